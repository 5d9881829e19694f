"""Hash routing (Roller et al. 2021): each token goes to the one expert a fixed hash of its token id picks (ViT: of its
patch position); no router parameters, no aux loss; works under save/load, cached generation and checkpointing."""

import pytest
import torch
import transformers
from conftest import tiny_config, tiny_inputs, tiny_model

from hf_comet.modeling.moe_block import collect_routing
from hf_comet.modeling.moe_routers import HashRouter, hash_token_ids
from hf_comet.reproduce import models as reproduce_models


def _decisions(model, **inputs) -> list[torch.Tensor]:
    """Per MoE layer the (rows, seq) experts each token was routed to in one eval forward."""
    with torch.no_grad(), collect_routing(inputs.get("attention_mask"), inputs.get("input_ids")) as collector:
        model(**inputs)
    return [decision.top_k_index.view(batch_shape) for _, decision, batch_shape, _ in collector.records]


def test_the_expert_is_a_fixed_function_of_the_token_id_across_positions_batches_and_layers():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="hash").eval()
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 40, (3, 9), generator=generator)
    second = torch.roll(first, shifts=(1, 4), dims=(0, 1))  # the same ids at other rows and positions
    seen: dict[tuple[int, int], int] = {}
    for ids in (first, second, torch.randint(0, 40, (2, 5), generator=generator)):
        for layer, experts in enumerate(_decisions(model, input_ids=ids)):
            assert experts.shape == ids.shape
            router = model.moe_blocks()[layer].router
            assert torch.equal(experts, router.expert_of(ids))
            for token, expert in zip(ids.flatten().tolist(), experts.flatten().tolist(), strict=True):
                assert seen.setdefault((layer, token), expert) == expert
    # a different hash per layer, every expert used, and the routing seed changes the hash
    ids = torch.arange(64)
    routers = [block.router for block in model.moe_blocks()]
    assert not torch.equal(routers[0].expert_of(ids), routers[1].expert_of(ids))
    assert set(routers[0].expert_of(ids).tolist()) == {0, 1, 2, 3}
    other = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="hash", routing_seed=1).moe_blocks()[0].router
    assert not torch.equal(other.expert_of(ids), routers[0].expert_of(ids))


def test_the_hash_is_near_uniform_over_a_vocabulary_and_pure():
    ids = torch.arange(50_000)
    counts = torch.bincount(hash_token_ids(ids, 123, 8), minlength=8)
    assert counts.min() > 0.95 * 50_000 / 8 and counts.max() < 1.05 * 50_000 / 8
    assert torch.equal(hash_token_ids(ids, 123, 8), hash_token_ids(ids.clone(), 123, 8))
    assert not torch.equal(hash_token_ids(ids, 123, 8), hash_token_ids(ids, 124, 8))


def test_no_router_parameters_no_aux_loss_and_statistics_count_the_hashed_experts():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="hash")
    assert not [name for name, _ in model.named_parameters() if ".router." in f".{name}"]
    assert not [name for name in model.state_dict() if ".router." in f".{name}"]
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    model.train()
    out = model(**inputs, output_router_logits=True)
    assert out.router_aux_loss is None and out.router_losses is None and out.router_logits is None
    out.loss.backward()
    block = model.moe_blocks()[0]
    assert block.experts_module.up_proj.grad.abs().sum() > 0
    real = inputs["attention_mask"].bool()
    expected = torch.bincount(block.router.expert_of(inputs["input_ids"][real]), minlength=4)
    assert model.routing_statistics()[block.layer_idx]["tokens_per_expert"] == expected.float().tolist()


