"""Writing files and checkpoints without ever leaving a half-written or lost one: the package's one atomic write.

Everything is first written to a temporary sibling of the target (same folder, so the final rename stays on one file
system), then swapped into place. A failure before the swap removes the temporary and leaves the previous target
(if any) untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@contextlib.contextmanager
def staged_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """A fresh temporary sibling of ``target`` (an empty folder with ``directory=True``, else an empty file) to write
    into; when the ``with`` body completes it replaces ``target``, and when the body raises it is removed.

    A file is swapped in with one atomic ``os.replace``. A folder cannot replace a non-empty folder in one step, so
    the old one is first renamed aside, then removed once the new one is in place (and put back if that fails).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        staging = Path(name)
    try:
        yield staging
        _swap_in(staging, target, directory)
    except BaseException:
        if directory:
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        raise


def _swap_in(staging: Path, target: Path, directory: bool) -> None:
    if not directory:
        os.replace(staging, target)
        return
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the complete new one, never a part."""
    with staged_path(path) as staging:
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_pretrained(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained`` into a temporary sibling folder, then swap it in place of ``save_directory``.

    A crash mid-save leaves the previous checkpoint (if any) untouched; the old folder is removed only after the new
    one is complete and renamed into place. Returns the absolute path of the checkpoint.
    """
    target = Path(save_directory).resolve()
    with staged_path(target, directory=True) as staging:
        model.save_pretrained(staging, **kwargs)
    return target


__all__ = ["atomic_save_pretrained", "atomic_write_bytes", "atomic_write_text", "staged_path"]
