"""The pieces every claim of ``hf-comet reproduce`` shares: the claim registry, the resumable run cache, running specs
through it, a claim's result and the curve plot. A claim is one module that defines ``claim(cache, plots, quick,
cached_only) -> ClaimResult`` and registers it with `register_claim`; ``hf_comet.reproduce`` imports the claim
modules in page order."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    source: str
    run: Callable[[Path, Path, bool, bool], ClaimResult]
    """``run(cache folder, plots folder, quick, cached_only)``; ``cached_only`` raises `MissingRuns` rather than run."""
    paper_scale: str = "runs on a CPU as it is; no paper reports this experiment."
    """What the claim needs at the paper's scale (a GPU, downloaded data), said at the top of its section."""


CLAIMS: dict[str, Claim] = {}
"""Claims ``hf-comet reproduce`` runs, in page order (the order their modules register)."""


def register_claim(name: str, title: str, source: str, paper_scale: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering ``run`` (``run(cache, plots, quick, cached_only) -> ClaimResult``) as claim ``name`` with
    its page title, source and what it needs at the paper's scale; a name is registered once."""

    def register(run: Callable[[Path, Path, bool, bool], ClaimResult]) -> Callable:
        if name in CLAIMS:
            raise ValueError(f"claim {name!r} is already registered (by {CLAIMS[name].run.__module__}).")
        CLAIMS[name] = Claim(name, title, source, run, *([paper_scale] if paper_scale else []))
        return run

    return register


class MissingRuns(Exception):
    """A claim rendered from the cache alone has runs that have not finished."""


RUN_CODE_END = ("# -- the claim", "@register_claim")
"""A line starting with one of these ends a module's run code: what follows (verdicts, tables, plots) is rendering,
which can change without invalidating the cached runs (`code_version` hashes the source above it)."""


def run_code(module) -> str:
    """The source of ``module`` up to its first `RUN_CODE_END` line (all of it when there is none)."""
    lines = Path(module.__file__).read_text().splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.startswith(RUN_CODE_END)), len(lines))
    return "".join(lines[:end])


def code_version(*modules) -> str:
    """A hash of the run code (`run_code`) of the modules a claim's runs execute: a cached run made by other code is
    not reused, while the rendering below each module's `RUN_CODE_END` line can change freely."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(run_code(module).encode())
    return digest.hexdigest()[:12]


class RunCache:
    """Finished runs of one claim, keyed by their spec, in ``<directory>/<claim>.jsonl``; entries made by another
    version of the claim's code (``code``) are ignored, so they run again."""

    def __init__(self, directory: str | os.PathLike, claim: str, code: str = ""):
        self.path = Path(directory) / f"{claim}.jsonl"
        self.code = code
        self.records: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line of an interrupted write
                    continue
                if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or "record" not in entry:
                    continue  # not a record this cache wrote (a damaged line): its run is done again
                if entry.get("code", "") == code:
                    self.records[entry["key"]] = entry["record"]

    @staticmethod
    def key(spec: dict) -> str:
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def get(self, spec: dict) -> dict | None:
        return self.records.get(self.key(spec))

    def put(self, spec: dict, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.key(spec)
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with open(self.path, "a") as handle:  # after a torn line, start a new one so this record stays readable
            handle.write(("\n" if torn else "") + json.dumps({"key": key, "code": self.code, "spec": spec,
                                                              "record": record}) + "\n")  # fmt: skip
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record


def run_all(specs: list[dict], cache: RunCache, run: Callable[[dict], dict], description: str,
            cached_only: bool = False) -> list[dict]:  # fmt: skip
    """Each spec's record, from the cache or by running it (with a progress bar over the runs still to do);
    ``cached_only`` raises `MissingRuns` instead of running."""
    from tqdm.auto import tqdm

    todo = [spec for spec in specs if cache.get(spec) is None]
    if todo and cached_only:
        raise MissingRuns(f"{description}: {len(todo)} of {len(specs)} runs not finished")
    for spec in tqdm(todo, desc=description, unit="run", disable=not todo):
        cache.put(spec, run(spec))
    return [cache.get(spec) | {"spec": spec} for spec in specs]


@dataclass
class ClaimResult:
    """A claim's section of the results page; ``seconds`` is the compute time of its runs (the pre-training run of
    ``convert_finetune`` aside)."""

    name: str
    title: str
    verdict: str
    markdown: str
    seconds: float


def plot_curves(groups: dict[str, list[dict]], path: Path, title: str, metric: str,
                xlabel: str = "optimizer step") -> None:  # fmt: skip
    """Mean curve per group (``curve_steps`` against ``curve``), written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4))
    for variant, group in groups.items():
        if not group:
            continue
        steps = group[0]["curve_steps"]
        mean = [sum(r["curve"][i] for r in group) / len(group) for i in range(len(steps))]
        axis.plot(steps, mean, label=variant, linewidth=2.2 if variant in ("comet", "dense") else 1.2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f"validation {metric} (mean over seeds)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure, path: Path) -> None:
    """Lay out, write atomically (`hf_comet.training.plots._save`: a kill never leaves half a PNG) and close."""
    import matplotlib.pyplot as plt

    from ..training.plots import _save

    figure.tight_layout()
    _save(figure, path)
    plt.close(figure)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread (the claims' models are too small for a second to help, and on a shared 2-core
    machine a second one makes their steps several times slower), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["CLAIMS", "Claim", "ClaimResult", "MissingRuns", "RUN_CODE_END", "RunCache", "code_version", "one_thread", "plot_curves", "register_claim",
           "run_all", "run_code", "save_figure"]
