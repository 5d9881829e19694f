"""Attentive gating and the sample-similarity regulariser (Krishnamurthy, Watkins & Gärtner 2023; methods.md §2): the
analogue of the authors' MNIST table on scikit-learn's 8×8 digits, 5 experts, over seeds.

The model is the paper's classifier-level MoE (§2.2), written here because the library's routers gate transformer
FFNs: expert e is a small conv net ending in class probabilities ``y_e``; the gate reads the input; the output is the
**clean mixture** ``Σ_e p_e y_e`` and the loss ``NLL(log(out + 1e-15))``. The authors' code applies a second softmax
to the mixture (a quirk, §2.2), which we do not. The attentive gate (§2.3) is ``Q = h_g W_q^T``,
``K_e = h_e W_k^T``, ``p = softmax_e(Q·K_e / sqrt(H))`` with ``h_g`` the gate trunk's output and ``h_e`` expert e's
last hidden layer (H = 32, shared bias-free maps). The regularisers are the library's: the importance loss
``w · cv_squared(Σ_batch p)`` (`hf_comet.modeling.moe_routers.cv_squared`, unbiased std as in the authors' code) and
L_s (`sample_similarity_loss`, raw pixel distances normalised by the maximum over the pairs it sees). Distillation
(§2.6): after the attentive + L_s run, its experts are frozen, a plain softmax gate is initialised from the attentive
gate's trunk with a new output layer, and only the gate trains on the task loss for as many steps; it is scored both
as a soft mixture and with its top-1 expert only (conditional computation).

Decisions where the paper or code leaves details open (also in docs/decisions.md):
- Architectures on 8×8 inputs: expert = conv 3×3 (1 channel, padding 1) → ReLU → fc 64→32 → ReLU (``h_e``) → fc
  32→10 → softmax; gate trunk = conv 3×3 (1 channel) → ReLU → fc 64→128 → ReLU → fc 128→32 (``h_g``, no ReLU, as
  the MNIST script); the plain gate adds ReLU → fc 32→5 → softmax. The single model is one expert. No max-pool: on
  8×8 it would leave 16 features (MNIST's pooled map has 169); in a trial run a pooled single expert reached ~7 %
  test error in 1,500 steps, an unpooled one ~3 % in 1,000.
- L_s sees 2,048 pairs per batch, drawn without replacement from the 8,128 distinct pairs of a batch of 128 (its own
  random stream per seed): an estimate of the mean over all pairs (normalised by the largest sampled distance) at a
  quarter of the cost; the pair distances were most of a step's time.
- Weights: no tuning; the authors' selected MNIST values. w_importance 0.2; L_s (β_s, β_d) = (1e-6, 1e-6) for the
  original gate and (1e-6, 1e-2) for the attentive gate, translated to the library's pair-mean form at *their* batch
  of 512 (β_s × 512² = 0.262; β_d unchanged), so the regulariser has the strength they used, whatever our batch.
- Adam 1e-3, no weight decay (the notebooks), batch 128, a fixed step budget, the final weights (no early stopping).
- Metrics (bits, §2.7) on the test split: I(E;Y) between the argmax-gate expert and that expert's argmax prediction,
  H_s the mean per-sample gate entropy, H_u the entropy of the mean gate. The authors report, of 10 runs, the one
  with the lowest *training* error; we report means over seeds and show that selection rule beside it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.moe_routers import cv_squared, sample_similarity_loss
from .core import ClaimResult, RunCache, code_version, plot_curves, register_claim, run_all
from .stats import SIGNIFICANCE, format_interval, holm, mean_interval, paired_test

VARIANTS = ("single", "original", "original_importance", "original_ls", "attentive", "attentive_ls")
"""The trained variants; the attentive + L_s run also distils its gate (row ``distilled``)."""
ROWS = (*VARIANTS, "distilled")
LABELS = {
    "single": "single model (expert-sized)", "original": "original gate", "original_importance":
    "original + importance (0.2)", "original_ls": "original + L_s (1e-6, 1e-6)", "attentive": "attentive",
    "attentive_ls": "attentive + L_s (1e-6, 1e-2)", "distilled": "distilled (attentive + L_s → plain gate)",
}  # fmt: skip
PAPER_MNIST = {  # methods.md §2.8: (test err, I(E;Y), H_s, H_u) of the authors' selected run
    "single": (0.096, None, None, None), "original": (0.038, 2.022, 0.092, 2.172),
    "original_importance": (0.032, 2.262, 0.061, 2.320), "original_ls": (0.029, 2.244, 0.051, 2.246),
    "attentive": (None, None, None, None), "attentive_ls": (0.032, 2.275, 0.039, 2.321),
    "distilled": (0.028, 2.191, 0.056, 2.319),
}  # fmt: skip
CLAIMED = ("original_ls", "attentive", "attentive_ls")
"""The rows the claim is about: L_s and the attentive gate against the original gate."""
THEIR_BATCH = 512
"""The authors' MNIST batch: their β_s multiplies a sum over B² pairs, the library's a mean, so ours is β_s · 512²."""


@dataclass(frozen=True)
class Settings:
    steps: int
    eval_every: int
    seeds: tuple[int, ...]
    batch_size: int = 128
    learning_rate: float = 1e-3
    num_experts: int = 5
    hidden: int = 32
    gate_hidden: int = 128
    ls_pairs: int = 2048
    """L_s pairs sampled per batch (of the B(B-1)/2 = 8,128 distinct pairs at B = 128): the distances dominate its cost."""
    w_importance: float = 0.2
    beta_original: tuple[float, float] = (1e-6, 1e-6)
    beta_attentive: tuple[float, float] = (1e-6, 1e-2)


FULL = Settings(steps=800, eval_every=50, seeds=(0, 1, 2, 3, 4))
QUICK = Settings(steps=2, eval_every=1, seeds=(0, 1), hidden=8, gate_hidden=16)


# -- data -------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def load_split(seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Digits as (N, 1, 8, 8) pixels in [0, 1] and labels: the 60/20/20 train/validation/test split of the other
    digits claims (same permutation), without standardisation, so L_s sees raw pixel distances as in the paper."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n = len(y) // 5
    parts = order[2 * n :], order[n : 2 * n], order[:n]
    return tuple((x[p], y[p]) for p in parts)


# -- the model --------------------------------------------------------------------------------------------------------
def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """nn.Linear's default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, for a stack of per-expert layers."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class Experts(nn.Module):
    """E independent small conv nets, batched: each has its own 1-channel 3×3 conv, fc 64→H and fc H→10."""

    def __init__(self, num_experts: int, hidden: int, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, num_experts, 3, padding=1)  # output channel e = expert e's own 1-channel conv
        self.w1, self.b1 = _uniform((num_experts, 64, hidden), 64), _uniform((num_experts, hidden), 64)
        self.w2, self.b2 = _uniform((num_experts, hidden, classes), hidden), _uniform((num_experts, classes), hidden)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities (B, E, C) and last hidden layers ``h_e`` (B, E, H)."""
        z = F.relu(self.conv(x)).flatten(2).transpose(0, 1)  # (E, B, 64)
        hidden = F.relu(torch.baddbmm(self.b1.unsqueeze(1), z, self.w1))  # (E, B, H)
        logits = torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2)
        return logits.softmax(-1).transpose(0, 1), hidden.transpose(0, 1)


class GateTrunk(nn.Module):
    """The gate network up to ``h_g``: conv (1 channel) → ReLU → fc 64→128 → ReLU → fc 128→H."""

    def __init__(self, hidden: int, gate_hidden: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, gate_hidden), nn.Linear(gate_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


class PlainGate(nn.Module):
    """The original MoE gate: ``softmax(fc(ReLU(h_g)))`` over the experts, from the input alone."""

    def __init__(self, trunk: GateTrunk, hidden: int, num_experts: int):
        super().__init__()
        self.trunk, self.out = trunk, nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor, expert_hidden: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.trunk(x))).softmax(-1)


class AttentiveGate(nn.Module):
    """§2.3: ``p = softmax_e(Q·K_e / sqrt(H))``, ``Q = h_g W_q^T``, ``K_e = h_e W_k^T`` (bias-free, shared by experts)."""

    def __init__(self, trunk: GateTrunk, hidden: int):
        super().__init__()
        self.trunk = trunk
        self.w_q, self.w_k = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, expert_hidden: torch.Tensor) -> torch.Tensor:
        query, keys = self.w_q(self.trunk(x)), self.w_k(expert_hidden)  # (B, H), (B, E, H)
        return (torch.einsum("bh,beh->be", query, keys) / math.sqrt(query.shape[-1])).softmax(-1)


class MixtureOfExperts(nn.Module):
    """§2.2 in its clean form: ``out = Σ_e p_e y_e`` (no second softmax). Returns (out, gate p, expert probabilities)."""

    def __init__(self, experts: Experts, gate: nn.Module | None):
        super().__init__()
        self.experts, self.gate = experts, gate

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs, hidden = self.experts(x)
        if self.gate is None:  # the single model: one expert, weight 1
            gates = probs.new_ones(probs.shape[:2])
        else:
            gates = self.gate(x, hidden)
        return (gates.unsqueeze(-1) * probs).sum(1), gates, probs


def build(variant: str, settings: Settings, seed: int) -> MixtureOfExperts:
    """The variant's model; for one seed every variant draws its experts first, from the same generator state."""
    torch.manual_seed(seed)
    if variant == "single":
        return MixtureOfExperts(Experts(1, settings.hidden), None)
    experts = Experts(settings.num_experts, settings.hidden)
    trunk = GateTrunk(settings.hidden, settings.gate_hidden)
    if variant.startswith("attentive"):
        return MixtureOfExperts(experts, AttentiveGate(trunk, settings.hidden))
    return MixtureOfExperts(experts, PlainGate(trunk, settings.hidden, settings.num_experts))


