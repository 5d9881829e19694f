"""Sharing: push_to_hub through a fake HfApi that writes a real local Hub cache snapshot (no upload-capable Hub
server is installable; transformers-v5-notes §6), loading back by repo id with remote code, and model cards."""

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
import transformers.utils.hub as transformers_hub
import yaml
from conftest import EVERY_HEAD, main_output, tiny_inputs, tiny_model

from hf_comet.convert import convert_to_moe


class FakeHfApi:
    """Records create_repo / create_commit and writes each commit as a snapshot of a local Hub cache."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.commits: list[tuple[str, list[str]]] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        pass

    def create_commit(self, repo_id, operations, **kwargs):
        repo = self.cache / f"models--{repo_id.replace('/', '--')}"
        sha = hashlib.sha1(f"{repo_id}{len(self.commits)}".encode()).hexdigest()
        snapshot = repo / "snapshots" / sha
        snapshot.mkdir(parents=True)
        for op in operations:
            target = snapshot / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, target)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        self.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/{sha}", oid=sha, pr_url=None)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    api = FakeHfApi(tmp_path / "hub-cache")
    monkeypatch.setattr(transformers_hub, "hf_api", lambda: api)
    return api


@pytest.mark.parametrize("family, head", EVERY_HEAD)
def test_push_to_hub_uploads_weights_code_and_card_and_loads_back_by_repo_id(family, head, fake_hub):
    model = tiny_model(family, head, routing="topk").eval()
    repo_id = f"tester/{family}-{head.lower()}"
    model.push_to_hub(repo_id, tags=["unit-test"])
    (pushed_repo, files), *_ = fake_hub.commits
    assert pushed_repo == repo_id
    expected = {"README.md", "config.json", "model.safetensors", "configuration_comet.py", f"modeling_{family}.py"}
    expected |= {"modeling_comet_common.py", "moe_block.py", "moe_experts.py", "moe_kernels.py", "moe_routers.py"}
    assert expected <= set(files), files
    hub = dict(cache_dir=fake_hub.cache, local_files_only=True)
    if head.startswith("Auto"):
        loaded = getattr(transformers, head).from_pretrained(repo_id, trust_remote_code=True, **hub).eval()
    else:  # a head without an Auto class: its class from the pushed code, as the card says
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        reference = f"modeling_{family}.{type(model).__name__}"
        loaded = get_class_from_dynamic_module(reference, repo_id, **hub).from_pretrained(repo_id, **hub).eval()
        assert "transformers_modules" in type(loaded).__module__
    inputs = tiny_inputs(family, head, with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(**inputs)), main_output(model(**inputs)), rtol=1e-5, atol=1e-6)
    snapshot = next((fake_hub.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir())
    card = (snapshot / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["license"] == "apache-2.0"
    assert {"moe", "custom_code", "topk", "unit-test"} <= set(metadata["tags"])
    assert "Learned routing" in card
    if head.startswith("Auto"):  # the card loads the head with the Auto class that gives this very class
        assert f"from transformers import {head}" in card and "trust_remote_code=True" in card
        assert getattr(transformers, head)._model_mapping[type(model.config)] is type(model)
    else:
        assert f'get_class_from_dynamic_module("modeling_{family}.{type(model).__name__}"' in card


def test_converted_model_card_names_its_base_model_and_provenance(tmp_path):
    dense = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=64)
    )
    moe = convert_to_moe(dense, "split", num_experts=4, split_method="kmeans", seed=5)
    moe.config.converted_from = "openai-community/gpt2"  # as if converted from the Hub id
    moe.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["base_model"] == "openai-community/gpt2"
    assert metadata["pipeline_tag"] == "text-generation"
    assert "method `split` (unit partition `kmeans`), conversion seed 5" in card
    assert "MoEfication" in card and "Switch Transformers" in card


def test_cli_card_writes_a_card_with_results_plots_and_refuses_to_overwrite(tmp_path, capsys):
    from hf_comet.cli import main

    model = tiny_model("comet_vit", "AutoModelForImageClassification", routing="comet")
    model(**tiny_inputs("comet_vit", "AutoModelForImageClassification"))  # fill the statistics window
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["card", str(tmp_path / "ckpt")]) == 2 and "--overwrite" in capsys.readouterr().err
    (tmp_path / "ckpt" / "expert_load_comet.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["card", str(tmp_path / "ckpt"), "--overwrite", "--repo-id", "me/vit"]) == 0
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "COMET routing" in card and "(expert_load_comet.png)" in card and 'from_pretrained("me/vit")' in card
    assert main(["card", str(tmp_path / "nothing")]) == 2


def test_a_pushed_model_loads_by_repo_id_with_remote_code_where_hf_comet_is_missing(fake_hub, tmp_path):
    from test_checkpoints import run_remote_loader

    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="switch").eval()
    model.push_to_hub("tester/remote-gpt2")
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", with_labels=False)
    with torch.no_grad():
        torch.save(main_output(model(**inputs)), tmp_path / "reference.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    case = dict(
        path="tester/remote-gpt2",
        saved_as="AutoModelForCausalLM",
        load_as=["AutoModelForCausalLM"],
        inputs=str(tmp_path / "inputs.pt"),
        reference=str(tmp_path / "reference.pt"),
    )
    results = run_remote_loader([case], tmp_path, HF_HUB_CACHE=str(fake_hub.cache))
    assert results == [["tester/remote-gpt2", "AutoModelForCausalLM", True]]


def test_a_head_without_an_auto_class_pushes_its_code_where_hf_comet_is_not_installed(fake_hub, tmp_path, monkeypatch):
    """Without hf_comet (remote code) saving is upstream's; for GPT2DoubleHeads our save copies the code, and
    ``save_pretrained(push_to_hub=True)`` must push it too (upstream would push before the copy)."""
    from hf_comet.modeling.modeling_comet_common import CometPreTrainedMixin

    monkeypatch.setattr(CometPreTrainedMixin, "sharing", None)
    model = tiny_model("comet_gpt2", "CometGPT2DoubleHeadsModel", routing="comet")
    model.save_pretrained(tmp_path / "dh", push_to_hub=True, repo_id="tester/double-heads")
    (pushed_repo, files), *_ = fake_hub.commits
    assert pushed_repo == "tester/double-heads"
    assert {"config.json", "model.safetensors", "modeling_comet_gpt2.py", "moe_block.py"} <= set(files), files
    assert (tmp_path / "dh" / "modeling_comet_gpt2.py").is_file()
