"""Routing state that lives across forwards: Deep-MoE constraint phase, routing statistics, expert merging, gate
distillation, and activation checkpointing replaying all of it exactly."""

import math

import pytest
import torch
import transformers
from conftest import LEARNED, ROUTING_NAMES, run_ranks, tiny_config, tiny_inputs, tiny_model

from hf_comet import (
    DeepMoEGate,
    MoEBlock,
    RoutingDecision,
    attentive_to_softmax_gates,
    distill_attentive_gates,
    merge_experts,
    merge_most_used_into_least_used,
    reset_merged_optimizer_state,
)
from hf_comet.training import lift_deep_constraint

VIT = ("comet_vit", "AutoModelForImageClassification")


def train_steps(model, steps: int, head=VIT, lr: float = 1e-2):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        out = model(**tiny_inputs(*head, seed=step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return optimizer


# -- Deep-MoE balancing constraint ---------------------------------------------------------------------------------
def test_deep_constraint_phase_counts_training_forwards_then_switches_off_and_stays_off(tmp_path):
    model = tiny_model(*VIT, routing="deep", deep_constraint_steps=3)
    routers = [block.router for block in model.moe_blocks()]
    model.eval()(**tiny_inputs(*VIT))  # evaluation neither counts nor accumulates
    assert all(int(r.constraint_steps_done) == 0 and r.assignment_totals.sum() == 0 for r in routers)
    train_steps(model, 3)
    tokens_per_forward = 3 * 5  # batch 3, 4 patches + CLS
    for router in routers:
        assert int(router.constraint_steps_done) == 3 and not router.constraint_active
        # totals are the sums of the gates actually used: one unit of gate mass per token and forward
        assert router.assignment_totals.sum().item() == pytest.approx(3 * tokens_per_forward, rel=1e-5)
    totals = [r.assignment_totals.clone() for r in routers]
    train_steps(model, 2)
    assert all(torch.equal(r.assignment_totals, t) for r, t in zip(routers, totals, strict=True))
    # lifted for good: even a hugely unbalanced total no longer switches anything off, and a reload stays lifted
    with torch.no_grad():
        routers[0].assignment_totals.copy_(torch.tensor([1e6, 0.0, 0.0, 0.0]))
    x = torch.randn(4, 32)
    routers[0].train()
    torch.testing.assert_close(routers[0](x).expert_weights, routers[0].eval()(x).expert_weights)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert all(not block.router.constraint_active for block in loaded.moe_blocks())


def test_deep_constraint_is_active_during_the_phase_and_can_be_lifted_early():
    model = tiny_model(*VIT, routing="deep", deep_constraint_steps=100)
    router = model.moe_blocks()[0].router
    with torch.no_grad():
        router.assignment_totals.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    model.train()
    with torch.no_grad():
        out = model(**tiny_inputs(*VIT), output_router_logits=True)
    del out
    x = torch.randn(4, 32)
    router.refresh_state()
    assert (router(x).expert_weights[:, 0] == 0).all()
    lift_deep_constraint(model)
    assert not router.constraint_active
    assert (router(x).expert_weights[:, 0] > 0).all()


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_activation_checkpointing_gives_the_same_gradients_and_state(routing):
    # deep: 2 constraint steps, so the third forward below routes unconstrained while the phase ends
    # at the second commit, the step where recompute would see the updated phase without the snapshot
    extra = {"deep_constraint_steps": 2, "deep_constraint_margin": 0.0} if routing == "deep" else {}
    extra |= {"router_jitter_noise": 0.1} if routing == "switch" else {}
    plain = tiny_model(*VIT, routing=routing, **extra)
    checkpointed = tiny_model(*VIT, routing=routing, **extra)
    checkpointed.activation_checkpointing_enable()
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        train_steps(model, 2)  # the second step routes with state (deep totals) committed by the first
        model.zero_grad()
        torch.manual_seed(4)
        model(**tiny_inputs(*VIT, seed=9)).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    for a, b in zip(plain.moe_blocks(), checkpointed.moe_blocks(), strict=True):
        torch.testing.assert_close(a.statistics_tensors(), b.statistics_tensors())  # recompute counted nothing
        if routing in LEARNED:
            assert torch.equal(a.selection_counts, b.selection_counts)


# -- routing statistics ----------------------------------------------------------------------------------------
def test_statistics_match_a_hand_computation_and_skip_padding():
    block = MoEBlock(tiny_config("comet_vit", routing="topk"), 0, 32, "gelu")
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0]])
    decision = RoutingDecision(
        router_logits=probs.log(),
        top_k_index=torch.tensor([[0], [0], [1], [3]]),
        top_k_weights=torch.ones(4, 1),
        gate_probs=probs,
    )
    inputs = torch.randn(4, 32)
    token_mask = torch.tensor([True, True, True, False])  # the last token is padding
    block.commit(decision, inputs, token_mask, training=True)
    stats = block.routing_statistics()
    assert stats["tokens"] == 3
    assert stats["tokens_per_expert"] == [2.0, 1.0, 0.0, 0.0]
    assert stats["max_load_share"] == pytest.approx(2 / 3) and stats["min_load_share"] == 0.0
    assert stats["dead_experts"] == 2
    assert stats["gate_entropy"] == pytest.approx((1.0 + 0.0 + 2.0) / 3)  # bits
    mean_gate = [(0.5 + 1.0 + 0.25) / 3, (0.5 + 0.25) / 3, 0.25 / 3, 0.25 / 3]
    assert stats["usage_entropy"] == pytest.approx(-sum(p * math.log2(p) for p in mean_gate))
    assert stats["max_usage_entropy"] == 2.0
    assert block.selection_counts.tolist() == [2.0, 1.0, 0.0, 0.0]  # what merging ranks by
    block.commit(decision, inputs, token_mask, training=False)  # evaluation: statistics yes, merge counts no
    assert block.routing_statistics()["tokens"] == 6 and block.selection_counts.tolist() == [2.0, 1.0, 0.0, 0.0]


