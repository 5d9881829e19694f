"""What a converted checkpoint carries over from its source besides weights (issue 13 §2): the tokenizer, image
processor / feature extractor and generation-config files, so ``pipeline(task, model=converted_folder)`` works
with no other argument, and the source card's license, language, datasets and base model.

The source is a local folder or a Hub id; a Hub id's files are read from the local Hub cache only (conversion
never downloads anything beyond what ``from_pretrained`` itself fetched).
"""

from __future__ import annotations

import os
import shutil
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


@dataclass
class ConversionSource:
    """What the converted model inherits from its source: companion files (name -> path) and card metadata."""

    files: dict[str, Path] = field(default_factory=dict)
    card: dict = field(default_factory=dict)
    base_model: str | None = None
    local: bool = True

    def copy_files(self, directory: str | os.PathLike, skip_existing_in: str | os.PathLike | None = None) -> list[str]:
        """Copy the companion files into ``directory`` where it (and ``skip_existing_in``) has no file of that name
        yet (a tokenizer the user saved there wins); the names copied."""
        copied = []
        for name, path in self.files.items():
            target = Path(directory) / name
            kept = skip_existing_in is not None and os.path.lexists(Path(skip_existing_in) / name)
            if not os.path.lexists(target) and not kept:
                shutil.copyfile(path, target)
                copied.append(name)
        return copied


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
    for name in COMPANION_FILES:
        path = _cached(source, name, revision) if hub else Path(source) / name
        if path is not None and path.is_file():
            files[name] = path
    card_path = _cached(source, "README.md", revision) if hub else Path(source) / "README.md"
    card: dict = {}
    base_model = source if hub else None
    if card_path is not None and card_path.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(card_path).data.to_dict()
        except Exception:  # noqa: BLE001 - an unreadable card carries nothing over, as if absent
            data = {}
        card = {key: data[key] for key in CARD_FIELDS if data.get(key) not in (None, [], "")}
        if base_model is None and data.get("base_model"):
            base_model = data["base_model"]
    return ConversionSource(files=files, card=card, base_model=base_model, local=not hub)


__all__ = ["CARD_FIELDS", "COMPANION_FILES", "ConversionSource", "is_hub_id", "read_conversion_source"]
