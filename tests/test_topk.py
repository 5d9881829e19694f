"""Softmax top-k routing: router formulas, aux losses against hand computations, padding, GA weighting, kernels."""

import math

import pytest
import torch
import transformers
from conftest import ALL_HEADS, EVERY_HEAD, dense_twin, main_output, tiny_config, tiny_inputs, tiny_model
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hf_comet import TopKRouter
from hf_comet.modeling.moe_routers import load_balancing_loss, router_z_loss


def test_router_renormalises_the_top_k_softmax_probabilities():
    config = tiny_config("comet_gpt2", routing="topk", num_experts=4, num_experts_per_tok=2)
    router = TopKRouter(config, layer_idx=0, hidden_size=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    decision = router(torch.tensor([[2.0, 1.0]]))
    logits = torch.tensor([2.0, 1.0, -2.0, -1.0])
    probs = logits.exp() / logits.exp().sum()
    assert decision.top_k_index.tolist() == [[0, 1]]
    torch.testing.assert_close(decision.gate_probs[0], probs)
    torch.testing.assert_close(decision.top_k_weights[0], probs[:2] / probs[:2].sum())
    router.norm_topk_prob = False
    torch.testing.assert_close(router(torch.tensor([[2.0, 1.0]])).top_k_weights[0], probs[:2])


def test_load_balancing_loss_matches_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    # top-1 of each row: 0, 0, 1, 2, so f = (2/4, 1/4, 1/4); P = column means = (0.4, 0.375, 0.225); E * sum f*P
    expected = 3 * (0.5 * 0.4 + 0.25 * 0.375 + 0.25 * 0.225)
    assert load_balancing_loss(probs.log(), 3, 1).item() == pytest.approx(expected, abs=1e-6)  # top-1 = top1
    # perfectly balanced routing scores exactly 1
    assert load_balancing_loss(torch.zeros(4, 4), 4, 2).item() == pytest.approx(1.0)


def test_load_balancing_loss_ignores_padding_like_mixtral_and_differs_by_factor_k():
    torch.manual_seed(0)
    batch, seq, experts, k = 2, 5, 6, 2
    logits = torch.randn(batch * seq, experts)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, 3:] = 0
    ours = load_balancing_loss(logits, experts, k, attention_mask.reshape(-1).bool())
    theirs = load_balancing_loss_func((logits,), experts, k, attention_mask)
    assert ours.item() == pytest.approx(theirs.item() / k, rel=1e-6)
    # equal to the loss over the valid tokens alone, whatever the padded tokens route to
    valid = attention_mask.reshape(-1).bool()
    assert ours.item() == pytest.approx(load_balancing_loss(logits[valid], experts, k).item(), rel=1e-6)


def test_router_z_loss_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, -5.0]])
    mask = torch.tensor([True, True, False])
    expected = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("family", ["comet_gpt2", "comet_bert"])
def test_model_aux_loss_ignores_padded_positions(family):
    head = "AutoModel"
    model = tiny_model(family, head, routing="topk").eval()
    inputs = tiny_inputs(family, head, with_labels=False)
    reference = model(**inputs).router_aux_loss
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][-1, -2:] = torch.tensor([40, 50])  # different tokens at padded positions
    torch.testing.assert_close(model(**changed).router_aux_loss, reference, rtol=0, atol=1e-7)
    unmasked = model(input_ids=changed["input_ids"], attention_mask=torch.ones_like(changed["attention_mask"])).router_aux_loss
    assert (unmasked - reference).abs() > 1e-6, "the padded tokens must be what the mask removes"


