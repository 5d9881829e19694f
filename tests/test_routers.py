"""Learned routers and block-COMET: each formula and aux loss against a hand computation on a small tensor."""

import math
import statistics

import pytest
import torch
from conftest import EVERY_HEAD, dense_twin, main_output, tiny_config, tiny_inputs, tiny_model

from hf_comet import AttentiveRouter, MoEBlock, NoisyTopKRouter, RoutingDecision, SwitchRouter
from hf_comet.modeling.execution import choose_execution, thresholds
from hf_comet.modeling.moe_block import collect_routing
from hf_comet.modeling.moe_routers import cv_squared, load_balancing_loss, noisy_top_k_load, sample_similarity_loss


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def filled_block(config, seed: int = 0) -> MoEBlock:
    """A block of ``config`` with every parameter drawn from a seeded normal (no model init involved)."""
    block = MoEBlock(config, layer_idx=0, hidden_size=config.hidden_size, activation="gelu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        for name, buffer in block.named_buffers():
            if name.endswith("projection"):
                buffer.copy_(torch.randn(buffer.shape, generator=g))
            else:
                buffer.zero_()
    return block


# -- noisy top-k (Shazeer et al. 2017) -------------------------------------------------------------------------
def test_cv_squared_is_unbiased_variance_over_squared_mean():
    values = [3.0, 1.0, 0.5, 2.5]
    expected = statistics.variance(values) / statistics.mean(values) ** 2
    assert cv_squared(torch.tensor(values)).item() == pytest.approx(expected, rel=1e-6)
    assert cv_squared(torch.tensor([4.0])).item() == 0.0
    assert cv_squared(torch.ones(5)).item() == 0.0


def test_noisy_top_k_gates_without_noise_are_the_softmax_over_the_kept_logits():
    config = tiny_config("comet_gpt2", routing="noisy_topk", num_experts=4, num_experts_per_tok=2)
    router = NoisyTopKRouter(config, 0, hidden_size=2).eval()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]))
        router.noise_weight.fill_(3.0)  # ignored in evaluation
    decision = router(torch.tensor([[2.0, 1.0]]))
    # logits (2, 1, -2, 1.5): keep experts 0 and 3, softmax over (2, 1.5)
    assert decision.top_k_index.tolist() == [[0, 3]]
    e = [math.exp(2.0), math.exp(1.5)]
    torch.testing.assert_close(decision.top_k_weights[0], torch.tensor([e[0] / sum(e), e[1] / sum(e)]))
    torch.testing.assert_close(decision.combine_weights(4)[0], torch.tensor([e[0] / sum(e), 0.0, 0.0, e[1] / sum(e)]))
    torch.testing.assert_close(decision.gate_probs[0], torch.tensor([2.0, 1.0, -2.0, 1.5]).softmax(-1))  # pre-selection
    torch.testing.assert_close(decision.extras["load"][0], torch.tensor([1.0, 0.0, 0.0, 1.0]))  # hard count


def test_noisy_top_k_training_noise_is_softplus_scaled_and_drawn_from_the_global_rng():
    config = tiny_config("comet_gpt2", routing="noisy_topk", num_experts=4, num_experts_per_tok=2)
    router = NoisyTopKRouter(config, 0, hidden_size=3).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(4, 3, generator=g))
        router.noise_weight.copy_(torch.randn(4, 3, generator=g))
    x = torch.randn(5, 3, generator=g)
    torch.manual_seed(7)
    decision = router(x)
    torch.manual_seed(7)
    clean = x @ router.weight.detach().T
    std = torch.nn.functional.softplus(x @ router.noise_weight.detach().T) + 1e-2
    noisy = clean + torch.randn(5, 4) * std
    torch.testing.assert_close(decision.router_logits.detach(), noisy)
    top = noisy.topk(2, dim=-1)
    assert torch.equal(decision.top_k_index, top.indices)
    torch.testing.assert_close(decision.top_k_weights.detach(), top.values.softmax(-1))


