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

The checks of what a user points at live here too, once for the CLI and the Python API: paths (`existing_folder`,
`existing_file`, `destination_folder`, `destination_file`, `run_folder`), checkpoints (`checkpoint_folder`: config.json
parses, the safetensors weights are present and whole; `loading` turns transformers' load errors into a message
naming the path; `check_loaded` refuses a load report with missing, unexpected or mis-shaped tensors). They raise
`UserError` (a ``ValueError``) before anything is written. A checkpoint folder is one that holds a ``config.json``
file (`holds_checkpoint`); only such a folder, or an empty one, is ever replaced as a whole. A user's JSON is parsed
only once its nesting depth is bounded (`loads_json`, `check_json_file_depth`).

A run that writes a destination as a whole holds `destination_lock` on it, stages the result (`staged_path`, whose
``expect`` refuses to swap out a destination that appeared or changed meanwhile) and turns a failed write into one
`UserError` (`write_failures`). Names too long for the file system are refused before work (`check_name_length`);
hidden siblings of long names carry a hash instead (`_stem`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


NAME_MAX = 255
"""Longest file name (bytes) the usual file systems allow (POSIX ``NAME_MAX``; `name_max` asks the file system)."""
_SIBLING_RESERVE = 48
"""Bytes a hidden sibling adds to its destination's name (``.`` + ``.tmp-PID-START-TOKEN``, ``.lock``)."""


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) allowed in ``folder`` (its nearest existing ancestor), `NAME_MAX` if unknown."""
    for place in (Path(folder), *Path(folder).absolute().parents):
        if os.path.isdir(place):
            with contextlib.suppress(OSError, ValueError):
                return int(os.pathconf(place, "PC_NAME_MAX"))
            break
    return NAME_MAX


def _stem(name: str) -> str:
    """The destination's part of its hidden siblings' names: ``name`` itself, or for a name so long that a sibling's
    name would pass `NAME_MAX` (a legal 200-255-byte name) a short hash of it (``~`` and 16 hex digits)."""
    if len(os.fsencode(name)) + _SIBLING_RESERVE <= NAME_MAX:
        return name
    return "~" + hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{_stem(target.name)}.{kind}-{_tag()}-{secrets.token_hex(4)}")


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
    stem = _stem(target.name)
    prefix = f".{stem}."
    found = []
    for name in names:
        match = _LEFTOVER.fullmatch(name) if name.startswith(prefix) else None
        if match is None or match["name"] != stem:
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
    destinations = {m["name"] for m in map(_LEFTOVER.fullmatch, names) if m is not None}
    hashed = {_stem(name): name for name in names if _stem(name) != name}  # long names' siblings carry a hash
    destinations = sorted(hashed.get(name, name) for name in destinations
                          if not re.fullmatch(r"~[0-9a-f]{16}", name) or name in hashed)  # fmt: skip
    return [report for report in (recover(folder / name) for name in destinations) if report]


# -- checks -----------------------------------------------------------------------------------------------------------
CONFIG_NAME = "config.json"


def holds_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a checkpoint folder: it holds a ``config.json`` file (``save_pretrained`` always writes
    one and ``from_pretrained`` reads it first). The one definition every writer here, ``hf-comet convert``'s
    destination and a recipe run's checkpoint folders use to decide that replacing a folder deletes no one's files."""
    return (Path(folder) / CONFIG_NAME).is_file()


