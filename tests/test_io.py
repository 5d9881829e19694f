"""Crash-safe writes (`hf_comet.io`): every write leaves the destination complete (old or new) whatever fails or is
killed at any step, and the next writer (or `recover`) repairs the leftovers and says so; symbolic links, files
where folders go and folders where files go are refused; modes follow the umask like ``save_pretrained``.

Kills are real: the write runs in a forked child that ``os._exit``s at step k of the swap (no handler runs), so the
parent sees exactly what a kill leaves. Failures are injected in-process at every step as well.
"""

import logging
import os
import shutil
import stat

import pytest
import torch
import transformers
from conftest import tiny_model

import hf_comet.io as io
from hf_comet.cards import write_model_card
from hf_comet.io import (
    atomic_save_pretrained,
    atomic_write_bytes,
    atomic_write_text,
    check_destination,
    recover,
    recover_folder,
    scratch_directory,
    staged_path,
)
from hf_comet.training.recipes import RecipeArgumentError, check_recipe_outputs

OLD = {"config.json": b'{"old": 1}', "weights.bin": b"\x00old" * 100, "sub/extra.txt": b"old extra"}
NEW = {"config.json": b'{"new": 2}', "weights.bin": b"\x01new" * 50, "sub/other.txt": b"new other"}


def snapshot(path):
    """Every file under ``path`` (relative name -> bytes), or the bytes of ``path`` if it is a file; None if absent."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def write_tree(folder, files):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if io._LEFTOVER.fullmatch(name))


def dead_pid():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def leftover_name(target, kind, pid=None, start=0):
    return target.with_name(f".{target.name}.{kind}-{dead_pid() if pid is None else pid}-{start}-0123abcd")


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


# -- kills at every step, in a forked child ------------------------------------------------------------------------
KILLED = 17


def run_killed(write, kill_at, *, exchange=True, partial_rmtree=False):
    """Run ``write(event)`` in a child that exits (as a kill would: no handler, no cleanup) at event ``kill_at``;
    events are ``event()`` calls in the body, then the swap's steps (``_exchange``, ``os.replace``,
    ``shutil.rmtree``). Returns True if the child was killed, False if it completed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            count = [0]

            def event():
                count[0] += 1
                if count[0] == kill_at:
                    os._exit(KILLED)

            def hooked(function):
                def call(*args, **kwargs):
                    event()
                    return function(*args, **kwargs)

                return call

            real_rmtree = shutil.rmtree

            def rmtree(path, *args, **kwargs):
                if partial_rmtree:  # killed while deleting: one file gone, the rest still there
                    next(p for p in path.rglob("*") if p.is_file()).unlink()
                    os._exit(KILLED)
                return real_rmtree(path, *args, **kwargs)

            os.replace = hooked(os.replace)
            shutil.rmtree = hooked(rmtree)
            io._exchange = hooked(io._exchange) if exchange else (lambda a, b: False)
            write(event)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, KILLED), status
    return os.WEXITSTATUS(status) == KILLED


def folder_writer(target, files):
    def write(event):
        with staged_path(target, directory=True) as staging:
            for name, data in files.items():
                event()
                write_tree(staging, {name: data})

    return write


