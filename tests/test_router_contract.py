"""The router contract: a router written and registered inside a test runs through all three families, trains,
saves and loads, reports statistics and gets a model card, touching no package file; RoutingDecision checks its
invariants; every registered router states the facts the rest of the package reads from it."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import main_output, tiny_config, tiny_inputs, tiny_model
from torch import nn
from transformers import initialization as init

from hf_comet.modeling.moe_routers import (
    LEARNED_FIELDS,
    LEARNED_ROUTINGS,
    MIXTURE_ROUTINGS,
    ROUTER_CLASSES,
    ROUTINGS,
    Router,
    RoutingDecision,
    masked_mean,
)

TOY_HEADS = [
    ("comet_gpt2", "AutoModelForCausalLM"),
    ("comet_vit", "AutoModelForImageClassification"),
    ("comet_bert", "AutoModelForMaskedLM"),
]


class SharpestGateRouter(Router):
    """A toy router: top-1 of a learned softmax with weight 1, and an aux loss that rewards confident gates."""

    routing = "toy_sharpest"
    config_fields = (*LEARNED_FIELDS, "router_aux_loss_coef")  # every routing-specific field it reads
    citation = "Tester, T. *A router written inside a test.* 2026."

    def __init__(self, config, layer_idx: int, hidden_size: int):
        super().__init__(config, layer_idx, hidden_size)
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        self.loss_weights = {"confidence_loss": float(config.router_aux_loss_coef)}

    @classmethod
    def validate_config(cls, config) -> None:
        if config.num_experts < 2:
            raise ValueError(f"num_experts={config.num_experts}: toy_sharpest needs at least 2 experts.")

    @classmethod
    def describe(cls, config) -> str:
        return f"Toy sharpest-gate routing over {cls.describe_experts(config)}."

    def init_weights(self, config) -> None:
        init.normal_(self.weight, mean=0.0, std=1.0)

    def forward(self, hidden_states, token_mask=None, experts=None) -> RoutingDecision:
        logits = F.linear(hidden_states, self.weight)
        probs = logits.float().softmax(dim=-1)
        top = probs.argmax(dim=-1, keepdim=True)
        return RoutingDecision(
            router_logits=logits,
            gate_probs=probs,
            top_k_index=top,
            top_k_weights=probs.gather(1, top).to(hidden_states.dtype),
        )

    def aux_losses(self, decision, token_mask):
        return {"confidence_loss": masked_mean(1.0 - decision.gate_probs.max(dim=-1).values, token_mask)}


@pytest.fixture
def toy_router(monkeypatch):
    monkeypatch.setitem(ROUTER_CLASSES, SharpestGateRouter.routing, SharpestGateRouter)
    return SharpestGateRouter


@pytest.mark.parametrize("family, head", TOY_HEADS)
def test_a_router_registered_in_a_test_runs_trains_saves_and_loads_in_every_family(family, head, toy_router, tmp_path):
    assert "toy_sharpest" in ROUTINGS and "toy_sharpest" in LEARNED_ROUTINGS
    assert "toy_sharpest" not in MIXTURE_ROUTINGS
    with pytest.raises(ValueError, match="toy_sharpest needs at least 2 experts"):
        tiny_config(family, routing="toy_sharpest", num_experts=1)
    with pytest.raises(ValueError, match="only applies to routing='comet'"):  # fields it does not read
        tiny_config(family, routing="toy_sharpest", comet_block_size=16)
    model = tiny_model(family, head, routing="toy_sharpest", router_aux_loss_coef=0.5)
    blocks = model.moe_blocks()
    assert blocks and all(isinstance(block.router, SharpestGateRouter) for block in blocks)
    assert all(block.router.weight.std() > 0.5 for block in blocks)  # the model's init ran the router's init
    inputs = tiny_inputs(family, head)
    model.train()
    out = model(**inputs)
    # the aux loss is the toy loss, weighted, averaged over layers, and part of the training loss
    assert out.router_aux_loss is not None and out.router_aux_loss > 0
    model.eval()
    task_loss = model(**inputs).loss
    torch.testing.assert_close(out.loss, task_loss + out.router_aux_loss)
    out.loss.backward()
    assert all(block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0 for block in blocks)
    stats = model.routing_statistics()[blocks[0].layer_idx]
    assert stats["tokens"] > 0 and len(stats["tokens_per_expert"]) == 4
    model.save_pretrained(tmp_path)
    assert "Toy sharpest-gate routing over 4 experts" in (tmp_path / "README.md").read_text()
    assert "A router written inside a test" in (tmp_path / "README.md").read_text()
    loaded = getattr(transformers, head).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(model(**inputs)), rtol=0, atol=1e-6)
    assert loaded.config.routing == "toy_sharpest"


def test_the_registry_is_the_one_list_of_routings():
    assert tuple(ROUTINGS) == tuple(ROUTER_CLASSES)
    assert set(LEARNED_ROUTINGS) == {name for name, cls in ROUTER_CLASSES.items() if cls.has_trainable_gate}
    assert set(MIXTURE_ROUTINGS) == {"attentive", "deep"}
    with pytest.raises(ValueError, match="routing='hashed'.*one of 'comet', 'topk'"):
        tiny_config("comet_vit", routing="hashed")


@pytest.mark.parametrize("routing", list(ROUTER_CLASSES))
def test_every_router_states_its_facts(routing):
    router_class = ROUTER_CLASSES[routing]
    config = tiny_config("comet_vit", routing=routing)
    num_experts, width = router_class.expert_layout(config)
    assert num_experts * width in (config.ffn_width, config.num_experts * config.expert_intermediate_size)
    assert router_class.num_choices(config) in (num_experts, width)
    assert isinstance(router_class.shares_output_bias(config), bool)
    assert routing in router_class.describe(config) or router_class.describe(config)
    assert router_class.citation
    assert set(router_class.config_fields) <= set(type(config).__dataclass_fields__)


def _decision(**fields):
    base = {"router_logits": torch.zeros(3, 4)}
    return RoutingDecision(**{**base, **fields})


def test_a_decision_has_exactly_one_execution_form():
    index = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one execution form"):
        _decision()
    with pytest.raises(ValueError, match="exactly one execution form.*got 2"):
        _decision(unit_mask=torch.ones(3, 8), expert_weights=torch.ones(3, 4))
    with pytest.raises(ValueError, match="top_k_index and top_k_weights go together"):
        _decision(top_k_index=index)
    with pytest.raises(ValueError, match=r"same \(tokens, k\) shape"):
        _decision(top_k_index=index, top_k_weights=torch.ones(3, 1))
    with pytest.raises(ValueError, match="gate_probs must be float32"):
        _decision(expert_weights=torch.ones(3, 4), gate_probs=torch.ones(3, 4, dtype=torch.bfloat16))
    decision = _decision(
        top_k_index=torch.tensor([[0, 2], [1, 3], [3, 0]]), top_k_weights=torch.tensor([[0.7, 0.3]] * 3)
    )
    expected = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.7, 0.0, 0.3], [0.3, 0.0, 0.0, 0.7]])
    torch.testing.assert_close(decision.combine_weights(4), expected)


@pytest.mark.parametrize(
    "routing, top_k",
    [("topk", 2), ("noisy_topk", 2), ("switch", 1), ("attentive", None), ("attentive", 2), ("deep", None), ("deep", 2)],
)
def test_gate_probs_are_the_pre_selection_distribution_for_every_learned_router(routing, top_k):
    """One quantity for the gate entropy and the similarity regulariser: a full softmax over every expert, whatever
    top-k, capacity or renormalisation the combine weights went through."""
    fields = {"routing": routing}
    if routing in ("attentive", "deep"):
        fields["mixture_top_k"] = top_k
    model = tiny_model("comet_vit", "AutoModel", **fields).eval()
    block = model.moe_blocks()[0]
    decision = block.router(torch.randn(5, 32), experts=block.experts)
    probs = decision.gate_probs
    assert probs.dtype == torch.float32 and (probs > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    combine = decision.combine_weights(4)
    if top_k is None:  # a dense mixture combines with the distribution itself
        torch.testing.assert_close(combine, probs, rtol=1e-6, atol=1e-7)
    else:
        assert ((combine > 0).sum(-1) == top_k).all()  # sparse combine weights, full distribution