def test_smooth_load_estimator_matches_the_normal_cdf_by_hand():
    clean = torch.tensor([[0.5, 0.2, -0.3]])
    noisy = torch.tensor([[0.9, -0.1, 0.4]])  # top-1 is expert 0; the 2nd largest noisy value is 0.4
    std = torch.tensor([[0.5, 1.0, 2.0]])
    top_values = noisy.topk(2, dim=-1).values  # (0.9, 0.4)
    load = noisy_top_k_load(clean, noisy, std, top_values, k=1)
    # expert 0 is in: stays in if clean + noise > 0.4; experts 1 and 2 are out: get in if > 0.9
    expected = [phi((0.5 - 0.4) / 0.5), phi((0.2 - 0.9) / 1.0), phi((-0.3 - 0.9) / 2.0)]
    torch.testing.assert_close(load[0], torch.tensor(expected))


def test_noisy_top_k_aux_losses_are_cv_squared_of_importance_and_load_over_valid_tokens():
    config = tiny_config("comet_gpt2", routing="noisy_topk", num_experts=3, num_experts_per_tok=1, n_inner=96)
    router = NoisyTopKRouter(config, 0, hidden_size=2)
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])
    load = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.3, 0.3, 0.7], [0.5, 0.5, 0.5]])
    decision = RoutingDecision(router_logits=torch.zeros(4, 3), expert_weights=gates, extras={"load": load})
    mask = torch.tensor([True, True, True, False])
    losses = router.aux_losses(decision, mask)
    importance = [0.6, 0.4 + 1.0 + 0.3, 0.7]  # the padding row is left out
    load_sums = [0.9 + 0.2 + 0.3, 0.1 + 0.8 + 0.3, 0.2 + 0.1 + 0.7]
    expected_importance = statistics.variance(importance) / statistics.mean(importance) ** 2
    assert losses["importance_loss"].item() == pytest.approx(expected_importance, rel=1e-5)
    expected = statistics.variance(load_sums) / statistics.mean(load_sums) ** 2
    assert losses["load_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert router.loss_weights["importance_loss"] == router.loss_weights["load_loss"] == config.router_aux_loss_coef


# -- Switch (Fedus et al. 2021) ---------------------------------------------------------------------------------
def switch_router(**overrides) -> SwitchRouter:
    config = tiny_config("comet_gpt2", routing="switch", num_experts=4, **overrides)
    router = SwitchRouter(config, 0, hidden_size=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    return router


def test_switch_routes_top_1_scaled_by_its_probability():
    router = switch_router().eval()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    decision = router(x)
    probs = (x @ router.weight.detach().T).softmax(-1)
    assert decision.top_k_index.tolist() == [[0], [1]]
    torch.testing.assert_close(decision.top_k_weights[:, 0], probs.max(-1).values)  # not renormalised to 1
    assert decision.top_k_weights[0, 0] < 1.0


def test_switch_capacity_drops_overflow_in_token_order_and_dropped_tokens_get_zero_output():
    router = switch_router(capacity_factor=1.0, router_jitter_noise=0.0).train()
    x = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])  # five tokens want expert 0, one wants expert 1
    assert router.capacity(6) == 2  # ceil(1.0 * 6 / 4)
    decision = router(x)
    assert decision.extras["dropped"].tolist() == [False, False, True, True, True, False]
    assert (decision.top_k_weights[2:5] == 0).all() and (decision.top_k_weights[[0, 1, 5]] > 0).all()
    # the balancing loss sees the assignment before capacity: f = (5/6, 1/6, 0, 0)
    probs = decision.gate_probs
    expected = 4 * (5 / 6 * probs[:, 0].mean() + 1 / 6 * probs[:, 1].mean())
    torch.testing.assert_close(router.aux_losses(decision, None)["load_balancing_loss"], expected)
    # padding takes no place in a queue, and capacity counts only real tokens: ceil(5 / 4) = 2, ceil(4 / 4) = 1
    padding = torch.tensor([True, False, True, True, True, True])
    assert router(x, token_mask=padding).extras["dropped"].tolist() == [False, False, False, True, True, False]
    padding_first = torch.tensor([False, False, True, True, True, True])
    assert router(x, token_mask=padding_first).extras["dropped"].tolist()[2:] == [False, True, True, False]
    # evaluation (and generation) is dropless: a token's output never depends on its batch neighbours
    assert "dropped" not in router.eval()(x).extras

    config = tiny_config("comet_gpt2", routing="switch", num_experts=4, capacity_factor=1.0, router_jitter_noise=0.0)
    block = filled_block(config).train()
    with torch.no_grad():
        block.router.weight.copy_(torch.zeros(4, 32))
        block.router.weight[0, 0] = 5.0
        tokens = torch.randn(6, 32)
        tokens[:, 0] = 3.0  # every token prefers expert 0: capacity 2 keeps the first two
        out = block(tokens)
    assert out[:2].abs().sum() > 0 and torch.equal(out[2:], torch.zeros(4, 32))  # residual carries them


