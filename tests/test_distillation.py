"""Distillation from the dense model (`CometTrainer(teacher_model=..., distillation=DistillationConfig(...))`): the
settings are checked when built; the loss equals a hand-computed reference (causal LM, sequence classifier, with the
router aux loss kept and the gradient-accumulation share applied); alpha 0 is the plain trainer bit for bit; a dense
twin at keep 1.0 teaches nothing (KL 0); gradient accumulation does not change what is trained or logged; the
teacher never gets gradients and never reaches a checkpoint; a teacher of another logits size is refused."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import dense_twin, tiny_inputs, tiny_model
from safetensors.torch import load_file
from transformers import TrainingArguments

from hf_comet.training import CometTrainer, DistillationConfig
from hf_comet.training.distillation import distillation_kl

CAUSAL = ("comet_gpt2", "AutoModelForCausalLM")
CLASSIFIER = ("comet_bert", "AutoModelForSequenceClassification")


def _args(folder, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(folder), use_cpu=True, report_to="none", max_steps=3, per_device_train_batch_size=4,
                    learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
                    lr_scheduler_type="constant", dataloader_num_workers=0)  # fmt: skip
    return TrainingArguments(**{**settings, **overrides})


def _rows(family: str, head: str, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """``n`` rows with padding of different lengths, so micro-batches count different numbers of label tokens."""
    inputs = tiny_inputs(family, head, batch=n, seq=7)
    for row in range(n):
        pad = row % 4  # 0..3 padded tokens at the end
        if pad:
            inputs["attention_mask"][row, -pad:] = 0
            inputs["input_ids"][row, -pad:] = 0
            if inputs["labels"].dim() == 2:
                inputs["labels"][row, -pad:] = -100
    return [{k: v[row] for k, v in inputs.items()} for row in range(n)]


def _student_and_teacher(family: str, head: str, routing: str = "block_comet", keep: float = 0.5):
    """A student at ``keep`` holding the dense FFN of its stock twin (the teacher), so the two differ by routing."""
    student = tiny_model(family, head, routing=routing, **({"comet_keep_rate": keep} if "comet" in routing else {}))
    teacher = dense_twin(student)
    return student, teacher


def _stock_teacher(family: str, head: str, **config):
    """A stock dense model of ``head`` with its own random weights (a teacher unlike the student)."""
    config_class = {"comet_gpt2": transformers.GPT2Config, "comet_bert": transformers.BertConfig}[family]
    fields = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64) if family == "comet_gpt2" else dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, vocab_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    if family == "comet_gpt2":
        fields |= dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    torch.manual_seed(5)
    teacher = getattr(transformers, head).from_config(config_class(**{**fields, "num_labels": 3, **config})).eval()
    with torch.no_grad():  # confident logits, as a trained model's: the KL's direction then shows in its value
        teacher.get_output_embeddings().weight.mul_(30.0) if head == CAUSAL[1] else teacher.classifier.weight.mul_(30.0)
    return teacher


# -- settings -------------------------------------------------------------------------------------------------------
def test_config_defaults_and_what_it_distils():
    config = DistillationConfig()
    assert (config.alpha, config.temperature, config.hidden_weight) == (0.5, 2.0, 0.0)
    assert config.distils and DistillationConfig(alpha=0, hidden_weight=0.1).distils
    assert not DistillationConfig(alpha=0).distils
    with pytest.raises(AttributeError):  # frozen: a value cannot skip the checks by assignment
        config.alpha = 2.0


@pytest.mark.parametrize(
    "field, value, error, allowed",
    [
        ("alpha", -0.1, ValueError, r"\[0, 1\]"),
        ("alpha", 1.5, ValueError, r"\[0, 1\]"),
        ("alpha", math.nan, ValueError, r"\[0, 1\]"),
        ("temperature", 0.0, ValueError, "> 0"),
        ("temperature", -2.0, ValueError, "> 0"),
        ("temperature", math.inf, ValueError, "finite"),
        ("hidden_weight", -1.0, ValueError, ">= 0"),
        ("hidden_weight", math.nan, ValueError, ">= 0"),
        ("alpha", "0.5", TypeError, "number"),
        ("temperature", True, TypeError, "number"),
    ],
)
def test_config_refuses_bad_values_naming_them(field, value, error, allowed):
    with pytest.raises(error, match=rf"{field}={value!r}.*{allowed}"):
        DistillationConfig(**{field: value})


def test_trainer_refuses_bad_distillation_arguments_before_training(tmp_path):
    student, teacher = _student_and_teacher(*CAUSAL)
    args = _args(tmp_path)
    with pytest.raises(ValueError, match="without teacher_model"):
        CometTrainer(model=student, args=args, distillation=DistillationConfig())
    with pytest.raises(TypeError, match="DistillationConfig.*not a dict"):
        CometTrainer(model=student, args=args, teacher_model=teacher, distillation={"alpha": 0.5})
    with pytest.raises(TypeError, match="torch.nn.Module.*not a str"):
        CometTrainer(model=student, args=args, teacher_model="path/to/dense-gpt2")
    with pytest.raises(ValueError, match="the model being trained"):
        CometTrainer(model=student, args=args, teacher_model=student)


@pytest.mark.parametrize(
    "family, head, teacher_config, sizes",
    [(*CAUSAL, dict(vocab_size=80), ("80", "64")), (*CLASSIFIER, dict(num_labels=5), ("5", "3"))],
)
def test_a_teacher_of_another_logits_size_is_refused_naming_both(tmp_path, family, head, teacher_config, sizes):
    student = tiny_model(family, head, routing="block_comet")
    teacher = _stock_teacher(family, head, **teacher_config)
    with pytest.raises(ValueError, match=rf"teacher's logits have {sizes[0]} .* student's {sizes[1]}"):
        CometTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)


# -- the loss -------------------------------------------------------------------------------------------------------
def _kl_reference(student_logits, teacher_logits, temperature):
    """KL(p_teacher || p_student) per row of 2-D logits, written out from the softmaxes."""
    p_teacher = torch.softmax(teacher_logits / temperature, -1)
    p_student = torch.softmax(student_logits / temperature, -1)
    return (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)


@pytest.mark.parametrize("num_items", [None, 40])
def test_causal_lm_loss_equals_the_reference(tmp_path, num_items):
    """Task cross-entropy, KL and hidden-state MSE over the shifted label positions, the top-k aux loss at full
    weight; with ``num_items_in_batch`` (Trainer's gradient-accumulation normalisation) all of it takes this
    micro-batch's share of the counted tokens."""
    student = tiny_model(*CAUSAL, routing="topk")
    teacher = _stock_teacher(*CAUSAL)
    config = DistillationConfig(alpha=0.3, temperature=2.5, hidden_weight=0.7)
    trainer = CometTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, distillation=config)
    inputs = tiny_inputs(*CAUSAL)
    student.train()
    loss = trainer.compute_loss(student, dict(inputs), num_items_in_batch=num_items)

    outputs = student(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    with torch.no_grad():
        taught = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         output_hidden_states=True)  # fmt: skip
    targets = inputs["labels"][:, 1:]
    counted = targets != -100
    student_logits = outputs.logits[:, :-1][counted]
    teacher_logits = taught.logits[:, :-1][counted]
    task = F.cross_entropy(student_logits, targets[counted])
    kl = _kl_reference(student_logits, teacher_logits, 2.5).mean()
    mse = ((outputs.hidden_states[-1][:, :-1] - taught.hidden_states[-1][:, :-1]) ** 2).mean(-1)[counted].mean()
    share = 1.0 if num_items is None else counted.sum().item() / num_items
    assert outputs.router_aux_loss > 0
    expected = share * ((1 - 0.3) * task + outputs.router_aux_loss + 0.3 * 2.5**2 * kl + 0.7 * mse)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_sequence_classifier_loss_equals_the_reference(tmp_path):
    """One KL per example over the classes; the hidden-state MSE per example over its real tokens (the rows have
    different lengths), then over the examples, like the task loss."""
    student = tiny_model(*CLASSIFIER, routing="topk")
    teacher = _stock_teacher(*CLASSIFIER)
    config = DistillationConfig(alpha=0.6, temperature=3.0, hidden_weight=0.2)
    trainer = CometTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, distillation=config)
    inputs = tiny_inputs(*CLASSIFIER)
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))

    outputs = student(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)
    with torch.no_grad():
        taught = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         output_hidden_states=True)  # fmt: skip
    real = inputs["attention_mask"].bool()
    task = F.cross_entropy(outputs.logits, inputs["labels"])
    kl = _kl_reference(outputs.logits, taught.logits, 3.0).mean()
    squared = ((outputs.hidden_states[-1] - taught.hidden_states[-1]) ** 2).mean(-1)
    mse = torch.stack([row[keep].mean() for row, keep in zip(squared, real, strict=True)]).mean()  # per example
    assert outputs.router_aux_loss > 0
    expected = (1 - 0.6) * task + outputs.router_aux_loss + 0.6 * 3.0**2 * kl + 0.2 * mse
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_a_dense_twin_at_keep_one_teaches_nothing(tmp_path):
    """At keep 1.0 the converted model is its dense twin: KL and MSE are ~0 and the loss is (1 - alpha) * task; at
    keep 0.5 the same pair differs."""
    student, teacher = _student_and_teacher(*CAUSAL, keep=1.0)
    config = DistillationConfig(alpha=0.4, hidden_weight=1.0)
    trainer = CometTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, distillation=config)
    inputs = tiny_inputs(*CAUSAL)
    student.train()
    loss = trainer.compute_loss(student, dict(inputs))
    torch.testing.assert_close(loss, (1 - 0.4) * student(**inputs).loss, atol=1e-6, rtol=1e-6)
    assert float(trainer._distill_sum) < 1e-7
    student.set_comet_keep_rate(0.5)
    with torch.no_grad():
        kl = distillation_kl(student(**inputs).logits, teacher(**inputs).logits, config.temperature)
    assert kl > 1e-5  # 0.0003 here: far above the ~1e-9 of keep 1.0