# events: 3 body writes, then the steps of the swap
SWAPS = {
    True: ["_exchange", "os.replace (old copy -> .del)", "rmtree"],
    False: ["os.replace (old -> .old)", "os.replace (new -> NAME)", "os.replace (.old -> .del)", "rmtree"],
}
NEW_FROM = {True: 5, False: 6}  # killed before this event (the one after the swap): OLD; at or after it: NEW


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_kill_at_any_step_of_replacing_a_folder_leaves_it_recoverable(tmp_path, exchange, caplog):
    target = tmp_path / "ckpt"
    events = 3 + len(SWAPS[exchange])
    for kill_at in range(1, events + 2):
        if target.exists():
            shutil.rmtree(target)
        write_tree(target, OLD)
        killed = run_killed(folder_writer(target, NEW), kill_at, exchange=exchange)
        assert killed == (kill_at <= events)
        expected = OLD if kill_at < NEW_FROM[exchange] else NEW
        missing = not exchange and kill_at == 5  # between moving the old aside and the new in
        assert snapshot(target) == (None if missing else expected), kill_at
        had_leftovers = bool(leftovers(tmp_path))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_comet.io"):
            report = recover(target)
        assert snapshot(target) == expected, kill_at
        assert leftovers(tmp_path) == [], kill_at
        assert bool(report) == had_leftovers, kill_at
        assert (report.restored_from is not None) == missing
        if report:
            assert "recovered" in caplog.text and str(target) in caplog.text
            assert ("restored" in str(report)) == missing


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
def test_a_kill_while_deleting_the_old_folder_leaves_the_new_one_and_the_next_writer_cleans_up(
    tmp_path, exchange, caplog
):
    target = tmp_path / "ckpt"
    write_tree(target, OLD)
    assert run_killed(folder_writer(target, NEW), 0, exchange=exchange, partial_rmtree=True)
    assert snapshot(target) == NEW
    assert [n.split("-")[0] for n in leftovers(tmp_path)] == [".ckpt.del"]  # never a partial .old-* to restore
    with caplog.at_level(logging.WARNING, logger="hf_comet.io"):
        atomic_write_text(tmp_path / "other.txt", "unrelated")  # another destination: its leftovers are not touched
        assert leftovers(tmp_path) != []
        with staged_path(target, directory=True) as staging:  # the next writer of this destination recovers first
            assert leftovers(tmp_path) == [staging.name]
            write_tree(staging, OLD)
    assert "removed 1 leftover" in caplog.text
    assert snapshot(target) == OLD and leftovers(tmp_path) == []


def test_a_kill_during_a_first_write_leaves_no_destination_and_the_staging_is_removed(tmp_path):
    target = tmp_path / "new"
    for kill_at in range(1, 6):  # 3 body writes, the rename, then none: completed
        if target.exists():
            shutil.rmtree(target)
        killed = run_killed(folder_writer(target, NEW), kill_at)
        assert snapshot(target) == (None if killed else NEW)
        recover(target)
        assert leftovers(tmp_path) == []
        assert snapshot(target) == (None if killed else NEW)


def test_a_kill_at_any_step_of_a_file_write_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "metrics.json"
    for kill_at in range(1, 4):
        target.write_bytes(b"old")

        def write(event):
            event()
            atomic_write_bytes(target, b"new")

        killed = run_killed(write, kill_at)
        assert target.read_bytes() == (b"old" if killed else b"new")
        assert bool(recover(target)) == (kill_at == 2)  # killed after the temporary file was made
        assert os.listdir(tmp_path) == ["metrics.json"]


# -- failures raised in-process at every step -----------------------------------------------------------------------
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError], ids=["KeyboardInterrupt", "OSError"])
def test_a_failure_at_any_step_of_replacing_a_folder_restores_or_completes_it(tmp_path, monkeypatch, exchange, error):
    target = tmp_path / "ckpt"
    real = {"replace": os.replace, "rmtree": shutil.rmtree, "exchange": io._exchange}
    steps = ["exchange", "replace", "rmtree"] if exchange else ["replace", "replace", "replace", "rmtree"]
    for fail_at in range(len(steps)):
        if target.exists():
            shutil.rmtree(target)
        write_tree(target, OLD)
        count = [-1]

        def failing(kind, count=count, fail_at=fail_at):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == fail_at:
                    raise error("injected")
                return real[kind](*args, **kwargs)

            return call

        monkeypatch.setattr(io.os, "replace", failing("replace"))
        monkeypatch.setattr(io.shutil, "rmtree", failing("rmtree"))
        monkeypatch.setattr(io, "_exchange", failing("exchange") if exchange else lambda a, b: False)
        swapped = fail_at > (0 if exchange else 1)  # failed after the new folder was in place
        if swapped and error is OSError:  # the write succeeded; removing the old copy failed: a warning, no error
            with staged_path(target, directory=True) as staging:
                write_tree(staging, NEW)
        else:
            with pytest.raises(error, match="injected"):
                with staged_path(target, directory=True) as staging:
                    write_tree(staging, NEW)
        assert snapshot(target) == (NEW if swapped else OLD), fail_at
        if not swapped:  # cleaned up in-process
            assert leftovers(tmp_path) == [], fail_at
        monkeypatch.undo()
        recover(target)
        assert leftovers(tmp_path) == [] and snapshot(target) == (NEW if swapped else OLD)


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "README.md"
    atomic_write_text(target, "old card\n")
    written = []

    def disk_full(fd):  # the bytes are in the temporary file, the disk fails before they are durable
        written.append([p.name for p in tmp_path.iterdir() if p.name != "README.md"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new card " * 100_000)
    assert written and written[0], "the failure was injected while the temporary file existed"
    assert target.read_text() == "old card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_a_failed_file_swap_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"\x00old")
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError("read-only")))
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"\x01new")
    assert target.read_bytes() == b"\x00old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_atomic_write_text_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    assert atomic_write_text(target, "first ü\n") == target
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


