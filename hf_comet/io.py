"""Writing files and checkpoints so that no crash, kill or failure ever leaves a half-written or lost one.

Every writer here first writes a hidden sibling of its destination ``NAME`` (same folder, so renames stay on one
file system), makes it durable (``fsync``), then swaps it in:

- a **file** replaces ``NAME`` with one atomic ``os.replace``: readers see the old file or the complete new one;
- a **folder** is exchanged with ``NAME`` in one atomic step where the file system supports it (Linux
  ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs, ...), so ``NAME`` is never missing; elsewhere the old
  folder is renamed aside to ``.NAME.old-*``, the new one renamed in, and the old one put back if that fails.
  The old folder is deleted only once the new one is in place.

The hidden siblings are ``.NAME.tmp-*`` (being written, or after an exchange the old one on its way out),
``.NAME.old-*`` (the previous ``NAME`` while the new one moves in) and ``.NAME.del-*`` (being deleted); each name
carries its writer's process id and start time. A process killed at any step leaves only those, and `recover`
(which every writer runs on its destination before writing, and `recover_folder` for a whole folder) repairs them:
if ``NAME`` is missing it is restored from ``.NAME.old-*``, then the leftovers are removed, with a warning saying
what was done. Only leftovers of writers that are no longer running are touched, so concurrent writers never
delete each other's work.

Destinations that are symbolic links are refused (writing through one would replace or delete what it points to),
as are files where a folder is expected and folders where a file is expected (`check_destination`). Files and
folders are created with the modes ``save_pretrained`` gives them (``0o666`` / ``0o777`` less the umask: 0644 /
0755 with the usual umask 022); a replaced destination keeps its previous mode.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}")
"""``.NAME.KIND-PID-START-TOKEN``: START is the writer's process start time (Linux clock ticks since boot; 0 where
unknown), so a reused process id is not mistaken for the writer."""

_active: set[str] = set()
"""Names of this process's hidden siblings that are in use (a leftover with this process's tag but not in here was
abandoned, e.g. by an earlier process that had the same id)."""
_active_lock = threading.Lock()
_tag_cache: tuple[int, str] | None = None


# -- owners of hidden siblings ----------------------------------------------------------------------------------------
def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (OSError, IndexError, ValueError):
        return None


def _tag() -> str:
    global _tag_cache
    pid = os.getpid()
    if _tag_cache is None or _tag_cache[0] != pid:  # recomputed after a fork
        _tag_cache = (pid, f"{pid}-{_process_start(pid) or 0}")
    return _tag_cache[1]


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{_tag()}-{secrets.token_hex(4)}")


def _register(path: Path) -> None:
    with _active_lock:
        _active.add(path.name)


def _unregister(path: Path) -> None:
    with _active_lock:
        _active.discard(path.name)


def _owner_running(name: str, pid: int, start: int) -> bool:
    """Whether the writer that made the hidden sibling ``name`` may still be using it."""
    if f"{pid}-{start}" == _tag():
        with _active_lock:
            return name in _active
    if pid <= 0:
        return False
    if os.name == "nt":  # no cheap, harmless liveness check: never touch another process's files
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user has this id
    except OSError:
        return True
    if start:
        actual = _process_start(pid)
        if actual is not None and actual != start:
            return False  # the id was reused by a process started later
    return True


# -- recovery ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Recovery:
    """What `recover` did to a destination: the hidden copy it restored ``path`` from, and the leftovers removed."""

    path: Path
    restored_from: Path | None = None
    removed: list[Path] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.restored_from is not None or bool(self.removed)

    def __str__(self) -> str:
        if not self:
            return f"{self.path}: nothing to recover"
        parts = []
        if self.restored_from is not None:
            parts.append(f"restored it from {self.restored_from.name}, the previous version an interrupted write had "
                         "moved aside")  # fmt: skip
        if self.removed:
            parts.append(f"removed {len(self.removed)} leftover(s) of interrupted writes "
                         f"({', '.join(p.name for p in self.removed)})")  # fmt: skip
        return f"{self.path}: " + "; ".join(parts)


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute without following a symbolic link in its last component."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def _stale_leftovers(target: Path) -> list[tuple[Path, str]]:
    try:
        names = os.listdir(target.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = f".{target.name}."
    found = []
    for name in names:
        match = _LEFTOVER.fullmatch(name) if name.startswith(prefix) else None
        if match is None or match["name"] != target.name:
            continue
        if not _owner_running(name, int(match["pid"]), int(match["start"])):
            found.append((target.parent / name, match["kind"]))
    return found


def _remove(path: Path, kind: str) -> bool:
    """Delete a leftover (a folder is first renamed to ``.NAME.del-*`` unless it is one, so a kill midway never leaves
    a partial ``.old-*`` that could be restored). False if it was gone already or is not ours to delete."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        return False  # never made by these writers: not ours, and never followed
    if not stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True
    if kind != "del":
        name = _LEFTOVER.fullmatch(path.name)["name"]
        doomed = _sibling(path.with_name(name), "del")
        _register(doomed)
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            _unregister(doomed)
            return False
        except BaseException:
            _unregister(doomed)
            raise
        try:
            _rmtree(doomed)
        finally:
            _unregister(doomed)
        return True
    _rmtree(path)
    return True


