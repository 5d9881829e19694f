"""COMET on our transformer families (Shaier et al., ICLR 2025, on ViT and GPT-2; issue 14 §1) and time to dense
quality in wall-clock seconds (ours; issue 14 §5), from one set of runs.

A tiny ViT on scikit-learn's digits (8×8 images, 2×2 patches) and a tiny byte-level GPT-2 on the bundled
documentation text, each trained from scratch as (p is the keep rate, F the FFN width, 4 d):

* ``dense``: the stock transformers model (``ViTForImageClassification`` / ``GPT2LMHeadModel``).
* ``smaller``: the stock model with FFN width ``int(p F)``, as many units as COMET keeps.
* ``dropout``: dense with ``Dropout(1 - p)`` on the FFN's hidden activations.
* ``comet``: ``routing="comet"``, unit level, keep p; ``block_comet``: blocks of 16 units (``comet_block_size``).
* ``random_top1``: ``E = max(1, int(1 / p))`` experts of width ``int(p F)`` and a frozen random gate, hard top-1
  (``routing="topk"``, k = 1, the weight renormalised to 1, no balance loss).
* ``hash``: the same experts, ``routing="hash"`` (Roller et al. 2021): each token goes to the expert a fixed
  hash of its token id picks (ViT: of its patch position), weight 1, no router parameters, no balance loss; a
  second fixed-routing baseline beside ``random_top1`` whose routing ignores the hidden state.
* ``learned_top1``: the same experts, ``routing="switch"`` (the output scaled by the gate probability, so the gate
  learns); ``learned_top2``: ``max(2, int(2 / p))`` experts of width ``int(p F / 2)``, ``routing="topk"``, k = 2.
  Both with the Switch balance loss (0.01).

Every dropout of the stock models is 0, so ``dropout`` differs from ``dense`` only in the FFN; the same learning
rate (tuned for the dense model on the validation split, per family) and data order per seed for every variant.
Validation loss is measured every ``eval_every`` optimizer steps, with the cumulative seconds the optimizer steps
took (forward, backward and update; validation excluded), so one run gives both the per-update curve (§1) and the
wall-clock curve (§5). The test split is read once, at the end, with the same metric on ``eval_items`` fixed
training items (the generalisation gap).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

MODEL_VARIANTS = (
    "dense", "smaller", "dropout", "comet", "block_comet", "random_top1", "hash", "learned_top1", "learned_top2",
)  # fmt: skip
BLOCK_SIZE = 16


@dataclass(frozen=True)
class FamilySettings:
    """One family's sweep. ``keep_rates`` × ``variants`` are run, plus ``extra`` (variant, keep) pairs (§5's
    block-COMET at 0.25)."""

    family: str  # "vit" or "gpt2"
    hidden_size: int
    layers: int
    steps: int
    eval_every: int
    batch_size: int
    learning_rates: tuple[float, ...]
    keep_rates: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[str, ...] = MODEL_VARIANTS
    sweep_variants: tuple[str, ...] = MODEL_VARIANTS
    """Variants also run at the keep rates other than the middle one (the rest only at the middle one)."""
    extra: tuple[tuple[str, float], ...] = ()
    seq_len: int = 64
    eval_items: int = 256


# -- data ---------------------------------------------------------------------------------------------------------
def digits_split(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """scikit-learn's digits as (N, 1, 8, 8) pixels in [0, 1], fixed 60/20/20 train/validation/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    n = len(labels) // 5
    parts = {"test": order[:n], "validation": order[n : 2 * n], "train": order[2 * n :]}
    return {name: {"pixel_values": pixels[index], "labels": labels[index]} for name, index in parts.items()}


def text_split() -> dict[str, np.ndarray]:
    """The bundled documentation bytes, contiguous 80/10/10 train/validation/test."""
    from ..data import english_text_bytes

    data = english_text_bytes()
    first, second = int(len(data) * 0.8), int(len(data) * 0.9)
    return {"train": data[:first], "validation": data[first:second], "test": data[second:]}


