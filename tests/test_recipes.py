"""The recipe registry: every recipe is one `Recipe` object, and a recipe registered from outside the package (here,
inside a test) runs through `run_recipe` and ``hf-comet train NAME`` like the built-in ones.

The built-in recipes' fast runs are `test_cli_and_demo.py::test_recipes_fast_setting_runs_end_to_end_and_writes_its_files`
(parametrised over `RECIPES`, so a newly registered recipe is run there too)."""

import dataclasses
import json
from pathlib import Path

import pytest

from hf_comet.cli import main, parse_overrides
from hf_comet.data import digits_images
from hf_comet.modeling import FAMILIES
from hf_comet.modeling.configuration_comet import ROUTINGS
from hf_comet.training import recipes
from hf_comet.training.recipes import (
    RECIPES,
    Recipe,
    RecipeArgumentError,
    ReloadCheck,
    Rows,
    Settings,
    VariantRun,
    accuracy,
    register_recipe,
    run_recipe,
    validate_recipe_arguments,
    variant_names,
)


def test_every_registered_recipe_is_complete():
    assert list(RECIPES) == ["vit_digits", "gpt2_text", "bert_mlm_cls"]
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.family in FAMILIES
        assert isinstance(recipe.fast, Settings) and isinstance(recipe.full, Settings)
        assert recipe.fast.steps < recipe.full.steps
        assert recipe.default_variants and set(recipe.default_variants) <= set(variant_names())
        assert recipe.data_description and recipe.dataset_name and callable(recipe.run)
        for fast in (True, False):  # the presets themselves pass the argument checks, every MoE config builds
            variants, settings, _ = validate_recipe_arguments(name, fast, None, None, None)
            assert variants == list(recipe.default_variants) and settings == recipe.settings(fast)
    assert RECIPES["vit_digits"].check_reload is not None, "the demo checks its saved checkpoints"


def test_variant_names_are_dense_block_comet_and_every_routing():
    assert variant_names() == ("dense", "block_comet", *ROUTINGS)


def test_a_recipe_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(RECIPES["vit_digits"])
    assert register_recipe(RECIPES["vit_digits"], replace=True) is RECIPES["vit_digits"]


def test_override_parsing_and_table_formatting_live_in_the_cli_only():
    assert parse_overrides(["comet_keep_rate=0.25", "moe_layers=[0,2]", "routing=topk"]) == {
        "comet_keep_rate": 0.25,
        "moe_layers": [0, 2],
        "routing": "topk",
    }
    with pytest.raises(RecipeArgumentError, match="KEY=VALUE"):
        parse_overrides(["comet_keep_rate"])
    assert not hasattr(recipes, "parse_overrides") and not hasattr(recipes, "format_table")  # no cycle with the CLI


def test_the_cli_reports_a_checkpoint_that_reloads_differently(capsys):
    from hf_comet.cli import _report

    summary = {"variants": {"comet": {"metrics": {"acc": 0.5}, "parameters": 10, "train_seconds": 1.0}}}
    same = ReloadCheck("comet", "AutoModel", "CometModel", "acc", 0.5, 0.5)
    differs = same._replace(reloaded=0.25)
    assert _report(summary, "out", reload_checks=[same]) == 0
    assert "comet  reloads with AutoModel as CometModel: acc 0.5000 (as trained)" in capsys.readouterr().out
    assert _report(summary, "out", reload_checks=[same, differs]) == 1
    assert "acc 0.2500 (DIFFERS from training!)" in capsys.readouterr().out


# -- a recipe from outside the package ------------------------------------------------------------------------------
def _toy_shared(settings: Settings) -> dict:
    return dict(
        image_size=8, patch_size=4, num_channels=1, num_labels=10, hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        intermediate_size=2 * settings.hidden_size,
    )  # fmt: skip


def _toy_run(job) -> VariantRun:
    train, test = digits_images(seed=job.seed)
    train = {k: v[: job.settings.num_train] for k, v in train.items()}
    test = {k: v[: job.settings.num_eval] for k, v in test.items()}
    model = job.build_model("AutoModelForImageClassification")
    trainer, metrics, seconds = job.train(model, Rows(train), Rows(test), compute_metrics=accuracy)
    sample = {"pixel_values": test["pixel_values"]}
    return VariantRun(trainer, {"toy_accuracy": metrics["eval_accuracy"]}, seconds, sample)


