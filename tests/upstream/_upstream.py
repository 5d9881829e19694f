"""Shared plumbing of the adapters that run transformers' own model tests on the hf_comet classes.

The upstream files are not vendored: they are read from the folder ``$HF_COMET_UPSTREAM_TESTS`` names
(transformers' ``tests/`` folder, e.g. of a ``git clone --branch v<installed version>``, or ``.upstream_tests/tests``
filled by ``fetch_upstream_tests.py``). Unset, or naming a folder without them, every adapter module skips at import
time, so the default test run stays fast (the upstream suites take minutes: ~3 for ours, ~4.5 with the baseline on
2 cores).

What this module does, and nothing more:

* imports the upstream folder as the package ``tests`` (its files use ``from tests.... import`` and relative imports);
* fills in the few ``transformers.testing_utils`` names an older checkout imports but the installed transformers no
  longer has (only when missing);
* teaches the upstream tests our class names: they decide which labels to build and which classes to train by
  ``model_class.__name__ in get_values(MODEL_FOR_..._MAPPING_NAMES)``, and those tables list only transformers' own
  classes, so ``get_values`` is wrapped (in the upstream modules only) to add each hf_comet head to the table of its
  Auto class;
* builds the test classes: one per routing variant, each a subclass of the upstream ``XxxModelTest`` whose tester
  builds our config and whose ``all_model_classes`` / pipeline mapping / module-level class names are ours; and an
  unmodified copy of the upstream class (``Dense...``) when ``HF_COMET_UPSTREAM_BASELINE=1``, the reference that
  tells which failures are ours;
* applies the skip marks (design differences, heads hf_comet does not provide) and xfail marks (known defects) listed
  by the adapters and in ``KNOWN_DIFFERENCES.md``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

ENV_VAR = "HF_COMET_UPSTREAM_TESTS"
BASELINE_ENV_VAR = "HF_COMET_UPSTREAM_BASELINE"

# The MoE settings of the two variants every family runs. COMET keeps half the units of the upstream FFN width;
# top-k splits the FFN into 4 experts of equal width (the testers' widths are chosen so that width is a multiple of 4,
# which the grouped_mm kernel needs in fp32).
VARIANTS = {
    "comet": dict(
        routing="comet", comet_keep_rate=0.5, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=None
    ),
    "topk": dict(routing="topk", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=None),
}

# Values a checkout older than the installed transformers imports from ``transformers.testing_utils`` (set only when
# missing). ``_TEXT_MODEL_TESTER_DEFAULTS``: the defaults ``CausalLMModelTester`` applied before transformers moved
# them out of ``testing_utils`` (values of transformers 5.14).
_TESTING_UTILS_COMPAT = {
    "_TEXT_MODEL_TESTER_DEFAULTS": {
        "batch_size": 13,
        "seq_length": 7,
        "is_training": True,
        "use_input_mask": True,
        "use_labels": True,
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "hidden_act": "gelu",
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "expert_interval": 1,
        "moe_layer_start_index": 0,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 36,
        "shared_expert_gate": True,
        "moe_num_shared_experts": 2,
        "num_experts_per_tok": 2,
        "num_experts": 8,
    },
}


SKEWED_CHECKOUT = False
"""True once a compat value above had to be filled in: the upstream files are older than the installed transformers,
and the tests marked ``harness_skew`` fail for the dense upstream classes too."""


def upstream_dir() -> Path | None:
    """transformers' ``tests/`` folder named by ``$HF_COMET_UPSTREAM_TESTS``, or None when unset or not one."""
    configured = os.environ.get(ENV_VAR)
    if not configured:
        return None
    candidate = Path(configured).expanduser()
    return candidate if (candidate / "test_modeling_common.py").is_file() else None


def baseline_enabled() -> bool:
    return os.environ.get(BASELINE_ENV_VAR, "").lower() in ("1", "true", "yes")


def load(module: str, *, required: tuple[str, ...] = ()):
    """Import ``tests.<module>`` from the upstream folder, or skip the calling test module."""
    root = upstream_dir()
    if root is None:
        pytest.skip(
            f"transformers' own tests run only with {ENV_VAR} set to transformers' tests/ folder (got "
            f"{os.environ.get(ENV_VAR)!r}; tests/upstream/fetch_upstream_tests.py can assemble one)",
            allow_module_level=True,
        )
    for rel in (module.replace(".", "/") + ".py", *required):
        if not (root / rel).is_file():
            pytest.skip(
                f"{root / rel} is missing (see tests/upstream/fetch_upstream_tests.py)", allow_module_level=True
            )
    for dependency in ("parameterized", "httpx"):
        if importlib.util.find_spec(dependency) is None:
            pytest.skip(f"transformers' tests need `{dependency}` (pip install {dependency})", allow_module_level=True)
    _import_package(root)
    upstream = importlib.import_module(f"tests.{module}")
    _teach_class_names()
    return upstream