@pytest.mark.parametrize(
    "family, head",
    [
        ("comet_gpt2", "AutoModelForCausalLM"),
        ("comet_bert", "AutoModelForMaskedLM"),
        ("comet_vit", "AutoModelForImageClassification"),
    ],
)
def test_save_and_load_give_identical_logits(family, head, tmp_path):
    model = tiny_model(family, head, routing="hash").eval()
    inputs = tiny_inputs(family, head, with_labels=False)
    model.save_pretrained(tmp_path)
    assert "Hash routing" in (tmp_path / "README.md").read_text()
    loaded = getattr(transformers, head).from_pretrained(tmp_path).eval()
    assert loaded.config.routing == "hash" and loaded.config.num_experts_per_tok == 1
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_cached_generation_equals_uncached_generation():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="hash").eval()
    prompt = torch.tensor([[5, 9, 17, 3], [22, 4, 4, 30]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **settings)
    uncached = model.generate(prompt, use_cache=False, **settings)
    assert cached.shape == (2, 10) and torch.equal(cached, uncached)


@pytest.mark.parametrize("family, head", [("comet_gpt2", "AutoModelForCausalLM"), ("comet_bert", "AutoModelForMaskedLM")])
def test_inputs_embeds_without_ids_is_refused_naming_what_hash_routing_needs(family, head):
    model = tiny_model(family, head, routing="hash").eval()
    embeds = torch.randn(2, 5, model.config.hidden_size)
    with pytest.raises(ValueError, match="routing='hash'.*needs input_ids.*inputs_embeds"):
        model(inputs_embeds=embeds)
    block = model.moe_blocks()[0]
    with pytest.raises(ValueError, match="routing='hash'.*not the block on its own"):
        block(embeds)


def test_num_experts_per_tok_other_than_one_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok=3 is not allowed under routing='hash'.*fixes it at 1"):
        tiny_config("comet_gpt2", routing="hash", num_experts_per_tok=3)
    assert tiny_config("comet_gpt2", routing="hash", num_experts_per_tok=1).num_experts_per_tok == 1
    assert tiny_config("comet_gpt2", routing="hash").num_experts_per_tok == 1  # the default reads as unset
    with pytest.raises(ValueError, match="num_experts=3 does not divide the FFN width"):
        tiny_config("comet_gpt2", routing="hash", num_experts=3)
    with pytest.raises(ValueError, match="router_aux_loss_coef=0.5 only applies to"):
        tiny_config("comet_gpt2", routing="hash", router_aux_loss_coef=0.5)


def test_vit_routes_by_patch_position():
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="hash").eval()
    assert HashRouter.keyed_by(model.config) == "position"
    pixels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for layer, experts in enumerate(_decisions(model, pixel_values=pixels)):
        positions = torch.arange(experts.shape[1])  # CLS = 0, then the patches
        assert torch.equal(experts, model.moe_blocks()[layer].router.expert_of(positions).expand_as(experts))
    assert "patch position (CLS = 0)" in HashRouter.describe(model.config)


def test_activation_checkpointing_recompute_routes_as_the_forward():
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    grads, calls = [], []
    for checkpointing in (False, True):
        model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="hash").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        block = model.moe_blocks()[0]
        block.register_forward_pre_hook(lambda *args, flag=checkpointing: calls.append(flag))
        model(**inputs).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert calls == [False, True, True]  # the checkpointed block ran again in backward, outside the routed forward
    torch.testing.assert_close(grads[1], grads[0])


def test_the_reproduce_hash_variant_has_random_top1s_experts_and_routes_by_hash():
    fields = reproduce_models.moe_fields("hash", 0.25, 128)
    top1 = reproduce_models.moe_fields("random_top1", 0.25, 128)
    assert fields["routing"] == "hash" and fields["num_experts_per_tok"] == 1
    assert (fields["num_experts"], fields["moe_intermediate_size"]) == (top1["num_experts"], top1["moe_intermediate_size"]) == (4, 32)
    assert "hash" in reproduce_models.MODEL_VARIANTS
    settings = reproduce_models.FamilySettings(
        family="gpt2", hidden_size=32, layers=2, steps=1, eval_every=1, batch_size=2, learning_rates=(1e-3,),
        keep_rates=(0.25,), seeds=(0,), seq_len=16,
    )  # fmt: skip
    model = reproduce_models.build(settings, "hash", 0.25, seed=0)
    assert model.config.routing == "hash" and model.config.num_experts == 4
    assert not any(".router." in f".{name}" for name, _ in model.named_parameters())


@pytest.mark.parametrize(("family", "head"), [("comet_gpt2", "AutoModelForCausalLM"),
                                              ("comet_bert", "AutoModelForMultipleChoice")])
def test_a_caller_s_collect_routing_sees_the_hashed_experts(family, head):
    # inside the caller's own collector the forward hands over its ids (and mask) for the duration of the call,
    # flattened as the encoder sees them (multiple choice: batch x choices rows)
    model = tiny_model(family, head, routing="hash").eval()
    inputs = tiny_inputs(family, head)
    with collect_routing() as collector:
        model(**inputs)
    assert collector.input_ids is None and collector.attention_mask is None  # the caller's (empty) inputs restored
    scores = collector.scores()
    assert len(scores) == len(model.moe_blocks())
    ids = inputs["input_ids"].reshape(-1)
    for score, block in zip(scores, model.moe_blocks(), strict=True):
        assert torch.equal(score.argmax(-1), block.router.expert_of(ids))
