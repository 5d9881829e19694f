"""Sharing hf_comet models: the model card written at save time and ``push_to_hub`` uploading it.

This lives outside ``modeling/`` (which travels with checkpoints and must not import hf_comet): ``import hf_comet``
sets ``CometPreTrainedMixin.sharing = Sharing()``, and the models' ``save_pretrained`` / ``push_to_hub`` delegate to
it. A checkpoint loaded as remote code without the package behaves like upstream (no hf_comet card).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .cards import write_model_card


class Sharing:
    """What ``save_pretrained`` and ``push_to_hub`` add to upstream for hf_comet models."""

    def save_pretrained(
        self, model, upstream_save: Callable, save_directory, is_main_process: bool = True, *args, **kwargs
    ):
        """Upstream save, then the model card when the folder has none yet; ``push_to_hub=True`` uploads the folder
        with `push_to_hub` (card included)."""
        push = kwargs.pop("push_to_hub", False)
        push_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private") if k in kwargs}
        result = upstream_save(save_directory, is_main_process, *args, **kwargs)
        if is_main_process and not os.path.exists(os.path.join(save_directory, "README.md")):
            write_model_card(model, save_directory, repo_id=push_kwargs.get("repo_id"))
        if push and is_main_process:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            self.push_to_hub(model, repo_id, **push_kwargs)
        return result

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
        here are added), replacing README.md on the Hub. Same arguments and Hub calls as upstream otherwise.
        """
        from transformers.utils.hub import hf_api

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


__all__ = ["Sharing"]