def test_switch_capacity_counts_drops_in_the_statistics_and_ignores_padding_in_a_model():
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="switch", capacity_factor=0.5).train()
    inputs = tiny_inputs("comet_bert", "AutoModelForMaskedLM")
    model(**inputs)
    stats = model.routing_statistics()
    valid = int(inputs["attention_mask"].sum())
    capacity = math.ceil(0.5 * valid / 4)
    for layer in stats.values():
        kept = sum(layer["tokens_per_expert"])
        assert layer["dropped_tokens"] == valid - kept > 0
        assert max(layer["tokens_per_expert"]) <= capacity


def test_switch_jitter_perturbs_the_router_input_only_in_training():
    router = switch_router(router_jitter_noise=0.5)
    x = torch.randn(8, 2)
    router.eval()
    torch.testing.assert_close(router(x).router_logits, x @ router.weight.detach().T)
    router.train()
    assert not torch.allclose(router(x).router_logits, x @ router.weight.detach().T)
    router.jitter_noise = 0.0
    torch.testing.assert_close(router(x).router_logits, x @ router.weight.detach().T)


# -- attentive gating (Krishnamurthy et al. 2023) ----------------------------------------------------------------
@pytest.mark.parametrize("mixture_top_k", [None, 2])
def test_attentive_block_matches_a_per_expert_hand_computation(mixture_top_k):
    config = tiny_config(
        "comet_vit", routing="attentive", num_experts=4, gate_hidden_size=8, mixture_top_k=mixture_top_k
    )
    block = filled_block(config).eval()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block(x)
        experts, router = block.experts, block.router
        query = router.query(torch.relu(router.gate_proj(x)))  # (T, H)
        scores, outputs = [], []
        for e in range(4):
            z = torch.nn.functional.gelu(x @ experts.up_proj[e].T + experts.up_proj_bias[e])  # (T, I)
            key = z @ router.key_proj[e].T  # (T, H)
            scores.append((query * key).sum(-1) / math.sqrt(8))
            outputs.append(z @ experts.down_proj[e].T + experts.down_proj_bias[e])
        scores = torch.stack(scores, dim=-1)
        if mixture_top_k is None:
            weights = scores.softmax(-1)
        else:
            top = scores.topk(2, dim=-1)
            weights = torch.zeros_like(scores).scatter(1, top.indices, top.values.softmax(-1))
            assert ((weights > 0).sum(-1) == 2).all()
        expected = sum(weights[:, e : e + 1] * outputs[e] for e in range(4))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_attentive_importance_loss_is_std_over_mean_squared_and_gradients_reach_the_experts():
    config = tiny_config("comet_vit", routing="attentive", num_experts=4, router_aux_loss_coef=0.2)
    router = AttentiveRouter(config, 0, hidden_size=32)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert len(set(probs.sum(0).tolist())) > 1  # unequal importance: the mean normalisation matters
    decision = RoutingDecision(router_logits=probs, expert_weights=probs, gate_probs=probs)
    importance = probs.sum(0).tolist()
    expected = (statistics.stdev(importance) / statistics.mean(importance)) ** 2
    assert router.aux_losses(decision, None)["importance_loss"].item() == pytest.approx(expected, rel=1e-5)
    assert router.loss_weights == {"importance_loss": 0.2}

    block = filled_block(config).train()
    out = block(torch.randn(6, 32))
    # through the gate p, the task gradient reaches the key maps and every expert's first layer
    grads = torch.autograd.grad(out.square().sum(), [block.experts.up_proj, block.router.key_proj])
    assert all((g.flatten(1).abs().sum(-1) > 0).all() for g in grads)


