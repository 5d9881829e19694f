"""transformers' native MoE conventions (issue 13 §3): `Moe*` output classes, ``router_logits`` of shape (tokens,
num_experts) or absent, ``aux_loss`` as transformers' native models compute it (its own ``load_balancing_loss_func``),
our other terms under their own names, and when the weighted aux loss joins ``loss`` (docs/decisions.md#moe-output-
conventions)."""

import pytest
import torch
from conftest import EVERY_HEAD, MAIN_OUTPUTS, ROUTING_NAMES, main_output, tiny_inputs, tiny_model
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_comet.modeling.moe_routers import load_balancing_loss, router_z_loss

NATIVE = ("topk", "switch")
"""Routers that train transformers' load-balancing loss."""


@pytest.mark.parametrize("family, head", EVERY_HEAD)
def test_base_models_and_causal_lms_return_transformers_moe_outputs_with_upstream_tuple_order(family, head):
    model = tiny_model(family, head, routing="topk").eval()
    inputs = tiny_inputs(family, head)
    out = model(**inputs, output_router_logits=True)
    native = {"AutoModel": MoeModelOutputWithPast, "AutoModelForCausalLM": MoeCausalLMOutputWithPast}.get(head)
    if native is not None:
        assert isinstance(out, native)
    for field in ("aux_loss", "router_logits", "router_aux_loss", "router_losses"):
        assert field in out
    # tuples keep the upstream head's order: (loss, main output, ...), the routing fields last
    as_tuple = model(**inputs, output_router_logits=True, return_dict=False)
    main = next(name for name in MAIN_OUTPUTS if name in out)
    assert list(out.keys()).index(main) == (1 if head == "CometGPT2DoubleHeadsModel" else 0) + ("loss" in out)
    torch.testing.assert_close(as_tuple[list(out.keys()).index(main)], main_output(out))
    assert as_tuple[-1].keys() == out.router_losses.keys()


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_transformers_load_balancing_loss_func_never_crashes_on_our_router_logits(routing):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing).eval()
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    out = model(**inputs, output_router_logits=True)
    config = model.config
    value = load_balancing_loss_func(
        out.router_logits, config.num_experts, config.num_experts_per_tok, inputs["attention_mask"]
    )  # exactly what Mixtral's forward does
    if routing in ("comet", "block_comet", "hash"):
        assert out.router_logits is None and value == 0  # no gate: nothing to balance, as aux_loss says
    else:
        assert all(logits.shape == (3 * 7, config.num_experts) for logits in out.router_logits)
        assert torch.isfinite(value)


@pytest.mark.parametrize("routing", NATIVE)
def test_aux_loss_is_transformers_load_balancing_loss_over_every_layer_unweighted(routing):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing, router_aux_loss_coef=0.3).train()
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    out = model(**inputs, output_router_logits=True)
    top_k = 1 if routing == "switch" else model.config.num_experts_per_tok
    expected = load_balancing_loss_func(out.router_logits, model.config.num_experts, top_k, inputs["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss.requires_grad  # a loss, as native models return it
    # without output_router_logits, as natively: no router_logits, no aux_loss; the weighted term is still trained
    plain = model(**inputs)
    assert plain.aux_loss is None and plain.router_logits is None and plain.router_aux_loss is not None


@pytest.mark.parametrize("routing", ["noisy_topk", "attentive", "deep", "comet", "block_comet"])
def test_routers_that_train_other_balance_terms_leave_aux_loss_empty(routing):
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing=routing).train()
    out = model(**tiny_inputs("comet_bert", "AutoModelForMaskedLM"), output_router_logits=True)
    assert out.aux_loss is None
    names = {"noisy_topk": {"importance_loss", "load_loss"}, "attentive": {"importance_loss"}}.get(routing)
    assert (out.router_losses is None) == (names is None)
    if names is not None:
        assert set(out.router_losses) == names


def test_router_losses_are_the_unweighted_terms_and_router_aux_loss_their_weighted_sum():
    model = tiny_model(
        "comet_gpt2", "AutoModel", routing="topk", router_aux_loss_coef=0.5, router_z_loss_coef=0.1,
        similarity_beta_s=0.2,
    ).train()  # fmt: skip
    inputs = tiny_inputs("comet_gpt2", "AutoModel", with_labels=False)
    out = model(**inputs, output_router_logits=True)
    assert set(out.router_losses) == {"load_balancing_loss", "z_loss", "similarity_loss"}
    mask = inputs["attention_mask"].reshape(-1).bool()
    balance = torch.stack([load_balancing_loss(logits, 4, 2, mask) for logits in out.router_logits]).mean()
    z_loss = torch.stack([router_z_loss(logits, mask) for logits in out.router_logits]).mean()
    torch.testing.assert_close(out.router_losses["load_balancing_loss"], balance)
    torch.testing.assert_close(out.router_losses["z_loss"], z_loss)
    # per layer transformers' loss / k: the same function, normalised so a balanced router scores 1 at any k
    torch.testing.assert_close(balance * 2, torch.stack(
        [load_balancing_loss_func((logits,), 4, 2, inputs["attention_mask"]) for logits in out.router_logits]
    ).mean())  # fmt: skip
    weighted = 0.5 * balance + 0.1 * z_loss + out.router_losses["similarity_loss"]  # betas inside L_s
    torch.testing.assert_close(out.router_aux_loss, weighted)


@pytest.mark.parametrize("output_router_logits", [False, True])
def test_the_weighted_aux_loss_joins_loss_in_every_training_forward_and_never_in_eval(output_router_logits):
    """Our decision (README "Training"): native models add it only with ``output_router_logits=True``."""
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk", router_aux_loss_coef=0.5)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    train = model.train()(**inputs, output_router_logits=output_router_logits)
    task = ForCausalLMLoss(train.logits, inputs["labels"], vocab_size=64)
    torch.testing.assert_close(train.loss, task + train.router_aux_loss)
    evaluation = model.eval()(**inputs, output_router_logits=output_router_logits)
    torch.testing.assert_close(evaluation.loss, ForCausalLMLoss(evaluation.logits, inputs["labels"], vocab_size=64))
    assert (evaluation.aux_loss is not None) == output_router_logits  # reported, never added, in eval


def test_a_batch_of_padding_only_gives_a_zero_balance_loss_with_finite_gradients():
    model = tiny_model("comet_gpt2", "AutoModel", routing="topk", router_aux_loss_coef=1.0).train()
    inputs = tiny_inputs("comet_gpt2", "AutoModel", with_labels=False)
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    out = model(**inputs)
    assert out.router_losses["load_balancing_loss"] == 0
    out.router_aux_loss.backward()
    assert all(torch.isfinite(p.grad).all() for n, p in model.named_parameters() if ".router." in n)


@pytest.mark.parametrize("family", ["comet_gpt2", "comet_bert"])
def test_trainer_predict_on_a_causal_lm_with_the_cache_on_returns_plain_logits(family, tmp_path):
    """Trainer drops what `keys_to_ignore_at_inference` names; transformers 5 calls the KV cache ``cache``, and a
    list without it made ``predict`` fail on the DynamicCache (stock GPT-2 passes)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(family, "AutoModelForCausalLM", routing="topk")
    assert "cache" in model.config.keys_to_ignore_at_inference
    inputs = tiny_inputs(family, "AutoModelForCausalLM", batch=4)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(4)]
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True, use_cache=True)
    prediction = Trainer(model=model, args=args).predict(rows)
    assert not isinstance(prediction.predictions, tuple)  # the logits alone: no cache, no routing fields
    assert prediction.predictions.shape == (4, 7, 64)