def _rmtree(path: Path) -> None:
    """``shutil.rmtree`` that tolerates entries a concurrent recovery removed first."""

    def ignore_missing(function, name, error) -> None:
        error = error if isinstance(error, BaseException) else error[1]
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_missing)
    else:
        shutil.rmtree(path, onerror=ignore_missing)


def recover(path: str | os.PathLike) -> Recovery:
    """Repair what interrupted writes left at destination ``path`` (a file or a folder) and say what was done.

    If ``path`` is missing and a previous version was moved aside (``.NAME.old-*``), it is restored; then every
    leftover (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.del-*``) is removed. Only leftovers of writers that are no
    longer running are touched. Logs a warning when anything was done; returns a `Recovery` (false when nothing was).
    Every writer of this module calls it on its destination first.
    """
    target = _absolute(path)
    report = Recovery(target)
    stale = _stale_leftovers(target)
    if not stale:
        return report
    if not os.path.lexists(target):
        backups = [p for p, kind in stale if kind == "old" and p.is_dir() and not p.is_symlink()]
        for backup in sorted(backups, key=lambda p: p.lstat().st_ctime_ns, reverse=True):
            try:
                os.replace(backup, target)
            except FileNotFoundError:
                continue  # another recovery took it
            report.restored_from = backup
            break
    for leftover, kind in stale:
        if leftover == report.restored_from or (kind == "old" and not os.path.lexists(target)):
            continue
        try:
            if _remove(leftover, kind):
                report.removed.append(leftover)
        except OSError as error:
            logger.warning("hf_comet.io: could not remove the leftover %s (%s); remove it by hand", leftover, error)
    if report:
        logger.warning("hf_comet.io: recovered %s", report)
    return report


def recover_folder(folder: str | os.PathLike) -> list[Recovery]:
    """`recover` every destination in ``folder`` that has leftovers of interrupted writes; the reports of those
    where something was done."""
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    destinations = sorted({m["name"] for m in map(_LEFTOVER.fullmatch, names) if m is not None})
    return [report for report in (recover(folder / name) for name in destinations) if report]


# -- checks -----------------------------------------------------------------------------------------------------------
def holds_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved model: a ``config.json`` or weights (``*.safetensors``, ``*.bin``)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return True
    try:
        return any(e.is_file() and e.name.endswith((".safetensors", ".bin")) for e in os.scandir(folder))
    except OSError:
        return False


