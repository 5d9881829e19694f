"""Recipe ``vit_digits`` (the demo): dense vs MoE ViT, image classification on scikit-learn's bundled digits, or on
a user's images (``--dataset``)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ...data import digits_images
from . import data_sources
from .base import (
    DatasetSource,
    Recipe,
    RecipeArgumentError,
    RecipeData,
    ReloadCheck,
    Settings,
    VariantJob,
    VariantRun,
    accuracy,
    mean_label_loss,
    register_recipe,
    torch_dataset,
)

HEAD = "AutoModelForImageClassification"
IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
"""Default columns of a user's data (``--image-column``, ``--label-column``)."""


def shared_config(settings: Settings) -> dict:
    return dict(
        image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        intermediate_size=4 * settings.hidden_size, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def digits_dataset(seed: int = 0):
    """scikit-learn's digits as train and test `datasets.Dataset` objects (``pixel_values`` float32 (1, 8, 8),
    ``labels`` int64; torch format), split as `hf_comet.data.digits_images` splits them."""
    train, test = digits_images(seed=seed)
    return torch_dataset(train), torch_dataset(test)


def load_data(source: DatasetSource, seed: int) -> RecipeData:
    """A user's labelled images: the image column (default ``image``; nested lists [channels][height][width] or
    [height][width], or a flat list or string of a square grayscale image) becomes ``pixel_values``, the label column
    (default ``label``) ``labels``; ``image_size``, ``num_channels``, ``patch_size`` and the labels follow the data."""
    path = source.path
    if source.text_column is not None:
        raise RecipeArgumentError(
            f"--text-column {source.text_column!r}: recipe vit_digits trains on images; texts train with gpt2_text "
            "or bert_mlm_cls."
        )
    image = source.image_column or IMAGE_COLUMN
    label = source.label_column or LABEL_COLUMN
    train, test = data_sources.read_splits(path, seed)
    data_sources.require_column((train, test), image, "--image-column", "vit_digits", "image", path)
    data_sources.require_column((train, test), label, "--label-column", "vit_digits", "label", path)
    train, test, names = data_sources.encode_labels(train, test, label, path)
    train, test, (channels, side, _) = data_sources.to_pixel_values(train, test, image, path)
    columns = ["pixel_values", "labels"]
    train, test = (split.select_columns(columns).with_format("torch") for split in (train, test))
    config = dict(
        image_size=side, num_channels=channels, patch_size=data_sources.patch_size_for(side), num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    description = (
        f"{Path(path).name} ({len(train)} train / {len(test)} test images of {channels}×{side}×{side}, {len(names)} classes; "
        f"columns {image!r} and {label!r})."
    )
    return RecipeData(train, test, config, names, description)


def run(job: VariantJob) -> VariantRun:
    train, test = (job.data.train, job.data.test) if job.data is not None else digits_dataset(job.seed)
    model = job.build_model(HEAD)
    trainer, metrics, seconds = job.train(model, train, test, compute_metrics=accuracy)
    sample = {"pixel_values": test[:256]["pixel_values"]}
    loss = mean_label_loss(trainer.model, test)  # the denominator every variant shares
    return VariantRun(trainer, {"test_accuracy": metrics["eval_accuracy"], "test_loss": loss}, seconds, sample)


def check_reload(summary: dict) -> list[ReloadCheck]:
    """Reload every checkpoint of a run on the recipe's own data with the Auto class and score the test split again:
    a saved model must score what training measured."""
    _, test = digits_images(seed=summary["seed"])
    checks = []
    for name, entry in summary["variants"].items():
        model = getattr(transformers, HEAD).from_pretrained(entry["checkpoint"]).eval()
        with torch.no_grad():
            predictions = model(pixel_values=test["pixel_values"]).logits.argmax(-1)
        reloaded = float((predictions == test["labels"]).float().mean())
        trained = entry["metrics"]["test_accuracy"]
        checks.append(ReloadCheck(name, HEAD, type(model).__name__, "test_accuracy", trained, reloaded))
    return checks


RECIPE = register_recipe(
    Recipe(
        name="vit_digits",
        family="comet_vit",
        fast=Settings(steps=12, batch_size=32, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                      eval_steps=6, logging_steps=3),
        full=Settings(steps=1200, batch_size=64, hidden_size=64, num_layers=4, num_heads=4, learning_rate=2e-3,
                      eval_steps=200, logging_steps=50),
        default_variants=("dense", "comet", "topk"),
        shared_config=shared_config,
        run=run,
        data_description="scikit-learn's bundled handwritten digits (8×8, 10 classes; 80/20 split, seed 0).",
        dataset_name="scikit-learn digits",
        check_reload=check_reload,
        load_data=load_data,
    )
)  # fmt: skip
