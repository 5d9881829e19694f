"""``python -m benchmarks.sparsify_quality [gpt2|vit]``: what `hf_comet.convert.sparsify`'s levers keep before fine-tuning.

Trains a tiny dense model (byte-level GPT-2, 4 blocks, d 64, F 256, 1,500 AdamW steps on this repository's README and
design decisions; or a ViT, 2 blocks, on scikit-learn's digits, 600 steps), sparsifies it at keep 0.5 and 0.25 with
blocks of 32 units (F/8) for every (cluster, router) pair, and prints a markdown table of the deviation from the dense
model on held-out data: relative output error, argmax agreement, and the task's loss and accuracy (dense in brackets).
The calibration data are training inputs; seed 0, one thread. The numbers in docs/guides/conversion.md come from it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from hf_comet.convert.sparse import CLUSTERS, ROUTERS, deviation, sparsify

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32


def _gpt2() -> tuple[torch.nn.Module, dict, dict]:
    text = (ROOT / "README.md").read_bytes() + (ROOT / "docs" / "decisions.md").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    train, held = data[: int(len(data) * 0.85)], data[int(len(data) * 0.85) :]
    seq = 64

    def batch(source: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(source) - seq - 1, (size,), generator=generator)
        return torch.stack([source[i : i + seq] for i in starts])

    config = GPT2Config(vocab_size=256, n_positions=seq, n_embd=64, n_layer=4, n_head=4, n_inner=256,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(1500):
        ids = batch(train, 32, generator)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_ids = batch(held, 64, torch.Generator().manual_seed(2))
    return model.eval(), {"input_ids": batch(train, 64, torch.Generator().manual_seed(1))}, {
        "input_ids": held_ids,
        "labels": held_ids,
    }


def _vit() -> tuple[torch.nn.Module, dict, dict]:
    from hf_comet.data import digits_images

    train, test = digits_images()
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, num_labels=10)  # fmt: skip
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(600):
        index = torch.randint(0, train["pixel_values"].shape[0], (64,), generator=generator)
        loss = model(pixel_values=train["pixel_values"][index], labels=train["labels"][index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), {"pixel_values": train["pixel_values"][:512]}, {
        "pixel_values": test["pixel_values"],
        "labels": test["labels"],
    }


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    which = argv[0] if argv else "gpt2"
    start = time.perf_counter()
    dense, calibration, held = {"gpt2": _gpt2, "vit": _vit}[which]()
    print(f"{which}: trained in {time.perf_counter() - start:.0f} s; blocks of {BLOCK} units")
    print("| keep | cluster | router | relative error | argmax agreement | loss (dense) | accuracy (dense) |")
    print("|---|---|---|---|---|---|---|")
    for keep in (0.5, 0.25):
        for cluster in CLUSTERS:
            for router in ROUTERS:
                row = deviation(dense, sparsify(dense, keep, BLOCK, calibration, cluster=cluster, router=router), held)
                print(
                    f"| {keep} | {cluster} | {router} | {row['relative_error']:.3f} | {row['argmax_agreement']:.3f} "
                    f"| {row['eval_loss']:.3f} ({row['dense_eval_loss']:.3f}) "
                    f"| {row['accuracy']:.3f} ({row['dense_accuracy']:.3f}) |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