# -- recovery by hand-made leftovers: what is restored, what is removed, what belongs to a live writer --------------
def test_recover_restores_a_missing_destination_and_removes_every_stale_leftover(tmp_path):
    target = tmp_path / "ckpt"
    backup, staging, doomed = (leftover_name(target, kind) for kind in ("old", "tmp", "del"))
    write_tree(backup, OLD)
    write_tree(staging, NEW)  # complete or not: it was never swapped in, the previous version wins
    write_tree(doomed, {"half": b"x"})
    report = recover(target)
    assert report.restored_from == backup and sorted(report.removed) == sorted([staging, doomed])
    assert snapshot(target) == OLD and leftovers(tmp_path) == []
    assert not recover(target) and "nothing to recover" in str(recover(target))


def test_recover_leaves_the_work_of_live_writers_alone(tmp_path):
    target = tmp_path / "ckpt"
    write_tree(target, OLD)
    parent_start = io._process_start(os.getppid()) or 0
    live = leftover_name(target, "tmp", pid=os.getppid(), start=parent_start)  # a running process
    reused = leftover_name(target, "tmp", pid=os.getppid(), start=parent_start + 1)  # its id, an older process
    abandoned = target.with_name(f".ckpt.tmp-{io._tag()}-deadbeef")  # this process's tag, not in use
    for path in (live, reused, abandoned):
        path.mkdir()
    with staged_path(target, directory=True) as mine:  # its recovery removes what no running writer uses
        gone = [reused, abandoned] if parent_start else [abandoned]
        assert sorted(leftovers(tmp_path)) == sorted({mine.name, live.name, reused.name} - {p.name for p in gone})
        assert not recover(target)  # neither the write in flight nor the other process's staging
        write_tree(mine, NEW)
    if not parent_start:
        reused.rmdir()
    assert snapshot(target) == NEW and leftovers(tmp_path) == [live.name]
    assert recover_folder(tmp_path) == []


def test_recover_folder_repairs_every_destination_in_a_folder(tmp_path):
    write_tree(leftover_name(tmp_path / "comet", "old"), OLD)
    leftover_name(tmp_path / "metrics.json", "tmp").write_text("{")
    leftover_name(tmp_path / "comet.trainer", "tmp").mkdir()
    reports = recover_folder(tmp_path)
    assert sorted(r.path.name for r in reports) == ["comet", "comet.trainer", "metrics.json"]
    assert snapshot(tmp_path / "comet") == OLD and sorted(os.listdir(tmp_path)) == ["comet"]


def test_scratch_directory_is_removed_and_a_killed_one_is_recovered(tmp_path):
    with scratch_directory(tmp_path / "run.trainer") as scratch:
        (scratch / "state").write_text("x")
        assert recover_folder(tmp_path) == []  # in use
    assert os.listdir(tmp_path) == []
    leftover_name(tmp_path / "run.trainer", "tmp").mkdir()
    assert [r.path.name for r in recover_folder(tmp_path)] == ["run.trainer"] and os.listdir(tmp_path) == []


