"""The deep_moe claim (issue 14 §3): its metrics against hand-computed values, the jittered data, the library gate's
balancing constraint inside the paper's model, the verdict rules, and the quick claim's section."""

import math

import numpy as np
import pytest
import torch

from hf_comet.reproduce import deep_moe


def test_entropy_and_mutual_information_match_hand_computed_values():
    assert deep_moe.entropy_bits(np.array([0, 0, 0, 1])) == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))
    a = np.array([0, 0, 1, 1])
    assert deep_moe.mutual_information(a, a) == pytest.approx(1.0)
    assert deep_moe.mutual_information(a, np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    # H(a) = 1, H(b) = H(1/4, 3/4), H(a, b) = H(1/4, 1/4, 1/2) = 1.5
    b = np.array([0, 1, 1, 1])
    assert deep_moe.mutual_information(a, b) == pytest.approx(1 + deep_moe.entropy_bits(b) - 1.5)


def test_chance_information_is_the_plug_in_bias_and_routing_summary_separates_where_from_what():
    rng = np.random.default_rng(0)
    positions, labels = rng.integers(25, size=400), rng.integers(10, size=400)
    l1, l2 = positions % 4, labels % 4  # layer 1 routes by position, layer 2 by class
    bias = deep_moe.chance_information(rng.integers(4, size=400), positions)
    assert 0.05 < bias < 0.3  # ≈ (4-1)(25-1) / (2 N ln 2) = 0.13 bits for independent variables
    summary = deep_moe.routing_summary(l1, l2, positions, labels, 4)
    assert summary["l1_mi_position_above_chance"] > 1.5 > summary["l1_mi_label_above_chance"] + 1.4
    assert summary["l2_mi_label_above_chance"] > 1.5 > summary["l2_mi_position_above_chance"] + 1.4
    assert summary["l1_nmi_position"] == pytest.approx(1.0)
    assert summary["pairs_in_use"] == 16 and summary["l1_in_use"] == summary["l2_in_use"] == 4
    assert deep_moe.routing_summary(l1 * 0, l2 * 0, positions, labels, 4)["pairs_in_use"] == 1


def test_paste_puts_each_digit_at_its_offset_on_an_empty_canvas():
    images = torch.rand(3, 8, 8)
    offsets = torch.tensor([[0, 0], [4, 4], [1, 3]])
    canvas = deep_moe.paste(images, offsets)
    assert canvas.shape == (3, 12, 12)
    for image, (r, c), out in zip(images, offsets.tolist(), canvas, strict=True):
        assert torch.equal(out[r:r + 8, c:c + 8], image)
        assert out.sum() == pytest.approx(float(image.sum()))
    assert deep_moe.position_index(offsets).tolist() == [0, 24, 8]
    split = deep_moe.jittered_digits()
    assert [len(split[p]["labels"]) for p in ("train", "validation", "test")] == [1079, 359, 359]
    assert split["test"]["positions"].unique().numel() == 25


def test_the_library_gate_switches_off_an_expert_over_the_margin_and_renormalises():
    gate = deep_moe.deep_gate(4, 6, 5, constraint_steps=2, margin=0.1, layer_idx=0)
    gate.assignment_totals.copy_(torch.tensor([100.0, 10.0, 10.0, 10.0]))  # mean 32.5: expert 0 is 67.5 over
    x = torch.randn(7, 6)
    gate.train()
    gate.refresh_state()
    decision = gate(x)
    weights = decision.expert_weights
    assert torch.all(weights[:, 0] == 0) and torch.all(weights[:, 1:] > 0)
    assert torch.allclose(weights.sum(-1), torch.ones(7))
    gate.commit(decision, None, torch.tensor(True))
    assert float(gate.assignment_totals.sum()) == pytest.approx(130 + 7)  # the used (constrained) gates count
    gate.eval()
    assert torch.all(gate(x).expert_weights[:, 0] > 0)  # never in evaluation
    gate.train()
    gate.lift_constraint()
    gate.refresh_state()
    assert not gate.constraint_active and torch.all(gate(x).expert_weights[:, 0] > 0)


def test_the_model_counts_its_constraint_phase_in_training_forwards_and_the_baselines_match_its_size():
    settings = deep_moe.DeepMoESettings(steps=4, seeds=(0,), eval_every=2, expert_hidden=8, gate_hidden=4)
    model = deep_moe.build("dmoe", settings, 0)
    assert model.gate2.gate_proj.in_features == 8  # layer 2's gate reads layer 1's mixture
    x = torch.rand(5, 144)
    for _ in range(settings.constraint_steps):
        assert all(g.constraint_active for g in model.gates())
        logits, weights = model(x)
    assert logits.shape == (5, 10) and len(weights) == 2
    assert not any(g.constraint_active for g in model.gates())
    assert float(model.gate1.assignment_totals.sum()) == pytest.approx(5 * settings.constraint_steps)
    assert not deep_moe.build("dmoe_free", settings, 0).gate1.constraint_active
    assert deep_moe.build("single_l2", settings, 0).gate2 is None
    dnn, dmoe = (deep_moe.parameter_count(deep_moe.build(v, deep_moe.DEEP_MOE_FULL, 0)) for v in ("dnn", "dmoe"))
    assert abs(dnn - dmoe) / dmoe < 0.01


def test_verdict_rules():
    from hf_comet.reproduce.stats import Comparison

    def comparison(estimate, low, high, p, mde=0.05, claimed=deep_moe.CLAIMED_BITS):
        return Comparison("c", estimate, low, high, p, mde, +1, claimed, 5, p_holm=p)

    yes = comparison(0.8, 0.5, 1.1, 0.001)
    open_ = comparison(0.1, -0.2, 0.4, 0.4)  # not significant, the interval still holds the claimed 0.1 bits
    absent = comparison(0.01, -0.02, 0.04, 0.5)  # not significant, and the interval excludes 0.1 bits
    against = comparison(-0.5, -0.8, -0.2, 0.01)
    assert deep_moe.specialisation_word(yes, yes, 14) == "reproduced"
    assert deep_moe.specialisation_word(yes, yes, 6) == "partly reproduced"  # the combinations are not used
    assert deep_moe.specialisation_word(yes, open_, 14) == "partly reproduced"
    assert deep_moe.specialisation_word(open_, absent, 16) == "inconclusive"
    assert deep_moe.specialisation_word(absent, absent, 16) == "not reproduced"
    assert deep_moe.specialisation_word(absent, against, 16) == "contradicted"
    many = comparison(10.0, 8.0, 12.0, 0.001, claimed=deep_moe.CLAIMED_PAIRS)
    assert deep_moe.collapse_word(many, 1.0) == "reproduced"
    assert deep_moe.collapse_word(many, 8.0) == "partly reproduced"  # more pairs, but no collapse without it
    assert deep_moe.collapse_word(comparison(0.2, -2.0, 2.4, 0.3, claimed=1.0), 1.0) == "inconclusive"
    assert deep_moe.collapse_word(comparison(-3.0, -4.0, -2.0, 0.01, claimed=1.0), 8.0) == "contradicted"


def test_the_quick_claim_renders_its_section_and_plot_from_four_cached_runs(quick_reproduction, tmp_path):
    cache = quick_reproduction[0] / "cache" / "quick"  # the session's quick run: these runs are there
    result = deep_moe.claim(cache, tmp_path / "results", quick=True)
    assert any(f"**{w}**" in result.verdict for w in ("reproduced", "partly reproduced", "not reproduced",
                                                          "contradicted"))  # fmt: skip
    assert "| dmoe |" in result.markdown and "pairs in use" in result.markdown and result.seconds > 0
    assert (tmp_path / "results" / "deep_moe_curves.png").exists()
    assert len((cache / "deep_moe.jsonl").read_text().splitlines()) == 4
    again = deep_moe.claim(cache, tmp_path / "results", quick=True, cached_only=True)
    assert again.verdict == result.verdict
