"""The attentive-gating claim (issue 14 §2): the decomposition metrics against hand computations, the model against
the spec's formulas (clean mixture, attentive gate), the translation of the authors' L_s weights, distillation, and
the quick claim end to end. The verdict itself comes from the full run, not from these tests."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_comet.modeling.moe_routers import sample_similarity_loss
from hf_comet.reproduce import attentive_gating as ag


def test_decomposition_metrics_match_a_hand_computation():
    gates = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.25, 0.75]])
    # chosen experts 0, 0 (tie: first), 1, 1; their predictions 0, 0, 1, 0
    expert_probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.6, 0.4], [0.1, 0.9]], [[0.5, 0.5], [0.3, 0.7]],
                                 [[0.1, 0.9], [0.8, 0.2]]])  # fmt: skip
    metrics = ag.decomposition_metrics(gates, expert_probs)
    # joint (E, Y): (0,0) 1/2, (1,1) 1/4, (1,0) 1/4; marginals E (1/2, 1/2), Y (3/4, 1/4)
    mutual = 0.5 * math.log2(0.5 / (0.5 * 0.75)) + 0.25 * math.log2(0.25 / (0.5 * 0.25)) + 0.25 * math.log2(
        0.25 / (0.5 * 0.75))
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert metrics["I_EY"] == pytest.approx(mutual)
    assert metrics["H_s"] == pytest.approx((0 + 1 + 0 + h_quarter) / 4)
    mean = (1.75 / 4, 2.25 / 4)
    assert metrics["H_u"] == pytest.approx(-sum(p * math.log2(p) for p in mean))
    uniform = ag.decomposition_metrics(torch.full((6, 5), 0.2), torch.rand(6, 5, 10).softmax(-1))
    assert uniform["H_s"] == pytest.approx(math.log2(5)) and uniform["H_u"] == pytest.approx(math.log2(5))


def test_the_attentive_gate_and_the_clean_mixture_follow_the_spec():
    settings = ag.Settings(steps=1, eval_every=1, seeds=(0,), hidden=4, gate_hidden=6)
    model = ag.build("attentive", settings, seed=0)
    x = torch.rand(3, 1, 8, 8)
    out, gates, probs = model(x)
    experts = model.experts
    h_e = []  # expert e by hand: its own 1-channel conv, fc 64→H, ReLU
    for e in range(settings.num_experts):
        z = F.relu(F.conv2d(x, experts.conv.weight[e : e + 1], experts.conv.bias[e : e + 1], padding=1)).flatten(1)
        h_e.append(F.relu(z @ experts.w1[e] + experts.b1[e]))
    h_e = torch.stack(h_e, 1)  # (B, E, H)
    gate = model.gate
    q = gate.trunk(x) @ gate.w_q.weight.T  # Q = h_g W_q^T
    k = h_e @ gate.w_k.weight.T  # K_e = h_e W_k^T
    expected = torch.softmax((q.unsqueeze(1) * k).sum(-1) / math.sqrt(settings.hidden), dim=-1)
    torch.testing.assert_close(gates, expected)
    torch.testing.assert_close(out, (gates.unsqueeze(-1) * probs).sum(1))  # Σ p_e y_e, no second softmax
    torch.testing.assert_close(out.sum(-1), torch.ones(3))
    plain = ag.build("original", settings, seed=0)
    torch.testing.assert_close(plain.experts.w1, experts.w1)  # a seed draws the same experts for every variant
    assert ag.build("single", settings, seed=0)(x)[1].shape == (3, 1)


def test_the_library_s_l_s_on_distinct_pairs_equals_the_authors_double_sum():
    torch.manual_seed(0)
    batch, experts, beta_s, beta_d = 6, 3, 1e-2, 0.3
    inputs, gates = torch.rand(batch, 5), torch.rand(batch, experts).softmax(-1)
    distance = torch.cdist(inputs, inputs)
    distance = distance / distance.max()
    same = sum((gates[:, e, None] * gates[None, :, e] * distance).sum() for e in range(experts)) / experts
    diff = sum((gates[:, e, None] * gates[None, :, f] * distance).sum() for e in range(experts)
               for f in range(experts) if e != f) / (experts * (experts - 1))  # fmt: skip
    authors = beta_s * same - beta_d * diff / batch**2  # the code's precedence: only the β_d term is divided by B²
    ours = sample_similarity_loss(inputs, gates, ag._pairs(batch), *ag.library_betas(beta_s, beta_d, batch, batch))
    assert float(ours) == pytest.approx(float(authors), rel=1e-5)
    assert len(ag._pairs(128)[0]) == 128 * 127 // 2


def test_distillation_freezes_the_experts_and_starts_the_plain_gate_from_the_attentive_trunk():
    settings = ag.Settings(steps=1, eval_every=1, seeds=(0,), hidden=4, gate_hidden=6)
    teacher = ag.build("attentive_ls", settings, seed=0)
    student = ag.distill(teacher, settings, seed=0)
    assert isinstance(student.gate, ag.PlainGate)
    assert not any(p.requires_grad for p in student.experts.parameters())
    torch.testing.assert_close(student.gate.trunk.fc2.weight, teacher.gate.trunk.fc2.weight)
    assert student.gate.trunk is not teacher.gate.trunk and student.experts is not teacher.experts


def test_the_quick_claim_renders_the_table_and_a_verdict_and_reuses_its_runs(quick_reproduction, tmp_path, monkeypatch):
    cache = quick_reproduction[0] / "cache" / "quick"  # the session's quick run: these runs are there
    result = ag.claim(cache, tmp_path / "results", quick=True)
    from hf_comet.reproduce.stats import CONTRADICTED, INCONCLUSIVE, NOT_REPRODUCED, PARTLY, REPRODUCED

    assert any(f"**{word}**" in result.verdict
               for word in (REPRODUCED, PARTLY, INCONCLUSIVE, NOT_REPRODUCED, CONTRADICTED))  # fmt: skip
    for label in ag.LABELS.values():
        assert f"| {label} |" in result.markdown
    assert "0.038" in result.markdown  # the paper's original-gate MNIST error beside ours
    assert (tmp_path / "results" / "attentive_gating_curves.png").stat().st_size > 0

    def no_more_training(*args, **kwargs):
        raise AssertionError("a cached run was run again")

    monkeypatch.setattr(ag, "train_one", no_more_training)
    again = ag.claim(cache, tmp_path / "results", quick=True, cached_only=True)
    assert again.verdict == result.verdict and again.seconds == result.seconds
