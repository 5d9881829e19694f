"""Every upstream head of GPT-2, BERT and ViT has an hf_comet class (issue 13 §1): registered with the Auto class
transformers registers the stock head with, convertible from the stock class, round-tripping, loading as remote code,
and working in ``pipeline()`` where the head has a pipeline task (token classification, BERT's causal LM, and the
pre-training checkpoint under fill-mask; transformers 5 has no question-answering pipeline).

The head-specific checks of the first heads run here on the rest: dense exactness at keep rate 1 and with identical
experts is in test_comet/test_routers/test_topk (parametrised over ``EVERY_HEAD``), conversion exactness in
test_convert, remote code in test_checkpoints (one loader process for every head). Round trips and training run over
COMET, block-COMET and top-k only: the other routers' save/load is head-independent and is tested on the first heads
(test_checkpoints).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import EVERY_HEAD, MORE, head_class, main_output, tiny_config, tiny_inputs, tiny_model
from test_checkpoints import CODE_FILES
from test_pipeline_ready import word_tokenizer
from transformers import PreTrainedModel, pipeline
from transformers.models.auto import modeling_auto
from transformers.models.bert import modeling_bert
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.vit import modeling_vit

from hf_comet.convert import convert_to_moe
from hf_comet.modeling import FAMILY_ADAPTERS
from hf_comet.modeling.family_adapter import upstream_class
from hf_comet.modeling.modeling_comet_common import upstream_init

UPSTREAM_MODULES = {"comet_gpt2": modeling_gpt2, "comet_vit": modeling_vit, "comet_bert": modeling_bert}
FEW_ROUTINGS = ["comet", "block_comet", "topk"]


def auto_classes_of(model_type: str) -> dict[str, str]:
    """Auto class name -> the stock class name transformers maps ``model_type`` to, for every Auto model class."""
    found = {}
    for name in dir(modeling_auto):
        mapping = getattr(getattr(modeling_auto, name), "_model_mapping", None)
        names = getattr(mapping, "_model_mapping", None)
        if name.startswith("AutoModel") and names and model_type in names:
            found[name] = names[model_type]
    return found


@pytest.mark.parametrize("family", list(UPSTREAM_MODULES))
def test_every_upstream_head_has_a_comet_class_that_extends_it(family):
    module = UPSTREAM_MODULES[family]
    stock_heads = {
        name
        for name in module.__all__
        if isinstance(cls := getattr(module, name), type)
        and issubclass(cls, PreTrainedModel)
        and not name.endswith("PreTrainedModel")
    }
    adapter = FAMILY_ADAPTERS[family]
    assert set(adapter.stock_heads) == stock_heads
    for stock_name, head in adapter.stock_heads.items():
        ours = adapter.head_class(head)
        assert upstream_class(ours).__name__ == stock_name and ours.__name__.startswith("Comet")


@pytest.mark.parametrize("family", list(UPSTREAM_MODULES))
def test_every_auto_class_of_the_stock_family_loads_ours(family, tmp_path):
    """Wherever transformers maps gpt2/bert/vit to an Auto class, our model type maps to our class that extends the
    same stock class, and a saved checkpoint loads through it."""
    adapter = FAMILY_ADAPTERS[family]
    expected = auto_classes_of(adapter.upstream_model_type)
    assert set(adapter.auto_classes) == set(expected)
    config = tiny_config(family)
    for auto_name, stock_name in expected.items():
        ours = getattr(transformers, auto_name)._model_mapping[type(config)]
        assert ours is adapter.auto_classes[auto_name] and upstream_class(ours).__name__ == stock_name


@pytest.mark.parametrize("family, head", MORE)
@pytest.mark.parametrize("routing", FEW_ROUTINGS)
def test_a_new_head_trains_with_the_aux_loss_in_its_loss(family, head, routing):
    model = tiny_model(family, head, routing=routing).train()
    assert type(model) is FAMILY_ADAPTERS[family].model_classes.get(head, model.__class__)
    inputs = tiny_inputs(family, head)
    out = model(**inputs)
    loss_field = next(name for name in model.aux_loss_fields if out.get(name) is not None)
    loss = out[loss_field]
    with torch.no_grad():  # the same forward in eval mode: the task loss alone (dropout is off in tiny configs)
        task_loss = model.eval()(**inputs)[loss_field]
    if routing == "topk":
        assert out.router_aux_loss is not None and out.router_aux_loss > 0
        torch.testing.assert_close(loss, task_loss + out.router_aux_loss.detach(), rtol=1e-5, atol=1e-6)
    else:
        assert out.router_aux_loss is None
        torch.testing.assert_close(loss, task_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    expert_grads = [p.grad for n, p in model.named_parameters() if ".experts." in n]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)


@pytest.mark.parametrize("family, head", MORE)
def test_new_heads_with_per_batch_mean_losses_let_trainer_divide_them(family, head, tmp_path):
    """Every new head's upstream loss is a per-batch mean except BERT's causal LM (a sum over ``num_items_in_batch``,
    like GPT-2's): Trainer must know which (test_topk checks the accumulated step of each kind)."""
    model = tiny_model(family, head, routing="topk")
    arguments = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    trainer = transformers.Trainer(model=model, args=arguments)
    assert trainer.model_accepts_loss_kwargs is (head == "AutoModelForCausalLM")


@pytest.mark.parametrize("family, head", MORE)
@pytest.mark.parametrize("routing", FEW_ROUTINGS)
def test_a_new_head_round_trips_with_identical_outputs(family, head, routing, tmp_path):
    model = tiny_model(family, head, routing=routing).eval()
    model.save_pretrained(tmp_path)
    assert CODE_FILES | {f"modeling_{family}.py", "config.json", "model.safetensors"} <= set(
        p.name for p in tmp_path.iterdir()
    )
    loaded = head_class(family, head).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    inputs = tiny_inputs(family, head)
    with torch.no_grad():
        before, after = model(**inputs, output_router_logits=True), loaded(**inputs, output_router_logits=True)
    torch.testing.assert_close(main_output(before), main_output(after), rtol=1e-5, atol=1e-6)
    for a, b in zip(before.router_logits or (), after.router_logits or (), strict=True):  # None for COMET
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (before.router_logits is None) == (after.router_logits is None)


def test_multiple_choice_routing_leaves_out_the_padding_of_every_choice():
    """The encoder runs on (batch × choices, seq): the routing statistics count exactly the unpadded tokens."""
    model = tiny_model("comet_bert", "AutoModelForMultipleChoice", routing="topk").eval()
    inputs = tiny_inputs("comet_bert", "AutoModelForMultipleChoice", with_labels=False)
    model.reset_routing_statistics()
    with torch.no_grad():
        model(**inputs)
    statistics = model.routing_statistics()
    assert {layer: s["tokens"] for layer, s in statistics.items()} == dict.fromkeys(
        statistics, int(inputs["attention_mask"].sum())
    )


# -- construction: upstream's constructor around our base model (issue 21) ---------------------------------------
STOCK_BUILDING_BLOCKS = {
    "comet_gpt2": (modeling_gpt2.GPT2Model, modeling_gpt2.GPT2Block),
    "comet_bert": (modeling_bert.BertModel, modeling_bert.BertLayer),
    "comet_vit": (modeling_vit.ViTModel, modeling_vit.ViTLayer),
}
HEADS_ONLY = [(family, head) for family, head in EVERY_HEAD if head != "AutoModel"]


def comet_class(family: str, head: str) -> type:
    adapter = FAMILY_ADAPTERS[family]
    return adapter.auto_classes.get(head) or adapter.model_classes[head]


@pytest.mark.parametrize("family, head", EVERY_HEAD)
def test_a_model_builds_one_base_model_and_it_is_ours(family, head, monkeypatch):
    """Heads run upstream's ``__init__`` with the base model's name bound to ours: exactly one base model (ours) and
    one set of blocks is built, never a stock base model that is thrown away, and nothing is patched globally."""
    built = []
    for stock in STOCK_BUILDING_BLOCKS[family]:

        def counting_init(self, *args, _stock=stock, _original=stock.__init__, **kwargs):
            built.append((_stock, type(self)))
            _original(self, *args, **kwargs)

        monkeypatch.setattr(stock, "__init__", counting_init)
    stock_base, stock_block = STOCK_BUILDING_BLOCKS[family]
    model = comet_class(family, head)(tiny_config(family, head))
    assert [built_type for stock, built_type in built if stock is stock_base] == [type(model.base_model)]
    assert type(model.base_model).__name__ == f"Comet{stock_base.__name__}"
    assert sum(stock is stock_block for stock, _ in built) == model.config.num_hidden_layers
    assert getattr(UPSTREAM_MODULES[family], stock_base.__name__) is stock_base


def stock_twin_config(config):
    config_dict = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        config_dict.pop(key, None)
    return FAMILY_ADAPTERS[config.model_type].stock_config_class(**config_dict)


@pytest.mark.parametrize("family, head", HEADS_ONLY)
def test_a_head_is_seeded_like_its_base_model_and_initialised_like_upstream(family, head):
    """At a fixed seed a head's base model equals our base model built alone (upstream builds it first, so the head
    draws the same numbers as before), and the head's own tensors have upstream's init: the stock head's constants
    exactly, its random weights at its scale (transformers' ``_init_weights``, not torch's default init)."""
    cls = comet_class(family, head)
    torch.manual_seed(0)
    model = cls(tiny_config(family, head))
    backbone = model.base_model
    kwargs = {}
    if family != "comet_gpt2":
        kwargs["add_pooling_layer"] = backbone.pooler is not None
    if family == "comet_vit":
        kwargs["use_mask_token"] = backbone.embeddings.mask_token is not None
    torch.manual_seed(0)
    alone = type(backbone)(tiny_config(family, head), **kwargs)
    assert backbone.state_dict().keys() == alone.state_dict().keys()
    for key, value in alone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key

    torch.manual_seed(0)
    stock = upstream_class(cls)(stock_twin_config(tiny_config(family, head)))
    prefix = f"{model.base_model_prefix}."
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    theirs = {k: v for k, v in stock.state_dict().items() if not k.startswith(prefix)}
    assert ours and ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        value = ours[key]
        assert value.shape == expected.shape, key
        if expected.min() == expected.max():  # zeros, ones
            assert torch.equal(value, expected), key
        else:
            assert 0.5 < float(value.std() / expected.std()) < 2.0, key
            assert abs(float(value.mean())) < 3 * float(expected.std()) / value.numel() ** 0.5 + 1e-3, key


def test_upstream_init_refuses_an_upstream_that_does_not_build_the_named_base_model():
    """A transformers release that stopped building the base model by name is refused before anything is built."""
    model = modeling_gpt2.GPT2LMHeadModel.__new__(FAMILY_ADAPTERS["comet_gpt2"].model_classes["CometGPT2ForCausalLM"])
    refused = r"GPT2LMHeadModel.__init__ of transformers .* does not build \[.GPT2Block.\] in its own body"
    with pytest.raises(TypeError, match=refused):
        upstream_init(model, modeling_gpt2.GPT2LMHeadModel, tiny_config("comet_gpt2"), GPT2Block=torch.nn.Module)


# -- pipelines ----------------------------------------------------------------------------------------------------
def saved_dense(tmp_path, family: str, stock_name: str, tokenizer) -> str:
    """A tiny stock checkpoint of ``stock_name`` with a real tokenizer saved beside it."""
    kind = "bert" if family == "comet_bert" else "gpt2"
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, is_decoder=stock_name == "BertLMHeadModel", num_labels=2, **common,
        )  # fmt: skip
    else:
        config = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_positions=64, num_labels=3, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **common,
        )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, stock_name)(config)
    folder = tmp_path / f"dense-{stock_name}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