def check_destination(path: str | os.PathLike, *, directory: bool, checkpoint: bool = False) -> Path:
    """Raise ``ValueError`` (naming the path and what to do) if the writers of this module must not write ``path``.

    Refused: a symbolic link (writing through it would replace or delete what it points to), a path under a file,
    a file when ``directory`` (a folder is written) and a folder when not. With ``checkpoint`` also a non-empty
    folder that is not a checkpoint folder (`holds_checkpoint`; replacing it would delete its files). Returns ``path`` made absolute (without
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
    if directory and checkpoint:
        replaceable_folder(target, "folder")
    return target


# -- what users point at: paths and checkpoints -----------------------------------------------------------------------
class UserError(ValueError):
    """A mistake in what the user typed or pointed at, raised before anything is written, with a message that names
    the value and says what to do. ``hf-comet`` prints it as ``hf-comet <command>: error: <message>`` and exits 2."""


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def non_finite(value: Any, where: str = "") -> str | None:
    """Where ``value`` (a parsed JSON value) holds NaN or an infinity (``"a.b[1]"``; ``""`` for the value itself),
    or ``None`` when it holds none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite(item, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found is not None:
            return found
    return None


def _lstat(path: Path, what: str) -> os.stat_result | None:
    """``os.lstat`` of ``path``, ``None`` when nothing is there; a path that cannot be examined is a `UserError`."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as error:  # e.g. an embedded NUL byte
        raise UserError(f"{what} {str(path)!r} is not a valid path ({error}).") from None
    except OSError as error:
        raise UserError(f"{what} {str(path)!r} cannot be examined ({error.strerror or error}).") from None


MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in a user's JSON (config files, ``--set`` values, routing state):
real configs nest fewer than 10 levels; Python's parser recurses once per level (1,000 levels: a ``RecursionError``,
10,000: a crash)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings do not count), without parsing."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_json_file_depth(path: str | os.PathLike, what: str) -> None:
    """Refuse (`UserError`) a JSON or JSON Lines file nested deeper than `MAX_JSON_DEPTH`, read line by line (a JSON
    string holds no raw newline, so lines split no string) before a parser sees it: Arrow's JSON reader crashes
    the process (a segmentation fault) on 10,000 levels."""
    depth = deepest = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            for bracket in _BRACKETS.findall(_STRING.sub("", line)):
                depth += 1 if bracket in "[{" else -1
                if depth > deepest:
                    deepest = depth
                    if deepest > MAX_JSON_DEPTH:
                        raise UserError(
                            f"{what} nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; at most "
                            f"{MAX_JSON_DEPTH} are accepted."
                        )


def loads_json(text: str, what: str) -> Any:
    """``json.loads(text)``, refusing (`UserError` naming ``what`` and the limit) JSON nested deeper than
    `MAX_JSON_DEPTH` before parsing it; a ``json.JSONDecodeError`` passes through for the caller to word."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise UserError(f"{what} nests arrays/objects {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted.")
    return json.loads(text)


def given_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a `Path`; an empty one is a `UserError`."""
    if not str(path).strip():
        raise UserError(f"{what} is empty; give a path.")
    return Path(path)


def missing_path(path: Path, what: str) -> UserError:
    """The error for nothing at ``path``: a dangling link, a parent that is a file, or simply no such path."""
    if os.path.islink(path):
        return UserError(f"{what} {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist.")
    for parent in path.absolute().parents:
        if _lstat(parent, what) is not None:
            if not os.path.isdir(parent):
                return UserError(f"{what} {str(path)!r} does not exist: {str(parent)!r} is a file, not a folder.")
            break
    return UserError(f"{what} {str(path)!r} does not exist; check the path.")


def existing_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a readable folder (a symlink to one is fine for reading): refuses no such path, a file, no
    permission."""
    path = given_path(path, what)
    if _lstat(path, what) is None or not os.path.exists(path):
        raise missing_path(path, what)
    if not os.path.isdir(path):
        raise UserError(f"{what} {str(path)!r} is a file, not a folder; give the folder.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} cannot be read (permission denied).")
    return path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a readable regular file: refuses no such path, a folder, no permission."""
    path = given_path(path, what)
    if _lstat(path, what) is None or not os.path.exists(path):
        raise missing_path(path, what)
    if os.path.isdir(path):
        raise UserError(f"{what} {str(path)!r} is a folder, not a file; give the file.")
    if not os.path.isfile(path):
        raise UserError(f"{what} {str(path)!r} is not a regular file.")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {str(path)!r} cannot be read (permission denied).")
    return path


def check_name_length(path: str | os.PathLike, what: str) -> None:
    """Refuse (`UserError`, naming the limit) a path with a component longer than the file system allows
    (`name_max`, usually 255 bytes): writing it would fail with ``ENAMETOOLONG`` after the work."""
    path = Path(path)
    limit = name_max(path.parent)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise UserError(
                f"{what} {str(path)!r}: the name {part[:40]!r}... is {size} bytes long; the file system allows at "
                f"most {limit} bytes (NAME_MAX) per name: choose a shorter name."
            )


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove an empty hidden file in ``folder``: a read-only file system (``EROFS``, which stops root
    too), a full inode table or a refused permission is found here, before any work, not after it."""
    probe = folder / f".hf-comet-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as error:
        raise UserError(
            f"{what} {str(path)!r} cannot be written: {str(folder)!r} refuses new files ({error.strerror or error}); "
            "choose another place."
        ) from None
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _writable_place(path: Path, what: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a folder we may write in (permission bits and an
    actual probe file, `_probe`), and no name in it is too long (`check_name_length`)."""
    check_name_length(path, what)
    for parent in path.absolute().parents:
        if _lstat(parent, what) is None:
            continue
        if not os.path.isdir(parent):
            raise UserError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(
                f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable; choose another place."
            )
        _probe(parent, what, path)
        return


def _no_link(path: Path, status: os.stat_result, what: str) -> None:
    if stat.S_ISLNK(status.st_mode):
        raise UserError(
            f"{what} {str(path)!r} is a symlink (to {os.readlink(path)!r}); hf-comet replaces what it writes as a "
            "whole and will not replace what a link points to: give the real path or a new one."
        )


def replaceable_folder(path: str | os.PathLike, what: str) -> None:
    """Refuse to replace an existing folder as a whole unless it is empty or a checkpoint folder
    (`holds_checkpoint`): anything else is someone's files, which replacing would delete."""
    path = Path(path)
    try:
        entries = os.listdir(path)
    except OSError as error:
        raise UserError(f"{what} {str(path)!r} cannot be read ({error.strerror or error}).") from None
    if entries and not holds_checkpoint(path):
        raise UserError(
            f"{what} {str(path)!r} holds files but no config.json, so it is not a checkpoint; replacing it would "
            "delete them: choose another path."
        )


def _not_around_working_folder(path: Path, what: str) -> None:
    """Refuse a destination that is the current folder or holds it: replacing it as a whole would pull the working
    folder out from under the shell (and everything a user keeps beside the run)."""
    here = Path.cwd().resolve()
    there = path.resolve()
    if there == here or there in here.parents:
        raise UserError(
            f"{what} {str(path)!r} is {'the current folder' if there == here else 'a folder holding the current one'}, "
            "which a run replaces as a whole; choose a folder inside it (e.g. runs/NAME)."
        )


def destination_folder(path: str | os.PathLike, what: str, *, overwrite: bool) -> Path:
    """A folder that will be written as a whole (a checkpoint): refuses a symlink, a file, an existing folder
    without ``overwrite`` or that is not a checkpoint folder, and a place we may not write in. First repairs what an
    interrupted earlier write left there (`recover`, which says so)."""
    path = given_path(path, what)
    check_name_length(path, what)
    _not_around_working_folder(path, what)
    if not path.is_symlink():
        recover(path)
    status = _lstat(path, what)
    if status is not None:
        _no_link(path, status, what)
        if not stat.S_ISDIR(status.st_mode):
            raise UserError(f"{what} {str(path)!r} is a file, not a folder; remove it or choose another path.")
        if not overwrite:
            raise UserError(f"{what} {str(path)!r} exists; pass --overwrite to replace it.")
        replaceable_folder(path, what)
    _writable_place(path, what)
    return path


def destination_file(path: str | os.PathLike, what: str) -> None:
    """A file that will be written (replaced atomically): refuses a symlink, anything but a regular file there, a
    name longer than the file system allows, and a folder that cannot take new files (`_writable_place`)."""
    path = Path(path)
    check_name_length(path, what)
    status = _lstat(path, what)
    if status is not None:
        _no_link(path, status, what)
        if not stat.S_ISREG(status.st_mode):
            kind = "a folder, not a file" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            raise UserError(f"{what} {str(path)!r} is {kind}; remove it or choose another path.")
    _writable_place(path, what)


def run_folder(path: str | os.PathLike, what: str, *, folders: Sequence[str], files: Sequence[str]) -> Path:
    """The output folder of a run (created, or written into): refuses a symlink, a file, no write permission, and
    in it a symlink or the wrong kind of entry where the run writes ``folders`` (checkpoints, replaced as a whole:
    each must be a checkpoint folder or empty, `replaceable_folder`) and ``files``."""
    path = given_path(path, what)
    check_name_length(path, what)
    _not_around_working_folder(path, what)
    status = _lstat(path, what)
    if status is None:
        _writable_place(path, what)
        return path
    _no_link(path, status, what)
    if not stat.S_ISDIR(status.st_mode):
        raise UserError(f"{what} {str(path)!r} is a file, not a folder; remove it or choose another path.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {str(path)!r} is not writable; choose another place.")
    _writable_place(path, what)
    for name in folders:
        inner = _lstat(path / name, what)
        if inner is not None:
            _no_link(path / name, inner, what)
            if not stat.S_ISDIR(inner.st_mode):
                raise UserError(
                    f"{what} {str(path)!r} holds a file {name!r} where the run saves its {name} checkpoint folder; "
                    "remove it or choose another output folder."
                )
            replaceable_folder(path / name, what)
    for name in files:
        destination_file(path / name, what)
    return path


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether one of two paths is the other or inside it (links resolved): writing one would damage the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what}: {str(path)!r} is not UTF-8 text (a damaged file?); re-save it.") from None
    except OSError as error:
        raise UserError(f"{what}: {str(path)!r} cannot be read ({error.strerror or error}).") from None
    try:
        return loads_json(text, f"{what}: {str(path)!r}")
    except json.JSONDecodeError as error:
        raise UserError(
            f"{what}: {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "fix it or re-save the checkpoint."
        ) from None


def _safetensors_keys(path: Path, what: str) -> dict[str, list[int]]:
    """The tensor names and shapes in the header of a safetensors file; a missing, truncated or garbage file (the
    header must parse and cover the whole file) is a `UserError`. Reads the header only."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise UserError(f"{what}: {str(path)!r} is missing or not a file; re-save the checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{what}: {str(path)!r} is not a whole safetensors file ({error}); re-save the checkpoint."
        ) from None


def checkpoint_folder(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder saved by ``save_pretrained``, once the folder is checked:
    it exists and is a folder, ``config.json`` is a JSON object with a ``model_type`` and no NaN or infinity, and
    its safetensors weights (one file, or the shards an index names) are present with whole headers. Pickled weights
    are refused (never unpickled). Raises `UserError` naming the path and what to do."""
    folder = existing_folder(path, what)
    config_path = folder / CONFIG_NAME
    if not os.path.isfile(config_path):
        raise UserError(
            f"{what} {str(folder)!r} has no config.json, so it is not a saved checkpoint (save_pretrained writes "
            "one); give the checkpoint folder."
        )
    config = _read_json(config_path, what)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{what}: {str(config_path)!r} is not a transformers config (no model_type); re-save it.")
    field = non_finite(config)
    if field is not None:
        raise UserError(f"{what}: {str(config_path)!r} sets {field} to a non-finite number; give a finite one.")
    for companion in sorted(folder.glob("*.json")):  # generation/tokenizer configs transformers parses on load
        if companion.is_file() and not companion.is_symlink():
            check_json_file_depth(companion, f"{what}: {str(companion)!r}")
    index_path = folder / WEIGHTS_INDEX_NAME
    if os.path.exists(index_path):
        index = _read_json(index_path, what)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{what}: {str(index_path)!r} has no weight_map of tensor -> shard; re-save it.")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise UserError(f"{what}: {str(index_path)!r} names a shard outside the folder ({shard!r}).")
            keys = _safetensors_keys(folder / shard, what)
            absent = sorted(key for key, name in weight_map.items() if name == shard and key not in keys)
            if absent:
                raise UserError(f"{what}: shard {shard!r} lacks tensors its index lists: {absent[:5]}; re-save it.")
    elif os.path.lexists(folder / WEIGHTS_NAME):
        _safetensors_keys(folder / WEIGHTS_NAME, what)
    else:
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pattern))
        if pickled:
            raise UserError(
                f"{what} {str(folder)!r} has only pickled weights ({', '.join(pickled)}), which hf-comet does not "
                "unpickle; load them in Python and re-save with save_pretrained (it writes model.safetensors)."
            )
        raise UserError(f"{what} {str(folder)!r} has no weights ({WEIGHTS_NAME}); save the model with save_pretrained.")
    return config


