"""COMET routing (Shaier et al., ICLR 2025): exact-k masks, frozen persisted projection, dense equivalence at keep 1."""

import pytest
import torch
import torch.nn.functional as F
from conftest import EVERY_HEAD, dense_twin, main_output, tiny_inputs, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from hf_comet import CometRouter
from hf_comet.modeling import collect_routing


def comet_blocks(model):
    return [m for m in model.modules() if isinstance(m, CometRouter)]


@pytest.mark.parametrize("keep_rate", [0.1, 0.25, 0.5, 0.9])
def test_mask_has_exactly_k_units_per_token(keep_rate):
    model = tiny_model("comet_gpt2", "AutoModel", routing="comet", comet_keep_rate=keep_rate)
    router = comet_blocks(model)[0]
    expected_k = max(1, int(keep_rate * 128 + 1e-9))
    tokens = torch.randn(50, 32)
    tokens[:5] = 0.0  # all-zero inputs give all-equal scores: the paper's >= threshold would keep every unit
    decision = router(tokens)
    assert decision.unit_mask.shape == (50, 128)
    assert set(decision.unit_mask.unique().tolist()) <= {0.0, 1.0}
    assert (decision.unit_mask.sum(-1) == expected_k).all()
    # the kept units are the k largest projection scores
    scores = tokens[5:] @ router.projection.t()
    kth = scores.topk(expected_k, dim=-1).values[:, -1:]
    assert ((scores >= kth).float() == decision.unit_mask[5:]).all()


def test_masked_block_matches_the_formula_without_rescaling():
    model = tiny_model("comet_vit", "AutoModel", routing="comet", comet_keep_rate=0.25)
    block = model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    V = block.router.projection
    experts = block.experts
    mask = torch.zeros(10, 128).scatter_(-1, (x.reshape(10, 32) @ V.t()).topk(32, dim=-1).indices, 1.0)
    hidden = F.gelu(x.reshape(10, 32) @ experts.up_proj[0].t() + experts.up_proj_bias[0])  # activation, then mask
    expected = (hidden * mask) @ experts.down_proj[0].t() + experts.down_proj_bias[0]
    torch.testing.assert_close(block(x).reshape(10, 32), expected, rtol=0, atol=1e-6)


def test_projection_is_a_frozen_persistent_buffer_with_paper_init():
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="comet")
    routers = comet_blocks(model)
    assert len(routers) == 2
    param_names = [n for n, _ in model.named_parameters()]
    assert not any("projection" in n for n in param_names)
    state = model.state_dict()
    for i, router in enumerate(routers):
        assert f"bert.encoder.layer.{i}.intermediate.router.projection" in state
        V = router.projection
        assert V.shape == (128, 32) and not V.requires_grad
        bound = 32**-0.5
        assert V.abs().max() <= bound
        assert abs(V.mean().item()) < 0.01 and abs(V.var().item() - bound**2 / 3) < 0.1 * bound**2 / 3
    assert not torch.equal(routers[0].projection, routers[1].projection), "each block draws its own projection"


def test_projection_gets_no_gradient_and_training_leaves_it_unchanged():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_keep_rate=0.25)
    before = [r.projection.clone() for r in comet_blocks(model)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    for _ in range(3):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for router, old in zip(comet_blocks(model), before, strict=True):
        assert router.projection.grad is None
        assert torch.equal(router.projection, old)


def test_projection_depends_only_on_routing_seed_and_layer():
    a = tiny_model("comet_vit", "AutoModel", routing="comet", routing_seed=3)
    torch.manual_seed(123)  # the global RNG must not matter
    b = AutoModel.from_config(a.config)
    c = tiny_model("comet_vit", "AutoModel", routing="comet", routing_seed=4)
    for ra, rb, rc in zip(comet_blocks(a), comet_blocks(b), comet_blocks(c), strict=True):
        assert torch.equal(ra.projection, rb.projection)
        assert not torch.equal(ra.projection, rc.projection)


def test_saved_projection_is_loaded_not_redrawn(tmp_path):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet")
    custom = torch.randn(128, 32)
    comet_blocks(model)[0].projection.copy_(custom)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(comet_blocks(loaded)[0].projection, custom)
    assert torch.equal(comet_blocks(loaded)[1].projection, comet_blocks(model)[1].projection)


def test_missing_projection_is_recreated_from_the_recorded_seed(tmp_path):
    """A checkpoint without projections (e.g. a dense one being converted) gets the seeded ones, reproducibly."""
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", routing_seed=11)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "projection" not in k},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    loaded = type(model).from_pretrained(tmp_path)
    for old, new in zip(comet_blocks(model), comet_blocks(loaded), strict=True):
        assert torch.equal(old.projection, new.projection)


@pytest.mark.parametrize("family, head", [fh for fh in EVERY_HEAD if fh[1] != "AutoModel"])
def test_keep_rate_one_reproduces_the_dense_model(family, head):
    model = tiny_model(family, head, routing="comet", comet_keep_rate=1.0).eval()
    dense = dense_twin(model)
    inputs = tiny_inputs(family, head, with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(dense(**inputs)), rtol=0, atol=1e-6)


def test_keep_rate_below_one_changes_the_output():
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="comet", comet_keep_rate=0.5).eval()
    dense = dense_twin(model)
    inputs = tiny_inputs("comet_vit", "AutoModelForImageClassification", with_labels=False)
    with torch.no_grad():
        assert (model(**inputs).logits - dense(**inputs).logits).abs().max() > 1e-4


def test_comet_has_no_aux_loss_and_masks_are_identical_in_train_and_eval():
    model = tiny_model("comet_bert", "AutoModelForSequenceClassification", routing="comet", comet_keep_rate=0.25)
    inputs = tiny_inputs("comet_bert", "AutoModelForSequenceClassification")
    train_out = model.train()(**inputs, output_router_logits=True)
    eval_out = model.eval()(**inputs, output_router_logits=True)
    assert train_out.router_aux_loss is None and eval_out.router_aux_loss is None
    assert train_out.aux_loss is None and train_out.router_logits is None  # COMET has no gate
    torch.testing.assert_close(train_out.loss, eval_out.loss)  # dropout is off in tiny configs: nothing differs
    scores = []
    for mode in (model.train, model.eval):
        with collect_routing() as collector:
            mode()(**inputs)
        scores.append(collector.scores())
    for a, b in zip(*scores, strict=True):
        assert a.shape == (3 * 7, 128)
        assert torch.equal(a, b)