def _toy_check(settings: Settings) -> None:
    if settings.batch_size > settings.num_train:
        raise RecipeArgumentError(f"setting batch_size={settings.batch_size} must be <= num_train.")


@pytest.fixture
def toy_recipe():
    tiny = Settings(steps=2, batch_size=16, hidden_size=16, num_layers=1, num_heads=2, learning_rate=3e-3,
                    eval_steps=2, logging_steps=1, num_train=64, num_eval=32)  # fmt: skip
    recipe = register_recipe(
        Recipe(
            name="toy_digits",
            family="comet_vit",
            fast=tiny,
            full=dataclasses.replace(tiny, steps=4),
            default_variants=("dense", "comet"),
            shared_config=_toy_shared,
            run=_toy_run,
            data_description="64 of scikit-learn's digits (a toy recipe of the tests).",
            dataset_name="toy digits",
            min_settings={"num_train": 16},
            check_settings=_toy_check,
        )
    )
    yield recipe
    del RECIPES[recipe.name]


def test_a_recipe_registered_in_a_test_runs_through_run_recipe(toy_recipe, tmp_path):
    summary = run_recipe("toy_digits", tmp_path, fast=True, progress=False, log=lambda line: None)
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    assert summary["recipe"] == "toy_digits" and summary["settings"]["steps"] == 2
    assert list(summary["variants"]) == ["dense", "comet"]
    assert set(summary["variants"]["comet"]["metrics"]) == {"toy_accuracy", "overlap_similarity_correlation"}
    for name in ("loss_curves.png", "expert_load_comet.png", "overlap_similarity_comet.png", "comet/config.json"):
        assert (tmp_path / name).exists()
    card = (tmp_path / "comet" / "README.md").read_text()
    assert "a toy recipe of the tests" in card and "toy_accuracy" in card


