"""The transformers range pyproject.toml declares is the range CI tests: .ci/run runs the suite with the newest
release (the README's test command) and with the oldest, pinned once in .ci/constraints-min.txt."""

import re
from pathlib import Path

import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared_transformers() -> SpecifierSet:
    (spec,) = re.findall(r'^\s*"transformers([^"]*)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return SpecifierSet(spec)


def pinned_minimum() -> Version:
    lines = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines()]
    (pin,) = [line for line in lines if line.startswith("transformers")]
    assert pin.startswith("transformers=="), pin
    return Version(pin[len("transformers==") :])


def test_the_pinned_minimum_is_the_lower_bound_pyproject_declares():
    declared = declared_transformers()
    lower = [s for s in declared if s.operator == ">="]
    assert len(lower) == 1 and Version(lower[0].version) == pinned_minimum()
    assert pinned_minimum() in declared


def test_ci_runs_the_suite_against_the_pinned_minimum():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    minimum = [line for line in lines if "constraints-min.txt" in line and not line.startswith("#")]
    assert len(minimum) == 1 and "-m pytest -q" in minimum[0] and "pytest -q tests/" not in minimum[0]


def test_the_installed_transformers_is_in_the_declared_range():
    assert Version(transformers.__version__) in declared_transformers()
