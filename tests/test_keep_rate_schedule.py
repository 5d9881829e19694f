"""The COMET keep-rate schedule (issue 14 §6): a converted dense model starts as exactly the dense model (keep 1.0)
and anneals to the target keep rate over the first N optimizer steps, unit or block level, with the config and the
checkpoints following the keep rate it runs at."""

import pytest
import torch
import transformers
from conftest import tiny_inputs, tiny_model
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_comet.convert import convert_to_moe
from hf_comet.modeling.moe_routers import comet_num_active
from hf_comet.training import CometTrainer, KeepRateScheduleCallback, scheduled_keep_rate


def test_the_cubic_schedule_is_zhu_and_gupta_s_on_the_kept_fraction():
    assert scheduled_keep_rate(0, 0.25, 8) == 1.0
    assert scheduled_keep_rate(4, 0.25, 8) == pytest.approx(0.25 + 0.75 / 8)  # (1 - 1/2)^3
    assert scheduled_keep_rate(8, 0.25, 8) == scheduled_keep_rate(100, 0.25, 8) == pytest.approx(0.25)
    assert scheduled_keep_rate(4, 0.25, 8, schedule="linear") == pytest.approx(0.625)
    assert scheduled_keep_rate(2, 0.5, 4, start=0.9) == pytest.approx(0.5 + 0.4 / 8)
    values = [scheduled_keep_rate(step, 0.1, 10) for step in range(12)]
    assert values == sorted(values, reverse=True)  # never rises


def test_the_default_levels_keep_torch_compile_within_its_recompile_limit():
    """Every distinct k is a recompile under torch.compile (8 by default): the default 7 levels give 8 values."""
    values = [scheduled_keep_rate(step, 0.25, 500, levels=7) for step in range(600)]
    assert len(set(values)) == 8 and values[0] == 1.0 and values[-1] == pytest.approx(0.25)
    assert values == sorted(values, reverse=True)
    exact = [scheduled_keep_rate(step, 0.25, 500) for step in range(600)]
    assert all(q >= e - 1e-12 for q, e in zip(values, exact, strict=True))  # rounded up: never sparser than asked
    assert len(set(exact)) > 100


def test_a_resume_without_a_target_is_refused_and_the_saved_state_restores_it(tmp_path):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_keep_rate=0.75)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="resumes at step 3 without a target"):
        KeepRateScheduleCallback(steps=10).on_train_begin(args, TrainerState(global_step=3), TrainerControl(), model=model)
    fresh = KeepRateScheduleCallback(steps=10, levels=None)
    fresh.on_train_begin(args, TrainerState(), TrainerControl(), model=model)  # resolves target 0.75
    restored = KeepRateScheduleCallback.from_state(fresh.state())  # what Trainer does on resume
    assert (restored.target, restored.steps, restored.levels) == (0.75, 10, None)


def rows(inputs: dict) -> list[dict]:
    return [{k: v[i] for k, v in inputs.items()} for i in range(next(iter(inputs.values())).shape[0])]


@pytest.mark.parametrize("block_size", [1, 16])
def test_a_converted_dense_model_trains_from_keep_one_to_the_target_and_saves_as_it_runs(block_size, tmp_path):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(config).eval()
    moe = convert_to_moe(dense, "comet", comet_keep_rate=0.25, comet_block_size=block_size)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=8)
    callback = KeepRateScheduleCallback(steps=4)  # target: the converted model's 0.25
    groups = 128 // block_size
    trainer = CometTrainer(
        model=moe,
        args=TrainingArguments(
            str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        ),  # fmt: skip
        train_dataset=rows(inputs),
        callbacks=[callback],
    )
    with torch.no_grad():  # before training the model is the target sparse one ...
        assert (moe.eval()(**inputs).logits - dense(**inputs).logits).abs().max() > 1e-4
    trainer.train()
    # ... the schedule starts at keep 1.0 (every unit: the dense model) and ends at the target, never rising
    assert callback.history[0] == (0, 1.0, groups)
    kept = [k for _, _, k in callback.history]
    assert kept == sorted(kept, reverse=True) and len(kept) > 2
    assert kept[-1] == comet_num_active(0.25, groups) and callback.history[-1][0] <= 4
    assert moe.config.comet_keep_rate == pytest.approx(0.25)
    moe.save_pretrained(tmp_path / "saved")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert all(block.router.num_active == kept[-1] for block in loaded.moe_blocks())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, moe.eval()(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_keep_rate_one_reproduces_the_dense_model_and_the_schedule_resumes_where_it_was(tmp_path):
    dense_equivalent = tiny_model("comet_vit", "AutoModelForImageClassification", routing="comet", comet_keep_rate=1.0)
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="comet", comet_keep_rate=0.5)
    inputs = tiny_inputs("comet_vit", "AutoModelForImageClassification", with_labels=False)
    model.set_comet_keep_rate(1.0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, dense_equivalent.eval()(**inputs).logits)
    callback = KeepRateScheduleCallback(steps=10, target=0.5)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    state = TrainerState(global_step=5)  # a run resumed at step 5
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    expected = scheduled_keep_rate(5, 0.5, 10, levels=7)
    assert model.config.comet_keep_rate == pytest.approx(expected)
    assert all(block.router.num_active == comet_num_active(expected, 128) for block in model.moe_blocks())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps=0"),
        (dict(steps=4, schedule="exponential"), "schedule='exponential'"),
        (dict(steps=4, target=1.5), "target=1.5"),
        (dict(steps=4, target=0.5, start=0.25), "start=0.25 is below target=0.5"),
    ],
)
def test_bad_schedules_are_refused_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KeepRateScheduleCallback(**kwargs)


def test_a_model_without_comet_routing_is_refused_and_a_bad_keep_rate_changes_nothing(tmp_path):
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to="none")
    topk = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="topk")
    with pytest.raises(ValueError, match="routing='comet'.*'topk'"):
        KeepRateScheduleCallback(steps=4).on_train_begin(args, TrainerState(), TrainerControl(), model=topk)
    comet = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="comet", comet_keep_rate=0.5)
    with pytest.raises(ValueError, match="keep_rate=0"):
        comet.set_comet_keep_rate(0)
    assert comet.config.comet_keep_rate == 0.5
    assert all(block.router.num_active == 64 for block in comet.moe_blocks())
