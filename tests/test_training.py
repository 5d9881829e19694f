"""Training through transformers' Trainer and multi-process DDP: aux loss once per optimizer step, pure eval loss,
telemetry in log_history, merge and constraint callbacks, 2-process CPU DDP equal to one process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import ROUTING_NAMES, free_port, run_ranks, tiny_inputs, tiny_model
from transformers import TrainingArguments

from hf_comet.training import CometTrainer, DeepConstraintCallback, ExpertMergingCallback

HERE = Path(__file__).resolve().parent
HEAD = {"comet_gpt2": "AutoModelForCausalLM", "comet_vit": "AutoModelForImageClassification"}
HEAD["comet_bert"] = "AutoModelForMaskedLM"


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows_of(family: str, n: int, seed: int = 0) -> list[dict]:
    inputs = tiny_inputs(family, HEAD[family], batch=n, seed=seed)
    return [{k: v[i] for k, v in inputs.items()} for i in range(n)]


def args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=8,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        logging_steps=1,
        seed=0,
    )
    base.update(overrides)
    return TrainingArguments(**base)


@pytest.mark.parametrize("family", list(HEAD))
def test_gradient_accumulation_counts_the_aux_loss_once_per_optimizer_step(family, tmp_path):
    # two identical halves: each micro-batch of GA=2 has the same task and aux loss as the full batch, so one SGD
    # step must land on the same weights; counting the aux loss per micro-batch would double its gradient
    rows = rows_of(family, 4)
    rows = rows + rows
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = tiny_model(family, HEAD[family], routing="topk", router_aux_loss_coef=5.0)
        trainer = CometTrainer(
            model=model,
            args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation),
            train_dataset=ListDataset(rows),
        )
        trainer.train()
        logged = next(e for e in trainer.state.log_history if "loss" in e)
        results.append((model, logged))
    (one, log_one), (two, log_two) = results
    for (name, a), b in zip(one.named_parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert log_one["router_aux_loss"] == pytest.approx(log_two["router_aux_loss"], rel=1e-5)
    assert log_one["loss"] == pytest.approx(log_two["loss"], rel=1e-5)


def test_eval_loss_is_the_task_loss_and_metrics_receive_plain_logits(tmp_path):
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="topk", router_aux_loss_coef=5.0)
    model.config.output_router_logits = True  # router outputs must still not reach the metrics
    rows = rows_of("comet_vit", 6)
    seen = {}

    def compute_metrics(prediction):
        seen["logits"] = prediction.predictions
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, per_device_eval_batch_size=6),
        eval_dataset=ListDataset(rows),
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    assert model.routing_statistics()[0]["tokens"] == 0  # evaluation stays out of the training window
    assert isinstance(seen["logits"], np.ndarray) and seen["logits"].shape == (6, 3)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        task = torch.nn.functional.cross_entropy(
            model.eval()(pixel_values=batch["pixel_values"]).logits, batch["labels"]
        )
    assert metrics["eval_loss"] == pytest.approx(task.item(), rel=1e-5)


@pytest.mark.parametrize("routing", ["comet", "topk", "deep"])
def test_routing_telemetry_reaches_log_history_every_logging_step(routing, tmp_path):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing)
    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=ListDataset(rows_of("comet_gpt2", 16)),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [2, 4]
    for entry in logs:  # the default level: model summaries only, however deep the model
        for key in ("max_load_share", "min_load_share", "dead_experts", "gate_entropy", "usage_entropy"):
            assert f"routing/{key}" in entry
        assert not any("/layer_" in key for key in entry), entry
        assert "routing/mask_overlap" in entry and "routing/overlap_similarity_correlation" in entry
        assert ("router_aux_loss" in entry) == (routing == "topk")
    # each window holds exactly its two steps' real tokens (padding excluded, then reset)
    valid = sum(int(r["attention_mask"].sum()) for r in rows_of("comet_gpt2", 16)[:8])
    per_token = {"comet": 64, "topk": 2, "deep": 1}[routing]
    assert sum(trainer.routing_history[0]["tokens_per_expert"][0]) == pytest.approx(valid * per_token)


@pytest.mark.parametrize("level", ["summary", "layers", "none"])
def test_routing_logging_levels_choose_summaries_every_layer_or_nothing(level, tmp_path):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk")
    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, max_steps=2, logging_steps=2, per_device_train_batch_size=4, learning_rate=1e-3),
        train_dataset=ListDataset(rows_of("comet_gpt2", 8)),
        routing_logging=level,
    )
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    routing = {key for key in entry if key.startswith("routing/") or key == "router_aux_loss"}
    layers = {key for key in routing if "/layer_" in key}
    if level == "none":
        assert routing == set() and trainer.routing_history == []
        return
    summaries = routing - layers
    assert "router_aux_loss" in summaries and "routing/max_load_share" in summaries and len(summaries) <= 10
    assert {key.split("/")[1] for key in layers} == ({"layer_0", "layer_1"} if level == "layers" else set())
    assert layers >= ({"routing/layer_0/max_load_share", "routing/layer_1/dead_experts"} if level == "layers" else set())
    assert set(trainer.routing_history[0]["tokens_per_expert"]) == {0, 1}  # the load heatmaps' data at both levels


@pytest.mark.parametrize("level", ["all", "layer", "", None, True])
def test_an_unknown_routing_logging_level_is_refused_before_any_work(level, tmp_path):
    with pytest.raises(ValueError, match=f"routing_logging={level!r} is not a telemetry level; choose one of 'summary'"):
        CometTrainer(model=tiny_model("comet_vit", "AutoModel"), args=args(tmp_path), routing_logging=level)
    assert not (tmp_path / "out").exists()


def test_label_smoothing_keeps_the_aux_loss(tmp_path):
    rows = rows_of("comet_vit", 8)
    losses = {}
    for coef in (0.0, 5.0):
        model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="topk", router_aux_loss_coef=coef)
        trainer = CometTrainer(
            model=model, args=args(tmp_path, label_smoothing_factor=0.1), train_dataset=ListDataset(rows)
        )
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        model.train()
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        losses[coef] = (loss.item(), outputs.router_aux_loss.item())
    assert losses[5.0][0] == pytest.approx(losses[0.0][0] + losses[5.0][1], rel=1e-5)


@pytest.mark.parametrize("family", ["comet_vit", "comet_gpt2"])
def test_a_custom_loss_function_keeps_the_aux_loss_once_per_optimizer_step(family, tmp_path):
    """With ``compute_loss_func`` Trainer treats the loss as normalised over the accumulated batch (no division by
    the accumulation steps); the aux loss CometTrainer adds back must follow suit."""
    rows = rows_of(family, 4)
    rows = rows + rows

    def summed_cross_entropy(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        if family == "comet_gpt2":
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return loss / num_items_in_batch

    models = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = tiny_model(family, HEAD[family], routing="topk", router_aux_loss_coef=5.0)
        CometTrainer(
            model=model,
            args=args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation),
            train_dataset=ListDataset(rows),
            compute_loss_func=summed_cross_entropy,
        ).train()
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_expert_merging_callback_merges_at_the_set_step_and_resets_optimizer_state(tmp_path):
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="topk")
    callback = ExpertMergingCallback(at_steps=[3])
    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, max_steps=3, per_device_train_batch_size=4, optim="adamw_torch", learning_rate=1e-2),
        train_dataset=ListDataset(rows_of("comet_vit", 12)),
        callbacks=[callback],
    )
    trainer.train()
    assert [event["step"] for event in callback.history] == [3]
    (layer, (a, b), into), *_ = callback.history[0]["merges"]
    block = model.moe_blocks()[layer]
    torch.testing.assert_close(block.experts.up_proj[into], (block.experts.up_proj[a] + block.experts.up_proj[b]) / 2)
    state = trainer.optimizer.state[block.experts.up_proj]
    assert state["exp_avg"][into].abs().sum() == 0 and state["exp_avg"][a].abs().sum() > 0
    assert block.selection_counts.sum() == 0


def test_expert_merging_callback_refuses_a_missing_trigger():
    with pytest.raises(ValueError, match="needs a trigger"):
        ExpertMergingCallback()
    with pytest.raises(ValueError, match="every_n_steps=0"):
        ExpertMergingCallback(every_n_steps=0)


def test_deep_constraint_callback_ends_the_phase_by_optimizer_steps(tmp_path):
    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="deep", deep_constraint_steps=3)
    callback = DeepConstraintCallback()
    states = []

    class Probe(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            states.append(model.moe_blocks()[0].router.constraint_active)

    trainer = CometTrainer(
        model=model,
        args=args(tmp_path, max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=ListDataset(rows_of("comet_vit", 20)),
        callbacks=[callback, Probe()],
    )
    trainer.train()
    # 3 optimizer steps = 6 forwards: on its own the router would have lifted the constraint after step 2
    assert states == [True, True, False, False, False] and callback.lifted_at == 3
    assert int(model.moe_blocks()[0].router.constraint_steps_done) >= 3


def test_deep_constraint_callback_keeps_the_phase_when_training_resumes(tmp_path):
    def run(max_steps, resume=None, save=False):
        model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="deep", deep_constraint_steps=3)
        states = []

        class Probe(transformers.TrainerCallback):  # is the constraint on while this step's forwards run?
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                states.append(model.moe_blocks()[0].router.constraint_active)

        overrides = dict(max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2)
        if save:
            overrides.update(save_strategy="steps", save_steps=2)
        trainer = CometTrainer(
            model=model,
            args=args(tmp_path, **overrides),
            train_dataset=ListDataset(rows_of("comet_vit", 20)),
            callbacks=[DeepConstraintCallback(), Probe()],
        )
        trainer.train(resume_from_checkpoint=resume)
        return states

    assert run(2, save=True) == [True, True]
    # the checkpoint holds 4 counted forwards (> the 3 constraint steps); the phase must still last 3 optimizer steps
    assert run(5, resume=str(tmp_path / "out" / "checkpoint-2")) == [True, False, False]


def test_activation_checkpointing_in_trainer_gives_the_same_weights(tmp_path):
    rows = rows_of("comet_bert", 8)
    models = []
    for checkpointing in (False, True):
        model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="switch", router_jitter_noise=0.1)
        CometTrainer(
            model=model,
            args=args(tmp_path, max_steps=2, per_device_train_batch_size=4, activation_checkpointing=checkpointing),
            train_dataset=ListDataset(rows),
        ).train()
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- multi-process -------------------------------------------------------------------------------------------------
def _ddp_steps(rank: int, routings: list[str]) -> dict[str, float]:
    """Three DDP steps of every routing on this rank (gloo group set up by `run_ranks`); each model's parameter sum."""
    sums = {}
    for routing in routings:
        model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing=routing, moe_layers=[1])
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(3):  # an unused parameter fails at the second step's reduction
            out = ddp(**tiny_inputs("comet_gpt2", "AutoModelForCausalLM", seed=10 * rank + step))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        sums[routing] = float(sum(p.double().sum() for p in model.parameters()))
    return sums