# -- metrics ----------------------------------------------------------------------------------------------------------
def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits over the last dim, with 0 log 0 = 0."""
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)


def decomposition_metrics(gates: torch.Tensor, expert_probs: torch.Tensor) -> dict[str, float]:
    """§2.7 in bits: ``I(E;Y)`` between the argmax-gate expert E and that expert's argmax prediction Y (empirical joint
    over the samples), ``H_s`` the mean per-sample entropy of the gate, ``H_u`` the entropy of the mean gate."""
    chosen = gates.argmax(-1)
    predicted = expert_probs[torch.arange(len(chosen)), chosen].argmax(-1)
    joint = torch.zeros(gates.shape[-1], expert_probs.shape[-1], dtype=torch.float64)
    joint.index_put_((chosen, predicted), torch.ones(len(chosen), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mutual = float((joint[nonzero] * (joint[nonzero] / independent[nonzero]).log2()).sum())
    return {"I_EY": mutual, "H_s": float(_entropy_bits(gates.double()).mean()),
            "H_u": float(_entropy_bits(gates.double().mean(0)))}  # fmt: skip


@torch.no_grad()
def evaluate(model: MixtureOfExperts, part: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Error of the mixture and of the top-1 expert alone (the argmax-gate expert's prediction), and the metrics."""
    x, y = part
    out, gates, probs = model(x)
    top1 = probs[torch.arange(len(y)), gates.argmax(-1)].argmax(-1)
    return {"error": float((out.argmax(-1) != y).float().mean()), "top1_error": float((top1 != y).float().mean()),
            **decomposition_metrics(gates, probs)}  # fmt: skip