def _train(tmp_path, student, rows, teacher=None, config=None, **arguments):
    trainer = CometTrainer(model=student, args=_args(tmp_path, **arguments), train_dataset=rows,
                           teacher_model=teacher, distillation=config)  # fmt: skip
    trainer.train()
    return trainer


def test_alpha_zero_is_the_plain_trainer_bit_for_bit(tmp_path):
    rows = _rows(*CAUSAL)
    plain = tiny_model(*CAUSAL, routing="topk")
    _train(tmp_path / "plain", plain, rows)
    student = tiny_model(*CAUSAL, routing="topk")
    teacher = _stock_teacher(*CAUSAL)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    trainer = _train(tmp_path / "distil", student, rows, teacher, DistillationConfig(alpha=0.0))
    assert not calls, "alpha 0 and hidden_weight 0 distil nothing: the teacher must not run"
    assert all("distill_loss" not in entry for entry in trainer.state.log_history)
    for (name, a), b in zip(plain.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family, head", [CAUSAL, CLASSIFIER])
def test_gradient_accumulation_trains_and_logs_what_one_batch_does(tmp_path, family, head):
    """Batch 4 in one step vs 2 x 2 accumulated: the same weights and the same logged loss and distill_loss, for
    a loss Trainer normalises over the accumulated tokens (causal LM, micro-batches of different token counts) and
    one it divides by the accumulation steps (sequence classifier). SGD, so that equal gradients give equal weights
    (Adam's normalised steps turn float noise in near-zero gradients into differences of the learning rate's size)."""
    rows = _rows(family, head)
    config = DistillationConfig(alpha=0.5, temperature=2.0, hidden_weight=0.5)
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        student, teacher = _student_and_teacher(family, head)
        trainer = _train(tmp_path / f"{batch}", student, rows, teacher, config, max_steps=2, optim="sgd",
                         learning_rate=0.1, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation)  # fmt: skip
        runs.append((student, [e for e in trainer.state.log_history if "loss" in e]))
    (one, one_logs), (accumulated, accumulated_logs) = runs
    for (name, a), b in zip(one.state_dict().items(), accumulated.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert len(one_logs) == len(accumulated_logs) == 2
    for a, b in zip(one_logs, accumulated_logs, strict=True):
        assert a["distill_loss"] > 0
        assert a["distill_loss"] == pytest.approx(b["distill_loss"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_the_teacher_gets_no_gradients_and_no_checkpoint_holds_it(tmp_path):
    rows = _rows(*CAUSAL)
    student = tiny_model(*CAUSAL, routing="topk")
    teacher = _stock_teacher(*CAUSAL)
    teacher.train()  # the trainer puts it in eval mode
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _train(tmp_path, student, rows, teacher, DistillationConfig(alpha=0.5), max_steps=1,
                     save_strategy="steps", save_steps=1)  # fmt: skip
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    logged = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged["distill_loss"] > 0 and logged["router_aux_loss"] > 0

    checkpoint = tmp_path / "checkpoint-1"
    saved = load_file(checkpoint / "model.safetensors")
    student_state = student.state_dict()
    assert set(saved) <= set(student_state) and "transformer.wte.weight" in saved
    for key, value in saved.items():  # the trained student's tensors, not the teacher's (whose names overlap)
        assert torch.equal(value, student_state[key]), key
    assert not torch.equal(saved["transformer.wte.weight"], teacher.state_dict()["transformer.wte.weight"])
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert moments == sum(1 for p in student.parameters() if p.requires_grad)
    assert not any("teacher" in path.name for path in checkpoint.rglob("*"))
