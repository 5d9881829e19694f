"""Table-driven validation of every MoE config field through the three entry points: construction, loading
(``from_pretrained`` overrides and an edited ``config.json``) and assignment after construction."""

import copy
import json
import math
import pickle

import pytest
import torch
from conftest import TINY
from transformers import AutoConfig

from hf_comet.modeling.configuration_comet import MOE_FIELD_DEFAULTS, MOE_FIELD_RULES, routings_reading
from hf_comet.modeling.moe_routers import ROUTER_CLASSES

FAMILY = "comet_gpt2"  # 2 blocks, FFN width 128
NAN, INF = float("nan"), float("inf")

# bad values per rule kind, valid under no routing
BAD_INT = [True, False, 2.5, 2.0, "2", None, [2], {"a": 1}, NAN]
BAD_FLOAT = [True, False, "0.1", None, [0.1], {"a": 1}, NAN, INF, -INF]
BAD_BOOL = ["False", "True", 0, 1, 1.0, None, [True], {"a": 1}]
BAD_STR = [1, True, None, ["comet"], {"a": 1}, 1.5, "COMET", "", " comet"]

BAD_VALUES = {
    "routing": [*BAD_STR, "hashed", "top_k", "dense"],
    "num_experts": [*BAD_INT, 0, -1, -4],
    "num_experts_per_tok": [*BAD_INT, 0, -1, 5],
    "norm_topk_prob": BAD_BOOL,
    "moe_intermediate_size": [x for x in BAD_INT if x is not None] + [0, -8],
    "comet_keep_rate": [*BAD_FLOAT, 0, 0.0, -0.1, 1.01, 2],
    "moe_layers": [[0.5], [], [2], [-1], [0, 0], [True], ["0"], 0, "0,1", {"0": 1}, {0, 1}, [[0]], [None], True, NAN],
    "router_aux_loss_coef": [*BAD_FLOAT, -1e-3, -1],
    "router_z_loss_coef": [*BAD_FLOAT, -1e-3],
    "output_router_logits": BAD_BOOL,
    "routing_seed": [*BAD_INT, -1, 2**63],
    "comet_block_size": [*BAD_INT, 0, -16, 48],
    "comet_router": [x for x in BAD_STR if x not in ("COMET", " comet")] + ["Full", "lowrank", "structured ", "fit"],
    "comet_router_rank": [*BAD_INT, 0, -1],
    "capacity_factor": [x for x in BAD_FLOAT if x is not None] + [0, 0.0, -1.25],
    "router_jitter_noise": [*BAD_FLOAT, -0.1, 1, 1.5],
    "gate_hidden_size": [*BAD_INT, 0, -1],
    "mixture_top_k": [x for x in BAD_INT if x is not None] + [0, 5],
    "deep_constraint_steps": [*BAD_INT, -1],
    "deep_constraint_margin": [*BAD_FLOAT, -0.5],
    "similarity_beta_s": [*BAD_FLOAT, -1.0],
    "similarity_beta_d": [*BAD_FLOAT, -1e-9],
    "similarity_num_pairs": [*BAD_INT, 0, -1],
    "expert_output_bias": [x for x in BAD_STR if x != "COMET"] + ["per-expert", "none", "SHARED"],
    "router_scale": [*BAD_FLOAT, 0, 0.0, -1.0],
    "converted_from": [1, True, ["gpt2"], {"a": 1}, 1.5],
    "conversion_method": [1, True, "moefy", "", ["comet"], {"a": 1}, "COMET"],
    "split_method": [1, True, "kmean", "", ["random"], {"a": 1}],
    "conversion_seed": [x for x in BAD_INT if x is not None] + [-1],
    "sparsify_cluster": [1, True, "kmeans", "", ["none"], {"a": 1}, "Coactivation"],
}


def routing_for(field: str) -> str:
    """A routing that reads ``field`` (so the value itself, not the routing, is what gets refused)."""
    return routings_reading(field)[0] if not MOE_FIELD_RULES[field].common else "topk"


def base_fields(routing: str) -> dict:
    reads = ROUTER_CLASSES[routing].config_fields
    fields = dict(TINY[FAMILY], routing=routing)
    fields.update({k: v for k, v in {"num_experts": 4, "num_experts_per_tok": 2}.items() if k in reads})
    return fields


CASES = [(field, value) for field, values in BAD_VALUES.items() for value in values]
IDS = [f"{field}={value!r}" for field, value in CASES]


def test_every_field_has_a_rule_and_many_bad_values():
    assert set(BAD_VALUES) == set(MOE_FIELD_RULES) == set(MOE_FIELD_DEFAULTS)
    assert len(CASES) >= 200


