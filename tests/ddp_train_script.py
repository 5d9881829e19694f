"""Run by tests/test_training.py, once under ``torchrun --nproc_per_node 2`` and once as a single process: train a tiny
ViT on scikit-learn's digits with CometTrainer for a few steps and write what the test compares to OUT/rank{r}.json
and OUT/rank{r}.pt. Usage: python ddp_train_script.py OUT ROUTINGS PER_DEVICE_BATCH, ROUTINGS comma-separated: each
trains in turn in the same process group (one launch for all: each launch costs the imports), into OUT/ROUTING/."""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, TrainingArguments  # noqa: E402

import hf_comet  # noqa: E402, F401
from hf_comet.data import digits_images  # noqa: E402
from hf_comet.training import CometTrainer  # noqa: E402


class Digits(torch.utils.data.Dataset):
    def __init__(self, data, n):
        self.data, self.n = data, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": self.data["pixel_values"][i], "labels": self.data["labels"][i]}


def main():
    out, routings, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for routing in routings.split(","):
        os.makedirs(os.path.join(out, routing), exist_ok=True)
        train_one(os.path.join(out, routing), routing, batch)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # tear the gloo group down in order; left to interpreter exit, a rank sometimes aborted ("terminate called
        # without an active exception", SIGABRT) after writing its results
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def train_one(out, routing, batch):
    torch.manual_seed(0)
    moe = {} if routing == "comet" else dict(num_experts=4, num_experts_per_tok=2)  # fields COMET does not read
    config = AutoConfig.for_model(
        "comet_vit",
        routing=routing,
        **moe,
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.AutoModelForImageClassification.from_config(config)
    train, _ = digits_images()
    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        per_device_train_batch_size=batch,
        max_steps=4,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        train_sampling_strategy="sequential",
        ddp_find_unused_parameters=False,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = CometTrainer(model=model, args=args, train_dataset=Digits(train, 64))
    trainer.train()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    history = trainer.state.log_history
    record = {
        "world_size": world,
        "losses": [e["loss"] for e in history if "loss" in e],
        "routing_keys": sorted({k for e in history for k in e if k.startswith("routing/") or k == "router_aux_loss"}),
        "tokens_per_expert": [h["tokens_per_expert"] for h in trainer.routing_history],
        "ddp": type(trainer.model_wrapped).__name__,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    torch.save(model.state_dict(), os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
