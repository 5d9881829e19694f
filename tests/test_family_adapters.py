"""Family adapters own the family facts: the stock heads we convert from are exactly our registered heads, each FFN
pattern finds exactly the FFN weights of a stock model (never attention), and a family defined outside the package
(a toy RoBERTa here) converts, and gets LoRA targets, from its adapter alone."""

import pytest
import torch
import transformers
from conftest import TINY
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.roberta.modeling_roberta import RobertaModel, RobertaPreTrainedModel
from transformers.models.vit.modeling_vit import ViTMLP
from transformers.pytorch_utils import Conv1D

from hf_comet.convert import convert_to_moe, stock_to_ours
from hf_comet.lora import lora_targets
from hf_comet.modeling import FAMILIES, FAMILY_ADAPTERS, CometMoEConfigMixin, FamilyAdapter, MoEBlock
from hf_comet.modeling.modeling_comet_bert import CometBertModelOutput, CometBertOutput
from hf_comet.modeling.modeling_comet_common import CometPreTrainedMixin, routed_forward

DENSE_FFN_MODULES = (GPT2MLP, ViTMLP, BertIntermediate, BertOutput)
"""The upstream modules that hold a block's FFN projections (BertOutput: its `dense`; LayerNorm is not FFN)."""


def test_the_stock_heads_we_convert_from_are_exactly_our_registered_heads():
    assert FAMILY_ADAPTERS.keys() == FAMILIES.keys()
    heads = stock_to_ours()
    ours = [(family.model_type, head) for family, head in heads.values()]
    every_class = [(model_type, head) for model_type, family in FAMILY_ADAPTERS.items() for head in family.heads]
    assert sorted(ours) == sorted(every_class)  # every class of ours once, nothing else
    for stock_name, (family, head) in heads.items():
        stock = getattr(transformers, stock_name)
        if head.startswith("AutoModel"):  # transformers' own Auto mapping agrees that the stock class is the same head
            assert getattr(transformers, head)._model_mapping[family.stock_config_class] is stock
        else:  # a head transformers registers with no Auto class: it is in none of its mappings either
            assert head == f"Comet{stock_name}"
        assert issubclass(family.head_class(head), stock) and family.stock_class(head) is stock
    for model_type, family in FAMILY_ADAPTERS.items():
        config_class, auto_classes = FAMILIES[model_type]
        assert set(family.heads.values()) == set(auto_classes.values()) | set(family.other_classes)
        assert family.model_type == model_type and family.config_class is config_class
        assert issubclass(config_class, family.stock_config_class)
        assert family.upstream_model_type == family.stock_config_class.model_type
        assert all(cls.family is family for cls in family.model_classes.values())  # model.family on every head


@pytest.mark.parametrize("stock_name", list(stock_to_ours()))
def test_each_ffn_pattern_finds_exactly_the_ffn_weights_of_a_stock_model(stock_name):
    family, auto_name = stock_to_ours()[stock_name]
    config = family.stock_config_class(**TINY[family.model_type], num_labels=3)
    dense = getattr(transformers, stock_name)(config)
    state = dense.state_dict()
    expected = {
        f"{name}.{child_name}.{kind}"
        for name, module in dense.named_modules()
        if isinstance(module, DENSE_FFN_MODULES)
        for child_name, child in module.named_children()
        if isinstance(child, (nn.Linear, Conv1D))
        for kind in ("weight", "bias")
    }
    matched = {key for key in state if family.ffn_key(key) is not None}
    assert matched == expected and len(matched) == 2 * 2 * config.num_hidden_layers  # projections x weight|bias
    assert not [key for key in matched if "attn" in key or "attention" in key]

    kept, ffns = family.separate_ffns(state, lambda layer: layer == 1)
    assert set(state) - set(kept) == {key for key in expected if family.ffn_key(key).layer == 1}
    ffn_width, hidden = family.ffn_width(config), config.hidden_size
    assert ffn_width != hidden  # so the shapes below pin the (out, in) layout
    moe = family.head_class(auto_name)(family.config_class(**TINY[family.model_type], num_labels=3))
    (block, ffn), *others = ffns.items()
    assert not others and ffn.layer == 1 and isinstance(moe.get_submodule(block), MoEBlock)
    assert family.ffn_width(moe.config) == moe.config.ffn_width == ffn_width  # stock and our configs agree
    assert ffn.up_weight.shape == (ffn_width, hidden) and ffn.up_bias.shape == (ffn_width,)
    assert ffn.down_weight.shape == (hidden, ffn_width) and ffn.down_bias.shape == (hidden,)