def test_mask_overlap_is_one_for_identical_selections_and_correlation_needs_variation():
    block = MoEBlock(tiny_config("comet_vit", routing="topk"), 0, 32, "gelu")
    decision = RoutingDecision(
        router_logits=torch.zeros(10, 4),
        top_k_index=torch.tensor([[1, 2]] * 10),
        top_k_weights=torch.full((10, 2), 0.5),
        gate_probs=torch.full((10, 4), 0.25),
    )
    block.commit(decision, torch.randn(10, 32), None, training=False)
    stats = block.routing_statistics()
    assert stats["mask_overlap"] == pytest.approx(1.0)
    assert stats["overlap_similarity_correlation"] is None  # constant overlap: correlation undefined


def test_comet_masks_overlap_more_for_similar_inputs():
    """The COMET paper's central claim, measured by the statistics on inputs with graded similarity."""
    model = tiny_model("comet_vit", "AutoModel", routing="comet", comet_keep_rate=0.25).eval()
    block = model.moe_blocks()[0]
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g)
    tokens = torch.cat([centres[i] + s * torch.randn(64, 32, generator=g) for i in range(4) for s in (0.3,)])
    decision = block.router(tokens)
    block.commit(decision, tokens, None, training=False)
    stats = model.routing_statistics(reset=True)[0]
    assert stats["overlap_similarity_correlation"] > 0.5
    assert 0.1 < stats["mask_overlap"] < 1.0
    assert stats["gate_entropy"] == pytest.approx(math.log2(32))  # uniform over the 32 kept units
    assert model.routing_statistics()[0]["tokens"] == 0  # reset


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_statistics_accumulate_per_layer_for_every_router(routing):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing).train()
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    model(**inputs)
    stats = model.routing_statistics()
    assert sorted(stats) == [0, 1]
    valid = int(inputs["attention_mask"].sum())
    # selections per token: k for top-k routers, the kept units/blocks for COMET, 1 for top-1 and dense mixtures
    per_token = {"topk": 2, "noisy_topk": 2, "comet": 64, "block_comet": 4}.get(routing, 1)
    for layer in stats.values():
        assert layer["tokens"] == valid
        assert sum(layer["tokens_per_expert"]) == pytest.approx(valid * per_token)
        assert 0 <= layer["usage_entropy"] <= layer["max_usage_entropy"] + 1e-9
        assert 0 <= layer["mask_overlap"] <= 1


