"""The docs say what the code does: the config field reference is generated from the config docstring, which
documents every field once; links and anchors resolve, and nothing points outside the repository; every package
name, model method, CLI command and repository path the docs mention exists; the README keeps the two set-up commands
CI runs; the router contract table of the contributor guide lists exactly what a router defines; the site builds
with mkdocs in strict mode (warnings are errors); and every shell command of the README and the docs pages runs as
pasted, in a fresh folder, or says why not and what runs instead."""

import dataclasses
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hf_comet.cli import build_parser
from hf_comet.config_reference import config_field_reference, docstring_fields, field_defaults
from hf_comet.modeling import CometGPT2ForCausalLM, CometMoEConfigMixin, Router

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"
PAGES = sorted(DOCS_DIR.rglob("*.md"))  # every page of the site (mkdocs.yml: docs_dir)
DOCS = [README, *PAGES, ROOT / "recipes" / "README.md", ROOT / "model_cards" / "README.md"]
CONTRIBUTING = DOCS_DIR / "contributing.md"
DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/hf-comet demo"
TEST_COMMAND = (
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && .venv/bin/python -m pytest -q'
)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_the_config_docstring_documents_every_field_once_in_field_order():
    documented = [name for name, _ in docstring_fields()]
    assert len(documented) == len(set(documented)), "a field is documented twice"
    assert documented == [field.name for field in dataclasses.fields(CometMoEConfigMixin)]
    assert all(meaning.strip() for _, meaning in docstring_fields()), "a field has an empty description"


