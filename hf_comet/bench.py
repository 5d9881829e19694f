"""``hf-comet bench`` (also ``python -m benchmarks``): every speed and memory number the README quotes, in one run.

Each section times candidates side by side in this process: warm-up, then rounds in which every candidate runs once
in turn (interleaved, so a neighbour's load hits all alike), reported as the median and min-max of the per-round
ratio to the section's baseline. ``OMP_WAIT_POLICY=PASSIVE`` must be set before torch starts (the CLI re-executes
itself with it); threads are pinned with ``--threads``.

Sections:
* ``sgemm``: the machine's float32 GEMM rate (what "fraction of SGEMM" is relative to);
* ``blocks``: one FFN/MoE block forward and forward+backward: ours vs transformers' Qwen3-MoE sparse block (every
  experts implementation it has; SwiGLU experts of 2/3 the width, equal FLOPs), vs the dense FFN of equal active
  parameters (the family's activation, as transformers ships it, and with the fused activation), vs the COMET
  paper's masking code; saved-for-backward MiB; achieved fraction of SGEMM;
* ``selection``: exact k-of-F selection alternatives for unit COMET;
* ``training``: end-to-end training tokens/s of each family and routing vs the stock dense model;
* ``generation``: GPT-2 ``generate`` tokens/s with the KV cache, batch 1 and 8, each routing vs stock GPT-2;
* ``router``: how well the structured COMET router keeps the overlap-vs-similarity property of the full one;
* ``sparse``: converted models (block-COMET, split top-k) against their stock source at BERT-base, ViT-B/16 and
  GPT-2 small sizes: encoder forward, decoding, a training step (`hf_comet.bench_sparse`);
* ``execution``: the crossovers the execution choice uses; ``--calibrate`` saves them for every later process.

``--quick`` runs every section at toy sizes with one round (the tests run it; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .bench_arguments import SECTIONS, add_arguments  # the argument part, torch-free (``hf-comet bench --help``)
from .timing import Measured, interleaved

README_START = "<!-- hf-comet bench: start -->"
README_END = "<!-- hf-comet bench: end -->"


# -- timing (`hf_comet.timing`) ------------------------------------------------------------------------------------


def saved_for_backward_mib(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> float:
    """MiB of distinct tensor storage autograd keeps for backward during ``fn()``, parameters excluded."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = fn()
    del output
    return sum(storages.values()) / 2**20


