"""Every router trains: 50 steps of a tiny ViT on scikit-learn's bundled digits, the loss falls, and routers that
promise balance leave no expert dead."""

import pytest
import torch
import transformers
from conftest import ROUTING_NAMES, tiny_config

from hf_comet.data import digits_images

BALANCED = {"topk", "noisy_topk", "switch", "attentive", "deep"}  # routers with a balance loss or constraint


@pytest.fixture(scope="module")
def digits():
    train, _ = digits_images()
    return train


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_fifty_steps_on_digits_lower_the_loss_and_keep_every_expert_alive(routing, digits):
    extra = {"deep_constraint_steps": 20} if routing == "deep" else {}
    config = tiny_config("comet_vit", routing=routing, num_labels=10, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(50):
        if step == 40:
            model.reset_routing_statistics()  # judge balance on the last 10 steps, after the deep constraint
        idx = torch.randint(0, len(digits["labels"]), (64,), generator=g)
        out = model(pixel_values=digits["pixel_values"][idx], labels=digits["labels"][idx])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, (routing, first, last)
    stats = model.routing_statistics()
    if routing in BALANCED:
        for layer, layer_stats in stats.items():
            assert layer_stats["dead_experts"] == 0, (routing, layer, layer_stats["tokens_per_expert"])
    if routing == "deep":
        assert all(not block.router.constraint_active for block in model.moe_blocks())
