"""Recipes: MoE variants against a dense baseline on real data that ships offline, trained with `CometTrainer`.

Each recipe is one `Recipe` object in its own module (``vit_digits``, ``gpt2_text``, ``bert_mlm_cls``), registered in
`RECIPES`. It has a ``fast`` preset (seconds; tests) and a ``full`` one (minutes on 2 CPU cores; README results);
`run_recipe` trains its variants side by side and writes into the output folder:

* ``metrics.json`` (settings, per variant: metrics, parameters, runtime, telemetry of the last window),
* ``loss_curves.png``, and per MoE variant ``expert_load_<variant>.png`` and ``overlap_similarity_<variant>.png``,
* one checkpoint folder per variant (loadable with the Auto classes) with a model card for the MoE ones.

``run_recipe(..., dataset=DatasetSource(PATH, ...))`` (``hf-comet train NAME --dataset PATH``) trains on a user's
data instead: a saved `datasets` folder or a json/csv file (`data_sources`). Data are `datasets.Dataset` objects
(texts tokenised with ``Dataset.map``), and accuracy comes from the `evaluate` module shipped in `hf_comet.metrics`.
Every reported loss is `mean_label_loss` (one denominator for the dense baseline and the MoE variants).

Recipes: ``vit_digits`` (image classification on scikit-learn's digits; the demo), ``gpt2_text`` (byte-level causal
LM on CPython's bundled English documentation, validation perplexity), ``bert_mlm_cls`` (byte-level masked-LM
pre-training on the same text, then sequence classification of standard-library docstrings by topic).

A new recipe is a module that builds a `Recipe` (presets, family, default variants, shared config fields, a runner
that trains one `VariantJob`) and calls `register_recipe`; ``hf-comet train NAME`` then runs it.
"""

from .base import (
    MIN_SETTINGS,
    RECIPES,
    DatasetSource,
    Recipe,
    RecipeArgumentError,
    RecipeData,
    ReloadCheck,
    Rows,
    Settings,
    StopOnNonFinite,
    TrainingDiverged,
    VariantJob,
    VariantResult,
    VariantRun,
    accuracy,
    build_model,
    check_recipe_outputs,
    load_recipe_data,
    mean_label_loss,
    recipe_outputs,
    register_recipe,
    run_recipe,
    torch_dataset,
    train_model,
    validate_recipe_arguments,
    variant_config_fields,
    variant_names,
)

# Each module registers its recipe on import, and `RECIPES` lists them in this order.
# isort: off
from . import vit_digits, gpt2_text, bert_mlm_cls  # noqa: E402, F401
# isort: on


__all__ = [
    "MIN_SETTINGS",
    "RECIPES",
    "DatasetSource",
    "Recipe",
    "RecipeArgumentError",
    "RecipeData",
    "ReloadCheck",
    "Rows",
    "Settings",
    "StopOnNonFinite",
    "TrainingDiverged",
    "VariantJob",
    "VariantResult",
    "VariantRun",
    "accuracy",
    "build_model",
    "check_recipe_outputs",
    "load_recipe_data",
    "mean_label_loss",
    "recipe_outputs",
    "register_recipe",
    "run_recipe",
    "torch_dataset",
    "train_model",
    "validate_recipe_arguments",
    "variant_config_fields",
    "variant_names",
]
