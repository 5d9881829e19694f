"""Config construction, validation (bad input refused with ValueError naming the field) and JSON round trips."""

import pytest
from conftest import TINY, tiny_config
from transformers import AutoConfig, BertConfig, GPT2Config, ViTConfig

from hf_comet import CometBertConfig, CometGPT2Config, CometViTConfig
from hf_comet.modeling.configuration_comet import comet_num_active

FAMILIES = list(TINY)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_config_builds_our_class_and_keeps_upstream_fields(family):
    config = AutoConfig.for_model(family, routing="topk", num_experts=4, **TINY[family])
    expected = {
        "comet_gpt2": (CometGPT2Config, GPT2Config),
        "comet_vit": (CometViTConfig, ViTConfig),
        "comet_bert": (CometBertConfig, BertConfig),
    }
    ours, upstream = expected[family]
    assert type(config) is ours and isinstance(config, upstream)
    assert config.model_type == family
    assert config.hidden_size == 32 and config.num_hidden_layers == 2
    assert set(config.keys_to_ignore_at_inference) >= {"router_logits", "aux_loss"}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_round_trip(family, tmp_path):
    config = tiny_config(
        family, routing="topk", moe_layers=[1], router_scale=0.3, router_z_loss_coef=0.001, routing_seed=7
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    for field in ("routing", "moe_layers", "router_scale", "router_z_loss_coef", "routing_seed", "num_experts"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"routing": "hashed"}, "routing"),
        ({"comet_keep_rate": 0.0}, "comet_keep_rate"),
        ({"comet_keep_rate": -0.1}, "comet_keep_rate"),
        ({"comet_keep_rate": 1.01}, "comet_keep_rate"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"num_experts": 0, "num_experts_per_tok": 0}, "num_experts"),
        ({"moe_layers": [2]}, "moe_layers"),
        ({"moe_layers": [-1]}, "moe_layers"),
        ({"moe_layers": []}, "moe_layers"),
        ({"moe_layers": [0, 0]}, "moe_layers"),
        ({"routing": "topk", "num_experts": 3, "num_experts_per_tok": 1}, "num_experts=3"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ({"routing": "comet", "comet_block_size": 0}, "comet_block_size=0"),
        ({"routing": "comet", "comet_block_size": 48}, "comet_block_size=48 does not divide"),
        ({"routing": "topk", "comet_block_size": 16}, "only applies to routing='comet'"),
        ({"routing": "switch", "capacity_factor": 0.0}, "capacity_factor=0.0"),
        ({"routing": "topk", "capacity_factor": 1.25}, "only applies to routing='switch'"),
        ({"routing": "switch", "router_jitter_noise": 1.5}, "router_jitter_noise"),
        ({"routing": "switch", "router_jitter_noise": -0.1}, "router_jitter_noise"),
        ({"routing": "attentive", "gate_hidden_size": 0}, "gate_hidden_size"),
        ({"routing": "attentive", "mixture_top_k": 5}, "mixture_top_k=5"),
        ({"routing": "topk", "mixture_top_k": 2}, "num_experts_per_tok"),
        ({"routing": "deep", "deep_constraint_steps": -1}, "deep_constraint_steps"),
        ({"routing": "deep", "deep_constraint_margin": -0.5}, "deep_constraint_margin"),
        ({"routing": "topk", "similarity_beta_s": -1.0}, "similarity_beta_s"),
        ({"routing": "comet", "similarity_beta_d": 0.1}, "gate probabilities"),
        ({"routing": "hash", "similarity_beta_s": 0.5}, r"got routing='hash'\); .*which a routing without a gate does not"),
        ({"routing": "attentive", "similarity_num_pairs": 0}, "similarity_num_pairs"),
        ({"routing": "noisy_topk", "num_experts": 3, "num_experts_per_tok": 1}, "num_experts=3"),
    ],
)
def test_bad_moe_fields_raise_value_error_naming_the_field(family, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(family, **overrides)


def test_indivisible_ffn_width_names_the_family_field():
    with pytest.raises(ValueError, match="n_inner"):
        tiny_config("comet_gpt2", routing="topk", num_experts=3, num_experts_per_tok=1, n_inner=64)
    with pytest.raises(ValueError, match="intermediate_size"):
        tiny_config("comet_bert", routing="topk", num_experts=3, num_experts_per_tok=1)
    # an explicit expert width lifts the divisibility requirement; COMET does not read num_experts at all
    assert (
        tiny_config(
            "comet_bert", routing="topk", num_experts=3, num_experts_per_tok=1, moe_intermediate_size=40
        ).expert_intermediate_size
        == 40
    )
    with pytest.raises(ValueError, match=r"num_experts=3 only applies to routing in \('topk'"):
        tiny_config("comet_bert", routing="comet", num_experts=3)


def test_bad_value_is_refused_when_loading_a_config_file(tmp_path):
    tiny_config("comet_vit").save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"comet_keep_rate": 0.5', '"comet_keep_rate": 2.0')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="comet_keep_rate"):
        AutoConfig.from_pretrained(tmp_path)


def test_bert_feed_forward_chunking_is_refused():
    with pytest.raises(ValueError, match="chunk_size_feed_forward"):
        tiny_config("comet_bert", chunk_size_feed_forward=2)


def test_expert_width_defaults_to_an_even_split_of_the_ffn():
    assert tiny_config("comet_gpt2", routing="topk", num_experts=4).expert_intermediate_size == 128 // 4
    assert tiny_config("comet_gpt2", n_inner=96).ffn_width == 96
    assert tiny_config("comet_gpt2", routing="topk", num_experts=4, n_inner=96).expert_intermediate_size == 96 // 4
    assert tiny_config("comet_gpt2", routing="topk", moe_intermediate_size=20).expert_intermediate_size == 20


@pytest.mark.parametrize(
    "keep_rate, units, expected",
    [(0.25, 128, 32), (0.29, 100, 29), (0.5, 3, 1), (0.001, 128, 1), (1.0, 128, 128), (0.7, 10, 7)],
)
def test_comet_active_units_is_floor_with_minimum_one(keep_rate, units, expected):
    assert comet_num_active(keep_rate, units) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_router_fields_round_trip_through_json(family, tmp_path):
    config = tiny_config(
        family,
        routing="deep",
        gate_hidden_size=12,
        mixture_top_k=2,
        deep_constraint_steps=17,
        deep_constraint_margin=0.25,
        similarity_beta_s=0.5,
        similarity_beta_d=0.01,
        similarity_num_pairs=99,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    for field in (
        "routing",
        "gate_hidden_size",
        "mixture_top_k",
        "deep_constraint_steps",
        "deep_constraint_margin",
        "similarity_beta_s",
        "similarity_beta_d",
        "similarity_num_pairs",
    ):
        assert getattr(loaded, field) == getattr(config, field), field
    switch = tiny_config(family, routing="switch", capacity_factor=1.25, router_jitter_noise=0.0)
    block = tiny_config(family, routing="comet", comet_block_size=16, comet_keep_rate=0.25)
    for cfg, fields in ((switch, ("capacity_factor", "router_jitter_noise")), (block, ("comet_block_size",))):
        cfg.save_pretrained(tmp_path / cfg.routing)
        again = AutoConfig.from_pretrained(tmp_path / cfg.routing)
        assert all(getattr(again, f) == getattr(cfg, f) for f in fields)
