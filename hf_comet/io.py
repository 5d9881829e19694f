"""Saving without ever leaving a half-written or lost checkpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel


def atomic_save_pretrained(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained`` into a temporary sibling folder, then swap it in place of ``save_directory``.

    A crash mid-save leaves the previous checkpoint (if any) untouched; the old folder is removed only after the new
    one is complete and renamed into place.
    """
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, **kwargs)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(staging, target)
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
