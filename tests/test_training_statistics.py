"""`statistics_paused`: forwards inside it do not count into the routing statistics window, and every block's
``track_statistics`` flag comes back as it was, also when the body raises."""

import pytest
import torch
from conftest import tiny_inputs, tiny_model

from hf_comet.training.statistics import statistics_paused


def test_statistics_paused_keeps_forwards_out_of_the_window_and_restores_flags_on_exception():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk")
    blocks = model.moe_blocks()
    assert len(blocks) == 2
    blocks[1].track_statistics = False  # a block someone switched off stays off
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", with_labels=False)
    with pytest.raises(RuntimeError, match="inside"):
        with statistics_paused(model):
            assert [block.track_statistics for block in blocks] == [False, False]
            with torch.no_grad():
                model.eval()(**inputs)
            raise RuntimeError("inside")
    assert [block.track_statistics for block in blocks] == [True, False]
    assert model.routing_statistics()[0]["tokens"] == 0, "the paused forward was not counted"
    with torch.no_grad():
        model(**inputs)
    assert model.routing_statistics()[0]["tokens"] > 0


def test_statistics_paused_leaves_a_dense_model_alone():
    model = torch.nn.Linear(2, 2)
    with statistics_paused(model):
        pass
