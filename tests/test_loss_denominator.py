"""One loss denominator for the dense baseline and our MoE models (issue 23): a recipe's reported loss is its reloaded
checkpoint's mean cross-entropy on the same data, and Trainer normalises a stock model's loss like ours, in
evaluation and under gradient accumulation (`align_loss_contract`)."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from hf_comet.data import digits_images
from hf_comet.training import CometTrainer
from hf_comet.training.recipes import RECIPES, mean_label_loss, run_recipe
from hf_comet.training.recipes.base import torch_dataset
from hf_comet.training.recipes.text_data import text_windows

TINY_GPT2 = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)  # fmt: skip


def shifted_mean_cross_entropy(model, ids: torch.Tensor) -> float:
    """The mean next-token cross-entropy of ``model`` on full windows ``ids``, computed here from the logits."""
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_gpt2_text_reports_its_reloaded_checkpoints_loss_for_dense_and_comet(tmp_path):
    settings = dict(steps=2, eval_steps=2, logging_steps=1, num_train=32, num_eval=8)
    summary = run_recipe("gpt2_text", tmp_path, fast=True, variants=["dense", "comet"], settings=settings,
                         progress=False, log=lambda line: None)  # fmt: skip
    chosen = RECIPES["gpt2_text"].settings(True).__class__(**summary["settings"])
    _, evaluation = text_windows(chosen, summary["seed"])
    for variant, entry in summary["variants"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(entry["checkpoint"])
        assert (variant == "dense") == (type(model).__name__ == "GPT2LMHeadModel")
        reloaded = shifted_mean_cross_entropy(model, evaluation)
        assert entry["metrics"]["val_loss"] == pytest.approx(reloaded, abs=1e-5), variant


def test_vit_digits_reports_its_reloaded_checkpoints_test_loss_for_dense_and_comet(tmp_path):
    summary = run_recipe("vit_digits", tmp_path, fast=True, variants=["dense", "comet"], settings={"steps": 2},
                         progress=False, log=lambda line: None)  # fmt: skip
    _, test = digits_images(seed=summary["seed"])
    for variant, entry in summary["variants"].items():
        model = transformers.AutoModelForImageClassification.from_pretrained(entry["checkpoint"]).eval()
        with torch.no_grad():
            reloaded = float(F.cross_entropy(model(pixel_values=test["pixel_values"]).logits, test["labels"]))
        assert entry["metrics"]["test_loss"] == pytest.approx(reloaded, abs=1e-5), variant


def _trainer(model, data, tmp_path, **args):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        per_device_eval_batch_size=4, logging_steps=1, learning_rate=1e-3, seed=0, **args,
    )  # fmt: skip
    return CometTrainer(model=model, args=arguments, train_dataset=data, eval_dataset=data, routing_logging="none")


def test_trainer_evaluates_a_stock_causal_lm_over_its_predicted_positions(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    ids = torch.randint(0, 64, (8, 16))
    trainer = _trainer(model, torch_dataset({"input_ids": ids, "labels": ids}), tmp_path)
    expected = shifted_mean_cross_entropy(model, ids)  # 15 predictions per 16-token window, not 16
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert mean_label_loss(model, torch_dataset({"input_ids": ids, "labels": ids})) == pytest.approx(expected, rel=1e-6)


def test_mean_label_loss_divides_once_by_every_scored_position(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2)).eval()
    ids = torch.randint(0, 64, (3, 16))
    labels = ids.clone()
    labels[0, 4:] = -100  # a short row: 3 scored positions against 15 in the others
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    per_position = F.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="none")
    expected = float(per_position.sum() / (labels[:, 1:] != -100).sum())  # not the mean of per-batch means
    dataset = torch_dataset({"input_ids": ids, "labels": labels})
    assert mean_label_loss(model, dataset, batch_size=1) == pytest.approx(expected, rel=1e-6)
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    unscored = torch.full_like(ids, -100)
    unscored[:, 0] = 5  # a causal LM never predicts the first position: still nothing to score
    with pytest.raises(ValueError, match="none of the 3 rows has a scored label"):
        mean_label_loss(model, torch_dataset({"input_ids": ids, "labels": unscored}))
    with pytest.raises(ValueError, match=r"rows have no 'labels' \(they have \['input_ids'\]\)"):
        mean_label_loss(model, torch_dataset({"input_ids": ids}))
    with pytest.raises(ValueError, match="no rows"):
        mean_label_loss(model, torch_dataset({"input_ids": ids[:0], "labels": ids[:0]}))
    assert forwards == []  # every refusal before any forward


@pytest.mark.parametrize("stock", ["GPT2ForSequenceClassification", "GPT2LMHeadModel"])
def test_gradient_accumulation_leaves_a_stock_models_loss_as_without_it(stock, tmp_path):
    """(batch 4, accumulation 2) logs the loss and gradient norm of (batch 8, accumulation 1): a stock head that
    takes ``**kwargs`` but returns a per-batch mean was not divided by the accumulation steps (2x ours)."""
    ids = torch.randint(3, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    labels = ids if stock == "GPT2LMHeadModel" else torch.arange(8) % 3
    data = torch_dataset({"input_ids": ids, "labels": labels})
    logged = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = getattr(transformers, stock)(transformers.GPT2Config(**TINY_GPT2, num_labels=3, pad_token_id=0))
        if batch == 8:  # the loss the first step must log: the initial model's mean over the 8 rows, computed here
            with torch.no_grad():
                if stock == "GPT2LMHeadModel":
                    expected = shifted_mean_cross_entropy(model, ids)  # over the 15 predicted positions per row
                else:
                    expected = float(F.cross_entropy(model.eval()(input_ids=ids).logits, labels))
            model.train()
        trainer = _trainer(model, data, tmp_path / f"{batch}", per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, max_steps=1)  # fmt: skip
        trainer.train()
        entry = next(e for e in trainer.state.log_history if "loss" in e)
        logged.append((entry["loss"], entry["grad_norm"]))
    assert logged[0][0] == pytest.approx(expected, rel=1e-4)  # the stock head's loss over the right denominator
    assert logged[1] == pytest.approx(logged[0], rel=1e-4)