# -- refused destinations ---------------------------------------------------------------------------------------------
def test_symbolic_links_are_refused_and_what_they_point_to_is_untouched(tmp_path):
    model = tiny_model("comet_vit", "AutoModel")
    real = tmp_path / "real"
    model.save_pretrained(real)
    (real / "notes.txt").write_text("mine")
    before = snapshot(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    for write in (
        lambda: atomic_save_pretrained(model, link),
        lambda: atomic_write_bytes(link, b"x"),
        lambda: staged_path(link, directory=True).__enter__(),
    ):
        with pytest.raises(ValueError, match="symbolic link") as error:
            write()
        assert str(link) in str(error.value) and str(real) in str(error.value)
    (real / "README.md").rename(real / "card.md")
    (real / "README.md").symlink_to(real / "card.md")
    with pytest.raises(ValueError, match="symbolic link"):
        write_model_card(model, real)
    (real / "README.md").unlink()
    (real / "card.md").rename(real / "README.md")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="symbolic link"):
        atomic_write_text(dangling, "x")
    assert snapshot(real) == before and link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert leftovers(tmp_path) == [] and leftovers(real) == []


def test_a_file_where_a_folder_goes_and_a_folder_where_a_file_goes_are_refused(tmp_path):
    model = tiny_model("comet_vit", "AutoModel")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"user data")
    with pytest.raises(ValueError, match="is a file, not a folder") as error:
        atomic_save_pretrained(model, file)
    assert str(file) in str(error.value)
    with pytest.raises(ValueError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        atomic_write_text(file / "README.md", "x")
    notes = tmp_path / "notes"
    write_tree(notes, {"todo.txt": b"mine"})
    with pytest.raises(ValueError, match="holds files but no config.json, so it is not a checkpoint"):
        atomic_save_pretrained(model, notes)
    assert file.read_bytes() == b"user data" and snapshot(notes) == {"todo.txt": b"mine"}
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "notes"]
    (tmp_path / "empty").mkdir()
    assert atomic_save_pretrained(model, tmp_path / "empty") == tmp_path / "empty"  # nothing to lose
    with pytest.raises(ValueError, match="exists; pass overwrite"):
        atomic_save_pretrained(model, tmp_path / "empty", overwrite=False)
    assert check_destination(tmp_path / "absent" / "x", directory=True) == tmp_path / "absent" / "x"


def test_recipe_outputs_are_checked_before_any_training(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "comet").symlink_to(tmp_path / "real")
    with pytest.raises(RecipeArgumentError, match="comet' is a symlink"):
        check_recipe_outputs("vit_digits", tmp_path, ["dense", "comet"])
    (tmp_path / "comet").unlink()
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(RecipeArgumentError, match="is a folder"):
        check_recipe_outputs("vit_digits", tmp_path, ["dense", "comet"])
    (tmp_path / "metrics.json").rmdir()
    assert check_recipe_outputs("vit_digits", tmp_path, ["dense", "comet"]) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeArgumentError, match="is a file"):
        check_recipe_outputs("vit_digits", tmp_path / "file")


# -- modes ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask_like_save_pretrained(tmp_path, umask, mask):
    umask(mask)
    model = tiny_model("comet_vit", "AutoModel")
    ours, upstream = tmp_path / "ours", tmp_path / "upstream"
    atomic_save_pretrained(model, ours)
    model.save_pretrained(upstream)
    transformers.PreTrainedModel.save_pretrained(model, tmp_path / "plain")
    atomic_write_text(tmp_path / "metrics.json", "{}")

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(ours) == mode(upstream) == mode(tmp_path / "plain") == 0o777 & ~mask
    for folder in (ours, upstream):  # weights too (safetensors 0.8 writes 0600 whatever the umask; "plain" has it)
        assert {p.name: mode(p) for p in folder.iterdir()} == dict.fromkeys(os.listdir(folder), 0o666 & ~mask)
    assert mode(tmp_path / "metrics.json") == 0o666 & ~mask
    (tmp_path / "metrics.json").chmod(0o640)  # a replaced destination keeps its mode
    ours.chmod(0o750)
    atomic_write_text(tmp_path / "metrics.json", "[]")
    atomic_save_pretrained(model, ours)
    assert mode(tmp_path / "metrics.json") == 0o640 and mode(ours) == 0o750


