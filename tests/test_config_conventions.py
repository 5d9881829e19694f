"""transformers' config conventions (issue 21 item 4): Mixtral's ``num_local_experts`` as an alias of
``num_experts``, unknown MoE-looking names refused by name (a typo never passes silently), ``num_experts_per_tok``
true under Switch, cards listing only the fields the routing reads, and ``converted_from`` never an absolute path."""

import json

import pytest
import transformers
import yaml
from conftest import TINY, tiny_model
from transformers import AutoConfig

from hf_comet import convert_to_moe
from hf_comet.cards import config_rows, render_model_card
from hf_comet.convert.companions import recorded_source
from hf_comet.modeling.configuration_comet import MOE_FIELD_RULES, check_unknown_moe_names

FAMILIES = list(TINY)


def gpt2(**fields):
    return AutoConfig.for_model("comet_gpt2", **{**TINY["comet_gpt2"], **fields})


# -- aliases --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_num_local_experts_is_num_experts_everywhere(family, tmp_path):
    config = AutoConfig.for_model(family, **TINY[family], routing="topk", num_local_experts=4)
    assert config.num_experts == 4 and config.num_local_experts == 4  # read back under transformers' name too
    data = config.to_dict()
    assert data["num_experts"] == 4 and "num_local_experts" not in data  # serialised under our name only
    config.num_local_experts = 2  # assignment, validated like the field
    assert config.num_experts == 2
    with pytest.raises(ValueError, match="num_experts=3"):
        config.num_local_experts = 3  # does not divide the FFN width
    assert config.num_experts == 2
    config.update_moe(num_local_experts=4)
    assert config.num_experts == 4
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, num_local_experts=2).num_experts == 2  # a from_pretrained override
    data = json.loads((tmp_path / "config.json").read_text())
    data["num_local_experts"] = data.pop("num_experts")  # a config.json written with Mixtral's name
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert AutoConfig.from_pretrained(tmp_path).num_experts == 4
    assert AutoConfig.from_pretrained(tmp_path, num_experts=2).num_experts == 2  # the override wins over the file


def test_an_alias_and_its_field_with_different_values_are_refused():
    for fields in ({"num_local_experts": 4, "num_experts": 8}, {"num_local_experts": 8, "num_experts": 4}):
        with pytest.raises(ValueError, match="num_local_experts=.* and num_experts=.* disagree"):
            gpt2(routing="topk", **fields)  # num_experts=8 is the default: given explicitly, still refused
    assert gpt2(routing="topk", num_local_experts=4, num_experts=4).num_experts == 4  # the same value twice is fine
    config = gpt2(routing="topk", num_experts=4)
    with pytest.raises(ValueError, match="disagree"):
        config.update_moe(num_local_experts=2, num_experts=4)
    assert config.num_experts == 4


# -- unknown names --------------------------------------------------------------------------------------------------
TYPOS = {
    "num_experts_per_token": "num_experts_per_tok",
    "num_expert": "num_experts",
    "comet_keeprate": "comet_keep_rate",
    "moe_layer": "moe_layers",
    "router_aux_loss_coeff": "router_aux_loss_coef",
    "routing_sed": "routing_seed",
}


@pytest.mark.parametrize("typo, field", TYPOS.items())
def test_a_typo_of_an_moe_field_is_refused_naming_the_field_at_every_entry_point(typo, field, tmp_path):
    with pytest.raises(ValueError, match=f"'{typo}' is not a comet_gpt2 config field; did you mean '{field}'"):
        gpt2(routing="topk", **{typo: 2})
    config = gpt2(routing="topk")
    with pytest.warns(UserWarning, match=f"did you mean '{field}'.*changes nothing"):
        setattr(config, typo, 2)  # a warning only: transformers' own tests set arbitrary attributes
    with pytest.raises(ValueError, match=f"did you mean '{field}'"):
        config.update_moe(**{typo: 2})
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"did you mean '{field}'"):
        AutoConfig.from_pretrained(tmp_path, **{typo: 2})
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, typo: 2}))
    with pytest.raises(ValueError, match=f"did you mean '{field}'"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "name, message",
    [
        ("expert_capacity", "capacity_factor"),  # Switch Transformers' token count: not our factor
        ("mlp_only_layers", "moe_layers"),  # Qwen3-MoE's dense blocks: the complement of ours
        ("n_routed_experts", "the MoE fields are routing, num_experts"),  # MoE-looking, no close field
        ("router_type", "the MoE fields are"),
    ],
)
def test_other_libraries_moe_names_are_refused_with_advice(name, message):
    with pytest.raises(ValueError, match=message):
        gpt2(routing="topk", **{name: 1})


def test_other_unknown_names_keep_transformers_behaviour():
    # PreTrainedConfig stores unknown keyword arguments as attributes (transformers' own config tests rely on it)
    config = gpt2(routing="topk", my_metadata="x", intermediate_size=64, num_layers=3, experts_implementation="eager")
    assert config.my_metadata == "x" and config.num_layers == 3
    config.another = 1
    assert config.another == 1
    config._private_gate = 1  # private names are transformers' internals
    for name in ("intermediate_size", "num_layers", "head_hidden_size", "lqe_layers"):  # far from every MoE field
        check_unknown_moe_names(type(config), [name])


def test_every_field_and_the_upstream_fields_pass_the_unknown_name_check():
    for family in FAMILIES:
        config_class = type(AutoConfig.for_model(family, **TINY[family]))
        check_unknown_moe_names(config_class, [*config_class.__dataclass_fields__, *MOE_FIELD_RULES])


