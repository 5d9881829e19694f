"""``hf-comet --help``, every ``hf-comet SUB --help`` and ``--version`` load no torch: argument parsing is all they do.

The guard is the import graph (which modules a real ``python -m hf_comet.cli`` process loads), not a timing. The
parser's choices are literals in `hf_comet.names`; here they are compared with the registries they stand for."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_comet import names

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("info", "demo", "train", "convert", "bench", "reproduce", "card", "sparsify")
HEAVY = ("torch", "transformers", "datasets", "safetensors", "numpy", "tqdm", "matplotlib", "sklearn", "accelerate")
HEAVY_OURS = ("hf_comet.modeling", "hf_comet.convert", "hf_comet.training", "hf_comet.reproduce", "hf_comet.bench")

PROBE = """
import contextlib, io, json, sys
import hf_comet
package = set(sys.modules)
from hf_comet.cli import build_parser, main
for argv in [["--help"], ["--version"], *[[sub, "--help"] for sub in SUBCOMMANDS]]:
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
        build_parser().parse_args(argv)
    assert out.getvalue().strip(), argv
print(json.dumps({"package": sorted(package), "cli": sorted(set(sys.modules) - package)}))
"""


def _is(module: str, roots) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[str]]:
    """What a fresh process loads for ``import hf_comet``, and what parsing every ``--help`` adds to it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    probe = f"SUBCOMMANDS = {SUBCOMMANDS!r}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_parsing_every_help_and_the_version_loads_nothing_heavy(loaded):
    heavy = [m for m in loaded["cli"] if _is(m, HEAVY) or _is(m, HEAVY_OURS) and m != "hf_comet.bench_arguments"]
    assert heavy == [], f"argument parsing imported {heavy[:10]}"


def test_the_cli_process_loads_no_torch_once_the_package_does_not(loaded):
    """The whole process, ``python -m hf_comet.cli SUB --help``: no torch at all, once ``import hf_comet`` itself loads
    none (the package's lazy start; until then the test above guards what the CLI adds)."""
    if "torch" in loaded["package"]:
        pytest.skip("`import hf_comet` loads torch itself (the package's eager imports), so the CLI process does too")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    for sub in SUBCOMMANDS:
        command = [sys.executable, "-X", "importtime", "-m", "hf_comet.cli", sub, "--help"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and "usage: hf-comet" in done.stdout, done.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
        assert not {m for m in imported if _is(m, ("torch",))}, sub


def test_the_version_is_the_package_s(capsys):
    import hf_comet
    from hf_comet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"hf-comet {hf_comet.__version__}\n"


def test_train_help_says_every_training_argument_is_accepted_and_how_to_list_them(capsys):
    from hf_comet.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "Every transformers TrainingArguments flag is accepted" in out and "--report_to tensorboard" in out and "OUTPUT/trainer/VARIANT" in out
    assert "HfArgumentParser(TrainingArguments).print_help()" in out and "--routing-logging" in out


# -- the literals and the registries they stand for -------------------------------------------------------------------
def test_the_parser_s_names_are_the_registries():
    from hf_comet import bench
    from hf_comet.convert import DEFAULT_SPLIT_METHOD, METHODS, SPLIT_METHODS
    from hf_comet.modeling import ROUTINGS
    from hf_comet.modeling.configuration_comet import CometMoEConfigMixin
    from hf_comet.training import recipes
    from hf_comet.training.recipes import RECIPES, variant_names
    from hf_comet.training.trainer import ROUTING_LOGGING

    assert set(names.RECIPE_NAMES) <= set(RECIPES) and names.DEMO_RECIPE in RECIPES
    built_in = Path(recipes.__file__).parent  # each built-in recipe is a module of its name there
    assert names.RECIPE_NAMES == tuple(name for name in RECIPES if (built_in / f"{name}.py").is_file())
    assert names.ROUTINGS == tuple(ROUTINGS) and names.VARIANTS == variant_names()
    assert names.CONVERSION_METHODS == tuple(METHODS) and names.SPLIT_METHODS == tuple(SPLIT_METHODS)
    assert names.DEFAULT_SPLIT_METHOD == DEFAULT_SPLIT_METHOD and names.BENCH_SECTIONS == bench.SECTIONS
    assert names.ROUTING_LOGGING == ROUTING_LOGGING
    from hf_comet.convert.sparse import CLUSTERS, ROUTERS

    assert names.SPARSIFY_CLUSTERS == CLUSTERS and names.SPARSIFY_ROUTERS == ROUTERS
    kinds = {}
    for field in dataclasses.fields(CometMoEConfigMixin):
        annotation = str(field.type)
        kinds[field.name] = next(k for k in ("bool", "list", "float", "int", "str") if k in annotation)
    assert names.MOE_FIELD_KINDS == kinds
