"""The arguments of ``hf-comet bench`` (and ``python -m hf_comet.bench``), torch-free so that ``--help`` is instant;
the benchmark itself is `hf_comet.bench`."""

from __future__ import annotations

import argparse

from .names import BENCH_SECTIONS as SECTIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's sections and flags to ``parser``."""
    parser.add_argument("sections", nargs="*", default=[], metavar="SECTION",
                        help=f"sections to run (default: all of {', '.join(SECTIONS)})")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="toy sizes, one round: a smoke test (numbers mean nothing)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--readme", metavar="PATH", help="regenerate this README's speed section from the report")
    parser.add_argument("--calibrate", action="store_true",
                        help="with the execution section: save the measured thresholds where every later process "
                             "reads them (HF_COMET_EXECUTION, else $HF_HOME/hf_comet/execution.json)")  # fmt: skip


__all__ = ["SECTIONS", "add_arguments"]