@contextlib.contextmanager
def loading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn what transformers raises for a checkpoint it cannot load (OSError, a ValueError such as bad JSON or a
    refused config, huggingface_hub's typed-config errors, a TypeError or ZeroDivisionError from a config value the
    model cannot be built with, a safetensors error, a size mismatch) into a `UserError` naming the path."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, TypeError, ArithmeticError, RuntimeError, SafetensorError, StrictDataclassError) as e:
        raise UserError(f"{what} {str(path)!r} cannot be loaded: {e}") from e


def check_loaded(report: dict[str, Any], path: str | os.PathLike, what: str) -> None:
    """Refuse a load report (``from_pretrained(..., output_loading_info=True)``) with any missing, unexpected or
    mis-shaped tensor: the model would hold random values where the user expects saved ones."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(report.get(kind) or ())
        if keys:
            problems.append(f"{kind.replace('_keys', '')} tensors {keys[:5]}" + (" ..." if len(keys) > 5 else ""))
    mismatched = sorted(report.get("mismatched_keys") or ())
    if mismatched:
        problems.append(
            "tensors of the wrong shape "
            + ", ".join(f"{k} {tuple(s)} (needs {tuple(n)})" for k, s, n in mismatched[:5])
        )
    if report.get("error_msgs"):
        problems.append(f"errors {report['error_msgs']}")
    if problems:
        raise UserError(
            f"{what} {str(path)!r} does not match its config: {'; '.join(problems)}. Its weights are damaged or "
            "were saved for another model; re-save the checkpoint."
        )


def load_checked(path: str | os.PathLike, what: str) -> PreTrainedModel:
    """The hf_comet model saved in checkpoint folder ``path`` (already checked by `checkpoint_folder`), loaded with
    the class its ``architectures`` name (the family's first class otherwise), its load report refused unless
    clean (`check_loaded`); load errors become a `UserError` naming the path (`loading`)."""
    import transformers

    from .modeling import FAMILY_ADAPTERS

    with loading(path, what):
        config = transformers.AutoConfig.from_pretrained(path)
        classes = FAMILY_ADAPTERS[config.model_type].model_classes
        architecture = (config.architectures or ["AutoModel"])[0]
        model_class = classes.get(architecture, next(iter(classes.values())))
        model, report = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True)
    check_loaded(report, path, what)
    return model


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


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError, TypeError):
            _renameat2 = False
    return _renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not _load_renameat2():
        return False
    result = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


_RENAME_NOREPLACE = 1


def _rename_new(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, which must not exist (``FileExistsError`` if it does, even an empty folder
    someone just created: Linux ``renameat2(RENAME_NOREPLACE)``, atomic; elsewhere a check, then ``os.replace``)."""
    if _load_renameat2():
        result = _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.replace(source, target)


def _discard_old(old: Path) -> None:
    """Delete the replaced destination, now a hidden sibling; a failure leaves it for `recover` (the write itself
    succeeded)."""
    try:
        _remove(old, "tmp")
    except OSError as error:
        logger.warning("hf_comet.io: could not remove the replaced copy %s (%s); the next write removes it", old, error)


def _swap_in(staging: Path, target: Path, directory: bool, carry_over: Callable[[Path], bool] | None) -> None:
    if not os.path.lexists(target):
        try:
            _rename_new(staging, target)
            _fsync(target.parent, directory=True)
            return
        except FileExistsError:
            pass  # created meanwhile: replaced below as an existing destination
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


class DestinationChanged(UserError):
    """The destination of a write appeared or was replaced while the result was being made: it is never swapped
    out; the result is kept under `kept` (printed in the message)."""

    def __init__(self, message: str, kept: Path):
        super().__init__(message)
        self.kept = kept


_ANY = object()


def identity(path: str | os.PathLike, contents: bool = False) -> tuple | None:
    """What is at ``path`` now (device and inode, links not followed; with ``contents`` a folder's entry names
    too), ``None`` for nothing: `staged_path`'s ``expect`` compares it again at swap time."""
    try:
        status = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if contents and stat.S_ISDIR(status.st_mode):
        with contextlib.suppress(OSError):
            return (status.st_dev, status.st_ino, frozenset(os.listdir(path)))
    return (status.st_dev, status.st_ino)


def _keep_result(staging: Path, target: Path, what: str, found: str) -> DestinationChanged:
    kept = target.with_name(f"{_stem(target.name)}.new-{secrets.token_hex(4)}")
    os.rename(staging, kept)
    return DestinationChanged(
        f"{what} {str(target)!r} {found} while this result was being written; it is left as it is (never replaced "
        f"or deleted), and the new result is kept in {str(kept)!r}: move it where you want it.",
        kept,
    )


@contextlib.contextmanager
def destination_lock(path: str | os.PathLike, what: str = "destination") -> Iterator[Path]:
    """Hold an exclusive lock on destination ``path`` for a whole run: ``fcntl.flock`` on a hidden lock file beside
    it (``.NAME.lock``, removed at the end). A second run (another process, or this one) on the same destination is
    refused at once with a `UserError` naming the holder's process id, instead of both reporting success while one
    result is lost. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield _absolute(path)
        return
    target = _absolute(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(f".{_stem(target.name)}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"{what} {str(path)!r} is being written by another hf-comet run (process {holder}, lock "
                f"{str(lock)!r}); wait for it to finish or choose another destination."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if identity(lock) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break  # else the holder removed the file between our open and lock: lock the new one
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield target
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
                errno.EFBIG, errno.EIO, errno.EMFILE)  # fmt: skip
"""``OSError`` codes `write_failures` turns into a `UserError`: no space or quota, a read-only or refused place, a
name too long, a file too large, a failing disk."""


@contextlib.contextmanager
def write_failures(path: str | os.PathLike, what: str = "destination") -> Iterator[None]:
    """Turn a failed write under ``path`` into one clear `UserError`: an ``OSError`` of `WRITE_ERRNOS` and
    safetensors' ``SafetensorError`` (not an ``OSError``; e.g. "No space left on device"). Used around writers that
    stage their result (`staged_path`), so the message can say that what was there before is unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except SafetensorError as error:
        raise UserError(f"cannot write {what} {str(path)!r} ({error}); what was there before is unchanged.") from error
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise UserError(
            f"cannot write {what} {str(path)!r} ({error.strerror or error}); what was there before is unchanged."
        ) from error


def non_finite_weight(model: PreTrainedModel) -> str | None:
    """The first weight or buffer of ``model`` holding a NaN or an infinity (``"weight NAME"``), ``None`` if none."""
    import torch

    for kind, tensors in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in tensors:
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
                return f"{kind} {name}"
    return None


def check_finite_weights(model: PreTrainedModel, what: str = "model") -> None:
    """Refuse (`UserError`) a model with a NaN or infinite weight or buffer, naming the first: such a model must
    never be saved, carded or published."""
    found = non_finite_weight(model)
    if found is not None:
        raise UserError(
            f"{what}: {found} holds NaN or infinite values (training diverged?); it is not saved or published. "
            "Lower the learning rate or check the data."
        )


@contextlib.contextmanager
def staged_path(
    target: str | os.PathLike,
    *,
    directory: bool = False,
    carry_over: Callable[[Path], bool] | None = None,
    expect: Any = _ANY,
    what: str = "destination",
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

    ``expect`` (an `identity` taken when the destination was checked, ``None`` for nothing there) is checked again
    at swap time: a destination that appeared, was replaced or (for an identity with contents) gained or lost
    entries meanwhile (e.g. a folder or a file a user created) is never swapped out; the result is kept under a
    printed name and `DestinationChanged` (named with ``what``) is raised.
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
        now = identity(target, contents=expect is not _ANY and expect is not None and len(expect) == 3)
        if expect is not _ANY and now is not None and now != expect:  # never swap out what appeared or changed
            found = "appeared" if expect is None else "was replaced" if now[:2] != expect[:2] else \
                "changed (files were added or removed in it)"
            raise _keep_result(staging, target, what, found)
        if expect is not _ANY and now is None:  # nothing there (any more): moved in, unless something appears now
            try:
                _rename_new(staging, target)
            except FileExistsError:
                raise _keep_result(staging, target, what, "appeared") from None
            _fsync(target.parent, directory=True)
        else:
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
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = True,
    expect: Any = _ANY,
    what: str = "destination",
    **kwargs,
) -> Path:
    """``model.save_pretrained`` into a hidden sibling folder, then swap it in place of ``save_directory``.

    The new folder replaces the old one entirely (files ``save_pretrained`` did not write are not kept; a plain
    ``model.save_pretrained`` keeps them). A failure or kill at any point leaves the previous checkpoint, or after
    `recover` the previous or the complete new one. Refuses (``ValueError``, before saving) a symbolic link, a file,
    a non-empty folder that holds no checkpoint, and with ``overwrite=False`` any existing destination (checked
    after `recover`, which may have restored one an interrupted write had moved aside). A model with a NaN or
    infinite weight is refused (`check_finite_weights`). ``expect`` and ``what``: as for `staged_path`. Returns the
    absolute path of the checkpoint.
    """
    recover(save_directory)
    now = identity(save_directory, contents=expect is not _ANY and expect is not None and len(expect) == 3)
    changed = expect is not _ANY and now != expect  # kept aside by staged_path, not refused
    target = check_destination(save_directory, directory=True, checkpoint=not changed)
    if not overwrite and not changed and os.path.lexists(target):
        raise ValueError(f"{save_directory} exists; pass overwrite=True (--overwrite) to replace it.")
    check_finite_weights(model, f"checkpoint {str(save_directory)!r}")
    with staged_path(target, directory=True, expect=expect, what=what) as staging:
        model.save_pretrained(staging, **kwargs)
        apply_umask(staging)
    return target


__all__ = [
    "MAX_JSON_DEPTH",
    "NAME_MAX",
    "WRITE_ERRNOS",
    "DestinationChanged",
    "Recovery",
    "check_finite_weights",
    "check_json_file_depth",
    "check_name_length",
    "non_finite_weight",
    "destination_lock",
    "identity",
    "json_depth",
    "loads_json",
    "name_max",
    "write_failures",
    "UserError",
    "check_loaded",
    "checkpoint_folder",
    "destination_file",
    "destination_folder",
    "existing_file",
    "existing_folder",
    "given_path",
    "load_checked",
    "loading",
    "missing_path",
    "non_finite",
    "paths_overlap",
    "replaceable_folder",
    "run_folder",
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