def test_aux_loss_is_the_mean_over_layers_of_weighted_router_losses():
    model = tiny_model("comet_gpt2", "AutoModel", routing="topk", router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    inputs = tiny_inputs("comet_gpt2", "AutoModel", with_labels=False)
    out = model(**inputs, output_router_logits=True)
    mask = inputs["attention_mask"].reshape(-1).bool()
    per_layer = []
    for logits in out.router_logits:
        per_layer.append(0.5 * load_balancing_loss(logits, 4, 2, mask) + 0.1 * router_z_loss(logits, mask))
    torch.testing.assert_close(out.router_aux_loss, torch.stack(per_layer).mean())


def test_aux_loss_joins_the_loss_in_training_only():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk", router_aux_loss_coef=0.5)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    train = model.train()(**inputs)
    task = ForCausalLMLoss(train.logits, inputs["labels"], vocab_size=64)
    torch.testing.assert_close(train.loss, task + train.router_aux_loss)
    evaluation = model.eval()(**inputs)
    torch.testing.assert_close(evaluation.loss, ForCausalLMLoss(evaluation.logits, inputs["labels"], vocab_size=64))
    assert evaluation.router_aux_loss is not None  # still reported, for logging


def test_gradient_accumulation_counts_the_aux_loss_once():
    """Two identical micro-batches with Trainer's num_items_in_batch sum to the loss of the whole batch."""
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk", router_aux_loss_coef=1.0).train()
    micro = tiny_inputs("comet_gpt2", "AutoModelForCausalLM")
    whole = {k: torch.cat([v, v]) for k, v in micro.items()}
    num_items = whole["labels"][..., 1:].ne(-100).sum()
    full = model(**whole, num_items_in_batch=num_items)
    accumulated = sum(model(**micro, num_items_in_batch=num_items).loss for _ in range(2))
    torch.testing.assert_close(accumulated, full.loss)
    assert full.router_aux_loss > 0.5  # coefficient 1: a scaling error would show


@pytest.mark.parametrize("family, head", [fh for fh in ALL_HEADS if fh[1] not in ("AutoModel", "AutoModelForCausalLM")])
def test_heads_with_mean_losses_let_trainer_divide_by_accumulation(family, head, tmp_path):
    """Their upstream loss is a per-batch mean: Trainer must divide it (aux loss included) by the accumulation steps.
    Two identical halves under GA=2 must then take the same SGD step as the whole batch; an undivided loss would
    take twice the step."""
    assert tiny_model(family, head, routing="topk").accepts_loss_kwargs is False
    inputs = tiny_inputs(family, head, batch=2)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(2)] * 2
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = tiny_model(family, head, routing="topk", router_aux_loss_coef=5.0)
        arguments = transformers.TrainingArguments(
            str(tmp_path / f"ga{accumulation}"),
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.5,
            optim="sgd",
        )
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=rows)
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        weights.append({name: param.detach().clone() for name, param in model.named_parameters()})
    moved = False
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved |= not torch.equal(value, tiny_model(family, head, routing="topk").state_dict()[name])
    assert moved  # the step changed the weights, so equal weights mean equal steps


@pytest.mark.parametrize("family, head", [fh for fh in EVERY_HEAD if fh[1] != "AutoModel"])
def test_identical_experts_with_renormalised_weights_reproduce_the_dense_model(family, head):
    ffn_width = 128
    model = tiny_model(
        family, head, routing="topk", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=ffn_width
    ).eval()
    dense = dense_twin(model)
    inputs = tiny_inputs(family, head, with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), main_output(dense(**inputs)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, head", ALL_HEADS)
def test_bucketed_grouped_mm_and_eager_agree(family, head):
    model = tiny_model(family, head, routing="topk")
    assert model.config._experts_implementation == "bucketed"  # the default (docs/decisions.md#our-expert-kernel)
    inputs = tiny_inputs(family, head)
    results = []
    for implementation in ("bucketed", "grouped_mm", "eager"):
        model.set_experts_implementation(implementation)
        model.zero_grad()
        out = model(**inputs)
        loss = out.loss if "loss" in out else main_output(out).square().mean()
        (loss + out.router_aux_loss).backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if "experts" in n]
        results.append((main_output(out).detach(), grads))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0], rtol=0, atol=1e-5)
        for a, b in zip(results[0][1], other[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_batched_mm_is_refused_with_a_clear_error():
    config = tiny_config("comet_vit", routing="topk")
    with pytest.raises(ValueError, match="batched_mm"):
        transformers.AutoModel.from_config(config, experts_implementation="batched_mm")
    model = transformers.AutoModel.from_config(tiny_config("comet_vit", routing="topk"))
    with pytest.raises(ValueError, match="batched_mm"):
        model.set_experts_implementation("batched_mm")
