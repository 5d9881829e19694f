"""`datasets` and `evaluate` the ecosystem's way (issue 13 §4): the accuracy module shipped in ``hf_comet/metrics``
loads offline with ``evaluate.load(<path>)`` and agrees with numpy; every recipe trains on a user's data given as a
json file, a csv file or a saved `datasets` folder (``--dataset``); bad data is refused before any training."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers
from sklearn.datasets import load_digits

from hf_comet.cli import main
from hf_comet.metrics import METRICS, METRICS_DIR, load_metric, metric_path
from hf_comet.training.recipes import DatasetSource, RecipeArgumentError, accuracy, load_recipe_data, run_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = {"steps": 2, "eval_steps": 2, "logging_steps": 1, "hidden_size": 16, "num_layers": 1, "num_heads": 2}
TEXTS = {
    "math": ["The square root of a number times itself.", "Add two fractions with a common denominator.",
             "A prime number has exactly two divisors.", "The logarithm inverts exponentiation."],
    "files": ["Copy a file to a new folder.", "List the names in a directory tree.",
              "Remove an empty directory from the disk.", "Open the archive and extract every member."],
}  # fmt: skip


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """``load_dataset``'s cache in the test's folder (it is read at call time)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _text_rows(repeat: int = 3) -> list[dict]:
    return [{"text": t, "label": label} for _ in range(repeat) for label, texts in TEXTS.items() for t in texts]


def _digit_rows(count: int, channels: int) -> list[dict]:
    """Digits 2×2-average-pooled to 4×4, as nested lists [channels][4][4] in [0, 1]."""
    digits = load_digits()
    pooled = digits.images[:count].reshape(count, 4, 2, 4, 2).mean(axis=(2, 4)) / 16.0
    return [
        {"image": np.repeat(image[None], channels, 0).round(4).tolist(), "label": int(label)}
        for image, label in zip(pooled, digits.target[:count], strict=True)
    ]


