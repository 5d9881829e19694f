"""A hand-written training loop with a plain ``Accelerator()``: COMET ViT on scikit-learn's digits, data parallel.

    ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate_ddp_cpu.yaml recipes/accelerate_loop.py
    ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node 2 recipes/accelerate_loop.py
    python recipes/accelerate_loop.py                      # one process

On a machine with GPUs drop ``ACCELERATE_USE_CPU=true``. Without GPUs it is what makes a plain ``Accelerator()``
join the launched ranks' gloo group: otherwise every launched copy trains alone, silently (the recipe then warns;
docs/decisions.md, "Accelerate on CPU"). The model's ``loss`` already includes the router aux loss in training mode,
so the loop backpropagates ``outputs.loss`` as is. Evaluation gathers predictions with ``gather_for_metrics``; the
main process saves ``accelerator.get_state_dict(model)`` (the full weights, also under ``accelerate_fsdp.yaml`` on
GPUs) with ``save_pretrained`` and writes ``launch.json`` (what the ranks formed, for the tests).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from transformers import AutoConfig

import hf_comet  # noqa: F401  (registers the comet_* model types)
from hf_comet.data import digits_images
from hf_comet.training import reduce_routing_statistics, warn_if_launch_collapsed


class Rows(torch.utils.data.Dataset):
    def __init__(self, columns, n: int | None = None):
        self.columns = columns
        self.n = len(columns["labels"]) if n is None else n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def build_model(routing: str, hidden_size: int, layers: int) -> transformers.PreTrainedModel:
    """A small COMET (or other routing) ViT for 8 x 8 digits, initialised from seed 0 on every rank."""
    moe = {} if routing == "comet" else dict(num_experts=4, num_experts_per_tok=2)
    config = AutoConfig.for_model(
        "comet_vit", routing=routing, **moe, image_size=8, patch_size=4, num_channels=1, num_labels=10,
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=4 * hidden_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForImageClassification.from_config(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", default="comet")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--per-device-batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-examples", type=int, default=None, help="use the first N training images")
    parser.add_argument("--output-dir", default="runs/accelerate_loop")
    args = parser.parse_args()

    accelerator = Accelerator()  # plain: no cpu=True (the launch command decides)
    warn_if_launch_collapsed(accelerator.num_processes)
    model = build_model(args.routing, args.hidden_size, args.layers)
    train, test = digits_images()
    # no shuffling: each global batch is the next num_processes x per-device examples, whatever the process count
    train_loader = torch.utils.data.DataLoader(Rows(train, args.train_examples), batch_size=args.per_device_batch_size)
    test_loader = torch.utils.data.DataLoader(Rows(test), batch_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

    losses, step = [], 0
    model.train()
    while step < args.steps:
        for batch in train_loader:
            outputs = model(**batch)  # outputs.loss = task loss + router aux loss (training mode)
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(accelerator.gather(outputs.loss.detach()[None]).mean().item())  # mean over ranks
            step += 1
            if step == args.steps:
                break

    unwrapped = accelerator.unwrap_model(model)
    reduce_routing_statistics(unwrapped)  # training's window, summed over ranks: every rank calls it
    statistics = unwrapped.routing_statistics()

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in test_loader:
            predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(-1)
            predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += int((predictions == labels).sum())
            total += len(labels)
    ranks = accelerator.gather(torch.tensor([accelerator.process_index])).tolist()

    state_dict = accelerator.get_state_dict(model)  # collective: full weights also under FSDP (FULL_STATE_DICT)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
        record = {
            "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "gathered_ranks": ranks,
            "world_size_env": int(os.environ.get("WORLD_SIZE", 1)),
            "losses": losses,
            "accuracy": correct / total,
            "evaluated": total,
            "training_tokens_routed": {layer: stats["tokens"] for layer, stats in statistics.items()},
        }
        Path(args.output_dir, "launch.json").write_text(json.dumps(record, indent=1))
        print(f"num_processes {accelerator.num_processes}: accuracy {correct / total:.3f} on {total} test images")


if __name__ == "__main__":
    main()
