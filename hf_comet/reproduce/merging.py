"""Expert merging in task-incremental learning (Park 2024; methods.md §3.5): scikit-learn's digits split into 5 tasks
of 2 classes, learned one after another by a tiny ViT whose FFNs are top-2-of-8 MoE layers, with and without merging
the two most used experts into the least used one at every task boundary; the dense ViT trained the same way is the
replay-free baseline (no replay, no regulariser: plain sequential fine-tuning).

Task-incremental: the task is known at test time, so a sample is scored by the argmax over its task's two classes,
and training uses the current task's two logits only. After each task every task seen so far is evaluated on its
test samples; forgetting is the mean over the first four tasks of (best accuracy before the last task - final).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers

MERGING_VARIANTS = ("dense", "moe", "moe_merge")
TASKS = tuple((2 * t, 2 * t + 1) for t in range(5))


@dataclass(frozen=True)
class MergingSettings:
    steps_per_task: int
    seeds: tuple[int, ...]
    hidden_size: int = 32
    learning_rate: float = 2e-3
    batch_size: int = 32


def _model(variant: str, settings: MergingSettings, seed: int):
    shared = dict(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=settings.hidden_size,
                  num_hidden_layers=2, num_attention_heads=4, intermediate_size=4 * settings.hidden_size,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    if variant == "dense":
        return transformers.ViTForImageClassification(transformers.ViTConfig(**shared))
    config = transformers.AutoConfig.for_model("comet_vit", routing="topk", num_experts=8, num_experts_per_tok=2,
                                               **shared)  # fmt: skip
    return transformers.AutoModelForImageClassification.from_config(config)


def _task_accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, task: tuple[int, int]) -> float:
    keep = (labels == task[0]) | (labels == task[1])
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixels[keep]).logits[:, list(task)]
    model.train()
    return float((logits.argmax(-1) == (labels[keep] == task[1]).long()).float().mean())


def train_sequence(variant: str, settings: MergingSettings, seed: int) -> dict:
    """Learn the 5 tasks in order; ``accuracy[t][j]`` is task j's test accuracy after task t (j <= t)."""
    import hf_comet
    from hf_comet.data import digits_images

    train, test = digits_images(seed=0)  # one fixed split for every run, so runs pair by seed
    model = _model(variant, settings, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    accuracy, merges = [], []
    started = time.perf_counter()
    for t, task in enumerate(TASKS):
        if t > 0 and variant == "moe_merge":  # at the boundary: free the least used expert for the new task
            merged = hf_comet.merge_most_used_into_least_used(model)
            hf_comet.reset_merged_optimizer_state(optimizer, merged)
            merges.append([(m.layer_idx, list(m.sources), m.into) for m in merged])
        index = torch.nonzero((train["labels"] == task[0]) | (train["labels"] == task[1])).squeeze(-1)
        for _ in range(settings.steps_per_task):
            batch = index[torch.randint(len(index), (settings.batch_size,), generator=generator)]
            out = model(pixel_values=train["pixel_values"][batch])
            target = (train["labels"][batch] == task[1]).long()
            loss = F.cross_entropy(out.logits[:, list(task)], target)
            if getattr(out, "router_aux_loss", None) is not None:
                loss = loss + out.router_aux_loss  # the routers' weighted balance term, as in training mode
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy.append([_task_accuracy(model, test["pixel_values"], test["labels"], TASKS[j]) for j in range(t + 1)])
    final = accuracy[-1]
    forgetting = [max(accuracy[t][j] for t in range(j, len(TASKS) - 1)) - final[j] for j in range(len(TASKS) - 1)]
    return {
        "accuracy": accuracy,
        "average_after_task": [sum(row) / len(row) for row in accuracy],
        "test": sum(final) / len(final),
        "forgetting": sum(forgetting) / len(forgetting),
        "merges": merges,
        "seconds": time.perf_counter() - started,
    }


__all__ = ["MERGING_VARIANTS", "MergingSettings", "TASKS", "train_sequence"]
