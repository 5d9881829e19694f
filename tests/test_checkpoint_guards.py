"""Checkpoints that refuse to load wrong: missing or unexpected MoE tensors, a config.json edited after saving
(routing, experts, moe_layers, keep rate, block size, seed), and damaged projection bytes raise
CheckpointMismatchError naming the tensors or fields; a recreated projection is reported as recreated."""

import json

import pytest
import torch
import transformers
from conftest import TINY, main_output, tiny_inputs, tiny_model
from safetensors.torch import load_file, save_file
from transformers.testing_utils import CaptureLogger

from hf_comet.modeling import modeling_comet_common
from hf_comet.modeling.modeling_comet_common import CheckpointMismatchError

CAUSAL = ("comet_gpt2", "AutoModelForCausalLM")


def _saved(tmp_path, **fields):
    model = tiny_model(*CAUSAL, **fields)
    model.save_pretrained(tmp_path)
    return model


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _load(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)


@pytest.mark.parametrize(
    "routing, dropped",
    [
        ("topk", "transformer.h.1.mlp.experts.up_proj"),
        ("topk", "transformer.h.0.mlp.router.weight"),
        ("comet", "transformer.h.0.mlp.experts.down_proj"),
        ("deep", "transformer.h.1.mlp.router.assignment_totals"),
    ],
)
def test_a_missing_moe_tensor_is_named_in_a_warning_that_says_what_it_means(routing, dropped, tmp_path):
    """transformers' convention is to load and initialise missing weights; the warning must say it is an MoE
    tensor and that the routing is not the saved one (never only the generic report)."""
    _saved(tmp_path, routing=routing)
    _edit_weights(tmp_path, lambda w: w.pop(dropped))
    logger = transformers.utils.logging.get_logger(modeling_comet_common.__name__)
    with CaptureLogger(logger) as captured:
        _load(tmp_path)
    assert "MoE tensors missing from the checkpoint were initialised at random" in captured.out
    assert dropped in captured.out and "routing and outputs differ" in captured.out


@pytest.mark.parametrize(
    "saved_fields, edited, message",
    [
        (dict(routing="topk"), dict(routing="switch"), "routing 'topk' \\(config: 'switch'\\)"),
        (dict(routing="topk"), dict(moe_layers=[0]), "no place for: transformer.h.1.mlp.experts"),
        (dict(routing="topk", moe_layers=[0]), dict(moe_layers=None), "no place for: transformer.h.1.mlp.c_fc"),
        (dict(routing="comet"), dict(routing_seed=3), "routing_seed 0 \\(config: 3\\)"),
        (dict(routing="attentive"), dict(routing="deep"), "routing 'attentive'|no place for|missing"),
    ],
)
def test_a_config_edited_after_saving_is_refused_naming_the_field(saved_fields, edited, message, tmp_path):
    _saved(tmp_path, **saved_fields)
    _edit_config(tmp_path, **edited)
    with pytest.raises(CheckpointMismatchError, match=message):
        _load(tmp_path)


@pytest.mark.parametrize("edited", [dict(num_experts=2, num_experts_per_tok=1), dict(comet_block_size=32)])
def test_a_config_that_changes_tensor_shapes_is_refused(edited, tmp_path):
    routing = "comet" if "comet_block_size" in edited else "topk"
    _saved(tmp_path, routing=routing, **({"comet_block_size": 16} if routing == "comet" else {}))
    _edit_config(tmp_path, **edited)
    with pytest.raises((CheckpointMismatchError, RuntimeError, ValueError)) as error:
        _load(tmp_path)
    assert any(word in str(error.value) for word in ("num_experts", "comet_block_size", "expert_width", "size"))


def test_an_override_at_load_is_checked_like_config_json(tmp_path):
    _saved(tmp_path, routing="topk")
    with pytest.raises(CheckpointMismatchError, match="routing 'topk'"):
        _load(tmp_path, routing="switch")


@pytest.mark.parametrize("where", ["override", "config.json"])
def test_another_comet_keep_rate_runs_the_same_weights_with_a_warning(where, tmp_path):
    saved = _saved(tmp_path, routing="comet", comet_keep_rate=0.5)
    logger = transformers.utils.logging.get_logger(modeling_comet_common.__name__)
    if where == "config.json":
        _edit_config(tmp_path, comet_keep_rate=0.25)
    with CaptureLogger(logger) as captured:
        loaded = _load(tmp_path, **({"comet_keep_rate": 0.25} if where == "override" else {}))
    assert "running with k=32 as requested" in captured.out
    assert loaded.moe_blocks()[0].router.num_active == 32
    loaded.save_pretrained(tmp_path / "again")  # the record now describes k=32
    assert _load(tmp_path / "again").moe_blocks()[0].router.num_active == 32
    assert saved.moe_blocks()[0].router.num_active == 64


def test_damaged_projection_bytes_of_the_same_size_are_detected(tmp_path):
    _saved(tmp_path, routing="comet")

    def flip(weights):
        weights["transformer.h.0.mlp.router.projection"][3, 5] += 1e-3

    _edit_weights(tmp_path, flip)
    with pytest.raises(CheckpointMismatchError, match="layer 0's COMET projection does not match the checksum"):
        _load(tmp_path)


def test_a_projection_missing_from_the_file_is_recreated_and_said_so(tmp_path):
    saved = _saved(tmp_path, routing="comet", routing_seed=4)
    _edit_weights(tmp_path, lambda w: [w.pop(k) for k in list(w) if k.endswith("projection")])
    logger = transformers.utils.logging.get_logger(modeling_comet_common.__name__)
    transformers.logging.set_verbosity_warning()
    try:
        with CaptureLogger(logger) as ours, CaptureLogger(transformers.modeling_utils.logger) as generic:
            loaded = _load(tmp_path).eval()
    finally:
        transformers.logging.set_verbosity_error()
    assert "recreated from routing_seed=4" in ours.out and "identical" in ours.out
    assert "projection" in generic.out  # transformers lists every tensor the file lacks (its own tests require it)
    inputs = tiny_inputs(*CAUSAL)
    with torch.no_grad():
        torch.testing.assert_close(
            main_output(loaded(**inputs)), main_output(saved.eval()(**inputs)), rtol=0, atol=1e-6
        )


def test_a_dense_checkpoint_loaded_into_an_moe_class_is_refused_with_the_way_out(tmp_path):
    moe_config = tiny_model(*CAUSAL, routing="topk").config
    dense = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY["comet_gpt2"]))
    dense.save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="convert_to_moe"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, config=moe_config)
