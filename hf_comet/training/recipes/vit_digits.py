"""Recipe ``vit_digits`` (the demo): dense vs MoE ViT, image classification on scikit-learn's bundled digits."""

from __future__ import annotations

import torch
import transformers

from ...data import digits_images
from .base import Recipe, ReloadCheck, Rows, Settings, VariantJob, VariantRun, accuracy, register_recipe

HEAD = "AutoModelForImageClassification"


def shared_config(settings: Settings) -> dict:
    return dict(
        image_size=8, patch_size=2, num_channels=1, num_labels=10, hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        intermediate_size=4 * settings.hidden_size, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def run(job: VariantJob) -> VariantRun:
    train, test = digits_images(seed=job.seed)
    model = job.build_model(HEAD)
    trainer, metrics, seconds = job.train(model, Rows(train), Rows(test), compute_metrics=accuracy)
    sample = {"pixel_values": test["pixel_values"][:256]}
    return VariantRun(
        trainer, {"test_accuracy": metrics["eval_accuracy"], "test_loss": metrics["eval_loss"]}, seconds, sample
    )


def check_reload(summary: dict) -> list[ReloadCheck]:
    """Reload every checkpoint of a run with the Auto class and score the test split again: a saved model must
    score what training measured."""
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
    )
)  # fmt: skip