def check_destination(path: str | os.PathLike, *, directory: bool, checkpoint: bool = False) -> Path:
    """Raise ``ValueError`` (naming the path and what to do) if the writers of this module must not write ``path``.

    Refused: a symbolic link (writing through it would replace or delete what it points to), a path under a file,
    a file when ``directory`` (a folder is written) and a folder when not. With ``checkpoint`` also a non-empty
    folder that holds no checkpoint (replacing it would delete its files). Returns ``path`` made absolute (without
    following a link in its last component). Call it before any work whose result goes to ``path``.
    """
    target = _absolute(path)
    what = "folder" if directory else "file"
    if target.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link (to {os.readlink(target)}); refusing to write the {what} through it, which "
            f"would replace what it points to. Give the real path ({target.resolve()}) or remove the link."
        )
    for ancestor in target.parents:
        if os.path.lexists(ancestor):
            if not ancestor.is_dir():
                raise ValueError(f"{path}: {ancestor} is a file, not a folder; choose another destination.")
            break
    if not os.path.lexists(target):
        return target
    if directory and not target.is_dir():
        raise ValueError(
            f"{path} is a file, not a folder; refusing to replace it with a folder. Choose another destination or "
            "remove the file."
        )
    if not directory and target.is_dir():
        raise ValueError(f"{path} is a folder; a file is written there. Choose another path or remove the folder.")
    if directory and checkpoint and not holds_checkpoint(target) and any(os.scandir(target)):
        raise ValueError(
            f"{path} is a folder that holds no checkpoint (no config.json or weights); refusing to replace it, which "
            "would delete its files. Choose a new or empty folder, or remove this one first."
        )
    return target


# -- writing ----------------------------------------------------------------------------------------------------------
def _create(target: Path, directory: bool) -> Path:
    """A fresh ``.NAME.tmp-*`` sibling with the umask's mode (unlike ``tempfile``'s 0700 / 0600)."""
    for _ in range(100):
        path = _sibling(target, "tmp")
        _register(path)
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            _unregister(path)
        except BaseException:
            _unregister(path)
            raise
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def _fsync(path: Path, directory: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # some systems cannot open folders
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF) or not directory:
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Make a written folder durable before it is swapped in: every file, then every folder, bottom up."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink() and path.is_file():
                _fsync(path, directory=False)
        _fsync(Path(folder), directory=True)


def apply_umask(folder: str | os.PathLike) -> None:
    """Give every regular file under ``folder`` (a fresh staging folder, whose own mode is ``0o777`` less the umask)
    the mode ``0o666`` less the umask, as ``open()`` would: safetensors 0.8 writes weights 0600 whatever the umask."""
    mode = stat.S_IMODE(os.stat(folder).st_mode) & 0o666
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and stat.S_IMODE(os.stat(path).st_mode) != mode:
                os.chmod(path, mode)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _carry_over(old: Path, staging: Path, keep: Callable[[Path], bool]) -> None:
    """Put the entries of ``old`` that ``staging`` lacks and ``keep`` accepts into ``staging``: hard links (copies
    where the file system has none), so large files cost nothing and open files stay the same file."""
    for entry in os.scandir(old):
        source, destination = Path(entry.path), staging / entry.name
        if os.path.lexists(destination) or not keep(source):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(source), destination)
        elif entry.is_dir():
            shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
            for folder, _dirs, _files in os.walk(destination):
                _fsync(Path(folder), directory=True)
        else:
            _link_or_copy(str(source), str(destination))
    _fsync(staging, directory=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError, TypeError):
            _renameat2 = False
    if not _renameat2:
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def _discard_old(old: Path) -> None:
    """Delete the replaced destination, now a hidden sibling; a failure leaves it for `recover` (the write itself
    succeeded)."""
    try:
        _remove(old, "tmp")
    except OSError as error:
        logger.warning("hf_comet.io: could not remove the replaced copy %s (%s); the next write removes it", old, error)


