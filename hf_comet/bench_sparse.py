"""``hf-comet bench sparse`` and ``hf-comet bench execution``: converted models against their source at the sizes users
run, and the crossovers `hf_comet.modeling.execution.choose_execution` uses.

* ``sparse``: random-init BERT-base, ViT-B/16 and GPT-2 small (stock transformers classes), each converted with
  `convert_to_moe` to block-COMET (keep 0.5 and 0.25, blocks of F/8 and F/16 units) and to learned top-k from a
  ``split`` conversion at the same active FFN width (8 slices, 4 or 2 per token); speedup = the dense model's time
  divided by the converted one's, for an encoder forward (BERT 8 x 128 tokens, ViT 8 images, eval), greedy decoding
  with the KV cache (GPT-2, batch 1 and 8) and a training step (GPT-2, AdamW, 4 x 256 tokens). Each workload also
  runs the dense model with its FFN skipped (`ffn_share`): the FFN's share of the dense time sets the most any
  conversion can gain on this machine (`speedup_limit`), printed beside the best conversion at each active width.
* ``execution``: at GPT-2 small's FFN shape, per-token slabs against the bucketed kernel over decoding-sized batches
  (the slab threshold), and masked dense compute against the kernel over the kept fraction of blocks (the dense-block
  threshold, forward + backward). ``--calibrate`` writes both to `hf_comet.modeling.execution.thresholds_path`.

Random weights time the same as trained ones (the kept blocks differ, not their number), so no download is needed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable

import torch

SPARSE_WORKLOADS = ("bert_forward", "vit_forward", "gpt2_decode_1", "gpt2_decode_8", "gpt2_train")


def _shapes(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, layers=2, heads=4, width=256, vocab=512, seq=32, image=32, patch=8, batch=2,
                    prompt=4, new_tokens=4, train_batch=2, train_seq=32)  # fmt: skip
    return dict(hidden=768, layers=12, heads=12, width=3072, vocab=50257, seq=128, image=224, patch=16, batch=8,
                prompt=16, new_tokens=16, train_batch=4, train_seq=256)  # fmt: skip


def candidates(width: int) -> dict[str, tuple[str, dict]]:
    """Candidate name -> (conversion method, MoE fields): block-COMET and split top-k at equal active width."""
    eighth, sixteenth = width // 8, width // 16
    return {
        f"block-COMET keep 0.5, b {eighth}": ("comet", {"comet_keep_rate": 0.5, "comet_block_size": eighth}),
        f"block-COMET keep 0.25, b {eighth}": ("comet", {"comet_keep_rate": 0.25, "comet_block_size": eighth}),
        f"block-COMET keep 0.25, b {sixteenth}": ("comet", {"comet_keep_rate": 0.25, "comet_block_size": sixteenth}),
        "split top-k 8x4 (= keep 0.5)": ("split", {"routing": "topk", "num_experts": 8, "num_experts_per_tok": 4}),
        "split top-k 8x2 (= keep 0.25)": ("split", {"routing": "topk", "num_experts": 8, "num_experts_per_tok": 2}),
    }


def kept_fraction(fields: dict) -> float:
    """The fraction of the FFN's units a candidate's token runs: the keep rate, or k of E slices."""
    if "comet_keep_rate" in fields:
        return fields["comet_keep_rate"]
    return fields["num_experts_per_tok"] / fields["num_experts"]


def _dense(workload: str, s: dict):
    import transformers

    if workload == "bert_forward":
        config = transformers.BertConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                         num_attention_heads=s["heads"], intermediate_size=s["width"],
                                         vocab_size=min(s["vocab"], 30522))  # fmt: skip
        return transformers.BertModel(config)
    if workload == "vit_forward":
        config = transformers.ViTConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                        num_attention_heads=s["heads"], intermediate_size=s["width"],
                                        image_size=s["image"], patch_size=s["patch"])  # fmt: skip
        return transformers.ViTForImageClassification(config)
    config = transformers.GPT2Config(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["width"],
                                     vocab_size=s["vocab"], n_positions=1024)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _runner(workload: str, model, s: dict) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(0)
    if workload == "bert_forward":
        ids = torch.randint(0, min(s["vocab"], 30522), (s["batch"], s["seq"]), generator=generator)
        model.eval()
        return lambda: _no_grad(lambda: model(input_ids=ids))
    if workload == "vit_forward":
        pixels = torch.randn(s["batch"], 3, s["image"], s["image"], generator=generator)
        model.eval()
        return lambda: _no_grad(lambda: model(pixel_values=pixels))
    if workload.startswith("gpt2_decode"):
        batch = int(workload.rsplit("_", 1)[1])
        ids = torch.randint(0, s["vocab"], (batch, s["prompt"]), generator=generator)
        model.eval()
        model.generation_config.pad_token_id = 0
        new = s["new_tokens"]
        return lambda: _no_grad(
            lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False)  # fmt: skip
        )
    ids = torch.randint(0, s["vocab"], (s["train_batch"], s["train_seq"]), generator=generator)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.optimizer = optimizer  # `ffn_share` keeps the FFN's update in the step it times without the FFN
    return step


def _no_grad(fn: Callable[[], object]) -> None:
    with torch.no_grad():
        fn()


def _ffn_modules(dense) -> list[tuple[torch.nn.Module, int]]:
    """The stock model's FFN modules with their output widths, found by its family's FFN weight keys (so the layout of
    any supported transformers release works): per layer the module holding both projections (GPT-2's ``mlp``,
    ViT's ``mlp``), or, where they sit apart (BERT), the up projection's parent (linear + activation) and the down
    linear alone (not the LayerNorm or residual beside it, which a converted model still runs)."""
    from .convert.core import family_of_model_type

    family = family_of_model_type(dense.config.model_type)
    state = dense.state_dict()
    paths: dict[int, dict[str, str]] = {}
    for key in state:
        where = family.ffn_key(key)
        if where is not None and where.kind == "weight":
            paths.setdefault(where.layer, {})[where.role] = key.rsplit(".", 1)[0]
    modules = []
    for layer in sorted(paths):
        up, down = paths[layer]["up"], paths[layer]["down"]
        width = family.linear_layout(state[f"{up}.weight"], "weight").shape[0]
        hidden = family.linear_layout(state[f"{down}.weight"], "weight").shape[0]
        up_parent, down_parent = up.rsplit(".", 1)[0], down.rsplit(".", 1)[0]
        if up_parent == down_parent:
            modules.append((dense.get_submodule(up_parent), hidden))
        else:
            modules += [(dense.get_submodule(up_parent), width), (dense.get_submodule(down), hidden)]
    return modules


@contextlib.contextmanager
def ffn_skipped(modules: list[tuple[torch.nn.Module, int]], optimizer: torch.optim.Optimizer | None = None):
    """Inside: each FFN module's forward returns zeros of its output's shape at once (no weight is read); an
    ``optimizer`` still updates the FFN's parameters (on zero gradients), as a converted model's step does."""

    def zeros(width):
        return lambda hidden, *args, **kwargs: hidden.new_zeros(*hidden.shape[:-1], width)

    handle = None
    if optimizer is not None:
        params = [p for module, _ in modules for p in module.parameters()]
        fill = [torch.zeros_like(p) for p in params]

        def zero_grads(opt, args, kwargs):
            for param, grad in zip(params, fill, strict=True):
                if param.grad is None:
                    param.grad = grad

        handle = optimizer.register_step_pre_hook(zero_grads)
    own = {}  # id -> (module, an instance-level forward it already had, or None)
    for module, width in modules:
        own.setdefault(id(module), (module, module.__dict__.get("forward")))
        module.forward = zeros(width)
    try:
        yield
    finally:
        for module, forward in own.values():
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        if handle is not None:
            handle.remove()


def ffn_share(run: Callable[[], object], modules: list[tuple[torch.nn.Module, int]], rounds: int) -> float:
    """The dense model's share of ``run``'s time that its FFN modules take, by ablation: 1 - (time of ``run`` with
    the FFN skipped, `ffn_skipped`) / (time of ``run``), the median of that ratio over ``rounds`` interleaved pairs
    (after one warm-up of each). The FFN's forward and backward are skipped, its optimizer update is kept (a converted
    model still pays it): what a conversion that keeps none of the FFN's work would save."""
    import time

    def timed(skip: bool) -> float:
        gc.collect()
        context = ffn_skipped(modules, getattr(run, "optimizer", None)) if skip else contextlib.nullcontext()
        with context:
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

    timed(False), timed(True)
    ratios = []
    for round_index in range(rounds):
        first = round_index % 2 == 1  # alternate which goes first
        without = timed(True) if first else None
        full = timed(False)
        without = timed(True) if without is None else without
        ratios.append(without / full)
    ratios.sort()
    return 1.0 - ratios[len(ratios) // 2]


def speedup_limit(share: float, kept: float) -> float:
    """The best speedup a conversion keeping ``kept`` of the FFN's work can reach when the FFN is ``share`` of the
    dense model's time and everything else costs what it did: 1 / (1 - share * (1 - kept))."""
    return 1.0 / (1.0 - share * (1.0 - kept))


def section_sparse(quick: bool, rounds: int, workloads: tuple[str, ...] = SPARSE_WORKLOADS) -> list[dict]:
    """Each workload: the stock dense model and its conversions, timed interleaved; speedup = dense / converted."""
    from .convert import convert_to_moe
    from .timing import interleaved

    s = _shapes(quick)
    out = []
    for workload in workloads:
        torch.manual_seed(0)
        dense = _dense(workload, s)
        models = {"dense (transformers)": dense}
        for name, (method, fields) in candidates(s["width"]).items():
            models[name] = convert_to_moe(dense, method, **fields)
        runs = {name: _runner(workload, model, s) for name, model in models.items()}
        measured = interleaved(runs, rounds=rounds)
        kept = {name: kept_fraction(fields) for name, (_, fields) in candidates(s["width"]).items()}
        rows = []
        for name, m in measured.items():
            speeds = [1 / r for r in m.ratios]
            rows.append({"name": name, "speedup": 1 / m.median_ratio, "range": f"{min(speeds):.2f}-{max(speeds):.2f}",
                         "seconds": m.median_seconds, "kept": kept.get(name), "speedups": speeds})  # fmt: skip
        share = ffn_share(runs["dense (transformers)"], _ffn_modules(dense), rounds)
        out.append({"workload": workload, "rows": rows, "ffn_share": share})
        del models, runs, dense
        gc.collect()
    return out


WORKLOAD_TITLES = {
    "bert_forward": "BERT-base encoder forward, batch 8 x 128 tokens, eval",
    "vit_forward": "ViT-B/16 forward, batch 8 images, eval",
    "gpt2_decode_1": "GPT-2 small greedy decode, KV cache, batch 1",
    "gpt2_decode_8": "GPT-2 small greedy decode, KV cache, batch 8",
    "gpt2_train": "GPT-2 small training step, AdamW, batch 4 x 256",
}


def markdown_sparse(section: list[dict]) -> list[str]:
    """The ``sparse`` section: a table with a row per workload and a column per conversion (speedup, min-max), then
    the limits the dense model's measured FFN share sets and how close the best conversion at each width comes."""
    if not section:
        return []
    names = [row["name"] for row in section[0]["rows"][1:]]
    lines = ["**Converted models against their source** (speedup = dense time / converted time; higher is faster; "
             "random-init weights at the real sizes, `convert_to_moe`)", "",
             "| workload | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for case in section:
        cells = [f"{row['speedup']:.2f} ({row['range']})" for row in case["rows"][1:]]
        lines.append(f"| {WORKLOAD_TITLES[case['workload']]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines + _markdown_limits(section) + _markdown_goals(section)


def _markdown_limits(section: list[dict]) -> list[str]:
    """Per workload whose FFN share was measured: the share, and per active width the limit it sets, the best
    conversion's median speedup and that as a fraction of the limit."""
    measured = [case for case in section if case.get("ffn_share") is not None]
    widths = sorted({row["kept"] for case in measured for row in case["rows"] if row.get("kept")}, reverse=True)
    if not measured or not widths:
        return []
    head = "".join(f" keep {w:g}: limit | best | of limit |" for w in widths)
    lines = ["**What the FFN's share allows** (share = 1 - the dense model's time with its FFN modules skipped / its "
             "time, median over the rounds; limit = 1 / (1 - share x (1 - keep)), everything else costing what it "
             "did; best = the best conversion at that active width, median speedup)", "",
             "| workload | FFN share of the dense time |" + head, "|---|---|" + "---|---|---|" * len(widths)]  # fmt: skip
    for case in measured:
        share = case["ffn_share"]
        cells = []
        for width in widths:
            limit = speedup_limit(share, width)
            best = max(row["speedup"] for row in case["rows"] if row.get("kept") == width)
            cells.append(f" {limit:.2f} | {best:.2f} | {best / limit:.0%} |")
        lines.append(f"| {WORKLOAD_TITLES[case['workload']]} | {share:.0%} |" + "".join(cells))
    return [*lines, ""]


SPARSE_GOALS: dict[str, dict[float, float]] = {
    "bert_forward": {0.5: 1.4, 0.25: 1.85},
    "vit_forward": {0.5: 1.4, 0.25: 1.85},
    "gpt2_decode_1": {0.5: 1.25, 0.25: 1.45},
    "gpt2_train": {0.5: 1.3, 0.25: 2.0},
}
"""Issue 20's goals: workload -> {active width: speedup over the source}, at the best block size (about 95 % of the
limits the FFN's share of the FLOPs or weights read sets)."""
GOAL_LEVEL = 0.95


def goal_verdicts(section: list[dict], goals: dict[str, dict[float, float]] = SPARSE_GOALS) -> list[dict]:
    """Per workload with goals and per active width: ``met`` when some conversion at that width has the lower bound
    of its median speedup's interval (`median_interval` over the paired per-round speedups, at 95 % Bonferroni-
    corrected over the conversions at that width) at or above the goal, ``not met`` when every conversion's upper
    bound is below it, ``inconclusive`` otherwise (too few rounds for an interval included: at least 7 with 2 or 3
    conversions per width). Each verdict names the conversion that decides it: the highest lower bound when met,
    else the highest upper bound. The intervals are within one run: they do not cover what moves between runs on a
    shared machine."""
    from .timing import median_interval

    out = []
    for case in section:
        for keep, goal in goals.get(case["workload"], {}).items():
            rows = [row for row in case["rows"] if row.get("kept") == keep and row.get("speedups")]
            if not rows:
                continue
            level = 1 - (1 - GOAL_LEVEL) / len(rows)
            judged = [(row, *median_interval(row["speedups"], level)) for row in rows]
            if any(low >= goal for _, low, _ in judged):
                verdict, bound = "met", 1  # shown: the conversion whose lower bound clears the goal by most
            elif all(high < goal for _, _, high in judged):
                verdict, bound = "not met", 2  # shown: the one that comes closest
            else:
                verdict, bound = "inconclusive", 2  # shown: the one whose interval reaches highest
            row, low, high = max(judged, key=lambda entry: (entry[bound] if entry[bound] == entry[bound] else -1.0,
                                                            entry[0]["speedup"]))  # fmt: skip
            out.append({"workload": case["workload"], "keep": keep, "goal": goal, "verdict": verdict,
                        "name": row["name"], "speedup": row["speedup"], "low": low, "high": high, "level": level})  # fmt: skip
    return out


def _markdown_goals(section: list[dict]) -> list[str]:
    """The `goal_verdicts` as a table: per workload and active width the goal, the verdict and the conversion that
    decides it (the highest lower bound when met, else the highest upper bound), with its median and interval."""
    verdicts = goal_verdicts(section)
    if not verdicts:
        return []
    lines = ["**Against issue 20's goals** (best block size: **met** when some conversion's 95 % interval for its "
             "median speedup, order statistics of the paired per-round speedups Bonferroni-corrected over the "
             "conversions at that width, lies at or above the goal; **not met** when every conversion's lies below "
             "it; **inconclusive** otherwise. The intervals are within this run and do not cover the drift between "
             "runs on a shared machine)", "",
             "| workload | active width | goal | verdict | deciding conversion: median [interval] |",
             "|---|---|---|---|---|"]  # fmt: skip
    for entry in verdicts:  # 3 digits: a bound can sit within 0.005 of the goal
        interval = "[too few rounds]" if entry["low"] != entry["low"] else f"[{entry['low']:.3f}, {entry['high']:.3f}]"
        lines.append(f"| {WORKLOAD_TITLES[entry['workload']]} | keep {entry['keep']:g} | {entry['goal']:.2f} | "
                     f"**{entry['verdict']}** | {entry['name']}: {entry['speedup']:.2f} {interval} |")  # fmt: skip
    return [*lines, ""]


# -- execution thresholds -------------------------------------------------------------------------------------------
def _slab_crossover(rows: list[dict], key: str) -> float:
    """The most pairs per expert below which slabs always beat the bucketed kernel (``key``: their time ratio)."""
    losing = [r["pairs_per_expert"] for r in rows if r[key] >= 1.0]
    winning = [r["pairs_per_expert"] for r in rows if r[key] < 1.0]
    return max((p for p in winning if not losing or p < min(losing)), default=0.0)


def section_execution(quick: bool, rounds: int) -> dict:
    """Slabs vs the bucketed kernel over decoding-sized batches, masked dense vs the kernel over the kept fraction;
    the thresholds they imply (`ExecutionThresholds`)."""
    from .modeling.execution import ExecutionThresholds
    from .modeling.moe_kernels import FusedActivation, bucketed_experts, masked_activation, slab_experts, unit_major
    from .modeling.slab_kernel import native_library
    from .timing import interleaved

    hidden, width = (64, 256) if quick else (768, 3072)
    activation = FusedActivation("gelu_new")
    generator = torch.Generator().manual_seed(0)
    compiled = native_library() is not None
    slab_rows = []
    for experts in (8, 16):
        block = width // experts
        up = torch.randn(experts, block, hidden, generator=generator) * 0.02
        up_bias = torch.zeros(experts, block)
        down = unit_major(torch.randn(experts, hidden, block, generator=generator) * 0.02)  # as a decoding model's
        for top_k in (experts // 4, experts // 2):
            for tokens in (1, 2, 4, 8, 16, 32, 64):
                x = torch.randn(tokens, hidden, generator=generator)
                index = torch.randn(tokens, experts, generator=generator).topk(top_k, dim=-1).indices
                args = (x, index, None, up, up_bias, down, None, activation)
                runs = {"bucketed": lambda a=args: bucketed_experts(*a),
                        "loop": lambda a=args: slab_experts(*a, compiled=False)}  # fmt: skip
                if compiled:
                    runs["compiled"] = lambda a=args: slab_experts(*a)
                with torch.no_grad():
                    m = interleaved(runs, rounds=rounds, repeat=5)
                slab_rows.append({"experts": experts, "top_k": top_k, "tokens": tokens,
                                  "pairs_per_expert": tokens * top_k / experts,
                                  "slabs_vs_bucketed": m["compiled"].median_ratio if compiled else None,
                                  "loop_vs_bucketed": m["loop"].median_ratio})  # fmt: skip
    loop_max = _slab_crossover(slab_rows, "loop_vs_bucketed")
    slab_max = _slab_crossover(slab_rows, "slabs_vs_bucketed") if compiled else loop_max

    tokens = 64 if quick else 1024
    experts = 8
    block = width // experts
    up = (torch.randn(experts, block, hidden, generator=generator) * 0.02).requires_grad_()
    up_bias = torch.zeros(experts, block, requires_grad=True)
    down = (torch.randn(experts, hidden, block, generator=generator) * 0.02).requires_grad_()
    x = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    fraction_rows = []
    for top_k in range(2, experts):
        index = torch.randn(tokens, experts, generator=generator).topk(top_k, dim=-1).indices

        def kernel(index=index):
            bucketed_experts(x, index, None, up, up_bias, down, None, activation).sum().backward()

        def masked(index=index):
            mask = torch.zeros(tokens, experts).scatter_(1, index, 1.0).repeat_interleave(block, dim=1)
            h = torch.nn.functional.linear(x, up.reshape(width, hidden), up_bias.reshape(width))
            out = torch.nn.functional.linear(masked_activation(h, mask, activation), down.permute(1, 0, 2).reshape(hidden, width))
            out.sum().backward()

        m = interleaved({"kernel": kernel, "masked": masked}, rounds=rounds)
        fraction_rows.append({"fraction": top_k / experts, "masked_vs_kernel": m["masked"].median_ratio})
    masked_wins = [r["fraction"] for r in fraction_rows if r["masked_vs_kernel"] < 1.0]
    kernel_wins = [r["fraction"] for r in fraction_rows if r["masked_vs_kernel"] >= 1.0]
    # the largest kept fraction below which the kernel wins: blocks above it run masked
    fraction = max((f for f in kernel_wins if not masked_wins or f < min(masked_wins)), default=1.0 / experts)
    measured = ExecutionThresholds(dense_block_fraction=min(fraction, 1.0), slab_max_pairs_per_expert=slab_max,
                                   loop_slab_max_pairs_per_expert=loop_max)  # fmt: skip
    return {"slabs": slab_rows, "fractions": fraction_rows, "thresholds": measured.__dict__.copy(),
            "shape": {"hidden": hidden, "width": width}}  # fmt: skip


def markdown_execution(section: dict | None) -> list[str]:
    if not section:
        return []
    t = section["thresholds"]
    lines = [f"**Execution thresholds** (`hf-comet bench execution`; FFN {section['shape']['hidden']} -> "
             f"{section['shape']['width']}): per-token slabs win while the routed (token, expert) pairs are at most "
             f"{t['slab_max_pairs_per_expert']:g} x the experts on the compiled kernel "
             f"({t.get('loop_slab_max_pairs_per_expert', t['slab_max_pairs_per_expert']):g} x on the torch loop); "
             f"weight-1 blocks keeping more than {t['dense_block_fraction']:g} of the blocks run as masked dense "
             "compute.", "",
             "| experts | k | tokens | pairs / expert | compiled slabs / bucketed time | torch-loop slabs / bucketed |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    lines += [f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['pairs_per_expert']:g} | "
              f"{ratio(r['slabs_vs_bucketed'])} | {ratio(r.get('loop_vs_bucketed'))} |" for r in section["slabs"]]  # fmt: skip
    lines += ["", "| kept fraction of 8 blocks | masked dense / kernel time (fwd+bwd) |", "|---|---|"]
    lines += [f"| {r['fraction']:g} | {r['masked_vs_kernel']:.2f} |" for r in section["fractions"]]
    return [*lines, ""]


__all__ = ["SPARSE_GOALS", "SPARSE_WORKLOADS", "candidates", "goal_verdicts", "markdown_execution", "markdown_sparse",
           "section_execution", "section_sparse"]  # fmt: skip
