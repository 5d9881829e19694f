"""PNG plots of a training run: loss curves, expert load per layer over training, COMET overlap vs similarity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..io import staged_path
from .statistics import statistics_paused


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """``fig.savefig`` atomically (`hf_comet.io.staged_path`): a failure or kill never leaves a partial image."""
    path = Path(path)
    with staged_path(path) as staging:
        fig.savefig(staging, dpi=110, format=path.suffix.lstrip(".") or "png")


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Training loss (solid) and evaluation loss (dashed, where logged) per step, one colour per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (name, history) in enumerate(histories.items()):
        colour = f"C{index}"
        train = [(e["step"], e["loss"]) for e in history if "loss" in e]
        evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
        if train:
            ax.plot(*zip(*train, strict=True), color=colour, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals, strict=True), color=colour, linestyle="--", marker="o", label=f"{name} eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_expert_load(routing_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One heatmap per MoE layer: load share of each expert (or COMET unit/block) over the logging windows.

    A balanced router is a flat colour at 1/E; dead experts are dark rows.
    """
    plt = _pyplot()
    layers = sorted({layer for entry in routing_history for layer in entry["tokens_per_expert"]}, key=int)
    fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(4.5 * max(1, len(layers)), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=False):
        columns, steps = [], []
        for entry in routing_history:
            counts = torch.tensor(entry["tokens_per_expert"][layer], dtype=torch.float64)
            if counts.sum() > 0:
                columns.append((counts / counts.sum()).tolist())
                steps.append(entry["step"])
        if not columns:
            continue
        share = torch.tensor(columns).T  # (experts, windows)
        image = ax.imshow(share.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(steps)))
        ax.set_xticklabels(steps, rotation=90, fontsize=6 if len(steps) > 12 else 8)
        ax.set_xlabel("step")
        ax.set_ylabel("expert" if share.shape[0] <= 64 else "FFN unit")
        if share.shape[0] <= 16:
            ax.set_yticks(range(share.shape[0]))
        ax.set_title(f"layer {layer}")
        fig.colorbar(image, ax=ax, label="load share")
    fig.suptitle(title or "expert load")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def overlap_vs_similarity(model, inputs: dict[str, torch.Tensor], num_pairs: int = 2000, seed: int = 0):
    """For random pairs of (non-padding) tokens of one batch, per MoE layer: the Jaccard overlap of their routing
    selections and the cosine similarity of their FFN inputs. Returns ``{layer: (overlaps, similarities)}``."""
    from ..modeling.moe_block import collect_routing
    from ..modeling.moe_statistics import pair_overlap_and_similarity

    was_training = model.training
    model.eval()
    try:
        with statistics_paused(model), collect_routing(inputs.get("attention_mask"), inputs.get("input_ids")) as collector:
            model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        model.train(was_training)
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for block, decision, batch_shape, tokens in collector.records:
        selection = decision.selection_mask(block.num_choices).cpu()
        tokens = tokens.float().cpu()
        mask = collector.token_mask(batch_shape)
        valid = torch.arange(tokens.shape[0]) if mask is None else mask.cpu().nonzero().flatten()
        if len(valid) < 2:
            continue
        first = valid[torch.randint(0, len(valid), (num_pairs,), generator=generator)]
        second = valid[torch.randint(0, len(valid), (num_pairs,), generator=generator)]
        keep = first != second
        first, second = first[keep], second[keep]
        result[block.layer_idx] = pair_overlap_and_similarity(selection, tokens, first, second)
    return result


def plot_overlap_vs_similarity(model, inputs: dict[str, torch.Tensor], path: str | Path, title: str = "") -> dict:
    """Scatter of routing overlap against input cosine similarity per MoE layer (COMET: similar inputs should share
    more units), with the Pearson correlation in each panel title. Returns ``{layer: correlation}``."""
    plt = _pyplot()
    pairs = overlap_vs_similarity(model, inputs)
    fig, axes = plt.subplots(1, max(1, len(pairs)), figsize=(4.5 * max(1, len(pairs)), 4), squeeze=False)
    correlations = {}
    for ax, (layer, (overlap, similarity)) in zip(axes[0], sorted(pairs.items()), strict=False):
        corr = float(torch.corrcoef(torch.stack([overlap, similarity]))[0, 1]) if overlap.std() > 0 else math.nan
        correlations[layer] = corr
        ax.scatter(similarity.numpy(), overlap.numpy(), s=4, alpha=0.35)
        ax.set_xlabel("cosine similarity of FFN inputs")
        ax.set_ylabel("routing overlap (Jaccard)")
        ax.set_title(f"layer {layer}: r = {corr:.2f}")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "routing overlap vs input similarity")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return correlations


__all__ = ["overlap_vs_similarity", "plot_expert_load", "plot_loss_curves", "plot_overlap_vs_similarity"]