# -- training ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _pairs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The B(B-1)/2 distinct pairs i < j of a batch. D and the gate products are symmetric and D is 0 on i = j, so
    the mean over them is ``B/(B-1)`` times the mean over the authors' B² ordered pairs."""
    first, second = torch.triu_indices(batch, batch, 1)
    return first, second


def library_betas(beta_s: float, beta_d: float, batch: int, their_batch: int = THEIR_BATCH) -> tuple[float, float]:
    """The authors' (β_s, β_d), set for batches of ``their_batch``, as `sample_similarity_loss` weights on the distinct
    pairs of a batch of ``batch``: their β_s multiplies a sum over their_batch² pairs (so × their_batch²), their β_d a
    mean; our mean over distinct pairs is ``batch/(batch-1)`` times the all-pairs mean (so × (batch-1)/batch)."""
    scale = (batch - 1) / batch
    return beta_s * their_batch**2 * scale, beta_d * scale


def _train(model: MixtureOfExperts, variant: str, settings: Settings, seed: int, parameters: list) -> dict:
    """Adam on the task loss (+ the variant's regulariser) for ``settings.steps``; validation error curve."""
    (x, y), validation, _ = load_split()
    optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    order = torch.Generator().manual_seed(seed)
    pair_order = torch.Generator().manual_seed(seed + 20_000)  # its own stream: batch order is the same for every variant
    first, second = _pairs(settings.batch_size)
    beta = settings.beta_attentive if variant.startswith("attentive") else settings.beta_original
    beta_s, beta_d = library_betas(*beta, settings.batch_size)
    curve_steps, curve = [], []
    batch_index, cursor = torch.randperm(len(y), generator=order), 0
    for step in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(y):
            batch_index, cursor = torch.randperm(len(y), generator=order), 0
        index = batch_index[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        out, gates, _ = model(x[index])
        loss = F.nll_loss(torch.log(out + 1e-15), y[index])
        if variant == "original_importance":
            loss = loss + settings.w_importance * cv_squared(gates.sum(0))
        elif variant.endswith("_ls"):
            pick = torch.randperm(len(first), generator=pair_order)[: settings.ls_pairs]
            loss = loss + sample_similarity_loss(x[index].flatten(1), gates, (first[pick], second[pick]), beta_s, beta_d)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % settings.eval_every == 0 or step == settings.steps:
            curve_steps.append(step)
            curve.append(evaluate(model, validation)["error"])
    return {"curve_steps": curve_steps, "curve": curve}


def _finish(model: MixtureOfExperts, record: dict, started: float) -> dict:
    train, _, test = load_split()
    record["seconds"] = time.perf_counter() - started
    record["train_error"] = evaluate(model, train)["error"]
    record["test"] = evaluate(model, test)  # read once, at the end
    return record


def distill(teacher: MixtureOfExperts, settings: Settings, seed: int) -> MixtureOfExperts:
    """§2.6: the teacher's experts, frozen, under a plain gate whose trunk starts as the attentive gate's trunk and
    whose output layer is new (seeded); only the gate will train."""
    experts = copy.deepcopy(teacher.experts).requires_grad_(False)
    torch.manual_seed(seed + 10_000)
    gate = PlainGate(copy.deepcopy(teacher.gate.trunk), settings.hidden, settings.num_experts)
    return MixtureOfExperts(experts, gate)


def train_one(variant: str, settings: Settings, seed: int) -> dict:
    """One run: train the variant; for ``attentive_ls`` also distil its gate into a plain one (``record["distilled"]``,
    its seconds counted in the run's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster than two on a shared 2-core VM
    try:
        return _train_one(variant, settings, seed)
    finally:
        torch.set_num_threads(threads)


def _train_one(variant: str, settings: Settings, seed: int) -> dict:
    started = time.perf_counter()
    model = build(variant, settings, seed)
    record = _finish(model, _train(model, variant, settings, seed, list(model.parameters())), started)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    if variant == "attentive_ls":
        started_distil = time.perf_counter()
        student = distill(model, settings, seed)
        trained = _train(student, "distilled", settings, seed + 10_000, list(student.gate.parameters()))
        record["distilled"] = _finish(student, trained, started_distil)
        record["seconds"] += record["distilled"]["seconds"]
    return record


# -- the claim --------------------------------------------------------------------------------------------------------
CLAIMED_EFFECT = {"H_s": 0.02, "error": 0.005}
"""The claimed effects, about half the paper's smallest MNIST improvement over the original gate (H_s 0.092 → 0.051
bits, error 3.8 % → 2.9 %, methods.md §2.8): 0.02 bits of H_s, half a point of test error."""


@register_claim(
    "attentive_gating",
    "Attentive gating and the sample-similarity regulariser: decomposition entropy and error",
    "Krishnamurthy, Watkins & Gärtner 2023 (methods.md §2.2–2.8)",
    "the paper's MNIST, FMNIST and CIFAR-10 tables (downloads; a GPU for CIFAR-10) select the best of 10 runs by training error; here bundled digits, means over seeds.",
)
def claim(cache_dir: Path, plots: Path, quick: bool, cached_only: bool = False) -> ClaimResult:
    """Every variant over the seeds, the MNIST-style table with paired tests against the original gate (Holm over the
    rows), the paper's numbers beside ours, and the verdict on H_s and test error for L_s and the attentive gate."""
    import sys

    from .stats import comparisons_table, holm_family, paired_comparison, verdict_text

    settings = QUICK if quick else FULL
    cache = RunCache(cache_dir, "attentive_gating", code_version(sys.modules[__name__]))
    specs = [dict(claim="attentive_gating", variant=v, seed=s, steps=settings.steps, eval_every=settings.eval_every,
                  batch_size=settings.batch_size, learning_rate=settings.learning_rate, hidden=settings.hidden,
                  gate_hidden=settings.gate_hidden) for v in VARIANTS for s in settings.seeds]  # fmt: skip
    records = run_all(specs, cache, lambda spec: train_one(spec["variant"], settings, spec["seed"]),
                      "attentive_gating", cached_only)  # fmt: skip
    groups = {v: sorted((r for r in records if r["spec"]["variant"] == v), key=lambda r: r["spec"]["seed"])
              for v in VARIANTS}  # fmt: skip
    groups["distilled"] = [r["distilled"] for r in groups["attentive_ls"]]

    def values(row: str, key: str) -> list[float]:
        return [r["test"][key] for r in groups[row]]

    metrics = ("error", "top1_error", "I_EY", "H_s", "H_u")
    compared = [row for row in ROWS if row != "original"]
    tests, adjusted = {}, {}
    for key in metrics:  # single has no gate: its entropies are 0 by construction and not tested
        rows = [row for row in compared if row != "single" or key in ("error", "top1_error")]
        tests[key] = {row: paired_test(values(row, key), values("original", key)) for row in rows}
        adjusted[key] = dict(zip(rows, holm([p for _, p in tests[key].values()]), strict=True))

    def cell(row: str, key: str) -> str:
        if row == "single" and key not in ("error", "top1_error"):
            return "–"
        text = format_interval(values(row, key), bounds=(0.0, 1.0) if "error" in key else (0.0, math.inf))
        if row in tests[key]:
            diff, _ = tests[key][row]
            star = " *" if adjusted[key][row] < SIGNIFICANCE else ""
            text += f" ({diff:+.3f}, p {adjusted[key][row]:.2g}){star}"
        return text

    seeds = list(settings.seeds)
    lines = [
        f"Data: scikit-learn's digits (8×8, bundled), the fixed 60/20/20 train/validation/test split of the other "
        f"digits claims (1,078 / 359 / 360 images), raw pixels in [0, 1]. {settings.num_experts} experts; seeds "
        f"{seeds} (initial weights and batch order; runs pair by seed). Adam lr {settings.learning_rate:g}, no weight "
        f"decay, batch {settings.batch_size}, {settings.steps} steps (~{settings.steps * settings.batch_size // 1078} "
        f"epochs), the final weights; the distilled gate trains {settings.steps} more steps on frozen experts. "
        "Validation error every "
        f"{settings.eval_every} steps (the curves); the test split is read once per run, at its end.",
        "",
        "Model (the paper's classifier-level MoE, §2.2, clean mixture `Σ p_e y_e`: the authors' code applies a second "
        "softmax to the mixture, we do not): expert = conv 3×3 (1 channel) → ReLU → fc 64→"
        f"{settings.hidden} → ReLU → fc {settings.hidden}→10 → softmax; gate trunk = conv 3×3 (1 channel) → ReLU "
        f"→ fc 64→{settings.gate_hidden} → ReLU → fc {settings.gate_hidden}→{settings.hidden}; original gate = trunk → "
        f"ReLU → fc → softmax; attentive gate = softmax(Q·K_e/√H), Q = h_g W_qᵀ, K_e = h_e W_kᵀ (H = {settings.hidden}). "
        f"Weights from the authors' MNIST selection, not tuned: importance {settings.w_importance:g}; L_s (β_s, β_d) = "
        f"{settings.beta_original} for the original gate, {settings.beta_attentive} for the attentive gate, with β_s "
        f"scaled by {THEIR_BATCH}² into the library's pair-mean form (`sample_similarity_loss`, {settings.ls_pairs} "
        "sampled pairs per batch).",
        "",
        "**Test metrics** (bits; maximum log2 5 = 2.32): mean [95 % interval] over seeds, and in brackets the mean "
        "paired difference to the original gate and its p-value after Holm's correction over the rows of that column "
        f"(* = significant at {SIGNIFICANCE}). Top-1 error: the argmax-gate expert's prediction alone.",
        "",
        "| model | test error | top-1 error | I(E;Y) | H_s | H_u |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        lines.append(f"| {LABELS[row]} | " + " | ".join(cell(row, key) for key in metrics) + " |")

    def paper(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    def selected(row: str) -> dict:  # the authors' rule: the run with the lowest training error
        return min(groups[row], key=lambda r: r["train_error"])

    lines += [
        "", "**Beside the paper** (MNIST, 5 experts, the authors' results CSV, methods.md §2.8; their row is the run "
        "with the lowest *training* error of 10, ours on the right the same rule over our seeds; ours on the left the "
        "mean over seeds). The paper's MNIST table has no plain attentive row; its attentive and distilled rows there "
        "are attentive + L_s (1e-6, 1e-2) and distilled from attentive + L_s (1e-6, 1e-3).", "",
        "| model | paper err | paper I(E;Y) | paper H_s | paper H_u | our mean err | our mean H_s | our selected err / "
        "I / H_s / H_u |", "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in ROWS:
        err, mi, hs, hu = PAPER_MNIST[row]
        pick = selected(row)["test"]
        ours_hs = "–" if row == "single" else f"{mean_interval(values(row, 'H_s'))[0]:.3f}"
        picked = (f"{pick['error']:.3f}" if row == "single" else
                  f"{pick['error']:.3f} / {pick['I_EY']:.2f} / {pick['H_s']:.3f} / {pick['H_u']:.2f}")  # fmt: skip
        lines.append(f"| {LABELS[row]} | {paper(err)} | {paper(mi)} | {paper(hs)} | {paper(hu)} | "
                     f"{mean_interval(values(row, 'error'))[0]:.3f} | {ours_hs} | {picked} |")  # fmt: skip
    # the verdict: for each claimed row, H_s lower and test error lower than the original gate, one Holm family of six
    claimed_tests = holm_family([
        paired_comparison(f"{LABELS[row]}: {key}", {r["spec"]["seed"]: r["test"][key] for r in groups[row]},
                          {r["spec"]["seed"]: r["test"][key] for r in groups["original"]}, -1, CLAIMED_EFFECT[key])
        for row in CLAIMED for key in ("H_s", "error")])  # fmt: skip
    lines += ["", f"**The comparisons the verdict rests on** (each claimed row minus the original gate, paired over "
              f"seeds; Holm over the six; claimed effects: H_s lower by {CLAIMED_EFFECT['H_s']:g} bits, test error by "
              f"{CLAIMED_EFFECT['error']:g}):", "", *comparisons_table(claimed_tests), ""]  # fmt: skip
    verdict = ("attentive gating and L_s lower the decomposition entropy (H_s) and the test error vs the original "
               "gate: " + verdict_text(claimed_tests, "comparisons"))
    distilled_err, distilled_p = tests["error"]["distilled"]
    collapsed = ", ".join(f"{LABELS[row]} {sum(h < 0.1 for h in values(row, 'H_u'))}/{len(groups[row])}"
                          for row in ROWS if row != "single")  # fmt: skip
    failed = [(r["spec"]["seed"], d) for r, d in zip(groups["attentive_ls"], groups["distilled"], strict=True)
              if d["train_error"] > 0.2]  # fmt: skip
    kept = [d["test"]["error"] for r, d in zip(groups["attentive_ls"], groups["distilled"], strict=True)
            if d["train_error"] <= 0.2]  # fmt: skip
    lines += [
        f"Distilled gate against the original gate: test error {distilled_err:+.3f} (p {adjusted['error']['distilled']:.2g}, "
        f"uncorrected {distilled_p:.2g}); as top-1 (one expert run per input) its error is "
        f"{format_interval(values('distilled', 'top1_error'), bounds=(0.0, 1.0))}. "
        + (("Distilled gates that did not learn to route (training error > 0.2): " + ", ".join(
            f"seed {s} (train {d['train_error']:.3f}, test {d['test']['error']:.3f})" for s, d in failed)
            + (f"; the other seeds' mean test error is {sum(kept) / len(kept):.3f}." if kept else "."))
           if failed else "Every distilled gate learned to route (training error ≤ 0.2)."), "",
        f"Expert use: seeds whose gate sends every test image to one expert (H_u < 0.1 bits): {collapsed}. Mean H_u: "
        + ", ".join(f"{LABELS[row]} {mean_interval(values(row, 'H_u'))[0]:.2f}" for row in ROWS if row != "single")
        + f" (of {math.log2(settings.num_experts):.2f}).", "",
        "Where our setting differs from the paper's: 8×8 digits with 1,078 training images instead of MNIST's 50,000 "
        "28×28 (no max-pool, so the experts' fc layers read 64 conv outputs, not 169); L_s on sampled pairs of "
        "each batch, not all; the clean mixture instead of the code's "
        "double softmax; batch 128 instead of 512 and a fixed number of steps (about "
        f"{settings.steps * settings.batch_size // 1078} epochs of this small set) instead of 20–100 MNIST epochs; no "
        "weight decay; our regulariser weights are the authors' MNIST choices, not re-tuned for digits; our rows are "
        f"means over {len(seeds)} seeds, theirs the minimum-training-error run of 10, which flatters every row "
        "(methods.md §2.10).", "",
    ]  # fmt: skip
    plot = plots / "attentive_gating_curves.png"
    plot_curves({LABELS[row]: groups[row] for row in ROWS}, plot,
                f"digits, {settings.num_experts} experts (distilled: gate-only steps)", "error")  # fmt: skip
    lines += [f"![validation error curves]({os.path.relpath(plot, plots.parent)})", ""]
    seconds = sum(r["seconds"] for r in records)
    return ClaimResult("attentive_gating", "", verdict, "\n".join(lines), seconds)


__all__ = ["FULL", "QUICK", "ROWS", "VARIANTS", "Settings", "build", "claim", "decomposition_metrics", "distill",
           "library_betas", "train_one"]  # fmt: skip
