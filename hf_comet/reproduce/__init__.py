"""``hf-comet reproduce``: the papers' claims, run over seeds, summarised with intervals and tests, and written to one
results page (``docs/results.md``) with a plot per claim.

Every run is a pure function of its spec (claim, variant, sizes, seed, steps, learning rate). Its record is appended
to a JSON-lines cache as soon as it finishes (one line, flushed and fsynced), so an interrupted run continues where it
stopped and a finished one is never repeated; a half-written last line is ignored. ``--quick`` runs the same pipeline
on tiny settings (the tests run it), into its own cache, and says on the page that its numbers are not results.

Each claim is one module that registers itself (`register_claim`); this package is the entry: it imports the claim
modules in page order and runs them (`reproduce`). A new claim is a module that defines ``claim(cache, plots, quick,
cached_only)`` with ``@register_claim(name, title, source)`` and one more name in the import below.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..io import staged_path
from .core import CLAIMS, Claim, ClaimResult, MissingRuns, RunCache, code_version, register_claim, run_all
from .stats import VERDICT_RULE

# Each module registers its claim on import, and `CLAIMS` lists them in this order (the page's).
# isort: off
from . import comet_mlp, convert_finetune, expert_merging, comet_regression  # noqa: E402, F401
from . import comet_transformers, time_to_quality, deep_moe, attentive_gating, convert_finetune_bert  # noqa: E402, F401
from . import sparsify_finetune_bert, sparsify_finetune_gpt2  # noqa: E402, F401
# isort: on


def reproduce(
    claims: list[str] | None = None,
    quick: bool = False,
    cache_dir: str | os.PathLike = "runs/reproduce",
    page: str | os.PathLike | None = None,
    render: bool = False,
) -> list[ClaimResult]:
    """Run ``claims`` (default: all of `CLAIMS`) from the cache onwards and write the results page and its plots
    (``<page folder>/results/``). Claims not asked for are rendered from the cache when all their runs are there, so
    running one claim keeps the others' sections. ``quick`` uses tiny settings, a separate cache and by default a page
    under the cache (``<cache>/quick/results.md``), never ``docs/results.md``; the page says its numbers are not
    results. ``render`` trains nothing: it re-renders the page from the cached runs alone (the committed
    ``runs/reproduce/full/*.jsonl`` give ``docs/results.md`` byte for byte) and raises `MissingRuns`, naming the claims,
    when any asked-for claim's runs are missing or were made by other code. Returns the claims asked for."""
    names = list(CLAIMS) if not claims else claims
    unknown = [name for name in names if name not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; choose from {', '.join(CLAIMS)}.")
    cache = Path(cache_dir) / ("quick" if quick else "full")
    page = Path(page) if page is not None else (cache / "results.md" if quick else Path("docs/results.md"))
    plots = page.parent / "results"
    # --render draws its plots in a scratch folder (laid out as beside the page, so the links are the same) and puts
    # them in place only when every asked-for claim rendered, so a missing run writes nothing at all
    with tempfile.TemporaryDirectory(prefix="hf_comet_render_") as scratch:
        target = Path(scratch) / "results" if render else plots
        results, rendered, missing = [], [], []
        for name, claim in CLAIMS.items():
            try:
                result = claim.run(cache, target, quick, render or name not in names)
            except MissingRuns as error:
                if render and name in names:
                    missing.append(f"{name} ({error})")
                continue  # not asked for and not finished: listed as not run yet
            result.title = claim.title
            rendered.append(result)
            if name in names:
                results.append(result)
        if missing:
            raise MissingRuns(f"cannot render from {cache} alone; missing runs: {'; '.join(missing)}. Run "
                              "`hf-comet reproduce` for them first.")  # fmt: skip
        if render and target.exists():
            plots.mkdir(parents=True, exist_ok=True)
            for drawn in target.iterdir():
                with staged_path(plots / drawn.name) as staging:  # a kill leaves the previous plot, never half one
                    shutil.copyfile(drawn, staging)
    write_page(rendered, page, quick)
    readme = Path("README.md")
    if not quick and page.resolve() == Path("docs/results.md").resolve() and readme.exists():
        text = readme.read_text()
        if README_START in text:  # the repository's own page: its README lists the verdicts too
            with staged_path(readme) as staging:
                staging.write_text(replace_readme_results(text, rendered))
    return results


README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def _drop_parentheses(text: str) -> str:
    """``text`` without its parenthesised asides (nested ones included) and the spaces before them."""
    out, depth = [], 0
    for char in text:
        depth += char == "("
        if not depth:
            out.append(char)
        depth -= char == ")" and depth > 0
    return re.sub(r" +([,;.:])", r"\1", re.sub(r" {2,}", " ", "".join(out))).strip()


def readme_results(results: list[ClaimResult]) -> str:
    """The README's list of verdicts: one row per claim on the page, its verdict without the page's asides, linked
    to its section."""
    lines = ["| claim | verdict |", "|---|---|"]
    for result in results:
        claim = CLAIMS[result.name]
        lines.append(f"| [{claim.title}](docs/results.md#{_slug(claim.title)}) | {_drop_parentheses(result.verdict)} |")
    return "\n".join(lines)


def replace_readme_results(readme: str, results: list[ClaimResult]) -> str:
    """``readme`` with the text between `README_START` and `README_END` replaced by `readme_results`."""
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} section to regenerate")
    return readme[: start + len(README_START)] + "\n" + readme_results(results) + "\n" + readme[end:]


def _slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def write_page(results: list[ClaimResult], page: Path, quick: bool) -> None:
    """The results page, written atomically."""
    lines = ["# Results: the papers' claims, reproduced or not", ""]
    if quick:
        lines += ["> **Quick mode**: tiny settings that check the pipeline. These numbers are not results.", ""]
    lines += ["Every number here is rendered from the committed run records in `runs/reproduce/full/` (one JSON line "
              "per run): `hf-comet reproduce --render` rewrites this page from them, byte for byte, without training "
              "(a test checks it). `hf-comet reproduce` reruns the claims (about the time below per claim on a 2-core "
              "CPU; finished runs are kept, so an interrupted run continues; runs made by other run code are redone). "
              "Choices are made on validation splits; each run reads its test split once. The statistics: "
              "`hf_comet/reproduce/stats.py`.", "", VERDICT_RULE, "",
              "| claim | source | verdict | time |", "|---|---|---|---|"]  # fmt: skip
    for result in results:
        claim = CLAIMS[result.name]
        lines.append(f"| [{claim.title}](#{_slug(claim.title)}) | {claim.source} | {result.verdict} | "
                     f"{result.seconds / 60:.1f} min |")  # fmt: skip
    done = {result.name for result in results}
    for claim in CLAIMS.values():
        if claim.name not in done:
            lines.append(f"| {claim.title} | {claim.source} | not run yet (`hf-comet reproduce {claim.name}`) | – |")
    lines.append("")
    for result in results:
        claim = CLAIMS[result.name]
        lines += [f"## {claim.title}", "", f"Source: {claim.source}. Command: "
                  f"`hf-comet reproduce {result.name}`. Verdict: {result.verdict}.", "",
                  f"At the paper's scale: {claim.paper_scale}", "", result.markdown, ""]  # fmt: skip
    with staged_path(page) as staging:  # a kill mid-write leaves the previous page
        staging.write_text("\n".join(lines))


__all__ = ["CLAIMS", "Claim", "ClaimResult", "MissingRuns", "README_END", "README_START", "RunCache", "code_version",
           "readme_results", "register_claim", "replace_readme_results", "reproduce", "run_all", "write_page"]  # fmt: skip