def test_family_facts_travel_with_checkpoints(tmp_path):
    family = FAMILY_ADAPTERS["comet_bert"]
    family.auto_classes["AutoModel"](family.config_class(**TINY["comet_bert"])).save_pretrained(tmp_path)
    assert (tmp_path / "family_adapter.py").is_file()


# -- a family added outside the package: one modeling "file" (the classes below) plus its adapter facts ------------
@strict
class ToyRobertaConfig(CometMoEConfigMixin, transformers.RobertaConfig):
    model_type = "comet_roberta_toy"


class ToyRobertaPreTrainedModel(CometPreTrainedMixin, RobertaPreTrainedModel):
    config_class = ToyRobertaConfig
    config: ToyRobertaConfig


class ToyRobertaModel(ToyRobertaPreTrainedModel, RobertaModel):
    def __init__(self, config: ToyRobertaConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        for layer_idx, layer in enumerate(self.encoder.layer):
            if config.is_moe_layer(layer_idx):
                layer.intermediate = MoEBlock(config, layer_idx, config.hidden_size, config.hidden_act)
                layer.output = CometBertOutput(config)
        self.post_init()

    forward = routed_forward(RobertaModel.forward, CometBertModelOutput)


ToyRobertaPreTrainedModel.family = FamilyAdapter(
    model_type="comet_roberta_toy",
    display_name="RoBERTa",
    config_class=ToyRobertaConfig,
    stock_config_class=transformers.RobertaConfig,
    auto_classes={"AutoModel": ToyRobertaModel},
    ffn_key_pattern=r"((?:.*\.)?layer\.(\d+))\.(intermediate|output)\.dense\.(weight|bias)",
    moe_module="intermediate",
    ffn_projections={"intermediate": "up", "output": "down"},
    attention_modules=("query", "key", "value", "attention.output.dense"),
)


@pytest.mark.parametrize(
    "method, fields",
    [
        ("comet", {"comet_keep_rate": 1.0}),
        ("upcycle", {"routing": "topk", "num_experts": 4, "num_experts_per_tok": 2}),
        ("split", {"num_experts": 4, "num_experts_per_tok": 4, "split_method": "kmeans"}),
    ],
)
def test_a_family_added_outside_the_package_converts_from_its_adapter_alone(method, fields, monkeypatch, tmp_path):
    family = ToyRobertaModel.family
    monkeypatch.setitem(FAMILY_ADAPTERS, family.model_type, family)  # the one registry line of a new family
    config = transformers.RobertaConfig(
        **TINY["comet_bert"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )  # fmt: skip
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(tmp_path / "dense")
    dense = RobertaModel.from_pretrained(tmp_path / "dense").eval()
    fields = dict(fields)
    moe = convert_to_moe(tmp_path / "dense", method, split_method=fields.pop("split_method", None), seed=1, **fields)
    assert type(moe) is ToyRobertaModel and moe.config.model_type == "comet_roberta_toy"
    assert len(moe.moe_blocks()) == config.num_hidden_layers
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=ids).last_hidden_state, dense(input_ids=ids).last_hidden_state, rtol=0, atol=1e-5
        )
    assert lora_targets(moe, ("attention",))["target_modules"] == list(family.attention_modules)