def _import_package(root: Path) -> None:
    existing = sys.modules.get("tests")
    if existing is not None:
        if Path(getattr(existing, "__file__", "") or "").resolve().parent == root.resolve():
            return
        pytest.skip(f"a different module is already imported as `tests` ({existing!r})", allow_module_level=True)
    import transformers.testing_utils as testing_utils

    global SKEWED_CHECKOUT
    for name, value in _TESTING_UTILS_COMPAT.items():
        if not hasattr(testing_utils, name):
            setattr(testing_utils, name, value)
            SKEWED_CHECKOUT = True
    spec = importlib.util.spec_from_file_location("tests", root / "__init__.py", submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["tests"] = package
    spec.loader.exec_module(package)


@functools.cache
def _extra_class_names() -> dict[int, tuple[str, ...]]:
    """id(<Auto class's MODEL_..._MAPPING_NAMES table>) -> the hf_comet class names registered for that Auto class."""
    import transformers

    from hf_comet.modeling import FAMILIES

    extra: dict[int, list[str]] = {}
    for _config_class, auto_classes in FAMILIES.values():
        for auto_name, model_class in auto_classes.items():
            names_table = getattr(transformers, auto_name)._model_mapping._model_mapping
            extra.setdefault(id(names_table), []).append(model_class.__name__)
    return {key: tuple(names) for key, names in extra.items()}


def _teach_class_names() -> None:
    """Wrap ``get_values`` in every imported upstream test module so the name tables include our heads."""
    for name, module in list(sys.modules.items()):
        if not (name == "tests" or name.startswith("tests.")) or module is None:
            continue
        original = getattr(module, "get_values", None)
        if original is None or getattr(original, "_hf_comet", False):
            continue

        def get_values(model_mapping, _original=original):
            values = list(_original(model_mapping))
            return values + [n for n in _extra_class_names().get(id(model_mapping), ()) if n not in values]

        get_values._hf_comet = True
        module.get_values = get_values


def patch_module_globals(test_case, module, replacements: dict) -> None:
    """Point ``module``'s global names (stock class names used inside upstream tests) at ours for one test."""
    for name, value in replacements.items():
        patcher = mock.patch.object(module, name, value)
        patcher.start()
        test_case.addCleanup(patcher.stop)


def apply_marks(cls, marks: dict[str, pytest.MarkDecorator]) -> None:
    """Attach pytest marks to (inherited) test methods of ``cls``; every named method must exist."""
    for name, mark in marks.items():
        original = getattr(cls, name, None)
        if original is None:
            # Upstream renamed or dropped the test: nothing to mark (listed so a newer checkout does not error).
            continue

        @functools.wraps(original)
        def wrapper(self, *args, _original=original, **kwargs):
            return _original(self, *args, **kwargs)

        setattr(cls, name, mark(wrapper))


def design(reason: str) -> pytest.MarkDecorator:
    """A documented design difference: the upstream test does not apply to hf_comet."""
    return pytest.mark.skip(reason=f"design: {reason}")


def not_provided(head: str) -> pytest.MarkDecorator:
    """An upstream test of a head hf_comet does not ship (README, "Model types and heads")."""
    return pytest.mark.skip(reason=f"design: hf_comet provides no {head} (README, 'Model types and heads')")


def defect(reason: str) -> pytest.MarkDecorator:
    """A known defect of our classes: remove the mark when it is fixed (strict=False: a fix shows as XPASS)."""
    return pytest.mark.xfail(strict=False, reason=f"defect: {reason}")


def harness_skew(reason: str) -> dict:
    """Marks for tests that fail for the dense upstream classes too when the checkout is older than the installed
    transformers (nothing to do with hf_comet); empty with a matching checkout, where they run unmarked."""
    return {"xfail": pytest.mark.xfail(strict=False, reason=f"harness: {reason}")} if SKEWED_CHECKOUT else {}


def marks_for(variant: str, common: dict, per_variant: dict[str, dict], skew: dict[str, str] | None = None) -> dict:
    """The marks of one variant: the harness-skew ones, the common ones, then the variant's own (later ones win)."""
    skew_marks = {}
    for name, reason in (skew or {}).items():
        mark = harness_skew(reason).get("xfail")
        if mark is not None:
            skew_marks[name] = mark
    return {**skew_marks, **common, **per_variant.get(variant, {})}


# Design differences every family shares (README, "Decisions": the experts run `grouped_mm` or `eager`).
BATCHED_MM_REFUSED = {
    f"test_eager_matches_batched_and_grouped_inference_{suffix}": design(
        "experts_implementation='batched_mm' is refused (it gathers a weight matrix per token and exhausts memory "
        "at training sizes; README, 'Decisions': Experts); the test compares eager, batched_mm and grouped_mm"
    )
    for suffix in ("0_fp16", "1_fp32", "2_bf16")
}
