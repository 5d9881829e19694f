"""The ``hf-comet`` command (``info``, ``demo``, ``train``, ``convert``, ``card``, ``bench``, ``reproduce``): a thin
layer that parses arguments and formats results. The work and its checks live in the library (paths and checkpoints
in `hf_comet.io`, conversion in `hf_comet.convert.checkpoint`, recipe runs in `hf_comet.training.recipes`), so Python
users get the same checks. Parsing loads no torch (``--help`` is instant; its choices come from `hf_comet.names`).

A user's mistake never shows a traceback: every check runs before anything is written, and a failed one prints
``hf-comet <command>: error: <what, which value, what to do>`` on stderr and exits 2, like argparse's own refusals.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .io import UserError, loads_json, non_finite

from .names import BENCH_SECTIONS, CONVERSION_METHODS, DEFAULT_SPLIT_METHOD, DEMO_RECIPE, MOE_FIELD_KINDS  # isort: skip
from .names import PROVENANCE_FIELDS, RECIPE_NAMES, ROUTING_LOGGING, SPLIT_METHODS, VARIANTS  # isort: skip
from .names import SPARSIFY_CLUSTERS, SPARSIFY_ROUTERS  # isort: skip

__all__ = ["UserError", "build_parser", "format_table", "main", "parse_overrides"]


# -- argument types (argparse turns their refusals into "hf-comet CMD: error: argument --flag: ..." and exit 2) ----
def finite_float(text: str) -> float:
    """A float flag: any number but NaN and +-infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _list_of(kind, what: str):
    """An argument type for ``a,b,...``: at least one item, each of ``kind`` (``float_list``: finite numbers)."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}")
        try:
            return [kind(part) for part in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    return parse


finite_float_list = _list_of(finite_float, "numbers (e.g. 0.25,0.5)")
_int_list = _list_of(int, "integers (e.g. 0,2)")


SEED_RANGE = (0, 2**32 - 1)
"""Seeds every generator we seed accepts (numpy's is the narrowest)."""


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is outside the seed range {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    return value


def repo_id(text: str) -> str:
    """``--repo-id``: a Hub repo id, ``name`` or ``namespace/name``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id ({error})") from None
    return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["comet_keep_rate=0.25", "moe_layers=[0,2]"]`` -> a dict; values are JSON when they parse, else strings.
    Refuses an item that is not KEY=VALUE, a key given twice, and NaN or infinity in any value."""
    from hf_comet.training.recipes import RecipeArgumentError

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeArgumentError(f"{item!r} is not KEY=VALUE (e.g. comet_keep_rate=0.25).")
        if key in overrides:
            raise RecipeArgumentError(f"{key} is given twice ({key}={overrides[key]!r} and {item!r}); give it once.")
        try:
            parsed = loads_json(value, f"{key}={value[:20]}...")
        except json.JSONDecodeError:  # a string, unless it spells NaN or an infinity JSON does not parse (nan, inf)
            parsed = value
            with contextlib.suppress(ValueError):
                parsed = value if math.isfinite(float(value)) else math.nan
        if non_finite(parsed) is not None:
            raise RecipeArgumentError(f"{key}={value!r} is not finite; give a finite number.")
        overrides[key] = parsed
    return overrides


def _variants(text: str | None) -> list[str] | None:
    """``dense,comet`` -> ``["dense", "comet"]``; ``None`` -> the recipe's defaults; empty names are refused."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not text.strip() or any(not name for name in names):
        raise UserError(f"--variants {text!r} has an empty name; give comma-separated variants, e.g. dense,comet.")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"--variants {text!r} names {', '.join(twice)} twice; give each variant once.")
    return names


# -- output ----------------------------------------------------------------------------------------------------------
def _quiet_transformers() -> None:
    """Keep the console to our tables and the training progress bar (load reports are checked, not printed)."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()  # Dataset.map and load_dataset of --dataset


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text comparison table of a recipe summary (one row per variant)."""
    variants = summary["variants"]
    keys = [k for k in next(iter(variants.values()))["metrics"] if k != "overlap_similarity_correlation"]
    header = f"{'variant':<12}" + "".join(f"{k:>22}" for k in keys) + f"{'params':>10}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for name, entry in variants.items():
        cells = "".join(f"{entry['metrics'][k]:>22.4f}" for k in keys)
        lines.append(f"{name:<12}{cells}{entry['parameters']:>10,}{entry['train_seconds']:>9.1f}")
    return "\n".join(lines)


def _report(summary: dict, output_dir: str, reload_checks: list | None = None) -> int:
    """Print the comparison table and each reload check; 1 when a reloaded checkpoint scores differently."""
    print("\n" + format_table(summary))
    for check in reload_checks or []:
        print(f"{check.variant:<6} reloads with {check.auto_class} as {check.model_class}: "
              f"{check.metric.replace('_', ' ')} {check.reloaded:.4f} "
              f"{'(as trained)' if check.matches else '(DIFFERS from training!)'}")  # fmt: skip
    print(f"\nmetrics.json, loss_curves.png, expert_load_*.png, overlap_similarity_*.png and checkpoints with model "
          f"cards are in {output_dir}/")  # fmt: skip
    return 0 if all(check.matches for check in reload_checks or []) else 1


# -- the commands ----------------------------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from hf_comet.modeling import FAMILIES, FAMILY_ADAPTERS, ROUTINGS

    print(f"hf-comet {_version()} (transformers {transformers.__version__}, torch {torch.__version__})")
    print(f"routings: {', '.join(ROUTINGS)}")
    for model_type, (config_class, auto_classes) in FAMILIES.items():
        print(f"{model_type}: {config_class.__name__}")
        for auto_name, model_class in auto_classes.items():
            print(f"  {auto_name:<36} {model_class.__name__}")
        for model_class in FAMILY_ADAPTERS[model_type].other_classes:
            print(f"  {'(no Auto class: load by class)':<36} {model_class.__name__}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hf_comet.training.recipes import RECIPES, base

    prepared = base.prepare_recipe_run(DEMO_RECIPE, args.output_dir, fast=args.fast, seed=args.seed, what="--output-dir",
                                       overwrite=args.overwrite)  # fmt: skip
    _quiet_transformers()
    setting = "fast" if args.fast else "full"
    print(f"hf-comet demo: COMET vs top-k vs dense ViT on scikit-learn's digits ({setting} setting) -> {args.output_dir}")
    summary = base.run_prepared(prepared, progress=not args.no_progress)
    return _report(summary, args.output_dir, reload_checks=RECIPES[DEMO_RECIPE].check_reload(summary))


def _dataset_source(args: argparse.Namespace):
    """The `DatasetSource` of ``--dataset`` and the column flags (``None`` without ``--dataset``)."""
    from hf_comet.training.recipes import DatasetSource

    columns = {name: getattr(args, name) for name in ("text_column", "image_column", "label_column")}
    if args.dataset is None:
        given = [f"--{name.replace('_', '-')}" for name, value in columns.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} names a column of --dataset PATH; give --dataset too.")
        return None
    for name, value in columns.items():
        if value is not None and not value.strip():
            raise UserError(f"--{name.replace('_', '-')} is empty; give a column name.")
    return DatasetSource(args.dataset, **columns)


def _train(args: argparse.Namespace) -> int:
    from hf_comet.training.recipes import base

    # every argument is checked here and in prepare_recipe_run, once, before anything is trained or written
    variants = _variants(args.variants)
    overrides = parse_overrides(args.set)
    settings = parse_overrides(args.setting)
    if args.steps is not None:
        if "steps" in settings:
            raise UserError(f"--steps {args.steps} and --setting steps={settings['steps']!r} both set steps; give one.")
        settings["steps"] = args.steps
    training_args = base.parse_training_arguments(args.training_arguments)
    source = _dataset_source(args)
    _quiet_transformers()
    output_dir = args.output_dir if args.output_dir is not None else f"runs/{args.recipe}"
    prepared = base.prepare_recipe_run(
        args.recipe, output_dir, fast=args.fast, variants=variants, overrides=overrides, settings=settings,
        seed=args.seed, dataset=source, training_args=training_args, routing_logging=args.routing_logging,
        what="--output-dir", overwrite=args.overwrite,
    )  # fmt: skip
    summary = base.run_prepared(prepared, progress=not args.no_progress)
    return _report(summary, output_dir)


def _check_convert_flags(args: argparse.Namespace) -> None:
    """Flags that conflict or would be ignored (the values themselves are `convert_checkpoint`'s to check)."""
    if args.split_method is not None and args.method != "split":
        raise UserError(f"--split-method {args.split_method} applies only to --method split, not --method "
                        f"{args.method}; leave it out.")  # fmt: skip
    if args.report_only and args.overwrite:
        raise UserError("--overwrite has no effect with --report-only, which writes nothing; give one of them.")
    if not (args.report or args.report_only):
        for flag, value in (("--sweep", args.sweep), ("--eval-inputs", args.eval_inputs)):
            if value is not None:
                raise UserError(f"{flag} only applies with --report or --report-only; add one or leave {flag} out.")


def _convert(args: argparse.Namespace) -> int:
    from hf_comet.convert.checkpoint import convert_checkpoint, format_deviation

    _check_convert_flags(args)
    _quiet_transformers()
    fields = {name: getattr(args, name) for name in _MOE_FLAGS if getattr(args, name) is not None}
    result = convert_checkpoint(
        args.source, None if args.report_only else args.destination, method=args.method,
        split_method=args.split_method, seed=args.seed, overwrite=args.overwrite, report=args.report, sweep=args.sweep,
        eval_inputs=args.eval_inputs, progress=not args.no_progress, **fields,
    )  # fmt: skip
    if result.destination is not None:
        model = result.model
        print(f"{type(model).__name__} ({model.config.routing}, method {args.method}) saved to {result.destination}")
    if result.rows:
        where = f"on {args.eval_inputs}" if args.eval_inputs else "on seeded random inputs"
        print("\n" + format_deviation(result.rows, result.sweep_label, where))
    return 0


def _sparsify(args: argparse.Namespace) -> int:
    from hf_comet.convert.checkpoint import format_sparsified, sparsify_checkpoint

    _quiet_transformers()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and args.rounds:
        print("note: OMP_WAIT_POLICY=PASSIVE is not set; spin-waiting threads can distort the timing "
              "(run as `OMP_WAIT_POLICY=PASSIVE hf-comet sparsify ...`)", file=sys.stderr)  # fmt: skip
    result = sparsify_checkpoint(
        args.source, args.destination, keep_rate=args.keep_rate, block_size=args.block_size,
        calibration=args.calibration, cluster=args.cluster, router=args.router, seed=args.seed,
        overwrite=args.overwrite, rounds=args.rounds,
    )  # fmt: skip
    config = result.model.config
    units = {"coactivation": "units that fire together", "none": "consecutive units"}[config.sparsify_cluster]
    router = "fitted router" if config.comet_router == "fitted" else "COMET's random router"
    print(f"{type(result.model).__name__}: block-COMET, blocks of {config.comet_block_size} {units}, keep "
          f"{config.comet_keep_rate:g}, {router}; saved to {result.destination}")  # fmt: skip
    print(format_sparsified(result))
    return 0


def _card(args: argparse.Namespace) -> int:
    from hf_comet.cards import write_model_card
    from hf_comet.io import check_finite_weights, checkpoint_folder, destination_file, load_checked
    from hf_comet.modeling import FAMILIES

    _quiet_transformers()
    saved = checkpoint_folder(args.checkpoint, "checkpoint")
    checkpoint, readme = Path(args.checkpoint), Path(args.checkpoint, "README.md")
    if saved["model_type"] not in FAMILIES:
        raise UserError(f"checkpoint {args.checkpoint!r} is a {saved['model_type']} checkpoint, not an hf_comet one; "
                        "convert it first with hf-comet convert.")  # fmt: skip
    destination_file(readme, "model card")
    if os.path.lexists(readme) and not args.overwrite:
        raise UserError(f"{str(readme)!r} exists; pass --overwrite to replace it.")
    if not os.access(checkpoint, os.W_OK | os.X_OK):
        raise UserError(f"checkpoint {args.checkpoint!r} is not writable, so README.md cannot be written there.")
    model = load_checked(checkpoint, "checkpoint")
    check_finite_weights(model, f"checkpoint {args.checkpoint!r}")  # a broken model is never carded
    try:
        path = write_model_card(model, checkpoint, plots=sorted(p.name for p in checkpoint.glob("*.png")),
                                repo_id=args.repo_id)  # fmt: skip
    except OSError as error:
        raise UserError(f"cannot write {str(readme)!r} ({error}); what was there before is unchanged.") from error
    print(f"model card written to {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hf_comet import bench

    argv = [*args.sections, *(["--quick"] if args.quick else []), "--threads", str(args.threads)]
    argv += [item for flag in ("rounds", "json", "readme") if getattr(args, flag) is not None
             for item in (f"--{flag}", str(getattr(args, flag)))]  # fmt: skip
    try:
        return bench.run_from_args(args, argv)
    except ValueError as error:
        raise UserError(str(error)) from None


def _reproduce(args: argparse.Namespace) -> int:
    from hf_comet.io import destination_file, run_folder, write_failures
    from hf_comet.reproduce import CLAIMS, MissingRuns, reproduce

    unknown = [claim for claim in args.claims if claim not in CLAIMS]
    if unknown:
        raise UserError(f"unknown claim(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CLAIMS)}.")
    cache = Path(args.cache)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"--cache {args.cache!r} is a file, not a folder; remove it or choose another path.")
    if args.render and not cache.is_dir():  # rendering reads runs and creates no cache
        raise UserError(f"--render reads finished runs from --cache {args.cache!r}, which does not exist; run "
                        "`hf-comet reproduce` first or point --cache at the runs.")  # fmt: skip
    if not args.render:  # runs write into the cache; rendering only reads it
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--cache {args.cache!r} cannot be created ({error}).") from None
        run_folder(cache, "--cache", folders=[], files=[])  # it takes new files: found before the runs, not after
    page = Path(args.page) if args.page else (Path(args.cache, "quick", "results.md") if args.quick else None)
    page = page or Path("docs/results.md")
    destination_file(page, "results page")
    with write_failures(page, "results page or --cache"):  # a full disk or read-only place: one line
        try:
            results = reproduce(args.claims or None, quick=args.quick, cache_dir=args.cache, page=page,
                                render=args.render)  # fmt: skip
        except MissingRuns as error:
            raise UserError(str(error)) from None
    for result in results:
        print(f"{result.name}: {result.verdict} ({result.seconds / 60:.1f} min)")
    print(f"results page written to {page}")
    return 0


COMMANDS = {
    "info": _info, "demo": _demo, "train": _train, "convert": _convert, "card": _card, "bench": _bench,
    "reproduce": _reproduce, "sparsify": _sparsify,
}  # fmt: skip


# -- the parser (light modules only: no torch, transformers or registries) ------------------------------------------
def _version() -> str:
    """The installed distribution's version, read from its metadata (importing nothing of the package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hf-comet")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):  # argparse's "version" action, reading the version only when asked
    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hf-comet {_version()}") or parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse, refusing like every other mistake: ``hf-comet CMD: error: ...`` (exit 2) and a pointer to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


_MOE_FLAGS = [name for name in MOE_FIELD_KINDS if name not in PROVENANCE_FIELDS and name != "output_router_logits"]
_MOE_TYPES = {"list": _int_list, "float": finite_float, "int": int, "str": None}

TRAIN_EPILOG = """\
Every transformers TrainingArguments flag is accepted too (after the recipe name) and reaches each variant's
Trainer, e.g. --report_to tensorboard --gradient_accumulation_steps 4 --weight_decay 0.0 --lr_scheduler_type linear.
--learning_rate, --max_steps, --per_device_train_batch_size, --logging_steps and --eval_steps set the recipe settings
of the same meaning; --output_dir and --seed are the recipe's (use --output-dir, --seed). A recipe reports nowhere
unless asked; reporter logs and Trainer checkpoints go to OUTPUT/trainer/VARIANT. List the flags with:
  python -c "from transformers import HfArgumentParser, TrainingArguments; HfArgumentParser(TrainingArguments).print_help()"
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-comet`` parser; builds without importing torch (choices come from `hf_comet.names`)."""
    parser = _Parser(prog="hf-comet", description="Mixture-of-experts FFNs for GPT-2, ViT and BERT.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="list model types, heads and routers")
    demo = commands.add_parser("demo", help="train COMET, top-k and dense ViT side by side on scikit-learn's digits "
                               "(~2 min), compare, save")  # fmt: skip
    demo.add_argument("--output-dir", default="runs/demo", help="where results and checkpoints go (default: runs/demo)")
    demo.add_argument("--fast", action="store_true", help="a few steps per model, for a quick check")
    demo.add_argument("--seed", type=seed_int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--overwrite", action="store_true", help="replace the previous run in --output-dir (your files stay)")

    train = commands.add_parser(
        "train", help="run a recipe: " + ", ".join(RECIPE_NAMES), epilog=TRAIN_EPILOG, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    train.add_argument("recipe", help=f"{', '.join(RECIPE_NAMES)} or a recipe registered with register_recipe")
    train.add_argument("--fast", action="store_true", help="the seconds-long setting (the full one takes minutes)")
    train.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)}")
    train.add_argument("--steps", type=int, help="training steps per variant (default: the setting's)")
    train.add_argument("--set", action="append", default=[], metavar="[VARIANT.]FIELD=VALUE",
                       help="config field of the MoE variants, e.g. comet_keep_rate=0.25 (every variant whose routing "
                       "reads it) or switch.capacity_factor=1.25 (that variant only); not routing: that is the variant's "
                       "name")  # fmt: skip
    train.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                       help="recipe setting, e.g. batch_size=16")  # fmt: skip
    train.add_argument("--output-dir", help="default: runs/RECIPE")
    train.add_argument("--overwrite", action="store_true", help="replace the previous run in --output-dir as a whole "
                       "(files of yours in it are kept); without it a folder that holds files is refused")  # fmt: skip
    train.add_argument("--seed", type=seed_int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--routing-logging", choices=ROUTING_LOGGING, default="summary",
                       help="routing telemetry per log line: model summaries (default), also every layer, or none")
    user_data = train.add_argument_group("your own data (instead of the recipe's; see the README's Training section)")
    user_data.add_argument("--dataset", metavar="PATH", help="a folder saved with save_to_disk (train + "
                           "test/validation splits, or one split: 20%% held out) or a .json/.jsonl/.csv file (20%% held "
                           "out, split with --seed)")  # fmt: skip
    user_data.add_argument("--text-column", help="the text column (gpt2_text, bert_mlm_cls; default: text)")
    user_data.add_argument("--image-column", help="the image column (vit_digits; default: image): nested lists "
                           "[channels][height][width] or [height][width], or a flat list / space-separated string of a "
                           "square grayscale image")  # fmt: skip
    user_data.add_argument("--label-column", help="the label column (vit_digits, bert_mlm_cls; default: label)")

    convert = commands.add_parser("convert", help="convert a dense GPT-2/ViT/BERT checkpoint into an MoE checkpoint "
                                  f"({', '.join(CONVERSION_METHODS)})")  # fmt: skip
    convert.add_argument("source", help="folder of a checkpoint saved by a stock transformers GPT-2/ViT/BERT class")
    convert.add_argument("destination", help="folder for the MoE checkpoint (written atomically)")
    convert.add_argument("--method", choices=CONVERSION_METHODS, default="comet")
    convert.add_argument("--split-method", choices=SPLIT_METHODS, default=None,
                         help=f"unit partition, only for --method split (default: {DEFAULT_SPLIT_METHOD})")
    convert.add_argument("--seed", type=seed_int, default=0, help="seed of the router init and the unit partition")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--report", action="store_true", help="also print the deviation from the dense model")
    convert.add_argument("--report-only", action="store_true", help="print the deviation sweep, write nothing")
    convert.add_argument("--sweep", type=finite_float_list, help="keep rates (comet) or k values to report, e.g. 0.25,0.5")
    convert.add_argument("--eval-inputs", help="a safetensors file of a labelled batch (e.g. input_ids and labels, "
                         "or pixel_values and labels; written with safetensors.torch.save_file): the report adds "
                         "loss/accuracy/perplexity")  # fmt: skip
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = convert.add_argument_group("MoE config fields (see docs/config.md; unset = the config default)")
    for name in _MOE_FLAGS:  # dashed flags (--comet-keep-rate 0.5, --moe-layers 0,2, --norm-topk-prob/--no-...)
        flag, kind = "--" + name.replace("_", "-"), MOE_FIELD_KINDS[name]
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=name)
        else:
            group.add_argument(flag, type=_MOE_TYPES[kind], dest=name, metavar="I,J,..." if kind == "list" else None)

    sparsify = commands.add_parser(
        "sparsify", help="turn a dense GPT-2/ViT/BERT checkpoint into a faster block-COMET one fitted to it; prints "
        "its deviation before fine-tuning and the speedup measured here")  # fmt: skip
    sparsify.add_argument("source", help="folder of a checkpoint saved by a stock transformers GPT-2/ViT/BERT class")
    sparsify.add_argument("destination", help="folder for the sparsified checkpoint (written atomically)")
    sparsify.add_argument("--keep-rate", type=finite_float, required=True, help="share of the blocks each token runs")
    sparsify.add_argument("--block-size", type=int, default=None, help="units per block (default: FFN width / 8)")
    sparsify.add_argument("--calibration", metavar="FILE", help="safetensors file of model inputs (input_ids and "
                          "attention_mask, or pixel_values) the blocks and router are fitted on; every 4th row is "
                          "held out for the deviation")  # fmt: skip
    sparsify.add_argument("--cluster", choices=SPARSIFY_CLUSTERS, default=None,
                          help="blocks of units that fire together (coactivation, default) or consecutive (none)")
    sparsify.add_argument("--router", choices=SPARSIFY_ROUTERS, default=None,
                          help="router fitted to the dense FFN's block importance (fitted, default) or COMET's "
                          "frozen random projection (random)")  # fmt: skip
    sparsify.add_argument("--seed", type=seed_int, default=0, help="seed of the clustering and the conversion")
    sparsify.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (0: no timing)")
    sparsify.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    from .bench_arguments import add_arguments as add_bench_arguments

    add_bench_arguments(commands.add_parser("bench", help="the speed/memory benchmark of the README "
                                            f"({', '.join(BENCH_SECTIONS)}; ~15 min; --quick: 1)"))  # fmt: skip
    reproduce = commands.add_parser("reproduce", help="the papers' claims over seeds, written to docs/results.md "
                                    "(resumable; --quick: tiny)")  # fmt: skip
    reproduce.add_argument("claims", nargs="*", metavar="CLAIM", help="claims to run (default: all)")
    reproduce.add_argument("--quick", action="store_true", help="tiny settings that check the pipeline, not results")
    reproduce.add_argument("--cache", default="runs/reproduce", help="folder of finished runs (resumed from)")
    reproduce.add_argument("--page", help="the results page to write (default docs/results.md; --quick: under --cache)")
    reproduce.add_argument("--render", action="store_true", help="train nothing: re-render the page from the cached "
                           "runs (the committed runs/reproduce/full/ give docs/results.md byte for byte)")  # fmt: skip

    card = commands.add_parser("card", help="write the model card (README.md) of a saved hf_comet checkpoint")
    card.add_argument("checkpoint")
    card.add_argument("--repo-id", type=repo_id, help="the Hub repo id to show in the loading snippet")
    card.add_argument("--overwrite", action="store_true", help="replace an existing README.md")
    parser.set_defaults(_subparsers=commands.choices)
    return parser


@contextlib.contextmanager
def _our_warnings_on_stderr(command: str) -> Iterator[None]:
    """hf_comet's own warnings (e.g. a source tensor its class does not use) as ``hf-comet CMD: warning: ...``."""
    package = str(Path(__file__).parent)
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package):
            print(f"hf-comet {command}: warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: list[str] | None = None) -> int:
    """Run ``hf-comet``; the one handler of user mistakes (`UserError`, which the recipes' and the converter's
    argument errors are too): the message on stderr as ``hf-comet <command>: error: ...`` and exit code 2. ``train``
    keeps the flags it does not know as TrainingArguments flags (``parse_training_arguments``); the others refuse."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown and args.command != "train":
        args._subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.training_arguments = unknown
    try:
        with _our_warnings_on_stderr(args.command):
            return COMMANDS[args.command](args)
    except UserError as error:
        print(f"hf-comet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-comet {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
