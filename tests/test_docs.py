"""The docs say what the code does: the config field reference is generated from the config docstring, which
documents every field once; links and anchors resolve; every package name, model method, CLI command and repository
path the docs mention exists; the README keeps the two set-up commands CI runs; the router contract table in the
README's development section lists exactly what a router defines."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from hf_comet.cli import build_parser
from hf_comet.config_reference import config_field_reference, docstring_fields, field_defaults
from hf_comet.modeling import CometGPT2ForCausalLM, CometMoEConfigMixin, Router

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "recipes" / "README.md",
    ROOT / "model_cards" / "README.md",
]
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
        if path.startswith("../") or "NAME" in path or "comet_x" in path:
            continue  # outside the repository, or a placeholder of the development section
        assert (ROOT / path).exists(), f"{doc.name} mentions {path}, which does not exist"


def test_the_readme_keeps_the_two_setup_commands_and_ci_runs_the_test_command():
    readme = text(README)
    assert DEMO_COMMAND in readme and TEST_COMMAND in readme
    ci_command = text(ROOT / ".ci" / "run").strip().splitlines()[-1]
    assert ci_command.replace("pip install -q ", "pip install ") == TEST_COMMAND


def _section(body: str, heading: str) -> str:
    start = body.index(heading)
    end = body.find("\n#", start + len(heading))
    return body[start : end if end > 0 else None]


def test_the_readme_router_contract_lists_exactly_what_a_router_defines():
    section = _section(text(README), "### Adding a routing")
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