# -- building blocks --------------------------------------------------------------------------------------------------
class DenseFFN(nn.Module):
    """The dense FFN ``act(x W1^T + b1) W2^T + b2``; ``activation`` a transformers ACT2FN name or a module."""

    def __init__(self, hidden: int, width: int, activation: nn.Module):
        super().__init__()
        self.fc_in = nn.Linear(hidden, width)
        self.fc_out = nn.Linear(width, hidden)
        self.act = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class PaperMaskedFFN(DenseFFN):
    """The COMET paper's masking (its reference code's shape): a random projection, the k-th largest score as a
    threshold (``>=``), a float mask multiplied into the activations, all in autograd."""

    def __init__(self, hidden: int, width: int, activation: nn.Module, keep_rate: float):
        super().__init__(hidden, width, activation)
        self.register_buffer("projection", torch.empty(width, hidden).uniform_(-(hidden**-0.5), hidden**-0.5))
        self.k = max(1, int(keep_rate * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ self.projection.t()
        threshold = scores.topk(self.k, dim=-1).values[..., -1:]
        mask = (scores >= threshold).float()
        return self.fc_out(self.act(self.fc_in(x)) * mask)


def comet_block(hidden: int, width: int, activation: str, **moe) -> nn.Module:
    """One of our MoE blocks (GPT-2 family, initialised as a model would be), in training mode."""
    from hf_comet.modeling.configuration_comet import CometGPT2Config
    from hf_comet.modeling.modeling_comet_gpt2 import CometGPT2Model

    implementation = moe.pop("experts_implementation", None)
    config = CometGPT2Config(
        n_embd=hidden, n_inner=width, n_layer=1, n_head=max(1, hidden // 64), vocab_size=8, n_positions=8,
        activation_function=activation, resid_pdrop=0.0, **moe,
    )
    model = CometGPT2Model(config)
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model.h[0].mlp.train()


def native_qwen3_block(hidden: int, expert_width: int, num_experts: int, top_k: int, implementation: str) -> nn.Module:
    """transformers' Qwen3-MoE sparse block (SwiGLU experts, softmax top-k router), for the given kernel."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=expert_width, num_experts=num_experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, experts_implementation=implementation,
    )
    config._experts_implementation = implementation
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.02)
    return block.train()


def swiglu_width(expert_width: int) -> int:
    """A SwiGLU width of (about) 2/3 of ``expert_width``, rounded down to a multiple of 8 (grouped_mm strides):
    three matrices of that width cost at most what our two of ``expert_width`` cost."""
    return max(8, (2 * expert_width // 3) // 8 * 8)


def _step(module: nn.Module, x: torch.Tensor, backward: bool) -> Callable[[], object]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> object:
        if not backward:
            with torch.no_grad():
                return module(x)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
        for p in params:
            p.grad = None
        return None

    return run


# -- sections ---------------------------------------------------------------------------------------------------------
def section_sgemm(quick: bool, rounds: int) -> dict:
    """Float32 GEMM GFLOP/s at the blocks' shape (one matmul, best of the rounds)."""
    m, k, n = (256, 64, 256) if quick else (2048, 768, 3072)
    a, b = torch.randn(m, k), torch.randn(k, n)
    res = interleaved({"sgemm": lambda: a @ b}, rounds=max(rounds, 3), repeat=3)
    seconds = min(res["sgemm"].seconds)
    return {"shape": [m, k, n], "gflops": 2 * m * k * n / seconds / 1e9}


@dataclass
class BlockCase:
    """One row group of the block table: a shape and the candidates compared at it (the first is the baseline)."""

    title: str
    tokens: int
    hidden: int
    candidates: dict[str, Callable[[], nn.Module]]
    flops: dict[str, float]  # forward GEMM FLOPs per candidate (what the SGEMM fraction uses)
    notes: str = ""


def block_cases(quick: bool) -> list[BlockCase]:
    """The block shapes of issue 12 (and at ``quick`` toy sizes)."""
    from transformers.activations import ACT2FN

    from hf_comet.modeling.moe_kernels import FusedActivation

    cases = []
    experts, top_k = 8, 2
    # learned top-k, two shapes
    topk_shapes = [(256, 1024, 2048, "gelu"), (768, 3072, 512, "gelu_new")]
    if quick:
        topk_shapes = [(32, 64, 64, "gelu")]
    for hidden, width, tokens, act in topk_shapes:
        glu = swiglu_width(width)
        cands: dict[str, Callable[[], nn.Module]] = {
            f"dense FFN, width {top_k * width} ({act}, as transformers ships it)": (
                lambda h=hidden, w=width, a=act: DenseFFN(h, top_k * w, ACT2FN[a])
            ),
            f"dense FFN, width {top_k * width}, fused activation": (
                lambda h=hidden, w=width, a=act: DenseFFN(h, top_k * w, FusedActivation(a))
            ),
        }
        for impl in ("bucketed", "grouped_mm", "eager"):
            cands[f"hf_comet topk E{experts} k{top_k} [{impl}]"] = (
                lambda h=hidden, w=width, a=act, i=impl: comet_block(
                    h, w * experts, a, routing="topk", num_experts=experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=w, experts_implementation=i,
                )
            )
        for impl in ("grouped_mm", "eager"):  # batched_mm gathers a weight matrix per token: GBs at these sizes
            cands[f"transformers Qwen3-MoE E{experts} k{top_k}, SwiGLU width {glu} [{impl}]"] = (
                lambda h=hidden, g=glu, i=impl: native_qwen3_block(h, g, experts, top_k, i)
            )
        dense_flops = 2 * tokens * hidden * top_k * width * 2
        flops = {name: float(dense_flops) for name in cands}
        cases.append(BlockCase(f"softmax top-k, E {experts}, k {top_k}: d {hidden}, expert width {width}, "
                               f"{tokens} tokens", tokens, hidden, cands, flops))
    # COMET at GPT-2-small width
    hidden, width, tokens = (32, 128, 64) if quick else (768, 3072, 2048)
    block = 32 if quick else 256
    cands = {
        "dense FFN (gelu_new, as GPT-2 ships it)": lambda: DenseFFN(hidden, width, ACT2FN["gelu_new"]),
        "dense FFN, fused activation": lambda: DenseFFN(hidden, width, FusedActivation("gelu_new")),
        "COMET paper's masking, keep 0.5": lambda: PaperMaskedFFN(hidden, width, ACT2FN["gelu_new"], 0.5),
        "hf_comet unit COMET, keep 0.5": lambda: comet_block(hidden, width, "gelu_new", comet_keep_rate=0.5),
        "hf_comet unit COMET, keep 0.5, structured router": lambda: comet_block(
            hidden, width, "gelu_new", comet_keep_rate=0.5, comet_router="structured"
        ),
    }
    flops = {name: 2 * tokens * hidden * width * 2.0 for name in cands}
    for name in list(cands)[2:5]:
        flops[name] *= 1.5 if "structured" not in name else 1.0  # + the F x d router GEMM
    for keep in (1.0, 0.5, 0.25, 0.125):
        name = f"hf_comet block-COMET b {block}, keep {keep:g}"
        cands[name] = lambda k=keep: comet_block(hidden, width, "gelu_new", comet_keep_rate=k, comet_block_size=block)
        flops[name] = 2 * tokens * hidden * width * 2.0 * max(keep, block / width)
    cases.append(BlockCase(f"COMET: d {hidden}, FFN width {width}, {tokens} tokens (GPT-2 activation)", tokens,
                           hidden, cands, flops))
    return cases


def section_blocks(quick: bool, rounds: int, sgemm_gflops: float) -> list[dict]:
    """Every block case, forward and forward+backward, with saved-for-backward MiB and the SGEMM fraction."""
    out = []
    for case in block_cases(quick):
        torch.manual_seed(0)
        x = torch.randn(1, case.tokens, case.hidden)  # (batch, tokens, d): every block takes this shape
        modules = {}
        for name, build in case.candidates.items():
            try:
                modules[name] = build()
            except Exception as error:  # noqa: BLE001 - a kernel this machine lacks: reported, not fatal
                print(f"  skipped {name}: {type(error).__name__}: {error}", file=sys.stderr)
        rows = {name: {} for name in modules}
        for mode, backward in (("forward", False), ("forward+backward", True)):
            xin = x.clone().requires_grad_(backward)
            runs = {name: _step(module, xin, backward) for name, module in modules.items()}
            measured = interleaved(runs, rounds=rounds)
            for name, m in measured.items():
                rows[name][mode] = {"ratio": m.median_ratio, "range": m.ratio_range(), "seconds": m.median_seconds}
                useful = case.flops[name] * (3 if backward else 1)
                rows[name][mode]["sgemm_fraction"] = useful / m.median_seconds / 1e9 / sgemm_gflops
        for name, module in modules.items():
            xin = x.clone().requires_grad_(True)
            exclude = [p for p in module.parameters()] + [b for b in module.buffers()] + [xin]
            rows[name]["saved_mib"] = saved_for_backward_mib(lambda m=module, v=xin: _first(m(v)), exclude)
        out.append({"title": case.title, "rows": rows})
        del modules
        gc.collect()
    return out


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def section_selection(quick: bool, rounds: int) -> list[dict]:
    """Exact k-of-F selection alternatives (T x F scores, keep 0.5) and the structured router's pair comparison,
    each producing the 0/1 float mask unit COMET multiplies by; ratio to one T x d x F router GEMM."""
    tokens, hidden, width = (64, 32, 128) if quick else (2048, 768, 3072)
    x, projection = torch.randn(tokens, hidden), torch.randn(width, hidden)
    scores = x @ projection.t()
    k = width // 2

    def by_topk():
        return torch.zeros_like(scores).scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, 1.0)

    def by_kthvalue():
        return (scores >= scores.kthvalue(width - k + 1, dim=-1, keepdim=True).values).to(scores.dtype)

    def by_sort():
        return (scores >= scores.sort(dim=-1, descending=True).values[:, k - 1 : k]).to(scores.dtype)

    def by_median():
        return (scores > scores.median(dim=-1, keepdim=True).values).to(scores.dtype)

    def pairs():
        from hf_comet.modeling.moe_routers import grouped_selection

        return grouped_selection(scores, 2, 1)

    candidates = {
        "router GEMM (T x d x F), for scale": lambda: x @ projection.t(),
        "topk (sorted=False) + scatter: ours, exact": by_topk,
        "kthvalue threshold, >= (ties inflate k)": by_kthvalue,
        "sort threshold, >= (ties inflate k)": by_sort,
        "median threshold (k = F/2 only; ties)": by_median,
        "structured router: keep 1 of each pair": pairs,
    }
    measured = interleaved(candidates, rounds=rounds)
    return [{"name": n, "ratio": m.median_ratio, "range": m.ratio_range()} for n, m in measured.items()]


def _tiny_training_models(family: str, quick: bool) -> tuple[dict[str, Callable[[], nn.Module]], Callable, int]:
    """(candidate name -> model factory, batch factory) for one family's training benchmark; the first is the
    stock dense model."""
    import transformers

    import hf_comet

    layers, hidden = (2, 32) if quick else (4, 128)
    width = 4 * hidden
    block = width // 4
    variants = {
        "COMET keep 0.5": {"routing": "comet", "comet_keep_rate": 0.5},
        "COMET keep 0.5, structured router": {"routing": "comet", "comet_keep_rate": 0.5, "comet_router": "structured"},
        f"block-COMET b {block}, keep 0.25": {"routing": "comet", "comet_keep_rate": 0.25, "comet_block_size": block},
        f"block-COMET b {block}, keep 0.5": {"routing": "comet", "comet_keep_rate": 0.5, "comet_block_size": block},
        "top-k 4x2": {"routing": "topk", "num_experts": 4, "num_experts_per_tok": 2},
        "switch 4": {"routing": "switch", "num_experts": 4},
        "noisy top-k 4x2": {"routing": "noisy_topk", "num_experts": 4, "num_experts_per_tok": 2},
        "attentive 4": {"routing": "attentive", "num_experts": 4},
        "deep 4": {"routing": "deep", "num_experts": 4},
    }
    batch, seq = (4, 16) if quick else (16, 128)

    def text_batch():
        ids = torch.randint(0, 256, (batch, seq))
        return {"input_ids": ids, "labels": ids}

    if family == "gpt2":
        common = dict(n_embd=hidden, n_layer=layers, n_head=4, n_inner=width, vocab_size=256, n_positions=seq)
        stock = lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**common))  # noqa: E731
        ours = lambda moe: hf_comet.CometGPT2ForCausalLM(hf_comet.CometGPT2Config(**common, **moe))  # noqa: E731
        make_batch, tokens = text_batch, batch * seq
    elif family == "bert":
        common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=width,
                      vocab_size=256, max_position_embeddings=seq)
        stock = lambda: transformers.BertForMaskedLM(transformers.BertConfig(**common))  # noqa: E731
        ours = lambda moe: hf_comet.CometBertForMaskedLM(hf_comet.CometBertConfig(**common, **moe))  # noqa: E731
        make_batch, tokens = text_batch, batch * seq
    else:
        image, patch = (16, 4) if quick else (32, 4)
        common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=width,
                      image_size=image, patch_size=patch, num_labels=10)
        stock = lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**common))  # noqa: E731
        ours = lambda moe: hf_comet.CometViTForImageClassification(hf_comet.CometViTConfig(**common, **moe))  # noqa: E731

        def make_batch():
            return {"pixel_values": torch.randn(batch, 3, image, image), "labels": torch.randint(0, 10, (batch,))}

        tokens = batch * ((image // patch) ** 2 + 1)
    factories = {"stock dense (transformers)": stock}
    factories.update({name: (lambda moe=moe: ours(moe)) for name, moe in variants.items()})
    return factories, make_batch, tokens


def section_training(quick: bool, rounds: int, families: tuple[str, ...] = ("gpt2", "vit", "bert")) -> list[dict]:
    """Training steps (forward, loss with aux losses, backward, AdamW) per second, as tokens/s ratios to stock."""
    out = []
    steps = 1 if quick else 3
    for family in families:
        factories, make_batch, tokens = _tiny_training_models(family, quick)
        torch.manual_seed(0)
        batches = [make_batch() for _ in range(steps)]
        runs = {}
        for name, factory in factories.items():
            torch.manual_seed(0)
            model = factory().train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def run(model=model, optimizer=optimizer, batches=batches):
                for b in batches:
                    loss = model(**b).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            runs[name] = run
        measured = interleaved(runs, rounds=rounds)
        rows = [
            {"name": n, "speed": 1 / m.median_ratio, "range": _inverse_range(m),
             "tokens_per_s": tokens * steps / m.median_seconds}
            for n, m in measured.items()
        ]
        out.append({"family": family, "tokens_per_step": tokens, "rows": rows})
    return out


def _inverse_range(m: Measured) -> str:
    return f"{1 / max(m.ratios):.2f}-{1 / min(m.ratios):.2f}" if m.ratios else "-"


def section_generation(quick: bool, rounds: int) -> list[dict]:
    """GPT-2 ``generate`` (greedy, KV cache) tokens/s at batch 1 and 8, each routing vs stock GPT-2."""
    import transformers

    import hf_comet

    layers, hidden, new_tokens, prompt = (2, 32, 4, 4) if quick else (4, 256, 32, 16)
    width = 4 * hidden
    common = dict(n_embd=hidden, n_layer=layers, n_head=4, n_inner=width, vocab_size=256, n_positions=128)
    variants = {
        "COMET keep 0.5": {"comet_keep_rate": 0.5},
        "COMET keep 0.5, structured router": {"comet_keep_rate": 0.5, "comet_router": "structured"},
        f"block-COMET b {width // 4}, keep 0.25": {"comet_keep_rate": 0.25, "comet_block_size": width // 4},
        "top-k 4x2": {"routing": "topk", "num_experts": 4, "num_experts_per_tok": 2},
        "switch 4": {"routing": "switch", "num_experts": 4},
    }
    out = []
    for batch in (1, 8):
        torch.manual_seed(0)
        ids = torch.randint(0, 256, (batch, prompt))
        models = {"stock GPT-2 (transformers)": transformers.GPT2LMHeadModel(transformers.GPT2Config(**common))}
        for name, moe in variants.items():
            models[name] = hf_comet.CometGPT2ForCausalLM(hf_comet.CometGPT2Config(**common, **moe))
        runs = {}
        for name, model in models.items():
            model.eval()
            model.generation_config.pad_token_id = 0

            def run(model=model, ids=ids):
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

            runs[name] = run
        measured = interleaved(runs, rounds=rounds)
        out.append({
            "batch": batch,
            "rows": [
                {"name": n, "speed": 1 / m.median_ratio, "range": _inverse_range(m),
                 "tokens_per_s": batch * new_tokens / m.median_seconds}
                for n, m in measured.items()
            ],
        })
    return out


def overlap_similarity_correlation(router: nn.Module, inputs: torch.Tensor, pairs: int, seed: int = 0) -> float:
    """Pearson r between the Jaccard overlap of two tokens' COMET masks and their inputs' cosine similarity."""
    from hf_comet.modeling.moe_statistics import pair_overlap_and_similarity

    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, inputs.shape[0], (pairs,), generator=generator)
    second = (first + 1 + torch.randint(0, inputs.shape[0] - 1, (pairs,), generator=generator)) % inputs.shape[0]
    with torch.no_grad():
        mask = router(inputs).unit_mask
    overlap, similarity = pair_overlap_and_similarity(mask, inputs, first, second)
    return float(torch.corrcoef(torch.stack([overlap.double(), similarity.double()]))[0, 1])


def section_router(quick: bool) -> list[dict]:
    """Overlap-vs-similarity correlation of the full and the structured COMET routers at init, on real inputs
    (scikit-learn's digits, centred, as 64-d token vectors; and the bundled text's byte-bigram counts)."""
    from sklearn.datasets import load_digits

    from hf_comet.modeling.configuration_comet import CometGPT2Config
    from hf_comet.modeling.moe_routers import CometRouter

    digits = torch.tensor(load_digits().data, dtype=torch.float32)
    digits = digits - digits.mean(0)
    datasets = {"digits (64-d pixels)": digits}
    rows = []
    pairs = 2000 if quick else 20000
    for data_name, inputs in datasets.items():
        hidden = inputs.shape[1]
        for router_kind, rank in (("full", 0), ("structured", 16), ("structured", 32), ("structured", 64)):
            for keep in (0.5, 0.25):
                config = CometGPT2Config(
                    n_embd=hidden, n_inner=4 * hidden, n_layer=1, comet_keep_rate=keep, comet_router=router_kind,
                    comet_router_rank=max(rank, 1),
                )
                values = []
                for seed in range(3):
                    config.routing_seed = seed
                    router = CometRouter(config, 0, hidden)
                    values.append(overlap_similarity_correlation(router, inputs, pairs, seed))
                rows.append({
                    "data": data_name, "router": router_kind if router_kind == "full" else f"structured, rank {rank}",
                    "keep": keep, "r": statistics.mean(values), "r_min": min(values), "r_max": max(values),
                })
    return rows


# -- targets and report -------------------------------------------------------------------------------------------
TARGETS = (
    # (description, section lookup, comparison, limit)
    ("top-k block fwd+bwd vs transformers' best native block (shape 1)", "topk_vs_native_0", "<=", 0.9),
    ("top-k block fwd+bwd vs transformers' best native block (shape 2)", "topk_vs_native_1", "<=", 0.9),
    ("top-k block fwd+bwd vs dense FFN of equal active parameters (shape 1)", "topk_vs_dense_0", "<=", 1.0),
    ("top-k block fwd+bwd vs dense FFN of equal active parameters (shape 2)", "topk_vs_dense_1", "<=", 1.0),
    ("unit COMET (full router) fwd+bwd vs dense", "comet_vs_dense", "<=", 1.2),
    ("unit COMET (structured router) fwd+bwd vs dense", "structured_vs_dense", "<=", 1.1),
    ("block-COMET keep 0.25 fwd+bwd vs dense", "block025_vs_dense", "<=", 0.30),
    ("tiny GPT-2 training tokens/s: COMET vs dense", "train_comet", ">=", 0.9),
    ("tiny GPT-2 training tokens/s: block-COMET keep 0.25 vs dense", "train_block025", ">=", 1.5),
    ("tiny GPT-2 training tokens/s: top-k 4x2 vs dense", "train_topk", ">=", 1.1),
    ("unit COMET saved-for-backward vs dense", "comet_saved", "<=", 1.05),
)


def target_values(report: dict, baseline: int) -> dict[str, float]:
    """The measured value of each target, from the report, against dense baseline row ``baseline`` of each block
    table (0: the dense FFN as transformers ships it; 1: the same FFN with the fused activation)."""
    values: dict[str, float] = {}
    cases = report.get("blocks", [])
    topk_cases = [case for case in cases if case["title"].startswith("softmax top-k")]
    comet_cases = [case for case in cases if case["title"].startswith("COMET")]
    for index, case in enumerate(topk_cases):
        rows = case["rows"]
        dense = list(rows.values())[baseline]["forward+backward"]["ratio"]
        ours = _pick(rows, "hf_comet topk", "[bucketed]")
        natives = [r["forward+backward"]["ratio"] for n, r in rows.items() if n.startswith("transformers")]
        if ours and natives:
            values[f"topk_vs_native_{index}"] = ours["forward+backward"]["ratio"] / min(natives)
            values[f"topk_vs_dense_{index}"] = ours["forward+backward"]["ratio"] / dense
    for case in comet_cases:
        rows = case["rows"]
        dense = list(rows.values())[baseline]
        unit = _pick(rows, "hf_comet unit COMET, keep 0.5", None, exclude="structured")
        structured = _pick(rows, "hf_comet unit COMET, keep 0.5, structured")
        block = _pick(rows, "hf_comet block-COMET", "keep 0.25")
        base = dense["forward+backward"]["ratio"]
        if unit:
            values["comet_vs_dense"] = unit["forward+backward"]["ratio"] / base
            values["comet_saved"] = unit["saved_mib"] / dense["saved_mib"]
        if structured:
            values["structured_vs_dense"] = structured["forward+backward"]["ratio"] / base
        if block:
            values["block025_vs_dense"] = block["forward+backward"]["ratio"] / base
    if baseline == 0:  # training is measured against the stock model only
        for family in report.get("training", []):
            if family["family"] != "gpt2":
                continue
            for row in family["rows"]:
                name = row["name"]
                if name == "COMET keep 0.5":
                    values["train_comet"] = row["speed"]
                elif name.startswith("block-COMET") and name.endswith("keep 0.25"):
                    values["train_block025"] = row["speed"]
                elif name == "top-k 4x2":
                    values["train_topk"] = row["speed"]
    return values


def _pick(rows: dict, prefix: str, contains: str | None = None, exclude: str | None = None) -> dict | None:
    for name, row in rows.items():
        if name.startswith(prefix) and (contains is None or contains in name) and (exclude is None or exclude not in name):
            return row
    return None


def markdown(report: dict, own_markers: tuple[str, ...] = ()) -> str:
    """The report as the README's speed section; the sections in ``own_markers`` are left out (they go between
    markers of their own, `replace_readme_sections`)."""
    meta = report["meta"]
    lines = [
        f"Measured {meta['date']} on {meta['machine']} ({meta['threads']} threads, float32, "
        f"`OMP_WAIT_POLICY=PASSIVE`, torch {meta['torch']}, transformers {meta['transformers']}) by "
        f"`{meta['command']}`: ratios to the first row of each table in the same process, median and min-max over "
        f"{meta['rounds']} interleaved rounds. SGEMM here: {report['sgemm']['gflops']:.0f} GFLOP/s.",
        "",
    ]
    for case in report.get("blocks", []):
        lines += [f"**{case['title']}** (time ratio; lower is faster)", "",
                  "| block | forward | forward + backward | saved for backward (MiB) | fwd+bwd % of SGEMM |",
                  "|---|---|---|---|---|"]
        for name, row in case["rows"].items():
            fwd, both = row.get("forward"), row.get("forward+backward")
            lines.append(
                f"| {name} | {fwd['ratio']:.2f} ({fwd['range']}) | {both['ratio']:.2f} ({both['range']}) | "
                f"{row['saved_mib']:.1f} | {100 * both['sgemm_fraction']:.0f} % |"
            )
        lines.append("")
    if report.get("selection"):
        lines += ["**Selecting k = F/2 of F units per token** (time ratio to one router GEMM)", "",
                  "| method | time |", "|---|---|"]
        lines += [f"| {row['name']} | {row['ratio']:.2f} ({row['range']}) |" for row in report["selection"]]
        lines.append("")
    for family in report.get("training", []):
        lines += [f"**Training, {family['family']}** ({family['tokens_per_step']} tokens per step; speed = tokens/s "
                  "relative to the stock dense model; higher is faster)", "",
                  "| model | speed | tokens/s |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['speed']:.2f} ({r['range']}) | {r['tokens_per_s']:.0f} |" for r in family["rows"]]
        lines.append("")
    for gen in report.get("generation", []):
        lines += [f"**Generation, GPT-2, batch {gen['batch']}** (greedy with the KV cache; speed relative to stock)",
                  "", "| model | speed | new tokens/s |", "|---|---|---|"]
        lines += [f"| {r['name']} | {r['speed']:.2f} ({r['range']}) | {r['tokens_per_s']:.0f} |" for r in gen["rows"]]
        lines.append("")
    if report.get("router"):
        lines += ["**Does the structured router keep COMET's property?** Pearson r of mask overlap (Jaccard) with "
                  "input cosine similarity over random pairs, at init, mean (min-max) over 3 seeds", "",
                  "| inputs | router | keep | r |", "|---|---|---|---|"]
        lines += [f"| {r['data']} | {r['router']} | {r['keep']:g} | {r['r']:.3f} ({r['r_min']:.3f}-{r['r_max']:.3f}) |"
                  for r in report["router"]]
        lines.append("")
    from .bench_sparse import markdown_execution, markdown_sparse

    if "sparse" not in own_markers:
        lines += markdown_sparse(report.get("sparse", []))
    if "execution" not in own_markers:
        lines += markdown_execution(report.get("execution"))
    if report.get("targets"):
        lines += ["**Targets of issue 12** (dense baseline as transformers ships it / with the fused activation; "
                  "the native-block and training targets do not depend on it)", "",
                  "| target | limit | vs stock dense | vs fused-activation dense |", "|---|---|---|---|"]

        def cell(result: dict | None) -> str:
            if result is None:
                return "-"
            status = "met" if result["met"] else f"**missed by {result['miss']:.2f}**"
            return f"{result['value']:.2f}, {status}"

        for t in report["targets"]:
            lines.append(f"| {t['target']} | {t['comparison']} {t['limit']:g} | {cell(t.get('stock'))} | "
                         f"{cell(t.get('fused'))} |")
        lines.append("")
    return "\n".join(lines)


def evaluate_targets(report: dict) -> list[dict]:
    """Each target with its value against the stock dense baseline and against the fused-activation dense one."""
    stock, fused = target_values(report, 0), target_values(report, 1)
    out = []
    for description, key, comparison, limit in TARGETS:
        if key not in stock:
            continue
        entry = {"target": description, "comparison": comparison, "limit": limit}
        for label, values in (("stock", stock), ("fused", fused)):
            if key in values:
                value = values[key]
                met = value <= limit if comparison == "<=" else value >= limit
                entry[label] = {"value": value, "met": met, "miss": 0.0 if met else abs(value - limit)}
        out.append(entry)
    return out


def section_markers(name: str) -> tuple[str, str]:
    """The markers of a section that has its own place in a page (``sparse``, ``execution``)."""
    return f"<!-- hf-comet bench {name}: start -->", f"<!-- hf-comet bench {name}: end -->"


def replace_readme_sections(readme: str, report: dict) -> str:
    """``readme`` with every section of ``report`` regenerated: ``sparse`` and ``execution`` between their own markers
    where the page has them (each with the run's measurement line), the rest between the main markers (left alone
    when the run measured none of it)."""
    from .bench_sparse import markdown_execution, markdown_sparse

    own = tuple(name for name in ("sparse", "execution") if name in report and section_markers(name)[0] in readme)
    renderers = {"sparse": lambda r: markdown_sparse(r["sparse"]), "execution": lambda r: markdown_execution(r["execution"])}
    for name in own:
        start, end = section_markers(name)
        first, last = readme.find(start), readme.find(end)
        if last < first:
            raise ValueError(f"the page's {start} marker has no {end} after it")
        text = "\n".join([markdown(report, own_markers=own).split("\n\n", 1)[0].rstrip(), "", *renderers[name](report)])
        readme = readme[: first + len(start)] + "\n" + text + "\n" + readme[last:]
    main = {"blocks", "selection", "training", "generation", "router", "sparse", "execution"} - set(own)
    if any(name in report for name in main):
        readme = replace_readme_section(readme, markdown(report, own_markers=own))
    return readme


def replace_readme_section(readme: str, section: str) -> str:
    """``readme`` with the text between the bench markers replaced by ``section``."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} section to regenerate")
    return readme[: start + len(README_START)] + "\n" + section + "\n" + readme[end:]


def run(sections: tuple[str, ...], quick: bool, rounds: int, threads: int, command: str) -> dict:
    """Run the chosen sections; the report as a dict (also what ``--json`` writes)."""
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    report: dict = {"meta": {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} CPUs", "threads": threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "rounds": rounds, "quick": quick, "command": command,
    }}
    report["sgemm"] = section_sgemm(quick, rounds)
    print(f"sgemm: {report['sgemm']['gflops']:.1f} GFLOP/s", file=sys.stderr)
    if "blocks" in sections:
        report["blocks"] = section_blocks(quick, rounds, report["sgemm"]["gflops"])
    if "selection" in sections:
        report["selection"] = section_selection(quick, rounds)
    if "training" in sections:
        report["training"] = section_training(quick, rounds)
    if "generation" in sections:
        report["generation"] = section_generation(quick, rounds)
    if "router" in sections:
        report["router"] = section_router(quick)
    if "sparse" in sections:
        from .bench_sparse import section_sparse

        report["sparse"] = section_sparse(quick, rounds)
    if "execution" in sections:
        from .bench_sparse import section_execution

        report["execution"] = section_execution(quick, rounds)
    report["targets"] = evaluate_targets(report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hf-comet bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv), argv)
    except ValueError as error:
        print(f"hf-comet bench: error: {error}", file=sys.stderr)
        return 2


def run_from_args(args: argparse.Namespace, argv: list[str]) -> int:
    """Validate, re-run under ``OMP_WAIT_POLICY=PASSIVE`` if it is not set, run, print and write the report."""
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown bench section(s) {unknown}; the sections are {', '.join(SECTIONS)}")
    if args.calibrate and args.sections and "execution" not in args.sections:
        raise ValueError("--calibrate saves what the execution section measures: add the section `execution`")
    if args.calibrate and args.quick:
        raise ValueError("--calibrate with --quick would save toy-size thresholds; drop --quick")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 7)
    if rounds < 1 or args.threads < 1:
        raise ValueError(f"--rounds and --threads must be at least 1 (got {rounds} and {args.threads})")
    from hf_comet.io import destination_file, write_failures

    if args.json is not None:  # refused before the run, not after it
        target = os.path.abspath(args.json)
        if os.path.isdir(target) or not os.path.isdir(os.path.dirname(target)):
            raise ValueError(f"--json {args.json!r} must be a file path in an existing folder")
    for flag, path in (("--json", args.json), ("--readme", args.readme)):
        if path is not None:  # a symlink, a folder, a name too long, a place that takes no new file: before the run
            destination_file(path, flag)
    if args.readme is not None:
        try:
            with open(args.readme, encoding="utf-8") as handle:
                replace_readme_section(handle.read(), "")
        except OSError as error:
            raise ValueError(f"cannot read --readme {args.readme!r}: {error}") from None
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and not os.environ.get("HF_COMET_BENCH_CHILD"):
        # libgomp reads the policy at start-up: re-run this process with it set
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_COMET_BENCH_CHILD": "1"}
        os.execve(sys.executable, [sys.executable, "-m", "hf_comet.bench", *argv], env)
    sections = tuple(args.sections) or SECTIONS
    command = ("hf-comet bench" + "".join(f" {name}" for name in args.sections) + (" --quick" if args.quick else "")
               + (f" --rounds {rounds}" if args.rounds else "") + (" --calibrate" if args.calibrate else ""))  # fmt: skip
    report = run(sections, args.quick, rounds, args.threads, command)
    text = markdown(report)
    print(text)
    from hf_comet.io import atomic_write_text

    if args.json:
        with write_failures(args.json, "--json"):
            atomic_write_text(args.json, json.dumps(report, indent=1))
    if args.calibrate:
        from .modeling.execution import thresholds_path

        path = thresholds_path()
        with write_failures(path, "--calibrate"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            atomic_write_text(path, json.dumps({"thresholds": report["execution"]["thresholds"],
                                                "measured": {"meta": report["meta"], **report["execution"]}}, indent=1))  # fmt: skip
        print(f"execution thresholds saved to {path}", file=sys.stderr)
    if args.readme:
        with open(args.readme, encoding="utf-8") as handle:
            readme = handle.read()
        with write_failures(args.readme, "--readme"):
            atomic_write_text(args.readme, replace_readme_sections(readme, report))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
