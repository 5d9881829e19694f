"""The one atomic write (`hf_comet.io`): a failed write leaves the previous file as it was and no temporary behind."""

import os

import pytest

import hf_comet.io
from hf_comet.io import atomic_write_bytes, atomic_write_text


def test_atomic_write_text_writes_and_replaces(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    assert atomic_write_text(target, "first ü\n") == target
    atomic_write_text(target, "second\n")
    assert target.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "README.md"
    atomic_write_text(target, "old card\n")
    written = []

    def disk_full(fd):  # the bytes are in the temporary file, the disk fails before they are durable
        written.append([p.name for p in tmp_path.iterdir() if p.name != "README.md"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_comet.io.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, "new card " * 100_000)
    assert written and written[0], "the failure was injected while the temporary file existed"
    assert target.read_text() == "old card\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_a_failed_swap_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"\x00old")

    def failing_replace(src, dst):
        raise PermissionError("read-only")

    monkeypatch.setattr(hf_comet.io.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"\x01new")
    assert target.read_bytes() == b"\x00old"
    assert os.listdir(tmp_path) == ["data.bin"]
