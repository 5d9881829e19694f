"""Regression tests for the defects a review of the first release found (issue 10 §9); autocast and torch.compile
have files of their own (test_autocast.py, test_compile.py)."""

import peft
import torch
import transformers
from conftest import tiny_config, tiny_inputs, tiny_model
from transformers import GenerationMixin
from transformers import initialization as init

from hf_comet import CometGPT2ForCausalLM, MoEBlock, merge_experts, reset_merged_optimizer_state
from hf_comet.lora import lora_config
from hf_comet.merging import expert_slice
from hf_comet.modeling.moe_block import collect_routing
from hf_comet.modeling.moe_routers import CometRouter


def _switch_block(**overrides) -> MoEBlock:
    config = tiny_config("comet_vit", routing="switch", capacity_factor=1.0, router_jitter_noise=0.0, **overrides)
    block = MoEBlock(config, 0, 32, "gelu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        block.router.weight.zero_()
        block.router.weight[0, 0] = 10.0  # every token with a positive first feature wants expert 0
    return block


def test_switch_tokens_dropped_by_capacity_get_a_zero_output_even_with_a_shared_bias():
    block = _switch_block(expert_output_bias="shared").train()
    assert block.experts.output_bias is not None and block.experts.output_bias.abs().sum() > 0
    x = torch.randn(8, 32)
    x[:, 0] = 1.0 + x[:, 0].abs()
    out = block(x)
    decision = block.router(x)
    dropped = decision.extras["dropped"]
    assert dropped.sum() == 6  # capacity ceil(8 / 4) = 2 of 8 tokens on expert 0
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))  # no bias: they ride the residual
    assert (out[~dropped].abs().sum(-1) > 0).all()
    # the kept tokens get the bias once, like the dense FFN
    kept = block.experts.sparse_forward(x[~dropped], decision.top_k_index[~dropped], decision.top_k_weights[~dropped])
    torch.testing.assert_close(out[~dropped], kept + block.experts.output_bias)


def test_a_block_called_outside_a_routed_forward_does_not_reuse_an_earlier_forwards_padding_mask():
    block = _switch_block().train()
    x = torch.randn(4, 32)
    x[:, 0] = 1.0 + x[:, 0].abs()  # all four tokens queue for expert 0, capacity 1
    padding = torch.tensor([[0, 1, 1, 0]])  # with this mask token 1 is the first real token in the queue
    with collect_routing(padding):
        routed = block(x.view(1, 4, 32)).view(4, 32)
    # padding takes no place in the queue: token 1 gets expert 0's one place, token 2 is dropped
    assert routed[1].abs().sum() > 0 and torch.equal(routed[2], torch.zeros(32))
    alone = block(x)  # a later call with the same token count, no collector, not a recompute: no stale mask
    assert alone[0].abs().sum() > 0 and torch.equal(alone[1:], torch.zeros(3, 32))  # token 0 took the place


def test_activation_checkpointing_recompute_routes_with_the_forwards_padding_mask():
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(
            "comet_gpt2", "AutoModelForCausalLM", routing="switch", capacity_factor=0.5, router_jitter_noise=0.0
        ).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_the_comet_projection_is_defined_in_init_and_reproduced_by_init_weights():
    config = tiny_config("comet_gpt2", routing="comet", routing_seed=5)
    reference = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", routing_seed=5)
    with init.no_init_weights():  # a model built with weight init skipped still holds the seeded projection
        skipped = CometGPT2ForCausalLM(config)
    for a, b in zip(skipped.moe_blocks(), reference.moe_blocks(), strict=True):
        assert torch.equal(a.router.projection, b.router.projection)
        router = a.router
        drawn = router.draw_projection()
        with torch.no_grad():
            router.projection.zero_()
        router.init_weights(config)  # `_init_weights` reproduces `__init__`
        assert torch.equal(router.projection, drawn)
    other = CometRouter(tiny_config("comet_gpt2", routing="comet", routing_seed=6), 0, 32)
    assert not torch.equal(other.projection, reference.moe_blocks()[0].router.projection)


def test_the_causal_lm_lists_generation_mixin_among_its_direct_bases():
    assert GenerationMixin in CometGPT2ForCausalLM.__bases__
    assert issubclass(CometGPT2ForCausalLM, transformers.GPT2LMHeadModel)


def _effective(peft_model, layer: int, name: str) -> torch.Tensor:
    """(E, ...) packed expert weights plus every adapter's delta, as the adapted model computes with them."""
    block = [m for m in peft_model.modules() if isinstance(m, MoEBlock)][layer]
    wrapper = block.experts
    while getattr(wrapper, "parameter_name", None) != name:
        wrapper = wrapper.base_layer
    base = getattr(block.experts_module, name)
    return base + sum(wrapper.get_delta_weight(adapter) for adapter in wrapper.lora_A)


def test_merging_adapted_experts_merges_the_effective_experts_and_resets_the_adapter_state():
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="topk")
    peft_model = peft.get_peft_model(model, lora_config(model, ("experts",), r=2))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # learned adapters: B is no longer zero
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    peft_model.train()
    peft_model(**tiny_inputs("comet_vit", "AutoModelForImageClassification")).loss.backward()
    optimizer.step()
    before = {name: _effective(peft_model, 0, name).detach().clone() for name in ("up_proj", "down_proj")}
    merge = merge_experts(peft_model, 0, 1, 2, into=3)
    for name, effective in before.items():
        after = _effective(peft_model, 0, name)
        torch.testing.assert_close(after[3], (effective[1] + effective[2]) / 2)  # the sources' learned deltas kept
        torch.testing.assert_close(after[[0, 1, 2]], effective[[0, 1, 2]])  # the other experts untouched
    adapters = {n: p for n, p in merge.parameters.items() if ".lora_" in n}
    assert len(adapters) == 4  # lora_A and lora_B of up_proj and down_proj
    touched = reset_merged_optimizer_state(optimizer, [merge])
    assert touched >= 2 * len(adapters)  # exp_avg and exp_avg_sq of every adapter factor
    for name, param in adapters.items():
        state = optimizer.state[param]
        assert torch.equal(
            expert_slice(name, state["exp_avg"], 3, 4), torch.zeros_like(expert_slice(name, param, 3, 4))
        )
        mean = (expert_slice(name, state["exp_avg_sq"], 1, 4) + expert_slice(name, state["exp_avg_sq"], 2, 4)) / 2
        torch.testing.assert_close(expert_slice(name, state["exp_avg_sq"], 3, 4), mean)
        if ".lora_B." in name:
            assert torch.equal(expert_slice(name, param, 3, 4), torch.zeros_like(expert_slice(name, param, 3, 4)))
