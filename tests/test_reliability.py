"""Nothing is lost and nothing broken is published (issue 22, classes 2-6), table-driven like test_cli_errors:

- runs and folders: ``train`` over a folder that holds files needs ``--overwrite``; a run is staged whole and swapped
  in at the end, so a failure, a full disk or Ctrl-C at any write leaves the previous run as it was; a destination
  is locked for the run and checked again at swap time;
- full disks, read-only places, long names: every output is checked before work, every write failure is one line;
- sizes: memory is estimated before allocating, JSON depth is bounded before parsing, ``num_eval`` caps a user's data;
- broken models: a diverging run stops with a clear error, a non-finite model is never saved or carded.
"""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import SafetensorError

from hf_comet import io
from hf_comet.cli import main
from hf_comet.training.recipes import base

GPT2 = dict(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64, bos_token_id=1, eos_token_id=2)
TRAIN = ["train", "vit_digits", "--fast", "--no-progress", "--variants", "dense"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) with its kind and content hash."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def one_error_line(capsys, command: str, *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"hf-comet {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(path)
    return path


@pytest.fixture
def previous_run(tmp_path) -> Path:
    """A folder as a previous run left it (a checkpoint of a variant this run does not train, metrics.json, a
    plot), plus a user's notes."""
    run = tmp_path / "place" / "run"
    (run / "comet").mkdir(parents=True)
    (run / "comet" / "config.json").write_text('{"model_type": "comet_vit"}')
    (run / "metrics.json").write_text('{"old": true}')
    (run / "loss_curves.png").write_bytes(b"old plot")
    (run / "notes.txt").write_text("my notes")
    return run


# -- class 2: runs and folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [TRAIN, ["demo", "--fast", "--no-progress"]], ids=["train", "demo"])
def test_a_run_over_a_folder_that_holds_files_needs_overwrite(command, previous_run, capsys, monkeypatch):
    monkeypatch.setattr(base, "run_prepared", lambda *a, **k: pytest.fail("a refused run started"))
    before = snapshot(previous_run.parent)
    assert main([*command, "--output-dir", str(previous_run)]) == 2
    one_error_line(capsys, command[0], f"'{previous_run}' exists and holds files", "--overwrite")
    assert snapshot(previous_run.parent) == before


def test_overwrite_replaces_the_previous_run_as_one_unit_and_keeps_the_user_s_files(previous_run, capsys,
                                                                                    monkeypatch):  # fmt: skip
    evaluations = []
    real_evaluate = transformers.Trainer.evaluate
    monkeypatch.setattr(transformers.Trainer, "evaluate", lambda self, *a, **k: evaluations.append(1)
                        or real_evaluate(self, *a, **k))  # fmt: skip
    assert main([*TRAIN, "--output-dir", str(previous_run), "--overwrite"]) == 0
    fast = base.RECIPES["vit_digits"].fast
    every = min(fast.eval_steps, fast.steps)
    assert len(evaluations) == fast.steps // every + (fast.steps % every != 0)  # the last step's is not repeated
    assert sorted(os.listdir(previous_run.parent)) == ["run"]  # no hidden leftover, no lock file
    entries = sorted(os.listdir(previous_run))
    assert entries == ["dense", "loss_curves.png", "metrics.json", "notes.txt"], entries  # comet/ was the old run's
    assert (previous_run / "notes.txt").read_text() == "my notes"
    summary = json.loads((previous_run / "metrics.json").read_text())
    assert summary["variants"]["dense"]["checkpoint"] == str(previous_run.absolute() / "dense")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")


def _after_training(exception):
    real = base.train_model

    def train_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise exception

    return train_then_fail


RUN_FAILURES = [
    # (id, what to patch, replacement, exit status, text of the one error line)
    ("weights-disk-full", "transformers.modeling_utils.safe_save_file", _safetensors_full, 2, "No space left"),
    ("metrics-disk-full", "hf_comet.training.recipes.base.atomic_write_text", _enospc, 2, "No space left"),
    ("plot-disk-full", "hf_comet.training.recipes.base.plot_loss_curves", _enospc, 2, "No space left"),
    ("card-read-only", "hf_comet.training.recipes.base.write_model_card",
     lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")), 2, "Read-only"),
    ("ctrl-c", "hf_comet.training.recipes.base.train_model", _after_training(KeyboardInterrupt()), 130, None),
    ("crash", "hf_comet.training.recipes.base.train_model", _after_training(RuntimeError("boom")), None, None),
]  # fmt: skip


@pytest.mark.parametrize("case", RUN_FAILURES, ids=[case[0] for case in RUN_FAILURES])
def test_a_failed_or_interrupted_rerun_leaves_the_previous_run_intact(case, previous_run, capsys, monkeypatch):
    _, target, replacement, status, text = case
    monkeypatch.setattr(target, replacement)
    before = snapshot(previous_run.parent)
    argv = [*TRAIN, "--variants", "comet", "--output-dir", str(previous_run), "--overwrite"]
    if status is None:
        with pytest.raises(RuntimeError, match="boom"):
            main(argv)
    else:
        assert main(argv) == status
        if text is not None:
            one_error_line(capsys, "train", text, "unchanged")
    assert snapshot(previous_run.parent) == before


CONVERT_FAILURES = [
    ("weights-disk-full", "transformers.modeling_utils.safe_save_file", _safetensors_full, "No space left"),
    ("config-disk-full", "transformers.PretrainedConfig.to_json_file", _enospc, "No space left"),
    ("config-name-too-long", "transformers.PretrainedConfig.to_json_file",
     lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENAMETOOLONG, "File name too long")), "File name too long"),
]  # fmt: skip


