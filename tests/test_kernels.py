"""Our expert execution (issue 12): the bucketed top-k kernel, the masked activation, the fused activations and the
structured COMET router, each against a plain-autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

from hf_comet.bench import DenseFFN, overlap_similarity_correlation, saved_for_backward_mib
from hf_comet.modeling.moe_kernels import MASK_SENTINEL, FusedActivation, bucketed_experts, masked_activation
from hf_comet.modeling.moe_routers import CometRouter, grouped_selection, structured_groups

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


def reference_experts(x, index, weights, up, up_bias, down, down_bias, act):
    """Token by token, expert by expert, in autograd: what the kernel must equal."""
    rows = []
    for t in range(x.shape[0]):
        total = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = index[t, j]
            y = act(x[t] @ up[e].t() + up_bias[e]) @ down[e].t()
            if down_bias is not None:
                y = y + down_bias[e]
            total = total + (y if weights is None else y * weights[t, j])
        rows.append(total)
    return torch.stack(rows)


def _problem(num_tokens=11, hidden=6, width=10, experts=5, top_k=2, uniform=False, shared=False, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    x = param(num_tokens, hidden)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(num_tokens)])
    index[index == experts - 1] = 0 if top_k == 1 else index[index == experts - 1]  # k=1: the last expert idles
    weights = None if uniform else torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64)
    if weights is not None:
        weights.requires_grad_(True)
    up, up_bias, down = param(experts, width, hidden), param(experts, width), param(experts, hidden, width)
    down_bias = None if shared else param(experts, hidden)
    return x, index, weights, up, up_bias, down, down_bias


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_bucketed_kernel_matches_the_reference_in_output_and_every_gradient(activation, uniform, shared, top_k):
    x, index, weights, up, up_bias, down, down_bias = _problem(top_k=top_k, uniform=uniform, shared=shared)
    act = FusedActivation(activation)
    inputs = [t for t in (x, weights, up, up_bias, down, down_bias) if t is not None]
    ours = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, act)
    ref = reference_experts(x, index, weights, up, up_bias, down, down_bias, act)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("top_k", [1, 3])  # k=1: the last expert idles (an empty bucket)
def test_bucketed_inference_matches_the_reference_and_leaves_its_inputs_alone(activation, uniform, shared, top_k):
    """Under no_grad the kernel reuses its buffers (activation in place, outputs over the gathered rows): the result
    must still be the reference, and no tensor the caller passed may change."""
    problem = [t if t is None else t.detach() for t in _problem(top_k=top_k, uniform=uniform, shared=shared)]
    x, index, weights, up, up_bias, down, down_bias = problem
    before = [None if t is None else t.clone() for t in problem]
    act = FusedActivation(activation)
    with torch.no_grad():
        ours = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, act)
    torch.testing.assert_close(ours, reference_experts(x, index, weights, up, up_bias, down, down_bias, act),
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    for a, b in zip(problem, before, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(grad, top_k):
    x, index, weights, up, up_bias, down, down_bias = _problem(num_tokens=1, top_k=top_k)
    x, index, weights = x[:0], index[:0], weights[:0]  # no token at all
    with torch.set_grad_enabled(grad):
        out = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, FusedActivation("gelu"))
    assert out.shape == (0, x.shape[1])
    if grad:
        for g in torch.autograd.grad(out.sum(), [up, up_bias, down, down_bias]):
            assert torch.all(g == 0)


def test_an_expert_without_tokens_gets_an_exact_zero_gradient():
    x, index, weights, up, up_bias, down, down_bias = _problem(top_k=1, experts=4)
    assert not (index == 3).any()
    out = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, FusedActivation("gelu"))
    grads = torch.autograd.grad(out.sum(), [up, up_bias, down, down_bias])
    for grad in grads:
        assert torch.all(grad[3] == 0)
        assert grad[:3].abs().sum() > 0


def test_bucketed_kernel_gives_the_same_bits_on_every_run():
    torch.manual_seed(0)
    x = torch.randn(512, 32, requires_grad=True)
    index = torch.stack([torch.randperm(8)[:2] for _ in range(512)])
    weights = torch.rand(512, 2, requires_grad=True)
    up, up_bias = torch.randn(8, 64, 32, requires_grad=True), torch.randn(8, 64, requires_grad=True)
    down, down_bias = torch.randn(8, 32, 64, requires_grad=True), torch.randn(8, 32, requires_grad=True)
    act = FusedActivation("gelu_new")

    def run():
        out = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, act)
        return [out, *torch.autograd.grad(out.square().sum(), [x, weights, up, up_bias, down, down_bias])]

    first = run()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bucketed_kernel_under_autocast_runs_in_the_autocast_dtype_and_grads_reach_float32(dtype):
    x, index, weights, up, up_bias, down, down_bias = (
        t.detach().float().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in _problem()
    )
    act = FusedActivation("gelu")
    with torch.autocast("cpu", dtype=dtype):
        out = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, act)
    assert out.dtype == dtype
    ref = reference_experts(x, index, weights, up, up_bias, down, down_bias, act)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.2)
    out.float().sum().backward()
    for tensor in (x, weights, up, up_bias, down, down_bias):
        assert tensor.grad is not None and tensor.grad.dtype == torch.float32 and torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_masked_activation_equals_activation_times_mask_and_masked_units_get_exact_zero_gradient(activation):
    torch.manual_seed(0)
    act = FusedActivation(activation)
    h = (3 * torch.randn(40, 24, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.rand(40, 24) > 0.5).double()
    ours, ref = masked_activation(h, mask, act), act(h) * mask
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    grad = torch.randn_like(ours)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, h, grad), torch.autograd.grad(ref, h, grad)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0)
    assert torch.all(g_ours[mask == 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["gelu", "gelu_new", "relu"])
def test_the_mask_sentinel_is_an_exact_zero_of_the_activation_and_its_derivative(dtype, kind):
    act = FusedActivation(kind)
    sentinel = torch.full((4,), MASK_SENTINEL, dtype=dtype, requires_grad=True)
    value = act(sentinel)
    assert torch.all(value == 0)
    (grad,) = torch.autograd.grad(value, sentinel, torch.full_like(value, 1e4 if dtype != torch.float16 else 1e3))
    assert torch.all(grad == 0)
    assert torch.all(act.backward(torch.ones(4, dtype=dtype), sentinel.detach()) == 0)


def test_fused_gelu_new_is_transformers_gelu_new_within_rounding():
    x = torch.linspace(-12, 12, 20001)
    torch.testing.assert_close(FusedActivation("gelu_new")(x), ACT2FN["gelu_new"](x), rtol=1e-6, atol=1e-6)
    exact = ACT2FN["gelu_new"](x.double())
    half = x.bfloat16()  # in bf16 the fused kernel is the more accurate one (transformers rounds every step)
    fused_error = (FusedActivation("gelu_new")(half).double() - exact).abs().max()
    assert fused_error <= (ACT2FN["gelu_new"](half).double() - exact).abs().max()


def test_unit_comet_saves_no_more_for_backward_than_the_dense_ffn():
    from hf_comet.bench import comet_block

    x = torch.randn(1, 256, 64, requires_grad=True)
    dense = DenseFFN(64, 256, FusedActivation("gelu_new"))
    block = comet_block(64, 256, "gelu_new", comet_keep_rate=0.5)

    def saved(module):
        return saved_for_backward_mib(lambda: module(x), [*module.parameters(), *module.buffers(), x])

    assert saved(block) <= 1.0 * saved(dense)
    paper = DenseFFN(64, 256, FusedActivation("gelu_new"))  # act(h) * float mask in autograd keeps the mask too
    mask = (torch.rand(1, 256, 256) > 0.5).float()
    unfused = saved_for_backward_mib(lambda: paper.fc_out(paper.act(paper.fc_in(x)) * mask), [*paper.parameters(), x])
    assert unfused > saved(block)


# -- the default kernel inside the models ---------------------------------------------------------------------------
def _gpt2(routing, **fields):
    config = AutoConfig.for_model(
        "comet_gpt2", n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=64, n_positions=32, routing=routing,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **fields,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


ROUTINGS = {
    "topk": {"num_experts": 4, "num_experts_per_tok": 2},
    "switch": {"num_experts": 4, "capacity_factor": 1.0},
    "noisy_topk": {"num_experts": 4, "num_experts_per_tok": 2},
    "block_comet": {"comet_block_size": 16, "comet_keep_rate": 0.25},
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_bucketed_default_matches_transformers_kernels_in_a_training_step(routing):
    fields = dict(ROUTINGS[routing])
    name = "comet" if routing == "block_comet" else routing
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    results = {}
    for implementation in ("bucketed", "grouped_mm", "eager"):
        model = _gpt2(name, **fields)
        if implementation != "bucketed":
            model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        torch.manual_seed(5)  # the same router noise for noisy_topk
        out = model(ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    logits, grads = results["bucketed"]
    for other in ("grouped_mm", "eager"):
        torch.testing.assert_close(logits, results[other][0], rtol=1e-5, atol=1e-5)
        assert grads.keys() == results[other][1].keys()
        for key, grad in grads.items():
            torch.testing.assert_close(grad, results[other][1][key], rtol=1e-4, atol=1e-5)


def test_an_unknown_experts_implementation_names_ours_among_the_choices():
    with pytest.raises(ValueError, match="bucketed"):
        _gpt2("topk", **ROUTINGS["topk"]).set_experts_implementation("no_such_kernel")


# -- the structured COMET router -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("units", "active", "expected"), [(128, 64, (2, 1)), (128, 32, (4, 1)), (128, 96, (4, 3)), (128, 12, (0, 0)),
                                      (96, 36, (8, 3)), (128, 128, (0, 0))]
)
def test_structured_groups_keep_exactly_k_units(units, active, expected):
    assert structured_groups(units, active) == expected
    group, keep = expected
    if group:
        scores = torch.randn(9, units)
        mask = grouped_selection(scores, group, keep)
        assert torch.all(mask.sum(-1) == active)
        grouped_mask, grouped_scores = mask.view(9, -1, group), scores.view(9, -1, group)
        assert torch.all(grouped_mask.sum(-1) == keep)
        kept_min = torch.where(grouped_mask > 0, grouped_scores, torch.inf).amin(-1)
        dropped_max = torch.where(grouped_mask > 0, -torch.inf, grouped_scores).amax(-1)
        assert torch.all(kept_min >= dropped_max)  # the kept ones are each group's largest


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.75, 0.1])
def test_structured_router_keeps_k_units_per_token_costs_rank_r_and_round_trips(keep, tmp_path):
    model = _gpt2("comet", comet_keep_rate=keep, comet_router="structured", comet_router_rank=8)
    router = model.moe_blocks()[0].router
    assert router.projection.shape == (64, 8) and router.projection_in.shape == (8, 32)
    decision = router(torch.randn(20, 32))
    assert torch.all(decision.unit_mask.sum(-1) == max(1, int(keep * 64)))
    ids = torch.randint(0, 64, (2, 8))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(loaded.moe_blocks()[0].router.projection_in, router.projection_in)


def test_structured_router_overlap_follows_input_similarity():
    from sklearn.datasets import load_digits

    config = AutoConfig.for_model("comet_gpt2", n_embd=64, n_inner=256, n_layer=1, comet_router="structured")
    inputs = torch.tensor(load_digits().data[:600], dtype=torch.float32)
    inputs = inputs - inputs.mean(0)
    structured = overlap_similarity_correlation(CometRouter(config, 0, 64), inputs, 4000)
    config.comet_router = "full"
    full = overlap_similarity_correlation(CometRouter(config, 0, 64), inputs, 4000)
    assert structured > 0.6 and full > 0.8


def test_structured_router_fields_are_validated():
    with pytest.raises(ValueError, match="comet_router"):
        AutoConfig.for_model("comet_gpt2", comet_router="fast")
    with pytest.raises(ValueError, match="comet_router_rank"):
        AutoConfig.for_model("comet_gpt2", comet_router_rank=0)
    with pytest.raises(ValueError, match="comet_router"):
        AutoConfig.for_model("comet_gpt2", routing="topk", comet_router="structured")


def test_a_structured_projection_missing_from_the_file_is_recreated(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _gpt2("comet", comet_router="structured", comet_router_rank=8)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if not k.endswith("router.projection_in")}
    assert len(dropped) < len(weights)
    save_file(dropped, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for a, b in zip(model.moe_blocks(), loaded.moe_blocks(), strict=True):
        assert torch.equal(a.router.projection_in, b.router.projection_in)


def test_masked_dense_path_uses_the_sentinel_kernel():
    """Unit COMET through the model: gradient of the masked units' pre-activation path is exactly what
    ``act(h) * mask`` gives, checked end to end against a float64 re-computation."""
    model = _gpt2("comet", comet_keep_rate=0.5).double()
    block = model.moe_blocks()[0]
    x = torch.randn(1, 7, 32, dtype=torch.float64, requires_grad=True)
    out = block(x)
    experts, mask = block.experts, block.router(x.reshape(-1, 32)).unit_mask
    h = F.linear(x.reshape(-1, 32), experts.up_proj[0], experts.up_proj_bias[0])
    ref = F.linear(experts.act_fn(h) * mask, experts.down_proj[0], experts.down_proj_bias[0])
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out.reshape(-1, 32), x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize("grad", [True, False])
def test_large_problems_take_the_index_add_path_and_still_match(grad):
    """Above `INDEX_ADD_MIN_ELEMENTS` slot elements the CPU kernel sums with ``index_add_``; under ``no_grad`` it
    skips the autograd node. Both must give what every expert applied to every token and gathered gives."""
    from hf_comet.modeling.moe_kernels import INDEX_ADD_MIN_ELEMENTS

    x, index, weights, up, up_bias, down, down_bias = _problem(num_tokens=1100, hidden=16, width=12, experts=6)
    assert index.numel() * 16 >= INDEX_ADD_MIN_ELEMENTS
    act = FusedActivation("gelu_new")
    every = torch.stack([act(x @ up[e].t() + up_bias[e]) @ down[e].t() + down_bias[e] for e in range(6)], dim=1)
    ref = (every.gather(1, index.unsqueeze(-1).expand(-1, -1, 16)) * weights.unsqueeze(-1)).sum(1)
    with torch.set_grad_enabled(grad):
        ours = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, act)
    assert ours.requires_grad == grad
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    if grad:
        inputs = [x, weights, up, up_bias, down, down_bias]
        g = torch.randn_like(ours)
        for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_second_derivative_through_our_kernels_raises_rather_than_being_wrong():
    h = torch.randn(3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(masked_activation(h, torch.ones(3, 4), FusedActivation("gelu")).sum(), h,
                                  create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
    x, index, weights, up, up_bias, down, down_bias = _problem()
    out = bucketed_experts(x, index, weights, up, up_bias, down, down_bias, FusedActivation("gelu"))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
