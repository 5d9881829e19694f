"""Multi-process training with Trainer: COMET ViT on scikit-learn's digits, data parallel over the launched ranks.

    torchrun --standalone --nproc_per_node 2 recipes/ddp_train.py [--routing topk] [--steps 200]
    accelerate launch --config_file recipes/accelerate_ddp_cpu.yaml recipes/ddp_train.py

Every rank trains the same model on its shard of each global batch; gradients are averaged (DDP), routing telemetry
is summed over ranks before it is logged, and expert merging (``--merge-every``) sums selection counts over ranks,
so the replicas stay identical. Rank 0 saves the model to ``--output-dir``.
"""

import argparse
import os

import torch
import transformers
from transformers import AutoConfig, TrainingArguments

import hf_comet  # noqa: F401  (registers the comet_* model types)
from hf_comet.data import digits_images
from hf_comet.training import CometTrainer, ExpertMergingCallback


class Rows(torch.utils.data.Dataset):
    def __init__(self, columns):
        self.columns = columns

    def __len__(self):
        return len(self.columns["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", default="comet")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--per-device-batch-size", type=int, default=32)
    parser.add_argument("--merge-every", type=int, default=None, help="expert merging every N steps (learned routers)")
    parser.add_argument("--output-dir", default="runs/ddp")
    args = parser.parse_args()
    config = AutoConfig.for_model(
        "comet_vit", routing=args.routing, image_size=8, patch_size=2, num_channels=1, num_labels=10,
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config)
    train, test = digits_images()
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.per_device_batch_size,
        learning_rate=2e-3, logging_steps=20, eval_strategy="steps", eval_steps=100, save_strategy="no",
        report_to="none", use_cpu=True, ddp_find_unused_parameters=False, seed=0,
    )  # fmt: skip
    callbacks = [ExpertMergingCallback(every_n_steps=args.merge_every)] if args.merge_every else []
    trainer = CometTrainer(
        model=model, args=training_args, train_dataset=Rows(train), eval_dataset=Rows(test), callbacks=callbacks
    )
    trainer.train()
    metrics = trainer.evaluate()  # collective: every rank evaluates its shard
    trainer.save_model(args.output_dir)  # rank 0 writes
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"world size {trainer.args.world_size}: {metrics}")


if __name__ == "__main__":
    main()