PIPELINES = [
    ("comet_gpt2", "GPT2ForTokenClassification", "token-classification", "CometGPT2ForTokenClassification"),
    ("comet_bert", "BertLMHeadModel", "text-generation", "CometBertForCausalLM"),
    # fill-mask loads AutoModelForMaskedLM from a pre-training checkpoint, as with bert-base-uncased
    ("comet_bert", "BertForPreTraining", "fill-mask", "CometBertForMaskedLM"),
]
"""Tasks with a pipeline in transformers 5 (its question-answering pipeline was removed; the QA heads are tested
above and in test_convert)."""


@pytest.mark.parametrize("family, stock_name, task, ours", PIPELINES, ids=[p[1] for p in PIPELINES])
def test_pipeline_on_a_converted_new_head_gives_the_dense_model_s_answer_at_keep_rate_one(
    family, stock_name, task, ours, tmp_path
):
    tokenizer = word_tokenizer("bert" if family == "comet_bert" else "gpt2")
    source = saved_dense(tmp_path, family, stock_name, tokenizer)
    destination = tmp_path / "moe"
    convert_to_moe(source, "comet", comet_keep_rate=1.0).save_pretrained(destination)
    moe, dense = pipeline(task, model=str(destination)), pipeline(task, model=source)
    assert type(moe.model).__name__ == ours
    if task == "token-classification":
        text = "experts overlap and share their weights"
        found, expected = moe(text), dense(text)
        assert [(e["word"], e["entity"]) for e in found] == [(e["word"], e["entity"]) for e in expected]
        assert [e["score"] for e in found] == pytest.approx([e["score"] for e in expected], rel=1e-4)
    elif task == "fill-mask":
        text = "the router [MASK] the units that fire"
        found, expected = moe(text), dense(text)
        assert [e["token_str"] for e in found] == [e["token_str"] for e in expected]
        assert [e["score"] for e in found] == pytest.approx([e["score"] for e in expected], rel=1e-4)
    else:
        prompt = "the router picks"
        kwargs = dict(do_sample=False, max_new_tokens=3)
        assert moe(prompt, **kwargs)[0]["generated_text"] == dense(prompt, **kwargs)[0]["generated_text"]
