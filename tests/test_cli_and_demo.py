"""The ``hf-comet`` command and the demo (main job) in a fast setting."""

import subprocess
import sys

import pytest
import torch
import transformers

import hf_comet
from hf_comet.data import digits_images, english_text_bytes
from hf_comet.demo import run_demo
from hf_comet.io import atomic_save_pretrained


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_comet.cli", *args], capture_output=True, text=True, timeout=300)


def test_version_and_info():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hf-comet {hf_comet.__version__}"
    info = run_cli("info")
    assert info.returncode == 0
    for name in ("comet_gpt2", "comet_vit", "comet_bert", "CometBertForTokenClassification", "comet, topk"):
        assert name in info.stdout


def test_bad_steps_is_refused_before_any_work(tmp_path):
    proc = run_cli("demo", "--steps", "0", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--steps 0" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bundled_datasets_are_real_and_offline():
    train, test = digits_images()
    assert train["pixel_values"].shape[1:] == (1, 8, 8) and len(train["labels"]) + len(test["labels"]) == 1797
    assert 0.0 <= train["pixel_values"].min() and train["pixel_values"].max() <= 1.0
    text = english_text_bytes()
    assert len(text) > 100_000 and b"the" in text[:20_000].tobytes()


def test_demo_fast_trains_saves_and_reloads_every_family(tmp_path):
    results = run_demo(tmp_path, steps=3, log=lambda line: None)
    assert {(r.family, r.routing) for r in results} == {
        (f, r) for f in ("comet_vit", "comet_gpt2", "comet_bert") for r in ("comet", "topk")
    }
    assert all(r.reload_identical for r in results)
    vit = next(r for r in results if r.family == "comet_vit" and r.routing == "comet")
    model = transformers.AutoModelForImageClassification.from_pretrained(vit.checkpoint)
    assert type(model).__name__ == "CometViTForImageClassification"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_atomic_save_replaces_a_checkpoint_and_keeps_the_old_one_on_failure(tmp_path):
    config = transformers.AutoConfig.for_model(
        "comet_vit",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_channels=1,
    )
    first, second = transformers.AutoModel.from_config(config), transformers.AutoModel.from_config(config)
    target = tmp_path / "ckpt"
    atomic_save_pretrained(first, target)
    atomic_save_pretrained(second, target)
    reloaded = transformers.AutoModel.from_pretrained(target)
    assert torch.equal(reloaded.layers[0].mlp.experts.up_proj, second.layers[0].mlp.experts.up_proj)

    def failing_save(*args, **kwargs):
        raise RuntimeError("disk full")

    second.save_pretrained = failing_save
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_pretrained(second, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(
        transformers.AutoModel.from_pretrained(target).layers[0].mlp.experts.up_proj,
        second.layers[0].mlp.experts.up_proj,
    )