def test_a_recipe_registered_in_a_test_runs_through_the_cli(toy_recipe, tmp_path, capsys):
    args = ["train", "toy_digits", "--fast", "--no-progress", "--variants", "comet", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "toy_accuracy" in out and "comet" in out
    assert list(json.loads((tmp_path / "metrics.json").read_text())["variants"]) == ["comet"]


@pytest.mark.parametrize(
    "settings, message",
    [
        (["num_train=8"], "num_train=8 must be >= 16"),
        (["batch_size=32", "num_train=24"], "batch_size=32 must be <= num_train"),
    ],
)
def test_a_registered_recipe_s_own_setting_checks_run_before_any_work(toy_recipe, tmp_path, capsys, settings, message):
    flags = [flag for setting in settings for flag in ("--setting", setting)]
    assert main(["train", "toy_digits", "--fast", *flags, "--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 1e30}, "steps=1e\\+30 must be a whole number in \\[0, 2147483647\\]"),
        ({"steps": float("nan")}, "steps=nan must be a finite int"),
        ({"learning_rate": float("inf")}, "learning_rate=inf must be a finite float"),
        ({"hidden_size": "abc"}, "hidden_size='abc' must be a finite int"),
        ({"batch_size": -3}, "batch_size=-3 must be a whole number"),
    ],
)
def test_recipe_settings_that_could_not_run_or_finish_are_refused_before_any_work(settings, message, tmp_path):
    with pytest.raises(RecipeArgumentError, match=message):
        validate_recipe_arguments("vit_digits", True, None, None, settings)
    assert not (tmp_path / "out").exists()


# -- TrainingArguments, per-variant overrides and telemetry through `hf-comet train` ----------------------------------
def test_training_arguments_and_the_telemetry_level_reach_every_variant_s_trainer(toy_recipe, tmp_path, monkeypatch):
    from hf_comet.training import CometTrainer
    from hf_comet.training.recipes import base

    seen = []

    class Recording(CometTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(base, "CometTrainer", Recording)
    flags = ["--gradient_accumulation_steps", "2", "--weight_decay", "0.0", "--lr_scheduler_type", "linear",
             "--learning_rate", "0.01", "--report_to", "none", "--routing-logging", "layers"]  # fmt: skip
    argv = ["train", "toy_digits", "--fast", "--no-progress", "--variants", "dense,comet", *flags]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    assert len(seen) == 2
    for trainer in seen:
        args = trainer.args
        assert args.gradient_accumulation_steps == 2 and args.weight_decay == 0.0 and args.learning_rate == 0.01
        assert args.lr_scheduler_type == "linear" and args.report_to == [] and trainer.routing_logging == "layers"
        assert args.max_steps == 2 and args.per_device_train_batch_size == 16  # the recipe's own, untouched
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["settings"]["learning_rate"] == 0.01  # --learning_rate is the recipe setting of that name
    assert summary["training_args"] == {"gradient_accumulation_steps": 2, "weight_decay": 0.0,
                                        "lr_scheduler_type": "linear", "report_to": "none"}  # fmt: skip
    assert any("/layer_0/" in key for entry in seen[1].state.log_history for key in entry)


def test_the_recipe_reports_nowhere_unless_asked_and_a_missing_reporter_is_refused_by_name(toy_recipe, monkeypatch):
    from hf_comet.training.recipes import base

    assert base._recipe_training_arguments(toy_recipe.fast, Path("w"), 0, False)["report_to"] == "none"
    monkeypatch.setattr("transformers.integrations.integration_utils.get_available_reporting_integrations", lambda: [])
    with pytest.raises(RecipeArgumentError, match=r"--report_to tensorboard: tensorboard is not installed \(pip"):
        base.check_training_arguments({"report_to": ["tensorboard"]})
    monkeypatch.setattr(
        "transformers.integrations.integration_utils.get_available_reporting_integrations", lambda: ["tensorboard"]
    )
    assert base.check_training_arguments({"report_to": ["tensorboard"], "max_steps": 3}) == (
        {"steps": 3},
        {"report_to": ["tensorboard"]},
    )


def test_parse_training_arguments_returns_only_what_was_given():
    from hf_comet.training.recipes.base import parse_training_arguments

    assert parse_training_arguments([]) == {}
    given = parse_training_arguments(["--report_to", "tensorboard", "--weight-decay", "0", "--no_remove_unused_columns"])
    assert given == {"report_to": "tensorboard", "weight_decay": 0.0, "remove_unused_columns": False}


def test_the_readme_s_per_variant_override_works_as_pasted(tmp_path):
    """``--variants dense,block_comet,switch --set capacity_factor=1.25``: only switch reads capacity_factor."""
    from hf_comet.training.recipes.base import prepare_recipe_run, variant_overrides

    variants = ["dense", "block_comet", "switch"]
    prepared = prepare_recipe_run("vit_digits", tmp_path / "out", fast=True, variants=variants,
                                  overrides={"capacity_factor": 1.25})  # fmt: skip
    assert prepared.variant_overrides == {"block_comet": {}, "switch": {"capacity_factor": 1.25}}
    assert not (tmp_path / "out").exists()
    given = {"router_aux_loss_coef": 0.1, "switch.router_aux_loss_coef": 0.2, "hidden_dropout_prob": 0.1}
    assert variant_overrides("comet_vit", ["comet", "topk", "switch"], given) == {
        "comet": {"hidden_dropout_prob": 0.1},  # comet reads no aux loss; a family field goes to every MoE variant
        "topk": {"router_aux_loss_coef": 0.1, "hidden_dropout_prob": 0.1},
        "switch": {"router_aux_loss_coef": 0.2, "hidden_dropout_prob": 0.1},  # the prefixed value wins
    }


def test_trainer_files_asked_for_are_kept_in_the_run_folder_and_none_otherwise(toy_recipe, tmp_path):
    argv = ["train", "toy_digits", "--fast", "--no-progress", "--variants", "comet"]
    assert main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "trainer").exists() and not any(p.name.startswith(".") for p in (tmp_path / "plain").iterdir())
    assert main([*argv, "--save_strategy", "steps", "--save_steps", "2", "--output-dir", str(tmp_path / "kept")]) == 0
    assert (tmp_path / "kept" / "trainer" / "comet" / "checkpoint-2" / "trainer_state.json").is_file()


def test_mixtral_s_field_names_reach_the_variants_as_ours_and_typos_are_refused():
    from hf_comet.training.recipes.base import variant_overrides

    assert variant_overrides("comet_vit", ["dense", "topk"], {"num_local_experts": 4}) == {"topk": {"num_experts": 4}}
    assert variant_overrides("comet_vit", ["topk", "comet"], {"topk.num_local_experts": 2}) == {
        "topk": {"num_experts": 2},
        "comet": {},
    }
    with pytest.raises(RecipeArgumentError, match="'num_experts_per_token' is not a comet_vit config field"):
        variant_overrides("comet_vit", ["topk"], {"num_experts_per_token": 2})