def test_docs_config_md_holds_the_table_generated_from_the_docstring():
    table = config_field_reference()
    assert table in text(ROOT / "docs" / "config.md"), (
        "docs/config.md is out of date: replace its table with `python -m hf_comet.config_reference`"
    )
    rows = table.splitlines()[2:]
    assert len(rows) == len(field_defaults())
    for row, (name, default) in zip(rows, field_defaults().items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[0] == f"`{name}`"
        assert cells[1] == (f'`"{default}"`' if isinstance(default, str) else f"`{default!r}`")


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    slug = heading.strip().lower().replace("`", "")
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    in_code, anchors = False, set()
    for line in text(path).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", text(doc)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: link to {target} points nowhere"
        if anchor:
            assert anchor in _anchors(path), f"{doc.name}: {target} has no heading #{anchor}"


def test_nothing_points_outside_the_repository():
    """Every link, path and name of the docs is inside this repository: no workspace notes, no absolute paths."""
    for doc in [*DOCS, ROOT / "mkdocs.yml"]:
        body = text(doc)
        for outside in ("../shared", "shared/docs", "/work/", "/tmp/", "file://"):
            assert outside not in body, f"{doc.relative_to(ROOT)} refers to {outside!r}, outside the repository"
        for target in re.findall(r"\]\(([^)\s]+)\)", body):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (doc.parent / target.partition("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{doc.relative_to(ROOT)} links to {target}, outside the repository"
        for path in re.findall(r"`((?:\.\./)+[\w./-]+)`", body):
            assert (doc.parent / path).resolve().is_relative_to(ROOT), f"{doc.relative_to(ROOT)} mentions {path}"


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_the_docs_mention_exists(doc):
    body = text(doc)
    for dotted in sorted(set(re.findall(r"\bhf_comet(?:\.[A-Za-z_]\w*)+", body))):
        try:
            _resolve(dotted)
        except (AttributeError, ModuleNotFoundError):
            pytest.fail(f"{doc.name} mentions {dotted}, which does not exist")
    for method in sorted(set(re.findall(r"\bmodel\.(\w+)\(", body))):
        assert hasattr(CometGPT2ForCausalLM, method), f"{doc.name} calls model.{method}(), which does not exist"
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in sorted(set(re.findall(r"\bhf-comet (\w+)", body))):
        assert command in commands, f"{doc.name} mentions `hf-comet {command}`, not a command ({sorted(commands)})"
    for path in sorted(set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml|json))`", body))):
        if "NAME" in path or "comet_x" in path:
            continue  # a placeholder of the contributor guide
        assert (ROOT / path).exists(), f"{doc.name} mentions {path}, which does not exist"


def test_the_readme_keeps_the_two_setup_commands_and_ci_runs_the_test_command():
    readme = text(README)
    assert DEMO_COMMAND in readme and TEST_COMMAND in readme
    ci_commands = [line.replace("pip install -q ", "pip install ") for line in text(ROOT / ".ci" / "run").splitlines()]
    assert TEST_COMMAND in ci_commands, ".ci/run must run the README's test command"


def _section(body: str, heading: str) -> str:
    start = body.index(heading)
    end = body.find("\n#", start + len(heading))
    return body[start : end if end > 0 else None]


def test_the_router_contract_of_the_contributor_guide_lists_exactly_what_a_router_defines():
    section = _section(text(CONTRIBUTING), "### Adding a routing")
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line.split("|")[1]]
    names = set()
    for row in rows:
        for member in re.findall(r"`(\w+)(?:\(|`)", row.split("|")[1]):
            names.add(member)
    helpers = {"describe_experts"}  # used by describe(), not part of what a router defines
    contract = {name for name in vars(Router) if not name.startswith("_") and name not in helpers} | {"__init__"}
    contract |= set(Router.__annotations__) - {"loss_weights"}  # loss_weights is set in __init__ (listed there)
    assert names == contract
    assert all(hasattr(Router, name) for name in names)


# -- the site ---------------------------------------------------------------------------------------------------------

SITE_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    """`mkdocs build --strict`: every page in the nav, every link and anchor resolves, every API page renders."""
    missing = [name for name in SITE_PACKAGES if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs tools are not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocstrings reads hf_comet's source from ROOT (paths: [.])
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    result = subprocess.run([*command, "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "routers" / "index.html").is_file()
    routers_page = (tmp_path / "site" / "api" / "routers" / "index.html").read_text(encoding="utf-8")
    assert "TopKRouter" in routers_page and "RoutingDecision" in routers_page  # rendered from the docstrings
    site_text = "".join(page.read_text(encoding="utf-8") for page in (tmp_path / "site").rglob("*.html"))
    assert "fonts.googleapis.com" not in site_text, "the site must not fetch fonts (theme.font: false)"


# -- the shell commands -----------------------------------------------------------------------------------------------

NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?);\s*runs as:\s*(?P<instead>.*?)\s*-->", re.DOTALL)
FENCE = re.compile(r"^```bash\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
SHELL_DOCS = [README, *PAGES]
PLACEHOLDER_CHECKPOINTS = ("path/to/dense-gpt2", "path/to/dense-bert", "path/to/dense-vit")
"""Where the docs stand for the user's own dense checkpoint; the test puts tiny ones there."""


def shell_blocks(doc: Path) -> list[tuple[str, re.Match | None]]:
    """The fenced ``bash`` blocks of ``doc``, each with its not-run marker (the comment right above it), if any."""
    body = text(doc)
    blocks = []
    for fence in FENCE.finditer(body):
        before = body[: fence.start()].rstrip()
        marker = NOT_RUN.search(before[before.rfind("<!--") :]) if before.endswith("-->") else None
        blocks.append((fence.group("body"), marker))
    return blocks


def run_blocks() -> list[str]:
    return [block for doc in SHELL_DOCS for block, marker in shell_blocks(doc) if marker is None]


def test_every_shell_block_that_does_not_run_says_why_and_what_runs_instead():
    run_text = "\n".join(run_blocks())
    assert run_text, "no shell block of the docs runs"
    for doc in SHELL_DOCS:
        markers = len(re.findall(r"^<!--\s*not-run", text(doc), re.MULTILINE))
        blocks = shell_blocks(doc)
        assert markers == sum(marker is not None for _, marker in blocks), (
            f"{doc.relative_to(ROOT)}: a not-run comment is malformed (`<!-- not-run: REASON; runs as: X -->`) or "
            "does not stand right above a ```bash block"
        )
        for block, marker in blocks:
            if marker is None:
                continue
            assert len(marker["reason"].strip()) > 10, f"{doc.relative_to(ROOT)}: a not-run block without a reason"
            for instead in (part.strip() for part in marker["instead"].split(", ")):
                assert (ROOT / instead).exists() or instead in run_text, (
                    f"{doc.relative_to(ROOT)}: the not-run block\n{block}\nnames {instead!r} as what runs instead: "
                    "neither a file of the repository nor a command of a block that runs"
                )


@pytest.fixture(scope="module")
def placeholder_checkpoints(tmp_path_factory) -> Path:
    """Tiny stock dense checkpoints where the docs write the user's own (`PLACEHOLDER_CHECKPOINTS`)."""
    from transformers import (
        BertConfig,
        BertForPreTraining,
        GPT2Config,
        GPT2LMHeadModel,
        ViTConfig,
        ViTForImageClassification,
    )

    root = tmp_path_factory.mktemp("checkpoints")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        root / "path/to/dense-gpt2"
    )
    bert = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    BertForPreTraining(bert).save_pretrained(root / "path/to/dense-bert")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=8,
                    patch_size=4, num_channels=1, num_labels=3)  # fmt: skip
    ViTForImageClassification(vit).save_pretrained(root / "path/to/dense-vit")
    return root


def _shell_env() -> dict[str, str]:
    """This interpreter's environment with its ``bin`` first on PATH, so ``hf-comet`` and ``python`` are the venv's."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.update(OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _run_doc(doc: Path, blocks: list[str], folder: Path, checkpoints: Path, env: dict[str, str]) -> str | None:
    """Run ``blocks`` of ``doc`` in order in ``folder``; the failure message of the first that fails, else None."""
    folder.mkdir()
    for block in blocks:
        for placeholder in PLACEHOLDER_CHECKPOINTS:
            if placeholder in block and not (folder / placeholder).exists():
                shutil.copytree(checkpoints / placeholder, folder / placeholder)
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True, text=True,
            timeout=600, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if result.returncode != 0:
            return (
                f"{doc.relative_to(ROOT)}: this block failed (exit {result.returncode}):\n{block}\n"
                f"--- stdout (tail)\n{result.stdout[-3000:]}\n--- stderr (tail)\n{result.stderr[-3000:]}"
            )
    return None


@pytest.fixture(scope="module")
def shell_runs(placeholder_checkpoints, tmp_path_factory) -> dict[Path, str | None]:
    """Each doc's blocks that run, in order in one fresh folder (as a user pastes them), docs two at a time.

    A block the README repeats from a guide runs once. Returns each doc's failure message, or None.
    """
    env = _shell_env()
    hf_comet = shutil.which("hf-comet", path=env["PATH"])
    if hf_comet is None or Path(hf_comet).parent != Path(sys.executable).parent:
        pytest.skip("the hf-comet command is not installed next to this Python: pip install -e .")
    owner: dict[str, Path] = {}
    for doc in [*PAGES, README]:  # the pages own what the README repeats
        for block, marker in shell_blocks(doc):
            if marker is None:
                owner.setdefault(block, doc)
    plan = {doc: [b for b, m in shell_blocks(doc) if m is None and owner[b] == doc] for doc in SHELL_DOCS}
    root = tmp_path_factory.mktemp("shell")
    docs = sorted((doc for doc in plan if plan[doc]), key=lambda doc: -len("".join(plan[doc])))
    with ThreadPoolExecutor(max_workers=2) as pool:  # each command is mostly imports on one core
        futures = {
            doc: pool.submit(_run_doc, doc, plan[doc], root / f"doc{i}", placeholder_checkpoints, env)
            for i, doc in enumerate(docs)
        }
        return {doc: future.result() for doc, future in futures.items()}


@pytest.mark.parametrize(
    "doc",
    [doc for doc in SHELL_DOCS if any(m is None for _, m in shell_blocks(doc))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_shell_block_runs_as_pasted(doc, shell_runs):
    """Every ``bash`` block without a not-run comment runs with the venv's ``hf-comet`` and fast settings."""
    failure = shell_runs.get(doc)
    assert failure is None, failure