def _write_json_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# -- the shipped metric module -------------------------------------------------------------------------------------
OFFLINE_SCRIPT = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access in an offline test")
socket.socket.connect = refuse
import numpy as np, evaluate
metric = evaluate.load(sys.argv[1], keep_in_memory=True)
rng = np.random.default_rng(0)
predictions, references = rng.integers(0, 5, 1000), rng.integers(0, 5, 1000)
print(metric.compute(predictions=predictions, references=references)["accuracy"], (predictions == references).mean())
"""


def test_the_shipped_accuracy_module_loads_offline_into_a_temporary_cache_and_agrees_with_numpy(tmp_path):
    assert METRICS == ("accuracy",) and (METRICS_DIR / "accuracy" / "accuracy.py").is_file()
    home = tmp_path / "hf_home"
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # cwd without an ./accuracy folder: evaluate looks there first, so this proves the path is what loads
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, str(metric_path("accuracy"))],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, reference = map(float, proc.stdout.split())
    assert ours == pytest.approx(reference, abs=1e-12) and 0.1 < ours < 0.3
    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.parts[0] == "hf_home" for p in written), written  # only the temporary cache


def test_accuracy_compute_metrics_uses_the_module_and_skips_ignored_labels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (6, 5))
    labels[:, :2] = -100
    valid = labels != -100
    expected = float((logits.argmax(-1)[valid] == labels[valid]).mean())
    assert accuracy(transformers.EvalPrediction(predictions=logits, label_ids=labels)) == {"accuracy": expected}
    weighted = load_metric("accuracy").compute(predictions=[1, 0, 1], references=[1, 1, 1], sample_weight=[2, 1, 1])
    assert weighted == {"accuracy": 0.75}
    assert np.isnan(load_metric("accuracy").compute(predictions=[], references=[])["accuracy"])  # e.g. nothing masked
    with pytest.raises(ValueError, match="not shipped"):
        metric_path("bleu")


def test_evaluate_is_a_declared_dependency_and_the_metric_modules_are_package_data():
    project = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; we support 3.10)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", project, re.S | re.M).group(1)
    assert re.search(r'^\s*"evaluate>=0\.4\.6,<0\.5",', dependencies, re.M), "evaluate is a declared dependency"
    assert re.search(r'^\s*"datasets>=', dependencies, re.M)
    package_data = re.search(r"^\[tool\.setuptools\.package-data\]\nhf_comet = \[(.*?)\]", project, re.M)
    patterns = re.findall(r'"([^"]+)"', package_data.group(1))
    package = ROOT / "hf_comet"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert all(metric_path(name) / f"{name}.py" in shipped for name in METRICS)


# -- a user's data -------------------------------------------------------------------------------------------------
def _quiet(line: str) -> None:
    pass


def test_vit_digits_trains_on_a_json_file_and_its_config_follows_the_images(tmp_path):
    path = _write_json_lines(tmp_path / "digits.jsonl", _digit_rows(80, channels=3))
    summary = run_recipe(
        "vit_digits", tmp_path / "out", fast=True, variants=["comet"], settings=TINY, progress=False, log=_quiet,
        dataset=DatasetSource(str(path)),
    )  # fmt: skip
    assert (
        summary["dataset"].startswith(path.name)
        and str(path.parent) not in summary["dataset"]
        and "64 train / 16 test images of 3×4×4" in summary["dataset"]
    )
    assert 0.0 <= summary["variants"]["comet"]["metrics"]["test_accuracy"] <= 1.0
    config = json.loads((tmp_path / "out" / "comet" / "config.json").read_text())
    assert (config["image_size"], config["num_channels"], config["patch_size"]) == (4, 3, 2)
    assert config["id2label"] == {str(i): str(i) for i in range(10)}
    card = (tmp_path / "out" / "comet" / "README.md").read_text()
    assert "digits.jsonl" in card and str(path.parent) not in card  # the file's name, not the local path


def test_gpt2_text_trains_on_a_csv_file_through_the_cli_with_a_named_text_column(tmp_path, capsys):
    path = tmp_path / "notes.csv"
    path.write_text("body,topic\n" + "".join(f'"{row["text"]}",{row["label"]}\n' for row in _text_rows()))
    flags = ["--setting", "steps=2", "--setting", "eval_steps=2", "--setting", "seq_len=32", "--no-progress"]
    args = ["train", "gpt2_text", "--fast", "--variants", "comet", "--dataset", str(path), "--text-column", "body"]
    assert main([*args, *flags, "--output-dir", str(tmp_path / "out")]) == 0
    assert "val_perplexity" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "text column 'body'" in summary["dataset"] and "19 train / 5 test texts" in summary["dataset"]
    assert np.isfinite(summary["variants"]["comet"]["metrics"]["val_perplexity"])


def test_bert_mlm_cls_trains_on_a_saved_dataset_dict_with_string_labels(tmp_path):
    rows = _text_rows()
    folder = tmp_path / "topics"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:16]),
            "test": datasets.Dataset.from_list(rows[16:]),
        }
    ).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.rglob("*"))
    data = load_recipe_data("bert_mlm_cls", DatasetSource(str(folder)), seed=0)
    assert (len(data.train), len(data.test), data.label_names) == (16, 8, ["files", "math"])
    settings = {**TINY, "finetune_steps": 2, "seq_len": 32}
    summary = run_recipe(
        "bert_mlm_cls", tmp_path / "out", fast=True, variants=["comet"], settings=settings, progress=False,
        log=_quiet, dataset=data,
    )  # fmt: skip
    metrics = summary["variants"]["comet"]["metrics"]
    assert 0.0 <= metrics["topic_test_accuracy"] <= 1.0 and 0.0 <= metrics["mlm_masked_accuracy"] <= 1.0
    assert sorted(p.name for p in folder.rglob("*")) == before, "nothing is written into the user's folder"


def test_a_single_saved_dataset_is_split_with_the_seed(tmp_path):
    folder = tmp_path / "one"
    datasets.Dataset.from_list(_text_rows(5)).save_to_disk(str(folder))
    first = load_recipe_data("gpt2_text", DatasetSource(str(folder)), seed=3)
    again = load_recipe_data("gpt2_text", DatasetSource(str(folder)), seed=3)
    other = load_recipe_data("gpt2_text", DatasetSource(str(folder)), seed=4)
    assert (len(first.train), len(first.test)) == (32, 8) and first.train.column_names == ["text"]
    assert first.test["text"] == again.test["text"] and first.test["text"] != other.test["text"]


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text_csv = tmp_path / "texts.csv"
    text_csv.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in _text_rows(1)))
    mixed = _digit_rows(6, channels=1)
    mixed[3]["image"] = [[0.0] * 3] * 3
    float_labels = [{"text": r["text"], "label": 0.5} for r in _text_rows(1)]
    numbers = [{"text": i, "label": "a"} for i in range(6)]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_folder").mkdir()
    return {
        "texts.csv": text_csv,
        "images.jsonl": _write_json_lines(tmp_path / "images.jsonl", _digit_rows(6, channels=1)),
        "mixed.jsonl": _write_json_lines(tmp_path / "mixed.jsonl", mixed),
        "float_labels.jsonl": _write_json_lines(tmp_path / "float_labels.jsonl", float_labels),
        "numbers.jsonl": _write_json_lines(tmp_path / "numbers.jsonl", numbers),
        "notes.txt": tmp_path / "notes.txt",
        "empty_folder": tmp_path / "empty_folder",
        "missing.json": tmp_path / "missing.json",
    }


@pytest.mark.parametrize(
    "recipe, file, flags, message",
    [
        ("vit_digits", "missing.json", [], "missing.json' does not exist; give a folder saved with"),
        ("vit_digits", "notes.txt", [], "files ending in '.txt' are not read; give a folder saved with"),
        ("vit_digits", "empty_folder", [], "is a folder not saved by save_to_disk"),
        ("vit_digits", "texts.csv", [], "no image column 'image' (its columns: text, label); recipe vit_digits"),
        ("vit_digits", "images.jsonl", ["--label-column", "digit"], "no label column 'digit' (its columns: image"),
        ("vit_digits", "images.jsonl", ["--text-column", "image"], "recipe vit_digits trains on images"),
        ("vit_digits", "mixed.jsonl", [], "holds images of shapes (1, 4, 4) and (1, 3, 3)"),
        ("gpt2_text", "images.jsonl", [], "no text column 'text' (its columns: image, label); recipe gpt2_text"),
        ("gpt2_text", "images.jsonl", ["--text-column", "image"], "text column 'image' holds List"),
        ("gpt2_text", "texts.csv", ["--label-column", "label"], "recipe gpt2_text reads no labels"),
        ("bert_mlm_cls", "float_labels.jsonl", [], "label column 'label' holds 0.5"),
        ("bert_mlm_cls", "numbers.jsonl", [], "text column 'text' holds Value('int64'), not strings"),
        ("bert_mlm_cls", "texts.csv", ["--image-column", "x"], "recipe bert_mlm_cls trains on text"),
        ("gpt2_text", None, ["--text-column", "body"], "--text-column names a column of --dataset PATH"),
    ],
)
def test_bad_data_is_refused_before_any_training(tmp_path, capsys, recipe, file, flags, message):
    dataset = ["--dataset", str(_bad_files(tmp_path)[file])] if file else []
    assert main(["train", recipe, "--fast", *dataset, *flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_recipe_without_a_data_reader_refuses_a_dataset(tmp_path):
    from hf_comet.training.recipes import RECIPES

    recipe = RECIPES["gpt2_text"]
    RECIPES["no_reader"] = type(recipe)(**{**recipe.__dict__, "name": "no_reader", "load_data": None})
    try:
        with pytest.raises(RecipeArgumentError, match="trains on its own data only; --dataset works with vit_digits"):
            load_recipe_data("no_reader", DatasetSource(str(tmp_path)))
    finally:
        del RECIPES["no_reader"]