def test_ddp_without_unused_parameter_search_works_for_every_routing(tmp_path):
    rank0, rank1 = run_ranks(_ddp_steps, 2, tmp_path, list(ROUTING_NAMES))
    for routing in ROUTING_NAMES:
        assert rank0[routing] == rank1[routing], routing  # replicas stay identical


DDP_ROUTINGS = ("comet", "topk")


def _launch_script(out: Path, batch: int, processes: int) -> subprocess.Popen:
    """Start the script for every routing of ``DDP_ROUTINGS`` in one launch (it writes ``out/<routing>/``)."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(HERE / "ddp_train_script.py"), str(out), ",".join(DDP_ROUTINGS), str(batch)]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = launcher + command[1:]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """Both routings trained once under torchrun with 2 processes (batch 8 each) and once in 1 (batch 16); the two
    launches run at the same time (each spends most of its time importing, on one core)."""
    folder = tmp_path_factory.mktemp("ddp_runs")
    launches = [_launch_script(folder / "ddp", batch=8, processes=2),
                _launch_script(folder / "single", batch=16, processes=1)]  # fmt: skip
    for launch in launches:
        _, err = launch.communicate(timeout=300)
        assert launch.returncode == 0, err[-3000:]
    return folder


@pytest.mark.parametrize("routing", DDP_ROUTINGS)
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(routing, ddp_runs):
    def read(run: str, processes: int) -> dict:
        return {rank: json.loads((ddp_runs / run / routing / f"rank{rank}.json").read_text()) for rank in range(processes)}

    ddp, single = read("ddp", 2), read("single", 1)
    tmp_path = ddp_runs  # the runs' folders: ddp/<routing>/, single/<routing>/
    assert ddp[0]["world_size"] == 2 and ddp[0]["ddp"] == "DistributedDataParallel"
    weights = [torch.load(tmp_path / "ddp" / routing / f"rank{r}.pt") for r in (0, 1)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name  # both ranks end identical
    # telemetry is reduced over ranks: the same windows as the single process with the global batch. The first
    # window routes with the initial weights, so it is identical; later ones route with weights that differ by
    # float-order noise (~1e-5, below), which may flip a near-tie unit of a few tokens, never the totals.
    windows_ddp, windows_single = ddp[0]["tokens_per_expert"], single[0]["tokens_per_expert"]
    assert len(windows_ddp) == len(windows_single)
    assert windows_ddp[0] == windows_single[0]
    for window_ddp, window_single in zip(windows_ddp, windows_single, strict=True):
        for layer in window_single:
            counts_ddp, counts_single = np.array(window_ddp[layer]), np.array(window_single[layer])
            assert counts_ddp.sum() == counts_single.sum()  # every token of the global batch, counted once
            assert np.abs(counts_ddp - counts_single).max() <= 2
    assert ddp[0]["routing_keys"] == single[0]["routing_keys"]
    if routing == "comet":  # no batch-dependent aux loss: the loss curve is the single-process one
        np.testing.assert_allclose(ddp[0]["losses"], single[0]["losses"], rtol=1e-5)
        reference = torch.load(tmp_path / "single" / routing / "rank0.pt")
        for name in reference:
            # Adam divides by sqrt(v): float-order differences of ~1e-7 in the gradients grow to ~1e-5 in the
            # weights; a wrong batch split would move them by ~lr = 1e-2
            torch.testing.assert_close(weights[0][name], reference[name], rtol=1e-3, atol=1e-4)
    else:  # the Switch/top-k aux loss is a per-rank batch statistic: close, not equal
        np.testing.assert_allclose(ddp[0]["losses"], single[0]["losses"], rtol=1e-2)
    assert all(math.isfinite(v) for v in ddp[0]["losses"])


def test_shipped_accelerate_config_starts_two_processes(tmp_path):
    root = HERE.parent
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["ACCELERATE_USE_CPU"] = "true"  # the README's command, the one a plain Accelerator() loop needs too
    command = [str(accelerate), "launch", "--config_file", str(root / "recipes" / "accelerate_ddp_cpu.yaml")]
    port = str(free_port())  # never a fixed port: two suites on one machine would share one rendezvous
    command += ["--main_process_port", port, str(root / "recipes" / "ddp_train.py"), "--steps", "2"]
    command += ["--routing", "topk", "--merge-every", "1", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout  # not the single process that `--cpu` would silently give
    assert "SingleProcessLaunchWarning" not in proc.stderr
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.routing == "topk"


@pytest.mark.parametrize("family", list(HEAD))
@pytest.mark.parametrize("loss_func", [False, True])
def test_the_logged_aux_loss_is_the_part_of_the_logged_loss_that_training_added(family, loss_func, tmp_path):
    # micro-batches of unequal label counts (GPT-2/BERT: padding varies): the model weights each micro-batch's aux
    # loss by its share of the loss items, so a plain mean over micro-batches would log something else than what
    # was trained. At the first step the weights do not depend on the coefficient, so the difference of the logged
    # losses with and without the aux loss is exactly the aux loss's part of the loss.
    rows = rows_of(family, 8, seed=3)
    if family != "comet_vit":
        for i, row in enumerate(rows[:4]):  # the first micro-batch has fewer counted labels
            row["labels"] = row["labels"].clone()
            row["labels"][: 2 + i] = -100
    logged = {}
    for coef in (0.0, 5.0):
        model = tiny_model(family, HEAD[family], routing="topk", router_aux_loss_coef=coef)
        extra = {}
        if loss_func:  # Trainer computes the loss itself and CometTrainer adds the aux loss back
            extra["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: (
                outputs.logits.float().square().mean()
            )
        trainer = CometTrainer(
            model=model,
            args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2),
            train_dataset=ListDataset(rows),
            **extra,
        )
        trainer.train()
        logged[coef] = next(e for e in trainer.state.log_history if "loss" in e)
    assert logged[5.0]["router_aux_loss"] > 0
    assert logged[5.0]["loss"] - logged[0.0]["loss"] == pytest.approx(logged[5.0]["router_aux_loss"], rel=1e-4)