# -- num_experts_per_tok --------------------------------------------------------------------------------------------
def test_switch_reports_and_accepts_one_expert_per_token(tmp_path):
    config = gpt2(routing="switch", num_experts=4)
    assert config.num_experts_per_tok == 1 and config.to_dict()["num_experts_per_tok"] == 1
    assert gpt2(routing="switch", num_experts=4, num_experts_per_tok=1).num_experts_per_tok == 1
    with pytest.raises(ValueError, match="num_experts_per_tok=3 is not allowed under routing='switch', which fixes it at 1"):
        gpt2(routing="switch", num_experts=4, num_experts_per_tok=3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert all(block.router.top_k == 1 for block in model.modules() if hasattr(block, "router"))
    # a checkpoint that recorded the old default (2) for a Switch config loads as 1
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_experts_per_tok": 2}))
    assert AutoConfig.from_pretrained(tmp_path).num_experts_per_tok == 1


def test_changing_the_routing_to_switch_and_back_keeps_the_config_true():
    config = gpt2(routing="topk", num_experts=4)
    config.routing = "switch"
    assert config.num_experts_per_tok == 1
    config.update_moe(routing="topk", num_experts_per_tok=2)
    assert config.num_experts_per_tok == 2
    config.num_experts_per_tok = 3
    with pytest.raises(ValueError, match="fixes it at 1"):
        config.routing = "switch"  # top-3 cannot become Switch silently
    assert (config.routing, config.num_experts_per_tok) == ("topk", 3)  # nothing changed


@pytest.mark.parametrize("routing", ["topk", "noisy_topk"])
def test_top_k_routings_keep_their_setting(routing):
    assert gpt2(routing=routing, num_experts=4).num_experts_per_tok == 2
    assert gpt2(routing=routing, num_experts=4, num_experts_per_tok=1).num_experts_per_tok == 1


# -- cards ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "routing, listed, absent",
    [
        ("comet", {"comet_keep_rate", "comet_block_size"}, {"num_experts", "num_experts_per_tok", "router_aux_loss_coef"}),
        ("topk", {"num_experts", "num_experts_per_tok", "router_aux_loss_coef"}, {"comet_keep_rate", "capacity_factor"}),
        ("switch", {"num_experts", "num_experts_per_tok", "capacity_factor"}, {"comet_keep_rate", "mixture_top_k"}),
        ("attentive", {"num_experts", "mixture_top_k", "router_aux_loss_coef"}, {"num_experts_per_tok"}),
        ("deep", {"num_experts", "mixture_top_k"}, {"num_experts_per_tok", "router_aux_loss_coef"}),
    ],
)
def test_cards_list_only_the_fields_the_routing_reads(routing, listed, absent):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing)
    rows = dict(config_rows(model.config))
    assert listed | {"routing", "moe_layers", "routing_seed"} <= set(rows) and not absent & set(rows)
    card = str(render_model_card(model))
    for name in listed:
        assert f"| `{name}` |" in card
    for name in absent:
        assert f"| `{name}` |" not in card
    if routing == "switch":
        assert rows["num_experts_per_tok"] == 1 and "| `num_experts_per_tok` | 1 |" in card


# -- converted_from -------------------------------------------------------------------------------------------------
def test_recorded_source_is_a_hub_id_or_a_folder_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recorded_source("openai-community/gpt2") == "openai-community/gpt2"
    assert recorded_source("gpt2") == "gpt2"
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert recorded_source(snapshot) == "openai-community/gpt2"  # a Hub-cache folder is its repo id
    (tmp_path / "gpt2").mkdir()
    assert recorded_source("gpt2") == "./gpt2"  # an existing local folder, not the Hub repo of that name
    assert recorded_source(tmp_path / "runs" / "dense") == "./dense"
    assert recorded_source("/home/someone/models/dense/") == "./dense"
    assert recorded_source(".") == f"./{tmp_path.name}"
    assert recorded_source(None) is None and recorded_source("") is None


def test_converted_from_never_records_an_absolute_path(tmp_path):
    dense = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
    )
    dense.save_pretrained(tmp_path / "my-dense")
    for source in (tmp_path / "my-dense", transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "my-dense")):
        moe = convert_to_moe(source, "upcycle", routing="topk", num_experts=4)
        assert moe.config.converted_from == "./my-dense"
        moe.save_pretrained(tmp_path / "moe")
        config_text = (tmp_path / "moe" / "config.json").read_text()
        card = (tmp_path / "moe" / "README.md").read_text()
        assert str(tmp_path) not in config_text and str(tmp_path) not in card
        assert "in the local folder `./my-dense`" in card
        assert "base_model" not in yaml.safe_load(card.split("---")[1])  # a local name is no Hub base model


def test_a_card_of_an_older_checkpoint_with_an_absolute_path_shows_only_the_folder_name():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet")
    model.config.update_moe(converted_from="/home/someone/.cache/dense", conversion_method="comet", conversion_seed=0)
    card = str(render_model_card(model))
    assert "/home/someone" not in card and "`./dense`" in card


def test_conversion_takes_transformers_names_and_refuses_typos_by_name():
    from hf_comet.convert.method import ConversionError

    dense = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
    )
    assert convert_to_moe(dense, "upcycle", routing="topk", num_local_experts=2).config.num_experts == 2
    with pytest.raises(ConversionError, match="did you mean 'num_experts_per_tok'"):
        convert_to_moe(dense, "upcycle", routing="topk", num_experts_per_token=1)