# -- sample-similarity regulariser --------------------------------------------------------------------------------
def test_sample_similarity_loss_matches_the_authors_double_loop_in_mean_form():
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 3, generator=g)
    gates = torch.randn(5, 4, generator=g).softmax(-1)
    first, second = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 2])
    beta_s, beta_d = 0.3, 0.05
    distances = [float((inputs[i] - inputs[j]).norm()) for i, j in zip(first.tolist(), second.tolist(), strict=True)]
    top = max(distances)
    same = different = 0.0
    for (i, j), dist in zip(zip(first.tolist(), second.tolist(), strict=True), distances, strict=True):
        for e in range(4):
            for f in range(4):
                term = float(gates[i, e] * gates[j, f]) * dist / top
                if e == f:
                    same += term
                else:
                    different += term
    pairs = len(distances)
    expected = beta_s * same / pairs / 4 - beta_d * different / pairs / (4 * 3)
    got = sample_similarity_loss(inputs, gates, (first, second), beta_s, beta_d)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # pair weights drop pairs that touch padding: same as the loss over the kept pairs alone
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    kept = weights.bool()
    masked = sample_similarity_loss(inputs, gates, (first, second), beta_s, beta_d, pair_weights=weights)
    alone = sample_similarity_loss(inputs, gates, (first[kept], second[kept]), beta_s, beta_d)
    assert masked.item() == pytest.approx(alone.item(), rel=1e-5)