# -- expert merging (Park 2024) ----------------------------------------------------------------------------------
def test_merge_writes_the_mean_of_the_two_sources_and_resets_counts():
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="attentive")
    train_steps(model, 1, head=("comet_bert", "AutoModelForMaskedLM"))
    block = model.moe_blocks()[1]
    assert block.selection_counts.sum() > 0
    before = {name: t.detach().clone() for name, t in block.expert_tensors().items()}
    query = block.router.query.weight.detach().clone()
    assert set(before) == {
        "experts.up_proj",
        "experts.up_proj_bias",
        "experts.down_proj",
        "experts.down_proj_bias",
        "router.key_proj",
    }
    merge = merge_experts(model, 1, 0, 2, into=3)
    for name, tensor in block.expert_tensors().items():
        torch.testing.assert_close(tensor[3], (before[name][0] + before[name][2]) / 2)
        for e in (0, 1, 2):
            assert torch.equal(tensor[e], before[name][e])
    assert block.selection_counts.sum() == 0
    assert merge.into == 3 and merge.sources == (0, 2)
    assert set(merge.parameters) == {f"bert.encoder.layer.1.intermediate.{n}" for n in before}
    assert torch.equal(block.router.query.weight, query)  # the gate itself is untouched


def test_count_weighted_merge_weights_sources_by_their_selection_counts():
    model = tiny_model(*VIT, routing="topk")
    block = model.moe_blocks()[0]
    block.selection_counts.copy_(torch.tensor([30.0, 10.0, 0.0, 5.0]))
    up = block.experts.up_proj.detach().clone()
    merge_experts(model, 0, 0, 1, into=2, how="count_weighted")
    torch.testing.assert_close(block.experts.up_proj[2], 0.75 * up[0] + 0.25 * up[1])


def test_merge_most_used_into_least_used_picks_per_layer_and_resets_optimizer_state():
    model = tiny_model(*VIT, routing="switch")
    optimizer = train_steps(model, 2)
    blocks = model.moe_blocks()
    blocks[0].selection_counts.copy_(torch.tensor([5.0, 9.0, 1.0, 7.0]))  # top two 1, 3; least used other: 2
    blocks[1].selection_counts.copy_(torch.tensor([4.0, 4.0, 4.0, 0.0]))  # ties go to the lower index
    up = [b.experts.up_proj.detach().clone() for b in blocks]
    merges = merge_most_used_into_least_used(model)
    assert [(m.layer_idx, m.sources, m.into) for m in merges] == [(0, (1, 3), 2), (1, (0, 1), 3)]
    torch.testing.assert_close(blocks[0].experts.up_proj[2], (up[0][1] + up[0][3]) / 2)
    param = blocks[0].experts.up_proj
    assert optimizer.state[param]["exp_avg"][2].abs().sum() > 0
    assert merge_most_used_into_least_used(model) == []  # counts were reset: nothing to rank
    second = optimizer.state[param]["exp_avg_sq"].clone()
    first = optimizer.state[param]["exp_avg"].clone()
    reset = reset_merged_optimizer_state(optimizer, merges)
    assert reset == 2 * 2 * 4  # 2 layers x (exp_avg, exp_avg_sq) x 4 expert tensors
    assert optimizer.state[param]["exp_avg"][2].abs().sum() == 0  # no stale direction
    torch.testing.assert_close(optimizer.state[param]["exp_avg_sq"][2], (second[1] + second[3]) / 2)  # scale
    for e in (0, 1, 3):  # the other experts keep their state
        assert torch.equal(optimizer.state[param]["exp_avg"][e], first[e])
        assert torch.equal(optimizer.state[param]["exp_avg_sq"][e], second[e])
    # the next Adam step of the merged expert is smaller than a normal one, not ~3x larger
    before = param.detach().clone()
    model(**tiny_inputs(*VIT, seed=11)).loss.backward()
    optimizer.step()
    moved = (param.detach() - before).abs().flatten(1).mean(-1)
    assert moved[2] < moved[[0, 1, 3]].min()


