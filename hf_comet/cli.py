"""The ``hf-comet`` command: ``--version``, ``info``, ``demo`` (the README's main job), ``train RECIPE`` and
``convert SRC DST``."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _info() -> int:
    import torch
    import transformers

    import hf_comet
    from hf_comet.modeling import FAMILIES, ROUTINGS

    print(f"hf-comet {hf_comet.__version__} (transformers {transformers.__version__}, torch {torch.__version__})")
    print(f"routings: {', '.join(ROUTINGS)}")
    for model_type, (config_class, auto_classes) in FAMILIES.items():
        print(f"{model_type}: {config_class.__name__}")
        for auto_name, model_class in auto_classes.items():
            print(f"  {auto_name:<36} {model_class.__name__}")
    return 0


def _quiet_transformers() -> None:
    """Keep the console to our tables and the training progress bar (no save/load bars or load reports)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


DEMO_RECIPE = "vit_digits"


def _demo(args: argparse.Namespace) -> int:
    from hf_comet.training.recipes import RECIPES, run_recipe

    _quiet_transformers()
    setting = "fast" if args.fast else "full"
    print(
        f"hf-comet demo: COMET vs top-k vs dense ViT on scikit-learn's digits ({setting} setting) -> {args.output_dir}"
    )
    summary = run_recipe(DEMO_RECIPE, args.output_dir, fast=args.fast, seed=args.seed, progress=not args.no_progress)
    return _report(summary, args.output_dir, reload_checks=RECIPES[DEMO_RECIPE].check_reload(summary))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["comet_keep_rate=0.25", "moe_layers=[0,2]"]`` -> a dict; values are JSON when they parse, else strings."""
    import json

    from hf_comet.training.recipes import RecipeArgumentError

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeArgumentError(f"{item!r} is not KEY=VALUE (e.g. comet_keep_rate=0.25).")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


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
    print()
    print(format_table(summary))
    status = 0
    for check in reload_checks or []:
        status |= 0 if check.matches else 1
        print(
            f"{check.variant:<6} reloads with {check.auto_class} as {check.model_class}: "
            f"{check.metric.replace('_', ' ')} {check.reloaded:.4f} "
            f"{'(as trained)' if check.matches else '(DIFFERS from training!)'}"
        )
    print(
        f"\nmetrics.json, loss_curves.png, expert_load_*.png, overlap_similarity_*.png and checkpoints with model "
        f"cards are in {output_dir}/"
    )
    return status


def _train(args: argparse.Namespace) -> int:
    from hf_comet.training.recipes import RecipeArgumentError, run_recipe, validate_recipe_arguments

    variants = args.variants.split(",") if args.variants else None
    try:  # every argument is checked here, before anything is trained or written
        overrides = parse_overrides(args.set)
        settings = parse_overrides(args.setting)
        if args.steps is not None:
            settings["steps"] = args.steps
        validate_recipe_arguments(args.recipe, args.fast, variants, overrides, settings)
    except RecipeArgumentError as error:
        print(f"hf-comet train: {error}", file=sys.stderr)
        return 2
    _quiet_transformers()
    output_dir = args.output_dir or f"runs/{args.recipe}"
    summary = run_recipe(
        args.recipe,
        output_dir,
        fast=args.fast,
        variants=variants,
        overrides=overrides,
        settings=settings,
        seed=args.seed,
        progress=not args.no_progress,
    )
    return _report(summary, output_dir)


PROVENANCE_FIELDS = ("converted_from", "conversion_method", "split_method", "conversion_seed")


def _moe_field_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add every MoE config field as a dashed flag (``--comet-keep-rate 0.5``, ``--moe-layers 0,2``,
    ``--norm-topk-prob/--no-norm-topk-prob``); defaults stay unset so the config's own defaults apply."""
    import dataclasses

    from hf_comet.modeling.configuration_comet import CometMoEConfigMixin

    names = []
    group = parser.add_argument_group("MoE config fields (see docs/config.md; unset = the config default)")
    for field in dataclasses.fields(CometMoEConfigMixin):
        if field.name in PROVENANCE_FIELDS or field.name == "output_router_logits":
            continue
        flag = "--" + field.name.replace("_", "-")
        annotation = str(field.type)
        if "bool" in annotation:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=field.name)
        elif "list" in annotation:
            group.add_argument(flag, type=_int_list, default=None, dest=field.name, metavar="I,J,...")
        elif "float" in annotation:
            group.add_argument(flag, type=float, default=None, dest=field.name)
        elif "int" in annotation:
            group.add_argument(flag, type=int, default=None, dest=field.name)
        else:
            group.add_argument(flag, default=None, dest=field.name)
        names.append(field.name)
    return names


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from error


