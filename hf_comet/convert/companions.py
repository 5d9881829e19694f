"""What a converted checkpoint carries over from its source besides weights (issue 13 §2): the tokenizer, image
processor / feature extractor and generation-config files, so ``pipeline(task, model=converted_folder)`` works
with no other argument, and the source card's license, language, datasets and base model.

The source is a local folder or a Hub id; a Hub id's files are read from the local Hub cache only (conversion
never downloads anything beyond what ``from_pretrained`` itself fetched).

What is read from the source is untrusted: a companion file is taken only when it is a regular file inside the
source (a local symbolic link that leads outside the source folder, or a Hub-cache link that leads outside that
repo's cache folder, is skipped with a warning, never followed), and it is written as a regular file; the source
card's front matter is parsed with YAML anchors and aliases refused and its size bounded, and each inherited value is
kept only when it has the shape the Hub gives that field (a license id, language codes, repo ids), so no markdown,
HTML or YAML from the source reaches the new card.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "image_processor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
"""Files transformers' tokenizers, image processors, feature extractors, processors and ``GenerationConfig`` save
and load by these names; a conversion copies each one the source has."""

CARD_FIELDS = ("license", "license_name", "license_link", "language", "datasets")
"""Source card metadata a converted model's card keeps (the weights are a derived work of the source's)."""

MAX_CARD_BYTES = 1 << 20
"""A source README larger than this (1 MiB) is not read: its metadata is not inherited (a warning says so)."""

MAX_LIST_ITEMS = 64
"""The most entries an inherited list field (``language``, ``datasets``) may have."""

_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,2}")
_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]{1,500}")


@dataclass
class ConversionSource:
    """What the converted model inherits from its source: companion files (name -> path) and card metadata."""

    files: dict[str, Path] = field(default_factory=dict)
    card: dict = field(default_factory=dict)
    base_model: str | None = None
    local: bool = True

    def copy_files(self, directory: str | os.PathLike, skip_existing_in: str | os.PathLike | None = None) -> list[str]:
        """Copy the companion files into ``directory`` where it (and ``skip_existing_in``) has no file of that name
        yet (a tokenizer the user saved there wins); the names copied. Each is read through a descriptor opened
        without following a final symbolic link and checked to be a regular file (a file swapped for a link since it
        was read is skipped), and written as a new regular file."""
        copied = []
        for name, path in self.files.items():
            target = Path(directory) / name
            kept = skip_existing_in is not None and os.path.lexists(Path(skip_existing_in) / name)
            if not os.path.lexists(target) and not kept and _copy_regular(path, target):
                copied.append(name)
        return copied


def _copy_regular(path: Path, target: Path) -> bool:
    """Copy ``path`` (already resolved) to a new regular file ``target`` if it is still a regular file."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        warnings.warn(f"companion file {path.name!r} could not be opened as a regular file; not copied.", stacklevel=3)
        return False
    with os.fdopen(descriptor, "rb") as source:
        if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
            warnings.warn(f"companion file {path.name!r} is not a regular file; not copied.", stacklevel=3)
            return False
        with open(target, "xb") as destination:
            shutil.copyfileobj(source, destination)
    return True


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _regular_inside(path: Path, root: Path, what: str) -> Path | None:
    """``path`` resolved, when it is (or links to) a regular file inside ``root``; None (with a warning for a link
    that leads outside, or to something that is not a regular file) otherwise."""
    try:
        status = os.lstat(path)
    except OSError:
        return None  # absent
    if not stat.S_ISLNK(status.st_mode):
        return path if stat.S_ISREG(status.st_mode) else None
    resolved = path.resolve()
    if not _inside(resolved, root.resolve()):
        warnings.warn(
            f"{what} {path.name!r} is a symbolic link that leads outside {root.name!r}; it is not copied (copy the "
            "file itself into the source folder to carry it over).",
            stacklevel=3,
        )
        return None
    return resolved if resolved.is_file() else None


def _hub_cache_root(path: Path) -> Path:
    """The repo folder of a Hub-cache file (``models--org--name/snapshots/<revision>/<file>``), whose ``blobs/``
    hold what the snapshot's links point to."""
    return path.parent.parent.parent if path.parent.parent.name == "snapshots" else path.parent