def test_merging_refuses_comet_layers_and_bad_arguments():
    comet = tiny_model(*VIT, routing="comet")
    with pytest.raises(ValueError, match="routing 'comet'.*overlapping unit masks.*nothing to merge"):
        merge_most_used_into_least_used(comet)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_experts(comet, 0, 0, 1, into=2)
    hashed = tiny_model(*VIT, routing="hash")  # each refusal names the routing the model really has
    with pytest.raises(ValueError, match="routing 'hash'.*no trainable gate.*nothing to merge"):
        merge_most_used_into_least_used(hashed)
    with pytest.raises(ValueError, match="routing='hash': a fixed routing has no trainable gate"):
        merge_experts(hashed, 0, 0, 1, into=2)
    learned = tiny_model(*VIT, routing="topk")
    with pytest.raises(ValueError, match="into=4"):
        merge_experts(learned, 0, 0, 1, into=4)
    with pytest.raises(ValueError, match="two different experts"):
        merge_experts(learned, 0, 1, 1, into=2)
    with pytest.raises(ValueError, match="how='median'"):
        merge_experts(learned, 0, 0, 1, into=2, how="median")
    with pytest.raises(ValueError, match="layer 5"):
        merge_experts(learned, 5, 0, 1, into=2)
    two = tiny_model(*VIT, routing="topk", num_experts=2, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="at least 3 experts"):
        merge_most_used_into_least_used(two)


# -- distillation of attentive gates -------------------------------------------------------------------------------
def test_distillation_swaps_in_sparse_softmax_gates_trains_only_them_and_reloads(tmp_path):
    model = tiny_model(*VIT, routing="attentive")
    train_steps(model, 2)
    trunk = model.moe_blocks()[0].router.gate_proj.weight.detach().clone()
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".router." not in n}
    batches = [tiny_inputs(*VIT, seed=s) for s in range(5)]
    losses = distill_attentive_gates(model, batches, top_k=1)
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert model.config.routing == "deep" and model.config.mixture_top_k == 1
    assert model.config.deep_constraint_steps == 0
    for block in model.moe_blocks():
        assert isinstance(block.router, DeepMoEGate)
        assert block.router(torch.randn(2, block.hidden_size)).top_k_index.shape == (2, 1)  # sparse, no keys
    assert not torch.equal(model.moe_blocks()[0].router.gate_proj.weight, trunk)  # the gate trained ...
    for name, param in model.named_parameters():  # ... and nothing else did
        if ".router." not in name:
            assert torch.equal(param, experts[name]), name
    decision = model.moe_blocks()[0].router(torch.randn(3, 32))
    assert decision.top_k_index.shape == (3, 1)  # sparse: one expert per token at inference
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs(*VIT, with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, loaded(**inputs).logits)


def test_distillation_refuses_models_without_attentive_gates():
    with pytest.raises(ValueError, match="routing='attentive'"):
        attentive_to_softmax_gates(tiny_model(*VIT, routing="topk"))
    with pytest.raises(ValueError, match="top_k=5"):
        attentive_to_softmax_gates(tiny_model(*VIT, routing="attentive"), top_k=5)


def test_deep_totals_stay_float64_in_a_half_precision_model():
    model = tiny_model(*VIT, routing="deep", deep_constraint_steps=10).to(torch.bfloat16)
    router = model.moe_blocks()[0].router
    assert router.assignment_totals.dtype == torch.float64 and router.gate_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        router.assignment_totals.fill_(1e6)  # far beyond bf16's integer resolution and fp16's range
    model.train()
    inputs = tiny_inputs(*VIT)
    model(pixel_values=inputs["pixel_values"].to(torch.bfloat16), labels=inputs["labels"])
    assert router.assignment_totals.sum().item() == pytest.approx(4e6 + 15, abs=1e-3)  # 15 tokens added exactly


def _merge_on_rank(rank: int) -> list:
    """Merge on this rank of a 2-process gloo group (`run_ranks`) from counts that differ per rank."""
    model = tiny_model(*VIT, routing="topk")
    block = model.moe_blocks()[0]
    local = [[5.0, 0.0, 1.0, 4.0], [0.0, 6.0, 1.0, 1.0]][rank]  # locally rank 0 would pick (0, 3), rank 1 (1, 3)
    block.selection_counts.copy_(torch.tensor(local))
    model.moe_blocks()[1].selection_counts.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    merges = merge_most_used_into_least_used(model)
    return [[m.layer_idx, list(m.sources), m.into] for m in merges]


def test_merging_under_distributed_training_sums_counts_so_every_rank_merges_the_same(tmp_path):
    results = run_ranks(_merge_on_rank, 2, tmp_path)
    # global counts (5, 6, 2, 5): top two 1, then 0 (tie with 3 goes to the lower index); least used other: 2
    assert results[0] == results[1] == [[0, [1, 0], 2], [1, [0, 1], 2]]