def test_similarity_betas_add_the_regulariser_to_the_aux_loss_of_a_learned_router():
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    betas = (1.0, 0.1)
    model = tiny_model(
        "comet_gpt2",
        "AutoModelForCausalLM",
        routing="topk",
        router_aux_loss_coef=0.3,
        similarity_beta_s=betas[0],
        similarity_beta_d=betas[1],
    ).train()
    draws = [block.pair_draws for block in model.moe_blocks()]
    state = torch.get_rng_state()
    with collect_routing(inputs["attention_mask"]) as collector:
        model.transformer(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        layer_losses = collector.layer_losses()
    assert torch.equal(state, torch.get_rng_state())  # the pairs never touch the global RNG (training noise)
    assert len(layer_losses) == len(collector.records) == 2
    expected_layers = []
    for (block, decision, batch_shape, tokens), draw, (_, losses) in zip(
        collector.records, draws, layer_losses, strict=True
    ):
        mask = collector.token_mask(batch_shape)
        block.pair_draws = draw  # replay the block's pair stream
        pairs, weights = block._sample_pairs(tokens.shape[0], block.similarity_num_pairs, mask, tokens.device)
        assert weights.sum() < weights.numel()  # padded pairs are weighted out
        similarity = sample_similarity_loss(tokens, decision.gate_probs, pairs, *betas, pair_weights=weights)
        balance = load_balancing_loss(decision.router_logits, 4, block.router.top_k, mask)
        torch.testing.assert_close(losses["similarity_loss"], similarity)
        torch.testing.assert_close(losses["load_balancing_loss"], balance)
        expected_layers.append(0.3 * balance + similarity)  # betas inside the loss, coefficient 1
    torch.testing.assert_close(collector.router_aux_loss(), torch.stack(expected_layers).mean())


def test_deep_gate_is_a_two_layer_relu_mlp_softmax():
    config = tiny_config("comet_vit", routing="deep", num_experts=4, gate_hidden_size=6)
    block = filled_block(config).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        decision = block.router(x)
        r = block.router
        expected = torch.relu(x @ r.gate_proj.weight.T + r.gate_proj.bias) @ r.gate_out.weight.T + r.gate_out.bias
        torch.testing.assert_close(decision.expert_weights, expected.softmax(-1))
        out = block(x)
        dense = [
            torch.nn.functional.gelu(x @ block.experts.up_proj[e].T + block.experts.up_proj_bias[e])
            @ block.experts.down_proj[e].T
            + block.experts.down_proj_bias[e]
            for e in range(4)
        ]
        torch.testing.assert_close(out, sum(decision.expert_weights[:, e : e + 1] * dense[e] for e in range(4)))


def test_deep_constraint_switches_off_experts_above_the_mean_by_the_margin_and_renormalises():
    config = tiny_config("comet_vit", routing="deep", num_experts=4, deep_constraint_margin=0.1)
    router = filled_block(config).router
    x = torch.randn(5, 32)
    with torch.no_grad():
        router.assignment_totals.copy_(torch.tensor([10.0, 3.2, 1.0, 1.8]))  # mean 4: expert 0 is 6 over, 3.2 is not
        raw = router.eval()(x).expert_weights
        constrained = router.train()(x).expert_weights
    assert router.allowed_experts().tolist() == [False, True, True, True]
    assert (constrained[:, 0] == 0).all()
    torch.testing.assert_close(constrained.sum(-1), torch.ones(5))
    torch.testing.assert_close(constrained[:, 1:], raw[:, 1:] / raw[:, 1:].sum(-1, keepdim=True))
    with torch.no_grad():
        router.assignment_totals.copy_(torch.tensor([4.3, 4.0, 4.0, 3.7]))  # 4.3 - 4 = 0.3 < 0.1 * 4 = 0.4: all on
    assert router.allowed_experts().all()


def test_deep_top_k_runs_only_the_kept_experts():
    config = tiny_config("comet_vit", routing="deep", num_experts=4, mixture_top_k=1)
    block = filled_block(config).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        decision = block.router(x)
        assert decision.expert_weights is None and decision.top_k_index.shape == (5, 1)
        torch.testing.assert_close(decision.top_k_weights, torch.ones(5, 1))
        e = decision.top_k_index[:, 0]
        x_e = torch.nn.functional.gelu(
            torch.einsum("td,tid->ti", x, block.experts.up_proj[e]) + block.experts.up_proj_bias[e]
        )
        expected = torch.einsum("ti,tdi->td", x_e, block.experts.down_proj[e]) + block.experts.down_proj_bias[e]
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


# -- block-COMET --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, head", [fh for fh in EVERY_HEAD if fh[1] != "AutoModel"])
def test_block_comet_with_keep_rate_one_equals_the_dense_ffn(family, head):
    model = tiny_model(family, head, routing="comet", comet_block_size=16, comet_keep_rate=1.0).eval()
    dense = dense_twin(model)
    inputs = tiny_inputs(family, head, with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(dense(**inputs)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "implementation, keep_rate", [("eager", 0.25), ("grouped_mm", 0.25), ("grouped_mm", 0.75), ("grouped_mm", 1.0)]
)  # 2 or 6 of 8 blocks run through the kernels, 8 of 8 through masked dense compute (default dense_block_fraction)
def test_block_comet_is_the_dense_ffn_with_whole_blocks_masked_and_the_bias_added_once(implementation, keep_rate):
    config = tiny_config("comet_vit", routing="comet", comet_block_size=16, comet_keep_rate=keep_rate)
    config._experts_implementation = implementation
    block = filled_block(config).eval()
    kept = int(keep_rate * 8)
    assert block.experts.num_experts == 8 and block.router.num_active == kept
    x = torch.randn(6, 32)
    with torch.no_grad():
        decision = block.router(x)
        masked = kept > thresholds().dense_block_fraction * 8
        assert choose_execution(block.experts, decision) == ("masked_dense" if masked else implementation)
        assert torch.equal(decision.top_k_weights, torch.ones(6, kept))
        scores = x @ block.router.projection.T  # (T, 8 blocks)
        assert set(map(tuple, decision.top_k_index.sort(-1).values.tolist())) == set(
            map(tuple, scores.topk(kept, dim=-1).indices.sort(-1).values.tolist())
        )
        w1 = block.experts.up_proj.reshape(128, 32)
        b1 = block.experts.up_proj_bias.reshape(128)
        w2 = block.experts.down_proj.permute(1, 0, 2).reshape(32, 128)
        unit_mask = torch.zeros(6, 8).scatter(1, decision.top_k_index, 1.0).repeat_interleave(16, dim=1)
        expected = (torch.nn.functional.gelu(x @ w1.T + b1) * unit_mask) @ w2.T + block.experts.output_bias
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert "experts.down_proj_bias" not in block.state_dict()  # the per-expert output bias is a fixed zero


def test_block_comet_projection_scores_blocks_and_is_fixed():
    model = tiny_model("comet_bert", "AutoModel", routing="comet", comet_block_size=32, comet_keep_rate=0.5)
    router = model.encoder.layer[0].intermediate.router
    assert router.projection.shape == (128 // 32, 32) and not router.projection.requires_grad
    assert router.num_active == 2
    assert [n for n, _ in model.named_parameters() if ".router." in n] == []