def _front_matter(card_path: Path) -> dict:
    """The source card's YAML front matter, parsed without anchors or aliases (a YAML alias bomb is refused, not
    expanded); ``{}`` when there is none, it is too large, or it does not parse."""
    import yaml

    if card_path.stat().st_size > MAX_CARD_BYTES:
        warnings.warn(
            f"the source's README.md is over {MAX_CARD_BYTES} bytes; its card metadata is not inherited.", stacklevel=3
        )
        return {}
    text = card_path.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, flags=re.DOTALL)
    if match is None:
        return {}

    class _NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("aliases are not allowed in card metadata")
            return super().compose_node(parent, index)

    try:
        data = yaml.load(match.group(1), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        warnings.warn(
            "the source's README.md front matter is not plain YAML; its metadata is not inherited.", stacklevel=3
        )
        return {}
    return data if isinstance(data, dict) else {}


def _repo_id(value: object) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _checked(key: str, value: object) -> object | None:
    """An inherited card value in the shape the Hub gives ``key``, or None (then it is dropped)."""
    if key in ("license", "license_name"):
        return value if isinstance(value, str) and _LICENSE.fullmatch(value) else None
    if key == "license_link":
        return value if isinstance(value, str) and _URL.fullmatch(value) else None
    pattern_check = {"language": lambda v: isinstance(v, str) and _LANGUAGE.fullmatch(v), "datasets": _repo_id}[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not 0 < len(items) <= MAX_LIST_ITEMS or not all(map(pattern_check, items)):
        return None
    return value if isinstance(value, str) else list(items)


def inherited_card_metadata(data: dict) -> tuple[dict, str | None]:
    """The `CARD_FIELDS` and ``base_model`` of a parsed source card, each rebuilt from a validated value (a value of
    another shape is dropped with a warning naming the field)."""
    card, dropped = {}, []
    for key in CARD_FIELDS:
        if data.get(key) in (None, [], ""):
            continue
        value = _checked(key, data[key])
        if value is None:
            dropped.append(key)
        else:
            card[key] = value
    base_model = data.get("base_model")
    if isinstance(base_model, list) and len(base_model) == 1:
        base_model = base_model[0]
    if base_model not in (None, "", []) and _repo_id(base_model) is None:
        dropped.append("base_model")
        base_model = None
    if dropped:
        warnings.warn(
            f"the source's card metadata is not in the Hub's form for {', '.join(dropped)}; not inherited.",
            stacklevel=3,
        )
    return card, base_model


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a Hub repo (a valid repo id that is not a path or an existing folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if source.startswith((".", "/", "~")) or os.path.isabs(source) or os.path.isdir(source):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def recorded_source(source: str | os.PathLike | None) -> str | None:
    """What ``converted_from`` records for a conversion source: never an absolute local path (it would put a home
    directory or cache location into ``config.json`` and cards, and means nothing on another machine).

    A Hub repo id is kept as given; a snapshot folder of the Hub cache (``.../models--org--name/snapshots/<rev>``)
    is recorded as its repo id ``org/name``; any other local folder as ``./<folder name>`` (the ``./`` keeps a local
    name from being read as a repo id). ``None`` (an in-memory model with no name) stays ``None``.
    """
    if source is None or not str(source):
        return None
    source = str(source)
    if is_hub_id(source):
        return source
    parts = Path(os.path.abspath(os.path.expanduser(source))).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo_id = parts[-3][len("models--") :].replace("--", "/")
        if is_hub_id(repo_id):
            return repo_id
    return f"./{parts[-1]}" if len(parts) > 1 else None


def _cached(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(path) if isinstance(path, str) and os.path.isfile(path) else None


def read_conversion_source(source: str | os.PathLike | None, revision: str | None = None) -> ConversionSource:
    """The companion files and card metadata of a source folder or cached Hub repo (empty for an in-memory model)."""
    if source is None:
        return ConversionSource(local=True)
    source = str(source)
    hub = is_hub_id(source)
    files: dict[str, Path] = {}

    def regular(name: str, what: str) -> Path | None:
        if hub:
            cached = _cached(source, name, revision)
            return None if cached is None else _regular_inside(cached, _hub_cache_root(cached), what)
        return _regular_inside(Path(source) / name, Path(source), what)

    for name in COMPANION_FILES:
        path = regular(name, "companion file")
        if path is not None:
            files[name] = path
    card_path = regular("README.md", "model card")
    card: dict = {}
    base_model = source if hub else None
    if card_path is not None:
        try:
            card, named_base = inherited_card_metadata(_front_matter(card_path))
        except OSError:  # an unreadable card carries nothing over, as if absent
            card, named_base = {}, None
        base_model = base_model or named_base
    return ConversionSource(files=files, card=card, base_model=base_model, local=not hub)


__all__ = [
    "CARD_FIELDS",
    "COMPANION_FILES",
    "ConversionSource",
    "inherited_card_metadata",
    "is_hub_id",
    "read_conversion_source",
    "recorded_source",
]
