"""Tensor-parallel plans (issue 13 §7): the configs' ``base_model_tp_plan`` shards attention, dense FFNs and the
packed experts of every routing with transformers' own machinery (``from_pretrained(...,
distributed_config=DistributedConfig(tp_size=n))``), the experts along their intermediate units with the
``comet_tp_experts`` style (`hf_comet.modeling.moe_experts.CometExpertsTensorParallel`). In-process checks that every
expert weight has a plan entry (transformers' ``test_moe_parallel_plans_shard_experts`` for the TP plan); one
2-process CPU run (gloo) that compares sharded and plain models, forward and backward (docs/decisions.md,
"Parallelism plans")."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROUTING_NAMES, tiny_model
from transformers.distributed.parallel_utils import (
    ALL_PARALLEL_STYLES,
    _get_parameter_plan,
    replace_layer_number_by_wildcard,
)

from hf_comet import CometBertConfig, CometGPT2Config, CometViTConfig
from hf_comet.modeling.moe_experts import TP_EXPERTS_STYLE

HERE = Path(__file__).resolve().parent
FAMILY_HEADS = {
    "comet_gpt2": "AutoModelForCausalLM",
    "comet_vit": "AutoModelForImageClassification",
    "comet_bert": "AutoModelForMaskedLM",
}


def _expert_weight_names(model) -> list[str]:
    """transformers' `_get_expert_weight_names` (tests/test_tensor_parallel_mixin.py): the projections of every
    experts module (``has_gate``), plus our up-projection bias, which is sharded with them."""
    params = dict(model.named_parameters())
    names = []
    for name, module in model.named_modules():
        if hasattr(module, "has_gate"):
            projections = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj", "up_proj_bias")
            names += [f"{name}.{p}" for p in projections if f"{name}.{p}" in params]
    return names


@pytest.mark.parametrize("family", list(FAMILY_HEADS))
@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_tp_plan_shards_every_expert_weight(family, routing):
    """Every expert weight of every routing has a TP plan entry, the experts module has ``comet_tp_experts`` (a
    registered style), and the replicated ones (router, output biases) have none that shards them."""
    model = tiny_model(family, FAMILY_HEADS[family], routing=routing, moe_layers=[1])
    names = _expert_weight_names(model)
    assert len(names) == 3  # one MoE block (layer 1); layer 0 is dense
    assert not [n for n in names if _get_parameter_plan(n, model.tp_plan, is_weight=True) is None]
    experts = names[0].rsplit(".", 1)[0]
    assert _get_parameter_plan(experts, model.tp_plan, is_weight=False) == TP_EXPERTS_STYLE
    assert TP_EXPERTS_STYLE in ALL_PARALLEL_STYLES
    plan_of = {n: _get_parameter_plan(n, model.tp_plan, is_weight=False) for n, _ in model.named_parameters()}
    assert not {n: s for n, s in plan_of.items() if (".router." in n or n.endswith(("down_proj_bias", "output_bias")))
                and s is not None}
    assert model.ep_plan == {}  # no expert-parallel plan (docs/decisions.md, "Parallelism plans")


@pytest.mark.parametrize("config_class", [CometGPT2Config, CometViTConfig, CometBertConfig])
def test_tp_plan_rules_name_modules(config_class):
    """Every rule of the base model's plan names a module or parameter of a model with a dense and a MoE block
    (transformers warns, and applies nothing, for a rule that matches nothing)."""
    family = config_class.model_type
    model = tiny_model(family, "AutoModel", routing="topk", moe_layers=[1])
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    generic = {replace_layer_number_by_wildcard(n) for n in names}
    assert set(config_class.base_model_tp_plan) <= generic


@pytest.mark.parametrize("family", list(FAMILY_HEADS))
@pytest.mark.parametrize("moe_layers", [None, [0, 1], [1]])
def test_every_rule_of_a_models_plan_names_a_module_or_parameter(family, moe_layers):
    """transformers' ``test_tp_plan_matches_params``: no rule may match nothing, so the dense-FFN rules appear only
    when a block is dense (every block is an MoE block for ``None`` and ``[0, 1]``)."""
    model = tiny_model(family, FAMILY_HEADS[family], routing="topk", moe_layers=moe_layers)
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    matched = {rule for rule in model.tp_plan for n in names if _get_parameter_plan(n, {rule: "x"}, is_weight=True)}
    assert set(model.tp_plan) == matched
    left_out = set(type(model.config).base_model_tp_plan) - set(model.config.base_model_tp_plan)
    assert bool(left_out) == (family != "comet_gpt2" and moe_layers != [1])  # GPT-2's Conv1D FFNs have no rules


def test_gpt2_plan_shards_the_input_embedding_with_its_tied_head():
    """transformers' ``test_tp_plan_shards_input_embeddings`` and ``test_tied_weights_are_sharded_together``."""
    for head in ("AutoModelForCausalLM", "CometGPT2DoubleHeadsModel", "AutoModel"):
        model = tiny_model("comet_gpt2", head, routing="topk")
        wte = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
        assert _get_parameter_plan(f"{wte}.weight", model.tp_plan, is_weight=True) == "embedding_rowwise"
        if head != "AutoModel":
            assert model.tp_plan["lm_head"] == "colwise_gather_output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKPOINTS = [
    ("comet_gpt2", "topk", [0, 1]),
    ("comet_gpt2", "comet", [0, 1]),
    ("comet_gpt2", "block_comet", [0, 1]),  # shared output bias
    ("comet_bert", "switch", [1]),  # attention + a dense FFN + Switch experts
    ("comet_vit", "attentive", [1]),  # the router reads the experts' activations
    ("comet_vit", "comet", [0]),
]


def test_tensor_parallel_two_processes_match_one(tmp_path):
    """Under ``torchrun --nproc_per_node 2`` (gloo), loading with ``DistributedConfig(tp_size=2)`` halves every
    expert weight (and ViT/BERT attention and dense FFN weights) on each rank, and the logits, the loss and every
    gradient (its local slice) equal the one-process model's; biases are random so an output bias added once per
    rank would show."""
    paths = []
    for family, routing, moe_layers in CHECKPOINTS:
        model = tiny_model(family, FAMILY_HEADS[family], routing=routing, moe_layers=moe_layers)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
        path = tmp_path / f"{family}-{routing}"
        model.save_pretrained(path)
        paths.append(str(path))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(HERE / "tp_script.py"), str(tmp_path), *paths]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {Path(p).name for p in paths}
        for name, result in results.items():
            sharded = result["sharded"]
            assert len([n for n in sharded if ".experts." in n]) == (6 if name.startswith("comet_gpt2") else 3), name
            # GPT-2: its two MoE blocks' experts and the token embedding on the vocabulary (Conv1D stays replicated;
            # the tied lm_head is the same parameter); ViT/BERT: 2 x 7 attention weights and biases (the rowwise output
            # bias stays replicated), a dense FFN's 3 and a MoE block's 3
            assert len(sharded) == (7 if name.startswith("comet_gpt2") else 20), (name, sharded)
            if name.startswith("comet_gpt2"):
                assert sharded["transformer.wte.weight"] == [[32, 32], [64, 32]], name  # half the vocabulary
            for local, full in sharded.values():  # one dim halved, the others whole
                pairs = list(zip(local, full, strict=True))
                assert sum(a != b for a, b in pairs) == 1 and all(a in (b, b // 2) for a, b in pairs), (name, pairs)
            assert result["logits_diff"] < 1e-5, name
            assert result["loss_diff"] < 1e-5, name
            assert result["grad_mismatch"] == {}, name