def assert_names(error: pytest.ExceptionInfo, field: str, value) -> None:
    message = str(error.value)
    assert field in message, message
    assert repr(value) in message, message


@pytest.mark.parametrize("field, value", CASES, ids=IDS)
def test_bad_value_refused_at_construction(field, value):
    fields = base_fields(routing_for(field))
    with pytest.raises(ValueError) as error:
        AutoConfig.for_model(FAMILY, **{**fields, field: value})
    assert_names(error, field, value)


@pytest.mark.parametrize("field, value", CASES, ids=IDS)
def test_bad_value_refused_on_assignment_and_old_value_kept(field, value):
    config = AutoConfig.for_model(FAMILY, **base_fields(routing_for(field)))
    old = copy.deepcopy(getattr(config, field))
    with pytest.raises(ValueError) as error:
        setattr(config, field, value)
    assert_names(error, field, value)
    after = getattr(config, field)
    assert after == old or (isinstance(old, float) and math.isnan(old) and math.isnan(after))
    config.validate_moe_config()  # still a valid config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good config saved per routing that reads each field: ``{routing: folder}``."""
    folders = {}
    for routing in {routing_for(field) for field in BAD_VALUES}:
        folder = tmp_path_factory.mktemp(routing)
        AutoConfig.for_model(FAMILY, **base_fields(routing)).save_pretrained(folder)
        folders[routing] = folder
    return folders


@pytest.mark.parametrize("field, value", CASES, ids=IDS)
def test_bad_value_refused_when_loading(field, value, saved, tmp_path):
    folder = saved[routing_for(field)]
    with pytest.raises(ValueError) as error:  # a from_pretrained override
        AutoConfig.from_pretrained(folder, **{field: value})
    assert_names(error, field, value)
    if isinstance(value, float) and not math.isfinite(value) or isinstance(value, set):
        return  # JSON cannot hold it
    data = json.loads((folder / "config.json").read_text())
    data[field] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:  # a config.json edited on disk
        AutoConfig.from_pretrained(tmp_path)
    assert_names(error, field, json.loads(json.dumps(value)))


GOOD_VALUES = {
    "num_experts": [2, 8, 128],
    "num_experts_per_tok": [1, 4],
    "norm_topk_prob": [False, True],
    "moe_intermediate_size": [None, 1, 36, 512],
    "comet_keep_rate": [1, 1.0, 1e-6, 0.25],
    "moe_layers": [None, [0], [1], [1, 0]],
    "router_aux_loss_coef": [0, 0.0, 0.2, 3],
    "router_z_loss_coef": [0, 1e-3],
    "output_router_logits": [True, False],
    "routing_seed": [0, 7, 2**63 - 1],
    "comet_block_size": [1, 2, 16, 128],
    "comet_router": ["full", "structured", "fitted"],
    "comet_router_rank": [1, 16, 4096],
    "capacity_factor": [None, 1, 1.25, 1e-3],
    "router_jitter_noise": [0, 0.0, 0.5, 0.999],
    "gate_hidden_size": [1, 32],
    "mixture_top_k": [None, 1, 4],
    "deep_constraint_steps": [0, 5],
    "deep_constraint_margin": [0, 0.5, 2],
    "similarity_beta_s": [0, 0.5],
    "similarity_beta_d": [0, 0.01],
    "similarity_num_pairs": [1, 99],
    "expert_output_bias": ["per_expert", "shared"],
    "router_scale": [0.5, 1, 2.0],
    "converted_from": [None, "gpt2", "/tmp/dense"],
    "conversion_method": [None, "comet", "upcycle", "split"],
    "split_method": [None, "contiguous", "random", "kmeans"],
    "conversion_seed": [None, 0, 3],
    "sparsify_cluster": [None, "none", "coactivation"],
}
GOOD = [(field, value) for field, values in GOOD_VALUES.items() for value in values]


@pytest.mark.parametrize("field, value", GOOD, ids=[f"{f}={v!r}" for f, v in GOOD])
def test_good_value_round_trips_through_every_entry_point(field, value, saved, tmp_path):
    routing = routing_for(field)
    config = AutoConfig.for_model(FAMILY, **{**base_fields(routing), field: value})
    assert getattr(config, field) == value
    config.save_pretrained(tmp_path)
    assert getattr(AutoConfig.from_pretrained(tmp_path), field) == value
    assert getattr(AutoConfig.from_pretrained(saved[routing], **{field: value}), field) == value
    assigned = AutoConfig.for_model(FAMILY, **base_fields(routing))
    setattr(assigned, field, value)
    assert getattr(assigned, field) == value
    assert getattr(pickle.loads(pickle.dumps(config)), field) == value
    assert getattr(copy.deepcopy(config), field) == value