# -- a plain model.save_pretrained over a checkpoint (hf_comet.hub.Sharing) ---------------------------------------
def test_save_pretrained_over_a_checkpoint_gives_upstreams_result_and_keeps_your_files(tmp_path, monkeypatch):
    first, second = tiny_model("comet_vit", "AutoModel"), tiny_model("comet_vit", "AutoModel")
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(1.0)
    old = tmp_path / "old"
    first.save_pretrained(old, max_shard_size="100KB")  # sharded: upstream deletes those shards when unsharded
    write_tree(old, {"notes.txt": b"mine", "README.md": b"my own card", "runs/log.txt": b"trainer log"})
    (old / "model.fp16.safetensors").write_bytes(b"another variant")
    assert len(list(old.glob("model-*-of-*.safetensors"))) > 1
    ours, upstream = tmp_path / "ours", tmp_path / "upstream"
    shutil.copytree(old, ours)
    shutil.copytree(old, upstream)
    staged = []
    monkeypatch.setattr("hf_comet.hub.staged_path", lambda *a, **k: staged.append(a) or staged_path(*a, **k))
    second.save_pretrained(ours)
    transformers.PreTrainedModel.save_pretrained(second, upstream)  # upstream, in place
    assert staged and snapshot(ours) == snapshot(upstream)
    assert snapshot(ours)["README.md"] == b"my own card" and "notes.txt" in snapshot(ours)
    assert not list(ours.glob("model-*-of-*.safetensors")) and leftovers(tmp_path) == []
    reloaded = transformers.AutoModel.from_pretrained(ours)
    assert all(
        (a == b).all() for a, b in zip(reloaded.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_save_pretrained_killed_midway_leaves_the_old_checkpoint_not_new_config_beside_old_weights(
    tmp_path, monkeypatch
):
    first = tiny_model("comet_vit", "AutoModel")
    second = tiny_model("comet_vit", "AutoModel", comet_keep_rate=0.25)  # a different config.json
    target = tmp_path / "ckpt"
    first.save_pretrained(target)
    before = snapshot(target)

    def killed(*args, **kwargs):  # after config.json is written, while the weights are
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(target)
    assert snapshot(target) == before and leftovers(tmp_path) == []


def test_the_next_save_pretrained_restores_a_checkpoint_a_kill_left_aside_and_says_so(tmp_path, caplog):
    model = tiny_model("comet_vit", "AutoModel")
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    target.rename(leftover_name(target, "old"))  # killed between moving the old one aside and the new one in
    with caplog.at_level(logging.WARNING, logger="hf_comet.io"):
        model.save_pretrained(target)
    assert "restored" in caplog.text
    assert (target / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_save_pretrained_writes_in_place_like_upstream_where_it_cannot_swap(tmp_path, monkeypatch):
    model = tiny_model("comet_vit", "AutoModel")
    real, link = tmp_path / "real", tmp_path / "link"
    model.save_pretrained(real)
    monkeypatch.setattr("hf_comet.hub.staged_path", lambda *a, **k: pytest.fail("staged"))
    trainer_dir = tmp_path / "checkpoint-5"  # a folder without a checkpoint, e.g. made by the Trainer
    write_tree(trainer_dir, {"optimizer.pt": b"state"})
    model.save_pretrained(trainer_dir)
    assert (trainer_dir / "config.json").exists() and (trainer_dir / "optimizer.pt").read_bytes() == b"state"
    link.symlink_to(real)
    (real / "notes.txt").write_text("mine")
    model.save_pretrained(link)  # through the link, like upstream: the linked folder is written, nothing deleted
    assert link.is_symlink() and (real / "notes.txt").read_text() == "mine"
    model.save_pretrained(real, is_main_process=False)
    assert leftovers(tmp_path) == []