def _swap_in(staging: Path, target: Path, directory: bool, carry_over: Callable[[Path], bool] | None) -> None:
    if not os.path.lexists(target):
        os.replace(staging, target)
        _fsync(target.parent, directory=True)
        return
    if directory and carry_over is not None:
        _carry_over(target, staging, carry_over)
    os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))  # a replaced destination keeps its mode
    if not directory:
        os.replace(staging, target)
        _fsync(target.parent, directory=True)
        return
    if _exchange(staging, target):  # one step: the new folder is NAME, the old one is the staging name
        _fsync(target.parent, directory=True)
        _discard_old(staging)
        return
    backup = _sibling(target, "old")
    _register(backup)
    try:
        try:
            os.replace(target, backup)  # step 1: the old folder aside
            os.replace(staging, target)  # step 2: the new one in
        except BaseException:
            if not os.path.lexists(target) and os.path.lexists(backup):  # between the steps: put the old one back
                try:
                    os.replace(backup, target)
                except BaseException as error:
                    logger.error("hf_comet.io: %s could not be put back from %s (%s); recover(%r) restores it",
                                 target, backup, error, str(target))  # fmt: skip
            raise
        _fsync(target.parent, directory=True)
        _discard_old(backup)  # step 3: the old one deleted
    finally:
        _unregister(backup)


@contextlib.contextmanager
def staged_path(
    target: str | os.PathLike, *, directory: bool = False, carry_over: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """A fresh hidden sibling of ``target`` (an empty folder with ``directory=True``, else an empty file) to write
    into; when the ``with`` body completes it is made durable and replaces ``target``; when the body (or the swap)
    fails it is removed and ``target`` is as it was.

    First `recover` repairs what interrupted writes left at ``target``, and `check_destination` refuses a symbolic
    link, a file where a folder goes and a folder where a file goes (``ValueError``). A folder that replaces an
    existing one is exchanged with it atomically where the file system can, else moved in after the old one is
    moved aside (and put back if that fails); see the module docstring. ``carry_over(path)`` (folders only) names
    the entries of the replaced folder to keep in the new one when the new one has no entry of that name (hard
    links, e.g. the files ``save_pretrained`` leaves alone).
    """
    target = _absolute(target)
    recover(target)
    check_destination(target, directory=directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _create(target, directory)
    try:
        yield staging
        if directory:
            _sync_tree(staging)
        else:
            _fsync(staging, directory=False)
        _swap_in(staging, target, directory, carry_over)
    except BaseException:
        with contextlib.suppress(OSError):
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)
        raise
    finally:
        _unregister(staging)


@contextlib.contextmanager
def scratch_directory(name: str | os.PathLike) -> Iterator[Path]:
    """A hidden scratch folder ``.NAME.tmp-*`` beside ``name``, removed when the ``with`` block ends; one left by a
    killed process is removed by `recover` (or `recover_folder`) like any other leftover."""
    target = _absolute(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = _create(target, directory=True)
    try:
        yield scratch
    finally:
        try:
            shutil.rmtree(scratch, ignore_errors=True)
        finally:
            _unregister(scratch)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the complete new one, never a part."""
    with staged_path(path) as staging:
        with open(staging, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_pretrained(
    model: PreTrainedModel, save_directory: str | os.PathLike, *, overwrite: bool = True, **kwargs
) -> Path:
    """``model.save_pretrained`` into a hidden sibling folder, then swap it in place of ``save_directory``.

    The new folder replaces the old one entirely (files ``save_pretrained`` did not write are not kept; a plain
    ``model.save_pretrained`` keeps them). A failure or kill at any point leaves the previous checkpoint, or after
    `recover` the previous or the complete new one. Refuses (``ValueError``, before saving) a symbolic link, a file,
    a non-empty folder that holds no checkpoint, and with ``overwrite=False`` any existing destination (checked
    after `recover`, which may have restored one an interrupted write had moved aside). Returns the absolute path
    of the checkpoint.
    """
    recover(save_directory)
    target = check_destination(save_directory, directory=True, checkpoint=True)
    if not overwrite and os.path.lexists(target):
        raise ValueError(f"{save_directory} exists; pass overwrite=True (--overwrite) to replace it.")
    with staged_path(target, directory=True) as staging:
        model.save_pretrained(staging, **kwargs)
        apply_umask(staging)
    return target


__all__ = [
    "Recovery",
    "apply_umask",
    "atomic_save_pretrained",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_destination",
    "holds_checkpoint",
    "recover",
    "recover_folder",
    "scratch_directory",
    "staged_path",
]