@pytest.mark.parametrize("case", CONVERT_FAILURES, ids=[case[0] for case in CONVERT_FAILURES])
def test_a_failed_convert_overwrite_keeps_the_previous_checkpoint(case, source, tmp_path, capsys, monkeypatch):
    _, target, replacement, text = case
    destination = tmp_path / "moe"
    assert main(["convert", str(source), str(destination), "--no-progress"]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    monkeypatch.setattr(target, replacement)
    assert main(["convert", str(source), str(destination), "--no-progress", "--overwrite", "--seed", "1"]) == 2
    one_error_line(capsys, "convert", f"cannot write destination '{destination}'", text, "unchanged")
    assert snapshot(tmp_path) == before


def test_a_destination_being_written_by_another_run_is_refused(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hf_comet.convert.checkpoint.convert_to_moe", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(base, "_run_into", lambda *a, **k: pytest.fail("trained"))
    with io.destination_lock(tmp_path / "out"):
        before = snapshot(tmp_path)
        assert main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 2
        one_error_line(capsys, "convert", "is being written by another hf-comet run", f"process {os.getpid()}")
        assert main([*TRAIN, "--output-dir", str(tmp_path / "out")]) == 2
        one_error_line(capsys, "train", "is being written by another hf-comet run")
        assert snapshot(tmp_path) == before
    assert not os.listdir(tmp_path)  # the lock file goes with the lock


def _user_creates(folder: Path, wrapped):
    """``wrapped``, after which a user has created ``folder`` with a file of theirs in it."""

    def call(*args, **kwargs):
        result = wrapped(*args, **kwargs)
        folder.mkdir()
        (folder / "mine.txt").write_text("mine")
        return result

    return call


@pytest.mark.parametrize("command", ["convert", "train"])
def test_a_folder_created_at_the_destination_during_the_write_is_never_replaced(
    command, source, tmp_path, capsys, monkeypatch
):
    destination = tmp_path / "out"
    if command == "convert":
        target = "hf_comet.convert.checkpoint.convert_to_moe"
        from hf_comet.convert import checkpoint as module

        monkeypatch.setattr(target, _user_creates(destination, module.convert_to_moe))
        argv = ["convert", str(source), str(destination), "--no-progress"]
    else:
        monkeypatch.setattr(base, "_write_plots_and_cards", _user_creates(destination, base._write_plots_and_cards))
        argv = [*TRAIN, "--output-dir", str(destination)]
    assert main(argv) == 2
    line = one_error_line(capsys, command, f"'{destination}' appeared", "never replaced or deleted")
    assert os.listdir(destination) == ["mine.txt"] and (destination / "mine.txt").read_text() == "mine"
    kept = [name for name in os.listdir(tmp_path) if name != "out"]
    assert len(kept) == 1 and kept[0] in line and (tmp_path / kept[0] / "dense" if command == "train" else
                                                   tmp_path / kept[0] / "config.json").exists()  # fmt: skip


# -- class 3: full disks, read-only places, long names ------------------------------------------------------------
def test_a_file_added_to_a_destination_being_overwritten_is_never_deleted(source, tmp_path, capsys, monkeypatch):
    from hf_comet.convert import checkpoint as module

    destination = tmp_path / "out"
    assert main(["convert", str(source), str(destination), "--no-progress"]) == 0
    real = module.convert_to_moe

    def convert_while_the_user_adds_a_file(*args, **kwargs):
        result = real(*args, **kwargs)
        (destination / "notes.txt").write_text("mine")
        return result

    monkeypatch.setattr(module, "convert_to_moe", convert_while_the_user_adds_a_file)
    before = snapshot(destination)
    assert main(["convert", str(source), str(destination), "--no-progress", "--overwrite", "--seed", "1"]) == 2
    line = one_error_line(capsys, "convert", f"'{destination}' changed", "never replaced or deleted")
    assert snapshot(destination) == {**before, "notes.txt": hashlib.sha256(b"mine").hexdigest()}
    kept = [name for name in os.listdir(tmp_path) if name != "out"]
    assert len(kept) == 1 and kept[0] in line and (tmp_path / kept[0] / "model.safetensors").exists()


def test_a_destination_name_of_255_bytes_works_and_256_is_refused_before_work(source, tmp_path, capsys, monkeypatch):
    legal = tmp_path / ("d" * 250)
    assert main(["convert", str(source), str(legal), "--no-progress"]) == 0
    assert main(["convert", str(source), str(legal), "--no-progress", "--overwrite"]) == 0  # hidden siblings fit
    run = tmp_path / ("r" * 255)
    assert main([*TRAIN, "--output-dir", str(run)]) == 0 and (run / "dense" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["d" * 250, "r" * 255]
    capsys.readouterr()
    monkeypatch.setattr("hf_comet.convert.checkpoint.convert_to_moe", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(base, "run_prepared", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr("hf_comet.bench.run", lambda *a, **k: pytest.fail("benchmarked"))
    long = str(tmp_path / ("e" * 256))
    for argv in (["convert", str(source), long], [*TRAIN, "--output-dir", long], ["bench", "--quick", "--json", long],
                 ["reproduce", "--quick", "--cache", str(tmp_path / "cache"), "--page", long]):  # fmt: skip
        if argv[0] == "reproduce":
            monkeypatch.setattr("hf_comet.reproduce.reproduce", lambda *a, **k: pytest.fail("reproduced"))
        assert main(argv) == 2
        one_error_line(capsys, argv[0], "is 256 bytes long", "at most 255 bytes (NAME_MAX)")
    assert not os.path.lexists(long)


@pytest.fixture
def read_only_place(tmp_path, monkeypatch) -> Path:
    """A folder that refuses new files (``EROFS``, which stops root too): every ``os.open`` that creates a file in
    it fails, as on a read-only mount."""
    place = tmp_path / "ro"
    place.mkdir()
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == place:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return place


def test_every_output_in_a_read_only_place_is_refused_before_work(source, read_only_place, capsys, monkeypatch):
    monkeypatch.setattr("hf_comet.convert.checkpoint.convert_to_moe", lambda *a, **k: pytest.fail("converted"))
    monkeypatch.setattr(base, "run_prepared", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr("hf_comet.bench.run", lambda *a, **k: pytest.fail("benchmarked"))
    monkeypatch.setattr("hf_comet.reproduce.reproduce", lambda *a, **k: pytest.fail("reproduced"))
    place = read_only_place
    before = snapshot(place.parent)
    for argv in (["convert", str(source), str(place / "moe")], [*TRAIN, "--output-dir", str(place / "run")],
                 ["bench", "--quick", "--json", str(place / "b.json")],
                 ["reproduce", "--quick", "--cache", str(place.parent / "cache"), "--page", str(place / "r.md")]):  # fmt: skip
        assert main(argv) == 2
        one_error_line(capsys, argv[0], f"'{place}' refuses new files", "Read-only file system")
    assert {k: v for k, v in snapshot(place.parent).items() if not k.startswith("cache")} == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes through permission bits")
def test_a_chmod_read_only_folder_is_refused_before_work(source, tmp_path, capsys):
    place = tmp_path / "ro"
    place.mkdir()
    place.chmod(0o555)
    try:
        assert main(["convert", str(source), str(place / "moe")]) == 2
        one_error_line(capsys, "convert", "not writable")
    finally:
        place.chmod(0o755)


# -- class 4: sizes -----------------------------------------------------------------------------------------------
SIZES = [
    (["train", "gpt2_text", "--fast", "--setting", "hidden_size=65536"], "train"),
    (["train", "gpt2_text", "--fast", "--setting", "num_train=2147483647"], "train"),
    (["train", "bert_mlm_cls", "--fast", "--setting", "num_eval=2147483647"], "train"),
    (["train", "gpt2_text", "--fast", "--setting", "seq_len=4096", "--setting", "batch_size=4096"], "train"),
    (["train", "vit_digits", "--fast", "--setting", "batch_size=2147483647"], "train"),
    (["train", "vit_digits", "--fast", "--variants", "topk", "--set", "num_experts=100000", "--set",
      "moe_intermediate_size=256"], "train"),
    (["convert", "{source}", "{out}", "--method", "upcycle", "--num-experts", "1000000"], "convert"),
    (["convert", "{source}", "{out}", "--method", "upcycle", "--num-experts", "200000", "--report"], "convert"),
]  # fmt: skip


@pytest.mark.parametrize("argv, command", SIZES, ids=[" ".join(case[0][1:]) for case in SIZES])
def test_sizes_beyond_the_machine_s_memory_are_refused_with_the_numbers(argv, command, source, tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    monkeypatch.setattr("hf_comet.limits.total_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(base, "run_prepared", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr("hf_comet.convert.checkpoint.convert_to_moe", lambda *a, **k: pytest.fail("converted"))
    argv = [a.format(source=source, out=tmp_path / "out") for a in argv]
    assert main([*argv, *(["--output-dir", str(tmp_path / "out")] if command == "train" else [])]) == 2
    line = one_error_line(capsys, command, "needs about", "more than this machine's 16.0 GB")
    assert "parameters" in line
    assert not os.listdir(tmp_path)


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _deep_config(name: str):
    """A copy of the source whose ``name`` (a JSON object file) gains a field nested 5,000 levels deep."""

    def make(tmp_path: Path, source: Path) -> list[str]:
        folder = tmp_path / "deep_source"
        folder.mkdir()
        for entry in os.listdir(source):
            (folder / entry).write_bytes((source / entry).read_bytes())
        text = (folder / name).read_text() if (folder / name).exists() else "{}"
        body = json.dumps(json.loads(text))
        (folder / name).write_text(body[:-1] + (", " if body != "{}" else "") + '"extra": ' + _deep(5000) + "}")
        return ["convert", str(folder), str(tmp_path / "out")]

    return make


def _deep_dataset(tmp_path: Path, suffix: str, levels: int) -> list[str]:
    row = '{"image": ' + json.dumps([[0.0] * 8] * 8) + ', "label": 0, "extra": ' + _deep(levels) + "}"
    path = tmp_path / f"data{suffix}"
    path.write_text("\n".join([row] * 4) if suffix == ".jsonl" else "[" + ",".join([row] * 4) + "]")
    return [*TRAIN, "--dataset", str(path), "--output-dir", str(tmp_path / "out")]


DEPTHS = [
    ("set", lambda tmp, src: [*TRAIN, "--variants", "comet", "--set", f"moe_layers={_deep(1000)}"]),
    ("setting", lambda tmp, src: [*TRAIN, "--setting", f"steps={_deep(10000)}"]),
    ("config.json", _deep_config("config.json")),
    ("generation_config.json", _deep_config("generation_config.json")),
    ("tokenizer_config.json", _deep_config("tokenizer_config.json")),
    ("jsonl-10000", lambda tmp, src: _deep_dataset(tmp, ".jsonl", 10000)),
    ("json-1000", lambda tmp, src: _deep_dataset(tmp, ".json", 1000)),
]


@pytest.mark.parametrize("case", DEPTHS, ids=[case[0] for case in DEPTHS])
def test_json_nested_very_deep_is_one_clear_error(case, source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base, "run_prepared", lambda *a, **k: pytest.fail("trained"))
    argv = case[1](tmp_path, source)
    before = snapshot(tmp_path)
    assert main(argv) == 2
    one_error_line(capsys, argv[0], "levels deep", "at most 64")
    assert snapshot(tmp_path) == before


def test_a_deep_routing_state_is_refused_naming_the_file(tmp_path):
    from hf_comet.training.trainer import _read_routing_state

    path = tmp_path / "routing_state_0.json"
    path.write_text('{"0": ' + _deep(10000) + "}")
    with pytest.raises(ValueError, match="routing_state_0.json.*at most 64"):
        _read_routing_state(path, model=None)


def test_num_eval_caps_a_user_s_held_out_rows(tmp_path):
    rows = [{"image": [[float(i % 7)] * 8] * 8, "label": i % 2} for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    source = base.DatasetSource(str(tmp_path / "d.jsonl"))
    prepared = base.prepare_recipe_run("vit_digits", tmp_path / "out", fast=True, dataset=source,
                                       settings={"num_eval": 8})  # fmt: skip
    assert len(prepared.data.test) == 8 and "evaluated on 8 held-out rows" in prepared.data.description


# -- class 6: broken models are never published --------------------------------------------------------------------
def test_a_diverging_run_stops_with_a_clear_error_and_writes_nothing(tmp_path, capsys):
    rows = [{"image": [[1e30 * ((i * 7 + j) % 5)] * 8 for j in range(8)], "label": i % 2} for i in range(40)]
    (tmp_path / "huge.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    argv = [*TRAIN, "--dataset", str(tmp_path / "huge.jsonl"), "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    one_error_line(capsys, "train", "training diverged at step", "not finite", "Nothing of this run is saved")
    assert sorted(os.listdir(tmp_path)) == ["huge.jsonl"]


def test_a_model_with_non_finite_weights_is_never_saved_or_carded(source, tmp_path, capsys):
    from hf_comet.convert import convert_to_moe

    model = convert_to_moe(source, "upcycle", num_experts=4)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(io.UserError, match="holds NaN or infinite values"):
        io.atomic_save_pretrained(model, tmp_path / "nan")
    assert not os.listdir(tmp_path)
    with pytest.warns(UserWarning, match="no model card is written"):
        model.save_pretrained(tmp_path / "nan")  # saved as asked (upstream's contract), but not carded
    assert (tmp_path / "nan" / "model.safetensors").exists() and not (tmp_path / "nan" / "README.md").exists()
    with pytest.raises(ValueError, match="refusing to push"):
        model.push_to_hub("me/nan")  # refused before any Hub call (the tests run offline)
    assert main(["card", str(tmp_path / "nan")]) == 2
    one_error_line(capsys, "card", "holds NaN or infinite values")
    assert not (tmp_path / "nan" / "README.md").exists()


# -- class 5: the keep-rate schedule's target survives a save mid-schedule ----------------------------------------
def test_a_keep_rate_schedule_made_again_on_a_mid_schedule_checkpoint_keeps_the_model_s_target(tmp_path):
    from conftest import tiny_inputs, tiny_model
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hf_comet.training import CometTrainer, KeepRateScheduleCallback, scheduled_keep_rate

    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_keep_rate=0.25)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=8)
    rows = [{k: v[i] for k, v in inputs.items()} for i in range(8)]
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none", save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3)  # fmt: skip
    CometTrainer(model=model, args=args, train_dataset=rows, callbacks=[KeepRateScheduleCallback(steps=8)]).train()
    middle = scheduled_keep_rate(3, 0.25, 8, levels=7)
    assert model.config.comet_keep_rate == pytest.approx(middle) and middle > 0.4  # stopped mid-schedule
    model.save_pretrained(tmp_path / "mid")
    for step in (0, 3):  # a new run on the reloaded checkpoint, and a resume at the step it was saved
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mid")
        callback = KeepRateScheduleCallback(steps=8)
        callback.on_train_begin(args, TrainerState(global_step=step), TrainerControl(), model=reloaded)
        assert callback.target == pytest.approx(0.25), step
    callback.on_train_end(args, TrainerState(global_step=8), TrainerControl(), model=reloaded)
    assert reloaded.config.comet_keep_rate == pytest.approx(0.25)
    assert not hasattr(reloaded.config, KeepRateScheduleCallback.TARGET_ATTRIBUTE)  # finished: nothing left to carry


def test_leftovers_of_a_long_named_destination_carry_a_hash_and_are_recovered(tmp_path):
    target = tmp_path / ("n" * 240)
    target.mkdir()
    stem = io._stem(target.name)
    assert stem.startswith("~") and len(stem) == 17 and io._stem("short") == "short"
    dead = 2**22 + 12345  # no such process
    leftover = tmp_path / f".{stem}.tmp-{dead}-0-0123abcd"
    leftover.mkdir()
    backup = tmp_path / f".{stem}.old-{dead}-0-0123abce"
    backup.mkdir()
    assert io.recover_folder(tmp_path) and sorted(os.listdir(tmp_path)) == ["n" * 240]
    target.rmdir()  # an interrupted swap: the destination moved aside, then the writer died
    backup.mkdir()
    (backup / "config.json").write_text("{}")
    report = io.recover(target)
    assert report.restored_from == backup and (target / "config.json").is_file()