def test_routing_missing_is_added_to_the_table():
    assert set(GOOD_VALUES) == set(MOE_FIELD_RULES) - {"routing"}


@pytest.mark.parametrize("routing", list(ROUTER_CLASSES))
def test_defaults_are_never_refused_and_every_field_is_serialised(routing, tmp_path):
    config = AutoConfig.for_model(FAMILY, **base_fields(routing))
    data = config.to_dict()
    assert set(MOE_FIELD_RULES) <= set(data) and "_moe_checked" not in data
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {k: loaded[k] for k in MOE_FIELD_RULES} == {k: data[k] for k in MOE_FIELD_RULES}


IGNORED = [
    (routing, field)
    for routing, cls in ROUTER_CLASSES.items()
    for field, rule in MOE_FIELD_RULES.items()
    if not rule.common and field not in cls.config_fields and field not in cls.fixed_fields and field in GOOD_VALUES
]


@pytest.mark.parametrize("routing, field", IGNORED, ids=[f"{r}-{f}" for r, f in IGNORED])
def test_a_field_the_routing_does_not_read_is_refused_naming_the_routings_that_do(routing, field):
    value = next(v for v in GOOD_VALUES[field] if v != MOE_FIELD_DEFAULTS[field])
    with pytest.raises(ValueError, match="only applies to routing") as error:
        AutoConfig.for_model(FAMILY, **{**base_fields(routing), field: value})
    assert_names(error, field, value)
    assert all(repr(reader) in str(error.value) for reader in routings_reading(field))
    config = AutoConfig.for_model(FAMILY, **base_fields(routing))
    with pytest.raises(ValueError, match="only applies to routing"):
        setattr(config, field, value)
    assert getattr(config, field) == MOE_FIELD_DEFAULTS[field]


def test_readers_come_from_the_routers_config_fields():
    assert set(routings_reading("num_experts")) == {"topk", "noisy_topk", "switch", "attentive", "deep", "hash"}
    assert set(routings_reading("router_aux_loss_coef")) == {"topk", "noisy_topk", "switch", "attentive"}
    assert set(routings_reading("router_z_loss_coef")) == {"topk", "noisy_topk", "switch"}
    assert set(routings_reading("comet_keep_rate")) == {"comet"}
    assert set(routings_reading("routing_seed")) == set(ROUTER_CLASSES)


def test_cross_field_rule_on_assignment_restores_the_old_value():
    config = AutoConfig.for_model(FAMILY, **base_fields("topk"))
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        config.num_experts_per_tok = 5
    assert config.num_experts_per_tok == 2
    with pytest.raises(ValueError, match="num_experts=3"):
        config.num_experts = 3  # does not divide the FFN width 128
    assert config.num_experts == 4
    with pytest.raises(ValueError, match="moe_layers"):
        AutoConfig.for_model(FAMILY, **{**base_fields("topk"), "moe_layers": [1]}).n_layer = 1
    # a change needing several fields at once: update_moe (and upstream update) validate once, atomically
    config.update_moe(routing="attentive", mixture_top_k=2, num_experts_per_tok=2)
    assert (config.routing, config.mixture_top_k) == ("attentive", 2)
    with pytest.raises(ValueError, match="mixture_top_k"):
        config.update_moe(routing="topk", num_experts_per_tok=3)
    assert (config.routing, config.num_experts_per_tok) == ("attentive", 2)
    config.update({"routing": "topk", "mixture_top_k": None, "num_experts_per_tok": 3})
    assert (config.routing, config.num_experts_per_tok) == ("topk", 3)


def test_upstream_attribute_paths_still_work(tmp_path):
    config = AutoConfig.for_model(FAMILY, **base_fields("topk"))
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    config.num_labels = 5
    config.update_from_string("num_experts_per_tok=3,output_router_logits=true")
    assert config.num_experts_per_tok == 3 and config.output_router_logits is True
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path, routing="switch", num_experts_per_tok=2)  # overrides together
    assert loaded.routing == "switch"
    assert type(loaded).from_dict(loaded.to_dict()).to_dict() == loaded.to_dict()
    assert loaded.to_diff_dict()["routing"] == "switch"


def test_a_width_grouped_mm_cannot_run_falls_back_to_eager_and_trains():
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model(FAMILY, **base_fields("topk"), n_inner=36)  # expert width 9: not 16-byte strides
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(3, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