# -- models -------------------------------------------------------------------------------------------------------
def _stock_config(settings: FamilySettings, ffn: int):
    d = settings.hidden_size
    if settings.family == "vit":
        return dict(image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=d,
                    num_hidden_layers=settings.layers, num_attention_heads=4, intermediate_size=ffn,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return dict(vocab_size=256, n_positions=settings.seq_len, n_embd=d, n_layer=settings.layers, n_head=4, n_inner=ffn,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip


def _ffn_activations(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of each FFN hidden activation of a stock model."""
    if isinstance(model, transformers.GPT2LMHeadModel):
        return [(block.mlp, "act") for block in model.transformer.h]
    return [(layer.mlp, "activation_fn") for layer in model.vit.layers]


def moe_fields(variant: str, keep: float, ffn: int) -> dict:
    """The MoE config fields of a routed variant at keep rate ``keep`` (FFN width ``ffn``)."""
    if variant in ("comet", "block_comet"):
        return dict(routing="comet", comet_keep_rate=keep, comet_block_size=BLOCK_SIZE if variant == "block_comet" else 1)
    if variant in ("random_top1", "hash", "learned_top1"):
        experts = max(1, int(1 / keep))
        fields = dict(num_experts=experts, moe_intermediate_size=max(1, int(keep * ffn)))
        if variant == "hash":  # top-1 by a fixed token-id hash: no router parameters, no aux loss to weight
            return fields | dict(routing="hash", num_experts_per_tok=1)
        if variant == "random_top1":
            return fields | dict(routing="topk", num_experts_per_tok=1, router_aux_loss_coef=0.0)
        return fields | dict(routing="switch", router_aux_loss_coef=0.01)
    if variant == "learned_top2":
        experts = max(2, int(2 / keep))
        return dict(routing="topk", num_experts=experts, num_experts_per_tok=2,
                    moe_intermediate_size=max(1, int(keep * ffn / 2)), router_aux_loss_coef=0.01)  # fmt: skip
    raise ValueError(f"variant={variant!r} is not routed; choose from {MODEL_VARIANTS}.")


def build(settings: FamilySettings, variant: str, keep: float, seed: int) -> nn.Module:
    """The ``variant`` model of ``settings.family`` at keep rate ``keep``, initialised from ``seed``."""
    if variant not in MODEL_VARIANTS:
        raise ValueError(f"variant={variant!r}; choose from {MODEL_VARIANTS}.")
    ffn = 4 * settings.hidden_size
    vit = settings.family == "vit"
    torch.manual_seed(seed)
    if variant in ("dense", "smaller", "dropout"):
        config_class = transformers.ViTConfig if vit else transformers.GPT2Config
        model_class = transformers.ViTForImageClassification if vit else transformers.GPT2LMHeadModel
        width = max(1, int(keep * ffn)) if variant == "smaller" else ffn
        model = model_class(config_class(**_stock_config(settings, width)))
        if variant == "dropout":
            for module, name in _ffn_activations(model):
                setattr(module, name, nn.Sequential(getattr(module, name), nn.Dropout(1 - keep)))
        return model
    config = transformers.AutoConfig.for_model("comet_vit" if vit else "comet_gpt2", routing_seed=seed,
                                               **_stock_config(settings, ffn), **moe_fields(variant, keep, ffn))  # fmt: skip
    auto = transformers.AutoModelForImageClassification if vit else transformers.AutoModelForCausalLM
    model = auto.from_config(config)
    if variant == "random_top1":  # a fixed random gate: hard top-1, never trained
        for name, parameter in model.named_parameters():
            if ".router." in f".{name}":
                parameter.requires_grad_(False)
    return model


# -- training -----------------------------------------------------------------------------------------------------
class _Data:
    """Training batches per seed and the fixed validation / test items of one family."""

    def __init__(self, settings: FamilySettings, seed: int):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(seed)
        if settings.family == "vit":  # the first ``eval_items`` images of validation and test (359 = all)
            self.parts = {name: {k: v[: settings.eval_items] if name != "train" else v for k, v in part.items()}
                          for name, part in digits_split().items()}  # fmt: skip
            self.parts["train_eval"] = {k: v[: settings.eval_items] for k, v in self.parts["train"].items()}
        else:
            from ..data import byte_windows

            text = text_split()
            self.text = torch.from_numpy(text["train"].astype(np.int64))
            self.parts = {name: {"input_ids": byte_windows(text[name], settings.seq_len, settings.eval_items, 1234)}
                          for name in ("validation", "test")}  # fmt: skip
            self.parts["train_eval"] = {"input_ids": byte_windows(text["train"], settings.seq_len, settings.eval_items,
                                                                  1234)}  # fmt: skip

    def batch(self) -> dict[str, torch.Tensor]:
        size = self.settings.batch_size
        if self.settings.family == "vit":
            train = self.parts["train"]
            index = torch.randint(len(train["labels"]), (size,), generator=self.generator)
            return {"pixel_values": train["pixel_values"][index], "labels": train["labels"][index]}
        starts = torch.randint(len(self.text) - self.settings.seq_len, (size,), generator=self.generator)
        ids = torch.stack([self.text[s : s + self.settings.seq_len] for s in starts.tolist()])
        return {"input_ids": ids, "labels": ids}


@torch.no_grad()
def evaluate(model: nn.Module, items: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean loss (and accuracy for images) over ``items``, in eval mode (no dropout, no aux loss)."""
    model.eval()
    losses, correct, count = [], 0, 0
    name = "pixel_values" if "pixel_values" in items else "input_ids"
    for start in range(0, len(items[name]), 128):
        chunk = {k: v[start : start + 128] for k, v in items.items()}
        if "pixel_values" in chunk:
            logits = model(pixel_values=chunk["pixel_values"]).logits
            losses.append(float(F.cross_entropy(logits, chunk["labels"], reduction="sum")))
            correct += int((logits.argmax(-1) == chunk["labels"]).sum())
            count += len(chunk["labels"])
        else:
            out = model(input_ids=chunk["input_ids"], labels=chunk["input_ids"])
            losses.append(float(out.loss) * len(chunk["input_ids"]))
            count += len(chunk["input_ids"])
    model.train()
    result = {"loss": sum(losses) / count}
    if name == "pixel_values":
        result["accuracy"] = correct / count
    return result


def overlap_correlations(model: nn.Module, items: dict[str, torch.Tensor]) -> list[float]:
    """Per MoE layer, Pearson r between two tokens' FFN-input cosine similarity and their COMET masks' Jaccard
    overlap (`hf_comet.training.plots.overlap_vs_similarity` on a fixed batch)."""
    from ..training.plots import overlap_vs_similarity

    inputs = {k: v[:64] for k, v in items.items() if k != "labels"}
    pairs = overlap_vs_similarity(model, inputs, num_pairs=2000, seed=0)
    result = []
    for layer in sorted(pairs):
        overlap, similarity = pairs[layer]
        ok = overlap.std() > 0 and similarity.std() > 0
        result.append(float(torch.corrcoef(torch.stack([overlap, similarity]))[0, 1]) if ok else math.nan)
    return result


def train_one(settings: FamilySettings, variant: str, keep: float, seed: int, learning_rate: float) -> dict:
    """Train one run; validation loss every ``eval_every`` steps against steps and training seconds, the test
    metrics once at the end; COMET runs also record the overlap-vs-similarity r per layer at init and trained."""
    data = _Data(settings, seed)
    model = build(settings, variant, keep, seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    validation = data.parts["validation"]
    record = {"trainable_parameters": sum(p.numel() for p in trainable), "curve_steps": [0], "curve_seconds": [0.0],
              "curve": [evaluate(model, validation)["loss"]]}  # fmt: skip
    if variant == "comet":
        record["overlap_r_init"] = overlap_correlations(model, validation)
    seconds = 0.0
    for step in range(1, settings.steps + 1):
        batch = data.batch()
        started = time.perf_counter()
        loss = model(**batch).loss  # in training mode the routers' weighted aux loss is part of it
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        if step % settings.eval_every == 0 or step == settings.steps:
            record["curve_steps"].append(step)
            record["curve_seconds"].append(seconds)
            record["curve"].append(evaluate(model, validation)["loss"])
    record["seconds"] = seconds
    record["seconds_per_step"] = seconds / settings.steps
    test = evaluate(model, data.parts["test"])  # read once
    record["test"] = test["accuracy"] if settings.family == "vit" else test["loss"]
    record["test_loss"] = test["loss"]
    train = evaluate(model, data.parts["train_eval"])  # the same metric on fixed training items: the generalisation gap
    record["train"] = train["accuracy"] if settings.family == "vit" else train["loss"]
    if variant == "comet":
        record["overlap_r_trained"] = overlap_correlations(model, validation)
    return record


__all__ = ["MODEL_VARIANTS", "FamilySettings", "build", "digits_split", "evaluate", "moe_fields", "text_split",
           "train_one"]  # fmt: skip