def _convert(args: argparse.Namespace, field_names: list[str]) -> int:
    from pathlib import Path

    from tqdm.auto import tqdm

    from hf_comet.convert import ConversionError, convert_to_moe, deviation_report
    from hf_comet.io import atomic_save_pretrained

    fields = {name: getattr(args, name) for name in field_names if getattr(args, name) is not None}
    destination = Path(args.destination)
    if destination.exists() and not args.overwrite and not args.report_only:
        print(f"hf-comet convert: {destination} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    _quiet_transformers()
    stages = tqdm(total=3, desc="convert", disable=args.no_progress)
    split_method = args.split_method if args.method == "split" else None
    try:  # everything that can fail runs before anything is written
        eval_inputs = None
        if args.eval_inputs:
            import torch

            try:
                eval_inputs = torch.load(args.eval_inputs, weights_only=True)
            except (OSError, RuntimeError, ValueError) as error:
                raise ConversionError(f"--eval-inputs {args.eval_inputs}: cannot be read ({error}).") from error
            if not isinstance(eval_inputs, dict) or "labels" not in eval_inputs:
                raise ConversionError(
                    f"--eval-inputs {args.eval_inputs}: expected a torch.save'd dict of model inputs with 'labels'."
                )
        stages.set_postfix_str("loading and mapping weights")
        model = convert_to_moe(args.source, args.method, split_method=split_method, seed=args.seed, **fields)
        stages.update(1)
        rows = []
        if args.report or args.report_only:
            stages.set_postfix_str("deviation sweep")
            sweep = args.sweep or ([0.25, 0.5, 0.75, 1.0] if args.method == "comet" else None)
            if sweep is None:
                experts = model.config.num_experts
                sweep = sorted({1, 2, max(1, experts // 2), experts})
            try:
                rows = deviation_report(
                    args.source,
                    args.method,
                    sweep,
                    inputs=eval_inputs,
                    split_method=split_method,
                    seed=args.seed,
                    **fields,
                )
            except ConversionError:
                raise
            except (ValueError, RuntimeError) as error:
                raise ConversionError(f"the deviation report failed: {error}") from error
        stages.update(1)
        if not args.report_only:
            stages.set_postfix_str(f"saving to {destination}")
            atomic_save_pretrained(model, destination)
        stages.update(1)
    except ConversionError as error:
        stages.close()
        print(f"hf-comet convert: {error}", file=sys.stderr)
        return 2
    stages.close()
    if not args.report_only:
        print(f"{type(model).__name__} ({model.config.routing}, method {args.method}) saved to {destination}")
    if rows:
        what = "comet_keep_rate" if args.method == "comet" else "experts per token"
        where = f"on {args.eval_inputs}" if args.eval_inputs else "on seeded random inputs"
        print(f"\ndeviation from the dense model before training ({what} sweep, {where}):")
        task = [k for k in ("eval_loss", "accuracy", "perplexity") if k in rows[-1]]
        print(
            f"{what:>18} {'max |error|':>12} {'mean |error|':>13} {'argmax agree':>13}"
            + "".join(f"{k:>11}" for k in task)
        )
        for row in rows:
            agree = f"{row['argmax_agreement']:.3f}" if "argmax_agreement" in row else "-"
            cells = "".join(f"{row[k]:>11.4f}" for k in task)
            setting = row["setting"] if isinstance(row["setting"], str) else f"{row['setting']:g}"
            print(f"{setting:>18} {row['max_abs_error']:>12.3e} {row['mean_abs_error']:>13.3e} {agree:>13}{cells}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from pathlib import Path

    import transformers

    from hf_comet.cards import write_model_card

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").exists():
        print(f"hf-comet card: {checkpoint} has no config.json (not a saved checkpoint).", file=sys.stderr)
        return 2
    if (checkpoint / "README.md").exists() and not args.overwrite:
        print(f"hf-comet card: {checkpoint / 'README.md'} exists; pass --overwrite to replace it.", file=sys.stderr)
        return 2
    _quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    if not hasattr(config, "routing"):
        print(f"hf-comet card: {checkpoint} is a {config.model_type} checkpoint, not an hf_comet one.", file=sys.stderr)
        return 2
    architecture = (config.architectures or ["AutoModel"])[0]
    from hf_comet.modeling import FAMILIES

    classes = {cls.__name__: cls for cls in FAMILIES[config.model_type][1].values()}
    model = classes.get(architecture, next(iter(classes.values()))).from_pretrained(checkpoint)
    plots = sorted(p.name for p in checkpoint.glob("*.png"))
    path = write_model_card(model, checkpoint, plots=plots, repo_id=args.repo_id)
    print(f"model card written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hf_comet import __version__
    from hf_comet.convert import DEFAULT_SPLIT_METHOD, METHODS, SPLIT_METHODS

    parser = argparse.ArgumentParser(prog="hf-comet", description="Mixture-of-experts FFNs for GPT-2, ViT and BERT.")
    parser.add_argument("--version", action="version", version=f"hf-comet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="list model types, heads and routers")
    demo = commands.add_parser(
        "demo", help="train COMET, top-k and dense ViT side by side on scikit-learn's digits (~2 min), compare, save"
    )
    demo.add_argument("--output-dir", default="runs/demo", help="where results and checkpoints go (default: runs/demo)")
    demo.add_argument("--fast", action="store_true", help="a few steps per model, for a quick check")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    from hf_comet.training.recipes import RECIPES

    train = commands.add_parser("train", help="run a recipe: " + ", ".join(RECIPES))
    train.add_argument("recipe", choices=RECIPES)
    train.add_argument("--fast", action="store_true", help="the seconds-long setting (the full one takes minutes)")
    train.add_argument("--variants", help="comma-separated: dense and/or routings, e.g. dense,comet,topk,block_comet")
    train.add_argument("--steps", type=int, help="training steps per variant (default: the setting's)")
    train.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="MoE config field, e.g. comet_keep_rate=0.25"
    )
    train.add_argument(
        "--setting", action="append", default=[], metavar="NAME=VALUE", help="recipe setting, e.g. batch_size=16"
    )
    train.add_argument("--output-dir", help="default: runs/RECIPE")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    convert = commands.add_parser(
        "convert", help=f"convert a dense GPT-2/ViT/BERT checkpoint into an MoE checkpoint ({', '.join(METHODS)})"
    )
    convert.add_argument("source", help="folder of a checkpoint saved by a stock transformers GPT-2/ViT/BERT class")
    convert.add_argument("destination", help="folder for the MoE checkpoint (written atomically)")
    convert.add_argument("--method", choices=list(METHODS), default="comet")
    convert.add_argument(
        "--split-method",
        choices=list(SPLIT_METHODS),
        default=DEFAULT_SPLIT_METHOD,
        help=f"unit partition for --method split (default: {DEFAULT_SPLIT_METHOD})",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the router init and the unit partition")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument("--report", action="store_true", help="also print the deviation from the dense model")
    convert.add_argument("--report-only", action="store_true", help="print the deviation sweep, write nothing")
    convert.add_argument(
        "--sweep", type=lambda t: [float(x) for x in t.split(",")], help="keep rates (comet) or k values to report"
    )
    convert.add_argument(
        "--eval-inputs",
        help="a torch.save'd dict of model inputs with labels: the report adds loss/accuracy/perplexity",
    )
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_moe_fields=_moe_field_flags(convert))

    card = commands.add_parser("card", help="write the model card (README.md) of a saved hf_comet checkpoint")
    card.add_argument("checkpoint")
    card.add_argument("--repo-id", help="the Hub repo id to show in the loading snippet")
    card.add_argument("--overwrite", action="store_true", help="replace an existing README.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "train":
        return _train(args)
    if args.command == "convert":
        return _convert(args, args._moe_fields)
    if args.command == "card":
        return _card(args)
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
