"""Every family × head × routing: forward, backward, outputs, which blocks are MoE, checkpointing, generation."""

import pytest
import torch
import transformers
from conftest import ALL_HEADS, BLOCK_SIZE, LEARNED, main_output, tiny_inputs, tiny_model
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.vit.modeling_vit import ViTMLP

from hf_comet import MoEBlock
from hf_comet.modeling import collect_routing

HEAD_CLASS = {
    ("comet_gpt2", "AutoModel"): "CometGPT2Model",
    ("comet_gpt2", "AutoModelForCausalLM"): "CometGPT2ForCausalLM",
    ("comet_gpt2", "AutoModelForSequenceClassification"): "CometGPT2ForSequenceClassification",
    ("comet_vit", "AutoModel"): "CometViTModel",
    ("comet_vit", "AutoModelForImageClassification"): "CometViTForImageClassification",
    ("comet_bert", "AutoModel"): "CometBertModel",
    ("comet_bert", "AutoModelForMaskedLM"): "CometBertForMaskedLM",
    ("comet_bert", "AutoModelForSequenceClassification"): "CometBertForSequenceClassification",
    ("comet_bert", "AutoModelForTokenClassification"): "CometBertForTokenClassification",
}


@pytest.mark.parametrize("family, head", ALL_HEADS)
def test_forward_and_backward(family, head, routing):
    model = tiny_model(family, head, routing=routing).train()
    assert type(model).__name__ == HEAD_CLASS[(family, head)]
    inputs = tiny_inputs(family, head)
    out = model(**inputs)
    assert torch.isfinite(main_output(out)).all()
    loss = out.loss if "loss" in out else main_output(out).square().mean()
    assert torch.isfinite(loss)
    loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if ".experts." in n]
    assert len(expert_grads) == 2 * 4  # 2 MoE layers x (up, up bias, down, down bias or block-COMET output bias)
    assert all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    router_grads = {n: p.grad for n, p in model.named_parameters() if ".router." in n}
    router_params_per_layer = {"topk": 1, "switch": 1, "noisy_topk": 2, "attentive": 4, "deep": 4}
    if routing in LEARNED:
        assert len(router_grads) == 2 * router_params_per_layer[routing]
        assert all(g is not None and g.abs().sum() > 0 for g in router_grads.values()), router_grads.keys()
    else:
        assert router_grads == {}  # COMET adds no trainable parameter


@pytest.mark.parametrize("family, head", ALL_HEADS)
def test_outputs_carry_moe_fields(family, head, routing):
    model = tiny_model(family, head, routing=routing, moe_layers=[1]).eval()
    inputs = tiny_inputs(family, head)
    out = model(**inputs, output_router_logits=True)
    tokens = 3 * (5 if family == "comet_vit" else 7)
    if routing in ("comet", "block_comet", "hash"):  # no gate over experts: no router logits (docs/decisions.md)
        assert out.router_logits is None
        with collect_routing() as collector:  # COMET's own scores, per unit or block; hash's one-hot choice
            model(**inputs)
        scores = collector.scores()
        width = {"comet": 128, "block_comet": 128 // BLOCK_SIZE, "hash": 4}[routing]
        assert len(scores) == 1 and scores[0].shape == (tokens, width)
    else:
        assert len(out.router_logits) == 1  # only block 1 is MoE
        assert out.router_logits[0].shape == (tokens, 4)  # transformers' contract: (tokens, num_experts)
    assert (out.router_aux_loss is None) == (routing in ("comet", "block_comet", "deep", "hash"))
    assert (out.aux_loss is None) == (routing not in ("topk", "switch"))  # transformers' loss, where it is trained
    assert "router_logits" not in model(**inputs)  # off unless requested (config.output_router_logits)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1 if "loss" in out else 0], main_output(out))


@pytest.mark.parametrize(
    "family, dense_ffn", [("comet_gpt2", GPT2MLP), ("comet_vit", ViTMLP), ("comet_bert", BertIntermediate)]
)
def test_moe_layers_selects_which_ffns_become_moe(family, dense_ffn):
    model = tiny_model(family, "AutoModel", moe_layers=[0])
    blocks = {"comet_gpt2": lambda m: [b.mlp for b in m.h], "comet_vit": lambda m: [b.mlp for b in m.layers]}
    blocks["comet_bert"] = lambda m: [b.intermediate for b in m.encoder.layer]
    ffns = blocks[family](model)
    assert isinstance(ffns[0], MoEBlock) and type(ffns[1]) is dense_ffn
    if family == "comet_bert":
        assert type(model.encoder.layer[1].output) is BertOutput
        assert type(model.encoder.layer[0].output).__name__ == "CometBertOutput"


def test_upstream_modules_and_parameter_names_are_kept():
    """Attention, embeddings and heads are the stock modules under the stock names; only FFN keys change."""
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="topk")
    stock = transformers.BertForMaskedLM(
        transformers.BertConfig(**{k: v for k, v in model.config.to_dict().items() if k != "model_type"})
    )
    ours, theirs = set(model.state_dict()), set(stock.state_dict())
    ffn = lambda key: ".intermediate." in key or (".output.dense." in key and ".attention." not in key)  # noqa: E731
    assert {k for k in theirs if not ffn(k)} == {k for k in ours if not ffn(k)}
    assert {k for k in ours if ffn(k)} == {
        f"bert.encoder.layer.{i}.intermediate.{name}"
        for i in range(2)
        for name in (
            "router.weight",
            "experts.up_proj",
            "experts.up_proj_bias",
            "experts.down_proj",
            "experts.down_proj_bias",
            "routing_record",  # what the weights were saved for (docs/decisions.md)
        )
    }


@pytest.mark.parametrize(
    "family, head", [("comet_gpt2", "AutoModelForCausalLM"), ("comet_bert", "AutoModelForMaskedLM")]
)
def test_activation_checkpointing_gives_the_same_gradients(family, head):
    inputs = tiny_inputs(family, head)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(family, head, routing="topk", router_aux_loss_coef=1.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        out = model(**inputs)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("routing_name", ["comet", "topk"])
def test_generation_with_kv_cache_matches_generation_without(routing_name):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing_name).eval()
    prompt = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", with_labels=False, batch=2)
    prompt = {"input_ids": prompt["input_ids"][:1], "attention_mask": prompt["attention_mask"][:1]}  # unpadded row
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **kwargs)
    without_cache = model.generate(**prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, without_cache)
