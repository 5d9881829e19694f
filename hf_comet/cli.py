"""The ``hf-comet`` command: ``hf-comet --version``, ``hf-comet info``, ``hf-comet demo``."""

from __future__ import annotations

import argparse
import sys


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


def _demo(args: argparse.Namespace) -> int:
    from hf_comet.demo import run_demo

    steps = 20 if args.fast else args.steps
    print(f"Training each family with COMET and softmax top-k routing for {steps} steps on bundled real data...")
    print(f"{'family':<11} {'router':<6} {'metric':<21} {'before':>8}    {'after':>8}")
    results = run_demo(args.output_dir, steps=steps, seed=args.seed)
    print(f"Checkpoints saved under {args.output_dir}/ (load them with the transformers Auto classes).")
    return 0 if all(r.reload_identical for r in results) else 1


def build_parser() -> argparse.ArgumentParser:
    from hf_comet import __version__

    parser = argparse.ArgumentParser(prog="hf-comet", description="Mixture-of-experts FFNs for GPT-2, ViT and BERT.")
    parser.add_argument("--version", action="version", version=f"hf-comet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="list model types, heads and routers")
    demo = commands.add_parser("demo", help="train, evaluate, save and reload every family on bundled real data")
    demo.add_argument("--output-dir", default="runs/demo", help="where the checkpoints go (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=300, help="training steps per model (default: 300)")
    demo.add_argument("--fast", action="store_true", help="20 steps per model, for a quick check")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.steps < 1:
        build_parser().error(f"--steps {args.steps}: must be at least 1")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
