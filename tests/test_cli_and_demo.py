"""The ``hf-comet`` command, the recipes and the demo (main job) in their fast settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import hf_comet
from hf_comet.data import digits_images, english_text_bytes, stdlib_docstrings
from hf_comet.io import atomic_save_pretrained
from hf_comet.training.recipes import RECIPES, run_recipe

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    """``python -m hf_comet.cli ARGS`` on this checkout's code (not whichever copy is installed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "hf_comet.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def test_version_and_info(capsys):
    from hf_comet.cli import main

    with pytest.raises(SystemExit) as exit_:  # in-process: the installed entry point is the `info` call below
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"hf-comet {hf_comet.__version__}"
    info = run_cli("info")
    assert info.returncode == 0
    for name in ("comet_gpt2", "comet_vit", "comet_bert", "CometBertForTokenClassification", "comet, topk"):
        assert name in info.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "vit_digits", "--steps", "0"], "steps=0"),
        (["train", "vit_digits", "--variants", "dense,hashed"], "'hashed'"),
        (["train", "vit_digits", "--set", "comet_keep_rate=1.5"], "comet_keep_rate=1.5"),
        (["train", "vit_digits", "--set", "comet_keep_rate"], "KEY=VALUE"),
        (["train", "gpt2_text", "--setting", "epochs=3"], "epochs"),
        (["train", "gpt2_text", "--setting", "steps=abc"], "steps='abc'"),
        (["train", "gpt2_text", "--setting", "num_train=0"], "num_train=0"),
        (["train", "bert_mlm_cls", "--fast", "--setting", "finetune_steps=0"], "finetune_steps=0"),
        (["train", "vit_digits", "--set", "comet_keep_rat=0.25"], "misspelt"),
        (["train", "vit_digits", "--variants", "block_comet", "--set", "comet_block_size=48"], "comet_block_size=48"),
    ],
)
def test_bad_train_arguments_are_refused_before_any_work(tmp_path, args, message, capsys):
    from hf_comet.cli import main

    assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_is_refused(capsys):
    from hf_comet.cli import main

    assert main(["train", "resnet_imagenet"]) == 2  # refused by the registry (a registered recipe is a choice too)
    err = capsys.readouterr().err
    assert "hf-comet train: error: recipe 'resnet_imagenet' does not exist" in err and "vit_digits" in err


def test_bundled_datasets_are_real_and_offline():
    train, test = digits_images()
    assert train["pixel_values"].shape[1:] == (1, 8, 8) and len(train["labels"]) + len(test["labels"]) == 1797
    assert 0.0 <= train["pixel_values"].min() and train["pixel_values"].max() <= 1.0
    text = english_text_bytes()
    assert len(text) > 100_000 and b"the" in text[:20_000].tobytes()


def test_stdlib_docstrings_are_a_real_four_topic_task():
    texts, labels, names = stdlib_docstrings()
    assert len(names) == 4 and len(texts) == len(labels) > 800
    assert all(labels.count(k) > 100 for k in range(4))
    assert len(set(texts)) == len(texts)
    assert any("decimal" in t.lower() for t, label in zip(texts, labels, strict=True) if label == 2)


def test_demo_fast_compares_comet_topk_and_dense_and_leaves_loadable_checkpoints(tmp_path):
    proc = run_cli("demo", "--fast", "--no-progress", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "comet" in proc.stdout and "dense" in proc.stdout and "(as trained)" in proc.stdout
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert set(summary["variants"]) == {"dense", "comet", "topk"}
    for name in ("loss_curves.png", "expert_load_comet.png", "overlap_similarity_comet.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "comet")
    assert type(model).__name__ == "CometViTForImageClassification"
    card = (tmp_path / "comet" / "README.md").read_text()
    assert card.startswith("---") and "library_name: transformers" in card and "- moe" in card
    assert "COMET routing" in card and "test_accuracy" in card and "(expert_load_comet.png)" in card
    assert (tmp_path / "comet" / "expert_load_comet.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_fast_setting_runs_end_to_end_and_writes_its_files(recipe, tmp_path):
    summary = run_recipe(recipe, tmp_path, fast=True, progress=False, log=lambda line: None)
    assert summary["setting"] == "fast" and json.loads((tmp_path / "metrics.json").read_text()) == summary
    for variant, entry in summary["variants"].items():
        assert all(isinstance(v, float) for v in entry["metrics"].values())
        assert (tmp_path / variant / "config.json").exists()
        if variant != "dense":
            assert (tmp_path / f"expert_load_{variant}.png").exists()
            assert entry["last_routing"]["routing/max_load_share"] > 0
    metric = {"vit_digits": "test_accuracy", "gpt2_text": "val_perplexity", "bert_mlm_cls": "topic_test_accuracy"}
    assert all(metric[recipe] in entry["metrics"] for entry in summary["variants"].values())


def test_recipe_overrides_reach_the_moe_config(tmp_path):
    summary = run_recipe(
        "vit_digits",
        tmp_path,
        fast=True,
        variants=["block_comet"],
        overrides={"comet_keep_rate": 0.25},
        settings={"steps": 3},
        progress=False,
        log=lambda line: None,
    )
    config = json.loads((tmp_path / "block_comet" / "config.json").read_text())
    assert config["comet_keep_rate"] == 0.25 and config["comet_block_size"] == 32
    assert summary["settings"]["steps"] == 3


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
