"""Reproducible runs (issue 11 §6): the same training with the same seed gives the same bits for every routing.

Transformers' ``grouped_mm`` experts kernel was the cause: the backward of its gathers ``bias[expert_ids]`` and
``hidden_states[perm // k]`` is ``index_put_(accumulate=True)`` with repeated indices, which torch runs on CPU as a
parallel atomic float add once the gradient has 32768 elements and two threads are on. The sizes below cross that
threshold (conftest runs torch with 2 threads): 32 images of 17 tokens, top-2 -> 1088 rows of 32 units.
"""

import pytest
import torch
import transformers
from conftest import tiny_config
from transformers.integrations.moe import grouped_mm_experts_forward

from hf_comet.modeling.moe_experts import PackedExperts, deterministic_grouped_mm_experts_forward

IMAGES = dict(patch_size=2, hidden_dropout_prob=0.1)  # 16 patches + CLS per 8x8 image; seeded dropout on

CASES = {
    "topk": dict(routing="topk"),
    "topk_k3": dict(routing="topk", num_experts_per_tok=3),
    "switch": dict(routing="switch", num_experts=2, capacity_factor=1.0, router_jitter_noise=0.1),
    "noisy_topk": dict(routing="noisy_topk"),
    "deep_top2": dict(routing="deep", mixture_top_k=2),
}


def _train(overrides: dict, steps: int = 5) -> dict[str, torch.Tensor]:
    """A few AdamW steps of a tiny top-k ViT from seed 0; the final state dict."""
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(tiny_config("comet_vit", **IMAGES, **overrides))
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(pixel_values=pixels, labels=labels).loss.backward()  # the aux loss is part of the loss
        optimizer.step()
        optimizer.zero_grad()
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_two_identical_training_runs_give_bitwise_identical_weights(case):
    first, second = _train(CASES[case]), _train(CASES[case])
    assert first.keys() == second.keys()
    differ = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differ, f"{case}: {len(differ)} tensors differ between two identical runs, e.g. {differ[:3]}"


def _experts(num_experts: int = 8, hidden: int = 32, width: int = 32, implementation: str = "grouped_mm"):
    config = tiny_config("comet_vit", routing="topk", num_experts=num_experts)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = PackedExperts(config, num_experts, hidden, width, "gelu")
    for parameter in experts.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return experts


def _kernel_step(experts, inputs, index, weights) -> list[torch.Tensor]:
    """Outputs and every gradient of one forward/backward of the sparse kernel."""
    experts.zero_grad()
    hidden, top_k_weights = inputs.clone().requires_grad_(), weights.clone().requires_grad_()
    out = experts.sparse_forward(hidden, index, top_k_weights)
    (out * torch.linspace(-1.0, 1.0, out.shape[-1])).sum().backward()
    return [out.detach(), hidden.grad, top_k_weights.grad, *(p.grad for p in experts.parameters())]


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_the_sparse_kernels_backward_is_bitwise_repeatable(implementation):
    # top-3 of 8 over 544 tokens: before the fix some backwards differed in the last bits
    experts = _experts(implementation=implementation)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(544, 32, generator=g)
    index = torch.rand(544, 8, generator=g).topk(3, dim=-1).indices
    weights = torch.rand(544, 3, generator=g).softmax(dim=-1)
    reference = _kernel_step(experts, inputs, index, weights)
    for attempt in range(30):
        got = _kernel_step(experts, inputs, index, weights)
        assert all(torch.equal(a, b) for a, b in zip(got, reference, strict=True)), f"attempt {attempt} differs"


def test_our_grouped_mm_computes_what_transformers_kernel_computes():
    experts = _experts(num_experts=4)
    g = torch.Generator().manual_seed(2)
    inputs = torch.randn(100, 32, generator=g)
    index = torch.rand(100, 4, generator=g).topk(2, dim=-1).indices
    weights = torch.rand(100, 2, generator=g).softmax(dim=-1)
    results = []
    for kernel in (grouped_mm_experts_forward, deterministic_grouped_mm_experts_forward):
        experts.zero_grad()
        hidden = inputs.clone().requires_grad_()
        out = kernel(experts, hidden, index, weights)
        out.square().sum().backward()
        results.append([out.detach(), hidden.grad, *(p.grad for p in experts.parameters())])
    assert torch.equal(results[0][0], results[1][0])  # the forward is the same arithmetic
    for a, b in zip(*results, strict=True):  # gradients: the same sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
