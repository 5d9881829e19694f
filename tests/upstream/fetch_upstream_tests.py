"""Assemble transformers' own test files for the adapters in this folder (into ``.upstream_tests/tests``).

The adapters need two kinds of files from transformers' ``tests/`` folder:

* the top-level mixins (``test_modeling_common.py``, ``test_configuration_common.py``, ``test_pipeline_mixin.py``,
  ``test_tensor_parallel_mixin.py``, ...): they ship in the transformers **sdist** on PyPI, so ``--sdist`` downloads
  the sdist of the installed version with pip and takes them from there;
* ``causal_lm_tester.py``, ``generation/test_utils.py``, ``exporters/``, ``utils/test_configuration_utils.py`` (with
  the repository's ``utils/test_module``) and the model tests ``models/{gpt2,bert,vit}/``: these live only in the
  transformers **repository**. Give a checkout with ``--checkout`` (a work tree, or a git directory with ``--rev``).

Usual use (exact match for the installed transformers)::

    git clone --depth 1 --branch v5.25.0 https://github.com/huggingface/transformers /tmp/transformers
    python tests/upstream/fetch_upstream_tests.py --checkout /tmp/transformers

    HF_COMET_UPSTREAM_TESTS=.upstream_tests/tests python -m pytest tests/upstream -q

or skip this script and point ``HF_COMET_UPSTREAM_TESTS`` at ``/tmp/transformers/tests``. The files land in
``.upstream_tests/`` (git-ignored). With both ``--checkout`` and ``--sdist`` the sdist's top-level files replace the
checkout's: use this when the only checkout at hand is older than the installed transformers (the adapters then mark
the few tests that fail for the dense upstream classes too). Nothing here is needed by the default test run: the
adapters skip unless ``HF_COMET_UPSTREAM_TESTS`` names a folder holding the files. The tests need ``parameterized``
and ``httpx`` besides the test extras.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO_ROOT / ".upstream_tests"

# Paths of the transformers repository that the adapters import (folders are copied whole); the top-level
# ``tests/*.py`` come as well. ``utils/test_module`` is imported by ``tests/utils/test_configuration_utils.py``.
FROM_REPOSITORY = [
    "tests/__init__.py",
    "tests/causal_lm_tester.py",
    "tests/distributed_testing_utils.py",
    "tests/generation/__init__.py",
    "tests/generation/test_utils.py",
    "tests/exporters",
    "tests/utils/__init__.py",
    "tests/utils/test_configuration_utils.py",
    "tests/utils/tiny_model_summary.json",
    "tests/models/__init__.py",
    "tests/models/gpt2",
    "tests/models/bert",
    "tests/models/vit",
    "utils/test_module",
]

# Stand-in written only when the repository version predates ``tests/distributed_testing_utils.py``; it is used by
# the multi-process tensor-parallel tests (skipped on a single device), which import only ``run_distributed``.
DISTRIBUTED_SHIM = '''"""Stand-in for transformers' tests/distributed_testing_utils.py (absent from the checkout used)."""

import os
import socket


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, func, args, kwargs):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        func(rank, *args, **kwargs)
    finally:
        dist.destroy_process_group()


def run_distributed(world_size=2):
    def decorator(func):
        def run(*args, **kwargs):
            import torch.multiprocessing as mp

            mp.spawn(_worker, args=(world_size, _free_port(), func, args, kwargs), nprocs=world_size, join=True)

        return run

    return decorator
'''


def _installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


def copy_from_checkout(checkout: Path, dest: Path, rev: str | None) -> list[str]:
    """Copy FROM_REPOSITORY (and the top-level ``tests/*.py``) from a work tree, or from ``rev`` of a git dir."""
    copied = []
    if rev is None:
        items = FROM_REPOSITORY + [f"tests/{p.name}" for p in (checkout / "tests").glob("*.py")]
        for rel in items:
            src = checkout / rel
            if not src.exists():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy2(src, target)
            copied.append(rel)
        return copied
    # A git directory (bare or not): ``git archive`` the wanted paths at ``rev``.
    git = ["git", "--git-dir", str(checkout / ".git") if (checkout / ".git").exists() else str(checkout)]
    listing = subprocess.run(
        [*git, "ls-tree", "--name-only", rev, "tests/"], check=True, capture_output=True, text=True
    )
    top_level = [p for p in listing.stdout.split() if p.endswith(".py")]
    wanted = []
    for rel in FROM_REPOSITORY + top_level:
        probe = subprocess.run([*git, "cat-file", "-e", f"{rev}:{rel}"], capture_output=True)
        if probe.returncode == 0:
            wanted.append(rel)
    archive = subprocess.run([*git, "archive", "--format=tar", rev, *wanted], check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                target = dest / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    return wanted


def copy_from_sdist(dest: Path, version: str) -> list[str]:
    """Download the transformers sdist of ``version`` with pip and copy its top-level ``tests/*.py``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"transformers=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob("transformers-*.tar.gz")
        copied = []
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py"):
                    target = dest / "tests" / parts[2]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
                    copied.append(parts[2])
        return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, help="a transformers checkout (work tree, or git dir with --rev)")
    parser.add_argument("--rev", help="commit or tag to read from --checkout's git history (default: its work tree)")
    parser.add_argument("--sdist", action="store_true", help="take the top-level test files from the PyPI sdist")
    parser.add_argument("--version", default=None, help="transformers version of the sdist (default: installed)")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where to put them (default {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    if not args.checkout and not args.sdist:
        parser.error("give --checkout, --sdist or both")
    marker = args.dest / ".fetched_by_hf_comet"
    if args.dest.exists() and any(args.dest.iterdir()):
        if not marker.exists():
            parser.error(f"{args.dest} exists and was not made by this script; pick an empty or new --dest")
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if args.checkout:
        print(
            f"from {args.checkout} ({args.rev or 'work tree'}): {len(copy_from_checkout(args.checkout, args.dest, args.rev))} paths"
        )
    if args.sdist:
        version = args.version or _installed_transformers_version()
        print(f"from the transformers {version} sdist: {len(copy_from_sdist(args.dest, version))} files")
    tests = args.dest / "tests"
    if not (tests / "distributed_testing_utils.py").exists():
        (tests / "distributed_testing_utils.py").write_text(DISTRIBUTED_SHIM)
        print("wrote a distributed_testing_utils.py stand-in (the checkout predates it)")
    src = args.dest / "src" / "transformers"
    if not src.exists():
        # test_pipeline_mixin.py imports the repository's src/transformers by path; use the installed package.
        import transformers

        src.parent.mkdir(parents=True, exist_ok=True)
        src.symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    for package in ("", "generation", "exporters", "utils", "models", "models/gpt2", "models/bert", "models/vit"):
        init = tests / package / "__init__.py"
        if init.parent.is_dir() and not init.exists():
            init.touch()
    needed = (
        "test_modeling_common.py",
        "generation/test_utils.py",
        "causal_lm_tester.py",
        "models/gpt2/test_modeling_gpt2.py",
        "models/bert/test_modeling_bert.py",
        "models/vit/test_modeling_vit.py",
    )
    missing = [p for p in needed if not (tests / p).exists()]
    print(f"upstream tests in {tests}" + (f"; still missing: {', '.join(missing)}" if missing else ""))
    print(f"run: HF_COMET_UPSTREAM_TESTS={tests} python -m pytest tests/upstream -q")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
