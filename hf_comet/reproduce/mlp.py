"""The COMET paper's MLP experiment (Shaier et al., ICLR 2025; methods.md §1.2, §1.6) on scikit-learn's bundled
digits (classification) and diabetes (regression) data: COMET and the official code's baselines on one 4-layer MLP
skeleton ``in → N → N → N → out`` (three hidden layers of N units, softplus, the output layer never masked).

Variants (p is the keep rate, N the width):

* ``dense``: the MLP of width N (the official ``standard_model``).
* ``smaller``: width ``max(1, int(p N))``, as many units as COMET keeps (``smaller_model``).
* ``dropout``: dense with ``Dropout(1 - p)`` after every hidden activation (``dropout_model``).
* ``comet``: the official ``COMET`` model: frozen projections ``V_l`` (``nn.Linear``'s default init, no bias) whose
  k-winner-take-all masks keep ``k = max(1, floor(p N))`` units per sample, applied after the activation; the router
  chain reads the input, then its own masked state ``m_{l-1} * c_{l-1}`` (no norm, the official default).
* ``block_comet``: our extension on the same MLP: per hidden layer a frozen projection of the layer's input scores
  N / b blocks of b = 16 units (as our transformer blocks read the FFN input), and the top ``max(1, floor(p N / b))``
  blocks are kept.
* ``random_top1``: the official ``moe_non_trainable``: E = ``max(1, int(1 / p))`` whole-MLP experts of width
  ``int(p N)`` and a fixed random linear gate on the input, hard top-1.
* ``learned_top1`` / ``learned_top2``: E experts as above (top-2: ``max(2, int(2 / p))`` experts of width
  ``int(p N / 2)``, so as many active units), a trainable softmax gate on the input, top-k renormalised weights, and
  the Switch load-balancing loss (coefficient 0.01). The official ``moe_trainable`` passes no gradient to its gate
  (methods.md §1.6 pitfall), so "learned" is ours.
* ``top_k``: the official ``top_k_model`` ("trainable routing"): each hidden layer keeps the
  ``k = max(1, floor(p N))`` largest of its own activations ``softplus(a_l)`` per sample (mask computed without
  gradient), so the routing follows the trained weights; no extra parameters.
* ``layer_wise``: the official ``layer_wise_routing``: the mask of hidden layer l is the top-k of a frozen random
  projection ``V_l`` (``nn.Linear``'s default init, no bias; the same shapes as COMET's router, drawn in the same
  order, so a seed gives both the same ``V``) of the **backbone's** previous hidden layer (its masked output; the input
  for layer 1), instead of COMET's router chain.
* ``example_tied_dropout``: Maini et al. (2023) as the official code runs it: every training example has its own
  fixed Bernoulli(0.2) mask per hidden layer, drawn once at construction, with the first ``int(p N)``
  "generalisation" units always on; at evaluation (``model.eval()``) only those ``int(p N)`` units are on, for every
  input. No rescaling. Decision: the official code keys an example by two of its pixel values (two images that share
  them share a mask); we key it by its index in the training split, which ``train_one`` passes as
  ``example_index`` (a training-mode forward without it is refused).

Decision (docs/decisions.md#reproducing-the-papers): "4-layer MLP" is the official code's four linear layers (three
hidden), not four hidden layers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 16
BALANCE_COEF = 0.01
TIED_DROPOUT_RATE = 0.2  # the official example_tied_dropout's Bernoulli probability (run_models.py)
MLP_VARIANTS = (
    "dense", "smaller", "dropout", "comet", "block_comet", "random_top1", "learned_top1", "learned_top2", "top_k",
    "layer_wise", "example_tied_dropout",
)  # fmt: skip


@dataclass(frozen=True)
class Split:
    """Standardised features (fit on train) and targets of a fixed train / validation / test split."""

    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_outputs: int
    task: str  # "classification" or "regression"


def load_split(dataset: str, seed: int = 0) -> Split:
    """``"digits"`` (1,797 8×8 images, 10 classes) or ``"diabetes"`` (442 patients, 10 features, a disease score),
    both bundled with scikit-learn; 60/20/20 split with a fixed seed (the same for every run, so runs pair by seed)."""
    from sklearn import datasets

    if dataset == "digits":
        data = datasets.load_digits()
        x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    elif dataset == "diabetes":
        data = datasets.load_diabetes()
        x, y = data.data.astype(np.float32), data.target.astype(np.float32)
    else:
        raise ValueError(f"dataset={dataset!r} is not a bundled dataset; choose 'digits' or 'diabetes'.")
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = n_val = len(y) // 5
    parts = order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0) + 1e-6
    if dataset == "diabetes":  # standardise the target too, so MSE is in units of its spread
        y_mean, y_std = y[parts[0]].mean(), y[parts[0]].std()
        y = (y - y_mean) / y_std
    tensors = [(torch.from_numpy((x[p] - mean) / std), torch.from_numpy(y[p])) for p in parts]
    return Split(*tensors, num_outputs=10 if dataset == "digits" else 1,
                 task="classification" if dataset == "digits" else "regression")  # fmt: skip


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 on the ``k`` largest scores of each row (exactly k; the official ``>=`` threshold can keep more on ties)."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores)
    return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)


def _frozen_router(num_inputs: int, width: int) -> nn.ModuleList:
    """Three frozen bias-free projections ``V_1..V_3`` (``nn.Linear``'s default init), COMET's shapes."""
    router = nn.ModuleList(
        [nn.Linear(num_inputs, width, bias=False), nn.Linear(width, width, bias=False),
         nn.Linear(width, width, bias=False)]
    )  # fmt: skip
    return router.requires_grad_(False)


class MLP(nn.Module):
    """The skeleton: three hidden layers of ``width`` units with softplus, an unmasked output layer."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(num_inputs, width), nn.Linear(width, width), nn.Linear(width, width)])
        self.output = nn.Linear(width, num_outputs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def hidden(self, x: torch.Tensor, layer: int, masks: torch.Tensor | None = None) -> torch.Tensor:
        h = F.softplus(self.layers[layer](x))
        return self.dropout(h if masks is None else h * masks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        for layer in range(3):
            x = self.hidden(x, layer)
        return self.output(x), None


class CometMLP(MLP):
    """The official COMET MLP: a frozen linear router chain whose k-WTA masks gate the hidden units."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float):
        super().__init__(num_inputs, width, num_outputs)
        self.k = max(1, math.floor(keep_rate * width * (1 + 1e-9)))
        self.router = _frozen_router(num_inputs, width)

    @torch.no_grad()
    def masks(self, x: torch.Tensor) -> list[torch.Tensor]:
        masks, state = [], x
        for projection in self.router:
            scores = projection(state)
            mask = top_k_mask(scores, self.k)
            masks.append(mask)
            state = scores * mask  # the chain reads its own masked state, not the backbone's
        return masks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        masks = self.masks(x)
        for layer in range(3):
            x = self.hidden(x, layer, masks[layer])
        return self.output(x), None


class BlockCometMLP(MLP):
    """Block-COMET on the MLP: per layer a frozen projection of the layer's input picks whole blocks of units."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float, block_size: int = BLOCK_SIZE):
        super().__init__(num_inputs, width, num_outputs)
        self.block_size = block_size if width % block_size == 0 else 1
        blocks = width // self.block_size
        self.k = max(1, math.floor(keep_rate * blocks * (1 + 1e-9)))
        self.router = nn.ModuleList(
            [nn.Linear(num_inputs, blocks, bias=False), nn.Linear(width, blocks, bias=False),
             nn.Linear(width, blocks, bias=False)]
        )  # fmt: skip
        self.router.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        for layer in range(3):
            with torch.no_grad():
                mask = top_k_mask(self.router[layer](x), self.k).repeat_interleave(self.block_size, dim=-1)
            x = self.hidden(x, layer, mask)
        return self.output(x), None


class TopKActivationMLP(MLP):
    """The official ``top_k_model``: every hidden layer keeps the ``k`` largest of its own activations per sample."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float):
        super().__init__(num_inputs, width, num_outputs)
        self.k = max(1, math.floor(keep_rate * width * (1 + 1e-9)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        for layer in range(3):
            h = F.softplus(self.layers[layer](x))
            with torch.no_grad():
                mask = top_k_mask(h, self.k)
            x = h * mask
        return self.output(x), None


class LayerWiseRoutingMLP(MLP):
    """The official ``layer_wise_routing``: layer l's mask is the top-k of a frozen projection of the backbone's
    previous (masked) hidden layer, not of COMET's own router chain."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float):
        super().__init__(num_inputs, width, num_outputs)
        self.k = max(1, math.floor(keep_rate * width * (1 + 1e-9)))
        self.router = _frozen_router(num_inputs, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        for layer in range(3):
            with torch.no_grad():
                mask = top_k_mask(self.router[layer](x), self.k)
            x = self.hidden(x, layer, mask)
        return self.output(x), None


class ExampleTiedDropoutMLP(MLP):
    """Example-tied dropout (Maini et al., 2023; the official ``example_tied_dropout``): a fixed mask per training
    example (Bernoulli(``rate``) plus the first ``int(p N)`` units) in training, only those first units at evaluation.
    The masks are a buffer, so a checkpoint keeps them."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float, num_examples: int,
                 rate: float = TIED_DROPOUT_RATE):  # fmt: skip
        super().__init__(num_inputs, width, num_outputs)
        self.generalisation_units = int(keep_rate * width * (1 + 1e-9))
        masks = torch.bernoulli(torch.full((3, num_examples, width), rate))
        masks[:, :, : self.generalisation_units] = 1.0
        self.register_buffer("example_masks", masks)
        eval_mask = torch.zeros(width)
        eval_mask[: self.generalisation_units] = 1.0
        self.register_buffer("eval_mask", eval_mask)

    def forward(self, x: torch.Tensor, example_index: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if self.training and example_index is None:
            raise ValueError("example_tied_dropout in training mode needs example_index (each row's index in the "
                             "training split); call model.eval() to use the generalisation units only.")  # fmt: skip
        for layer in range(3):
            mask = self.example_masks[layer, example_index] if self.training else self.eval_mask
            x = self.hidden(x, layer, mask)
        return self.output(x), None


class MixtureMLP(nn.Module):
    """Whole-MLP experts with an input gate: fixed random top-1 (official ``moe_non_trainable``) or learned top-k
    (softmax, renormalised top-k weights, Switch load-balancing loss)."""

    def __init__(self, num_inputs: int, width: int, num_outputs: int, keep_rate: float, top_k: int, learned: bool):
        super().__init__()
        self.num_experts = max(top_k, int((top_k / keep_rate) * (1 + 1e-9)))
        expert_width = max(1, int(keep_rate * width / top_k))
        self.experts = nn.ModuleList([MLP(num_inputs, expert_width, num_outputs) for _ in range(self.num_experts)])
        self.gate = nn.Linear(num_inputs, self.num_experts, bias=False)
        self.gate.requires_grad_(learned)
        self.top_k, self.learned = top_k, learned

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = torch.stack([expert(x)[0] for expert in self.experts], dim=1)  # (B, E, out)
        logits = self.gate(x)
        if not self.learned:
            chosen = logits.argmax(-1)
            return outputs[torch.arange(len(x)), chosen], None
        probs = logits.float().softmax(-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        combined = (outputs.gather(1, index.unsqueeze(-1).expand(-1, -1, outputs.shape[-1])) * weights.unsqueeze(-1))
        fraction = F.one_hot(index, self.num_experts).float().mean(dim=(0, 1))
        balance = self.num_experts * torch.sum(fraction * probs.mean(0))
        return combined.sum(1), balance


def build(variant: str, num_inputs: int, width: int, num_outputs: int, keep_rate: float,
          num_examples: int | None = None) -> nn.Module:  # fmt: skip
    """One variant of `MLP_VARIANTS` (the module docstring says what each is); ``num_examples`` (the training split's
    size) is needed by ``example_tied_dropout`` only, which draws one mask per training example."""
    if variant not in MLP_VARIANTS:
        raise ValueError(f"variant={variant!r} is not an MLP variant; choose one of {', '.join(MLP_VARIANTS)}.")
    if variant == "dense":
        return MLP(num_inputs, width, num_outputs)
    if variant == "smaller":
        return MLP(num_inputs, max(1, int(keep_rate * width)), num_outputs)
    if variant == "dropout":
        return MLP(num_inputs, width, num_outputs, dropout=1.0 - keep_rate)
    if variant == "comet":
        return CometMLP(num_inputs, width, num_outputs, keep_rate)
    if variant == "block_comet":
        return BlockCometMLP(num_inputs, width, num_outputs, keep_rate)
    if variant == "random_top1":
        return MixtureMLP(num_inputs, width, num_outputs, keep_rate, top_k=1, learned=False)
    if variant in ("learned_top1", "learned_top2"):
        return MixtureMLP(num_inputs, width, num_outputs, keep_rate, top_k=int(variant[-1]), learned=True)
    if variant == "top_k":
        return TopKActivationMLP(num_inputs, width, num_outputs, keep_rate)
    if variant == "layer_wise":
        return LayerWiseRoutingMLP(num_inputs, width, num_outputs, keep_rate)
    if num_examples is None or num_examples < 1:
        raise ValueError(f"num_examples={num_examples!r}: example_tied_dropout needs the training split's size (a "
                         "positive int) to draw one mask per training example.")  # fmt: skip
    return ExampleTiedDropoutMLP(num_inputs, width, num_outputs, keep_rate, num_examples)


def evaluate(model: nn.Module, split: Split, part: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Accuracy (classification) or MSE in target standard deviations (regression) of ``model`` on ``part``."""
    model.eval()
    with torch.no_grad():
        prediction, _ = model(part[0])
    model.train()
    if split.task == "classification":
        return float((prediction.argmax(-1) == part[1]).float().mean())
    return float(F.mse_loss(prediction.squeeze(-1), part[1]))


def overlap_similarity_correlation(model: CometMLP, x: torch.Tensor, pairs: int = 2000, seed: int = 0) -> list[float]:
    """COMET's mechanism, per hidden layer: Pearson r between the cosine similarity of two inputs and the Jaccard
    overlap of their masks, over random input pairs (positive r: similar inputs share more units)."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randint(len(x), (pairs,), generator=g), torch.randint(len(x), (pairs,), generator=g)
    keep = first != second
    first, second = first[keep], second[keep]
    similarity = F.cosine_similarity(x[first], x[second], dim=-1).numpy()
    result = []
    for mask in model.masks(x):
        a, b = mask[first], mask[second]
        overlap = ((a * b).sum(-1) / ((a + b).clamp(max=1).sum(-1))).numpy()
        result.append(float(np.corrcoef(similarity, overlap)[0, 1]))
    return result


def train_one(
    variant: str, dataset: str, width: int, keep_rate: float, seed: int, steps: int, learning_rate: float,
    batch_size: int = 32, eval_every: int = 50,
) -> dict:
    """Train one variant with Adam for ``steps`` optimizer steps; the validation metric every ``eval_every`` steps and
    at the end, the test metric once at the end, and the final metric on the whole training split (eval mode: the
    generalisation gap is ``train - test``). COMET also records its overlap-vs-similarity correlations at init and
    after training."""  # fmt: skip
    split = load_split(dataset)
    torch.manual_seed(seed)
    model = build(variant, split.train[0].shape[1], width, split.num_outputs, keep_rate, len(split.train[1]))
    tied = isinstance(model, ExampleTiedDropoutMLP)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    record: dict = {"curve_steps": [], "curve": []}
    if isinstance(model, CometMLP):
        record["overlap_r_init"] = overlap_similarity_correlation(model, split.test[0])
    order = torch.Generator().manual_seed(seed)
    x, y = split.train
    start = time.perf_counter()
    batch_index = torch.randperm(len(y), generator=order)
    cursor = 0
    for step in range(1, steps + 1):
        if cursor + batch_size > len(y):
            batch_index, cursor = torch.randperm(len(y), generator=order), 0
        index = batch_index[cursor : cursor + batch_size]
        cursor += batch_size
        prediction, balance = model(x[index], example_index=index) if tied else model(x[index])
        if split.task == "classification":
            loss = F.cross_entropy(prediction, y[index])
        else:
            loss = F.mse_loss(prediction.squeeze(-1), y[index])
        if balance is not None:
            loss = loss + BALANCE_COEF * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            record["curve_steps"].append(step)
            record["curve"].append(evaluate(model, split, split.validation))
    record["seconds"] = time.perf_counter() - start
    record["test"] = evaluate(model, split, split.test)  # read once, at the end
    record["train"] = evaluate(model, split, split.train)
    record["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(model, CometMLP):
        record["overlap_r_trained"] = overlap_similarity_correlation(model, split.test[0])
    return record


__all__ = ["MLP_VARIANTS", "build", "load_split", "overlap_similarity_correlation", "train_one"]
