"""Sharing hf_comet models: the model card written at save time and ``push_to_hub`` uploading it.

This lives outside ``modeling/`` (which travels with checkpoints and must not import hf_comet): ``import hf_comet``
registers a post-import hook that sets ``CometPreTrainedMixin.sharing = Sharing()`` as soon as
``hf_comet.modeling.modeling_comet_common`` loads (the first time any model class is needed), and the models'
``save_pretrained`` / ``push_to_hub`` delegate to it. ``import hf_comet`` itself does not import this module. A checkpoint loaded as remote code without the package behaves like upstream (no hf_comet card).
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from .cards import write_model_card
from .io import apply_umask, holds_checkpoint, non_finite_weight, recover, staged_path

_SHARD = re.compile(r"(.*?)-\d{5}-of-\d{5}")


class Sharing:
    """What ``save_pretrained`` and ``push_to_hub`` add to upstream for hf_comet models."""

    def save_pretrained(
        self, model, upstream_save: Callable, save_directory, is_main_process: bool = True, *args, **kwargs
    ):
        """Upstream save, the files a converted model carries over from its source (tokenizer, processor,
        generation config), then the model card when the folder has none yet; ``push_to_hub=True`` uploads the
        folder with `push_to_hub` (card included).

        Crash-safe where it can be (see `stages_save`): a new folder, or one that holds a checkpoint, is written as a
        hidden sibling and swapped in (`hf_comet.io.staged_path`), so a failure or kill midway leaves the previous
        checkpoint (never new config beside old weights). The result is what upstream's in-place save gives: the
        files upstream leaves alone (e.g. your notes, Trainer files, an existing README.md, other weight variants)
        are kept (hard links), and the stale weight shards upstream deletes are not. Two differences: the written
        files get the umask's mode (safetensors 0.8 itself writes weights 0600), and the folder is a new one (a
        process whose working directory or open folder handle is the old one keeps seeing the old one).
        """
        broken = non_finite_weight(model) if is_main_process else None
        if broken is not None:  # saved as asked (upstream does), but never carded or pushed as a working model
            warnings.warn(f"{type(model).__name__}.save_pretrained: {broken} holds NaN or infinite values; the "
                          "weights are saved, but no model card is written and push_to_hub is refused.", stacklevel=3)  # fmt: skip
            if kwargs.get("push_to_hub"):
                raise ValueError(f"{broken} holds NaN or infinite values; refusing to push the model to the Hub.")
        push = kwargs.pop("push_to_hub", False)
        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private") if k in kwargs}
        if self.stages_save(model, save_directory, is_main_process, args, kwargs):
            recover(save_directory)
            has_card = os.path.lexists(os.path.join(save_directory, "README.md"))
            keep = _left_by_upstream(model, kwargs.get("variant"))
            with staged_path(save_directory, directory=True, carry_over=keep) as staging:
                result = upstream_save(staging, is_main_process, *args, **kwargs)
                _carry_over_from_source(model, staging, existing=save_directory)
                if not has_card and broken is None:
                    write_model_card(model, staging, repo_id=push_kwargs.get("repo_id"))
                apply_umask(staging)
        else:
            result = upstream_save(save_directory, is_main_process, *args, **kwargs)
            if is_main_process and os.path.isdir(save_directory):
                _carry_over_from_source(model, save_directory)
            card = os.path.join(save_directory, "README.md")
            if is_main_process and os.path.isdir(save_directory) and not os.path.lexists(card) and broken is None:
                write_model_card(model, save_directory, repo_id=push_kwargs.get("repo_id"))
        if push and is_main_process:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            self.push_to_hub(model, repo_id, **push_kwargs)
        return result

    @staticmethod
    def stages_save(model, save_directory, is_main_process: bool, args: tuple, kwargs: dict) -> bool:
        """Whether `save_pretrained` writes a hidden sibling and swaps it in rather than writing in place (upstream).

        It does for the main process of a single-process run, saving to a folder that does not exist yet or that
        holds a checkpoint (``config.json`` or weights), in a parent folder it can write, on the same file system.
        Otherwise upstream's in-place save runs unchanged: ``is_main_process=False``, distributed (several ranks,
        tensor parallel, ``distributed_checkpoint``), a symbolic link, a file, a folder without a checkpoint (e.g. a
        Trainer's ``checkpoint-N`` it created, or a temporary folder), a mount point, a read-only parent.
        """
        if not is_main_process or args or kwargs.get("distributed_checkpoint"):
            return False
        if getattr(model, "_tp_size", None) is not None or getattr(model.config, "distributed_config", None):
            return False
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return False
        target = Path(os.path.abspath(save_directory))
        if target.is_symlink() or (os.path.lexists(target) and not target.is_dir()):
            return False
        parent = target.parent
        if target.is_dir():
            if not holds_checkpoint(target) or os.path.ismount(target):
                return False
            if os.stat(target).st_dev != os.stat(parent).st_dev:
                return False
        return not parent.exists() or os.access(parent, os.W_OK | os.X_OK)

    def push_to_hub(
        self,
        model,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        max_shard_size: int | str | None = "50GB",
        create_pr: bool = False,
        revision: str | None = None,
        commit_description: str | None = None,
        tags: list[str] | None = None,
    ):
        """Upload weights, config, modeling code and the hf_comet model card in one commit.

        Upstream ``push_to_hub`` uploads the repo's existing card (or a generic one) with tags added; this one
        uploads the hf_comet card of this model (routing, provenance, statistics, loading, citations; tags given
        here are added), replacing README.md on the Hub. Same arguments and Hub calls as upstream otherwise. A
        model with a NaN or infinite weight is refused (``ValueError``) before any Hub call.
        """
        from transformers.utils.hub import hf_api

        broken = non_finite_weight(model)
        if broken is not None:
            raise ValueError(f"{broken} holds NaN or infinite values; refusing to push the model to the Hub.")

        if tags:
            model.add_model_tags(tags)
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as work_dir:
            model.save_pretrained(work_dir, max_shard_size=max_shard_size, repo_id=repo_id)
            return model._upload_modified_files(
                work_dir,
                repo_id,
                files_timestamps={},
                commit_message=commit_message or "Upload model (hf_comet)",
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )


def _carry_over_from_source(model, directory, existing=None) -> None:
    """A converted model's tokenizer / processor / generation-config files, copied from its source where the folder
    (and ``existing``, the folder a staged save replaces) has none of that name (`hf_comet.convert.companions`):
    the saved folder then works with ``pipeline()`` alone, and a file the user saved there wins."""
    source = getattr(model, "conversion_source", None)
    if source is not None:
        source.copy_files(directory, skip_existing_in=existing)


def _add_variant(weights_name: str, variant: str | None) -> str:
    """transformers' ``model.safetensors`` -> ``model.VARIANT.safetensors``."""
    if not variant:
        return weights_name
    parts = weights_name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def _left_by_upstream(model, variant: str | None) -> Callable[[Path], bool]:
    """Which entries of a folder upstream's in-place ``save_pretrained`` leaves: all but the weight shards of the
    name it writes (``model[.VARIANT]-0000i-of-0000n.safetensors``, ``adapter_model...`` with adapters), which it
    deletes when it does not rewrite them (transformers ``modeling_utils.save_pretrained``, "Clean the folder")."""
    peft = getattr(model, "_hf_peft_config_loaded", False)
    weights_name = "adapter_model.safetensors" if peft else _add_variant("model.safetensors", variant)
    prefix = weights_name.replace(".bin", "").replace(".safetensors", "")

    def keep(path: Path) -> bool:
        name = path.name
        stem = name.replace(".bin", "").replace(".safetensors", "")
        return not (name.startswith(prefix) and path.is_file() and _SHARD.fullmatch(stem) is not None)

    return keep


__all__ = ["Sharing"]
