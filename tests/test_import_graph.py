"""``import hf_comet`` stays light (issue 21): it imports neither torch nor transformers, yet the configs and models
are registered with the Auto classes as soon as transformers' Auto modules load, whatever the import order. These tests guard the import graph (what is in ``sys.modules``), not a timing: a
fresh interpreter imports hf_comet, and the Auto classes, ``from_pretrained``, pipelines and every public name still
work from there. Also: the light registration table matches the families' facts, the lazy Auto entries behave like
registered classes, and hf_comet's modules import each other without a cycle."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from test_pipeline_ready import word_tokenizer

import hf_comet
from hf_comet import auto_registration
from hf_comet.auto_registration import AUTO_CLASSES, LazyClass, LazyClassDict, register_auto_classes
from hf_comet.modeling import FAMILY_ADAPTERS

ROOT = Path(__file__).resolve().parents[1]
LIGHT = {"hf_comet", "hf_comet._lazy", "hf_comet.auto_registration"}
"""The only hf_comet modules ``import hf_comet`` may import."""
FORBIDDEN = ("torch", "transformers", "matplotlib", "datasets", "evaluate", "peft", "sklearn")

FRESH = """
import json, sys
import hf_comet
after_import = sorted(sys.modules)
from transformers import AutoConfig, AutoModelForCausalLM, pipeline
config = AutoConfig.for_model("comet_gpt2", **json.loads(sys.argv[1]))
model = AutoModelForCausalLM.from_config(config)
loaded = AutoModelForCausalLM.from_pretrained(sys.argv[2])
generator = pipeline("text-generation", model=sys.argv[2])
text = generator("the cat", max_new_tokens=2, do_sample=False)[0]["generated_text"]
from hf_comet.convert import core
from hf_comet.modeling import FAMILIES, FAMILY_ADAPTERS
print(json.dumps({
    "after_import": after_import,
    "model": type(model).__module__ + "." + type(model).__name__,
    "loaded": type(loaded).__name__,
    "pipeline_model": type(generator.model).__name__,
    "generated": text,
    "sharing": type(type(model).sharing).__name__,
    "one_family_registry": core.FAMILY_ADAPTERS is FAMILY_ADAPTERS,
}))
"""


def test_import_hf_comet_imports_only_the_configs_yet_auto_classes_from_pretrained_and_pipelines_work(tmp_path):
    fields = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32, bos_token_id=2, eos_token_id=2)
    tokenizer = word_tokenizer("gpt2")
    fields["vocab_size"] = len(tokenizer)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("comet_gpt2", **fields))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(fields), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    modules = set(result["after_import"])
    ours = {name for name in modules if name == "hf_comet" or name.startswith("hf_comet.")}
    assert ours == LIGHT, f"import hf_comet imported {sorted(ours - LIGHT)}"
    heavy = [name for name in modules if name.split(".")[0] in FORBIDDEN or name in FORBIDDEN]
    assert not heavy, f"import hf_comet imported {heavy}"
    assert result["model"] == "hf_comet.modeling.modeling_comet_gpt2.CometGPT2ForCausalLM"
    assert result["loaded"] == result["pipeline_model"] == "CometGPT2ForCausalLM"
    assert result["generated"].startswith("the cat")
    assert result["sharing"] == "Sharing"  # model cards attach whenever a model class loads
    assert result["one_family_registry"]  # a lazy name is computed once: a family added to it reaches conversion


ORDERS = {
    "auto-config-first": "import hf_comet\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    "auto-model-first": "import hf_comet\nfrom transformers import AutoModelForCausalLM, AutoConfig",
    "stock-config-first": "import hf_comet\nfrom transformers import BertConfig\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    "our-config-first": "from hf_comet import CometGPT2Config\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    "our-model-first": "from hf_comet import CometGPT2ForCausalLM\nfrom transformers import AutoConfig, AutoModelForCausalLM",
    "transformers-before-hf_comet": "from transformers import AutoConfig, AutoModelForCausalLM\nimport hf_comet",
}  # fmt: skip


@pytest.mark.parametrize("order", list(ORDERS))
def test_the_auto_classes_know_our_types_whatever_the_import_order(tmp_path, order):
    """The registration hooks can fire inside transformers' own import chains (a config module's docstring decorator
    imports ``modeling_auto``): every order of first imports ends registered, hf_comet imported before or after
    transformers' Auto modules."""
    script = ORDERS[order]
    script += """
config = AutoConfig.for_model("comet_bert", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                              intermediate_size=64, vocab_size=40)
from transformers import AutoModel
print(type(AutoModel.from_config(config)).__name__, type(AutoModelForCausalLM.from_config(
    AutoConfig.for_model("comet_gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=40))).__name__)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["CometBertModel", "CometGPT2ForCausalLM"]


@pytest.mark.parametrize("package", ["hf_comet", "hf_comet.modeling", "hf_comet.convert", "hf_comet.training"])
def test_every_public_name_of_a_lazy_package_loads_and_is_listed(package):
    module = __import__(package, fromlist=["_"])
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'CometMoEBlock'"):
        getattr(module, "CometMoEBlock")  # noqa: B009  (the first release's aliases are gone)


def test_the_light_registration_table_is_the_families_auto_classes():
    assert list(AUTO_CLASSES) == list(FAMILY_ADAPTERS)
    for model_type, family in FAMILY_ADAPTERS.items():
        table = AUTO_CLASSES[model_type]
        assert table.config_class == family.config_class.__name__
        assert {auto: (cls.__module__, cls.__name__) for auto, cls in family.auto_classes.items()} == table.models
        for auto_name, cls in family.auto_classes.items():
            assert getattr(transformers, auto_name)._model_mapping[family.config_class] is cls


def test_a_lazy_entry_reads_as_its_class_every_way():
    target = LazyClass("hf_comet.modeling.moe_block", "MoEBlock")
    entries = LazyClassDict({int: str})
    entries.set_lazy("block", target.module, target.name)
    assert "block" in entries and entries.is_lazy("block") and len(entries) == 2
    assert dict(entries)["block"] is hf_comet.MoEBlock and not entries.is_lazy("block")  # read once, then kept
    entries.set_lazy("again", target.module, target.name)
    assert list(entries.values()) == [str, hf_comet.MoEBlock, hf_comet.MoEBlock]
    entries.set_lazy("more", target.module, target.name)
    assert entries.get("more") is hf_comet.MoEBlock and entries.get("missing", 1) == 1
    entries.set_lazy("copied", target.module, target.name)
    assert pickle.loads(pickle.dumps(entries)) == entries.copy() == {**entries}
    assert all(not isinstance(value, LazyClass) for _, value in entries.items())
    entries.set_lazy("popped", target.module, target.name)
    assert entries.pop("popped") is hf_comet.MoEBlock and "popped" not in entries


def test_registration_falls_back_to_importing_the_classes_where_a_mapping_is_not_the_expected_one(monkeypatch):
    config_class = hf_comet.CometViTConfig
    mapping = transformers.AutoModelForImageClassification._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", {**mapping._extra_content})
    monkeypatch.setattr(auto_registration, "_lazy_extra_content", lambda auto_class: None)
    del mapping._extra_content[config_class]
    register_auto_classes()
    assert type(mapping._extra_content) is dict  # registered with the public API, not replaced
    assert mapping._extra_content[config_class] is hf_comet.CometViTForImageClassification


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """hf_comet modules ``module`` imports anywhere (functions included; ``TYPE_CHECKING`` blocks and its own parent
    packages, which always load first, excluded)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in modules and name != module and not module.startswith(name + ".")}


def test_hf_comet_modules_import_each_other_without_a_cycle():
    files = {}
    for path in (ROOT / "hf_comet").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _imports(path, module, set(files)) for module, path in files.items()}
    # The one deliberate exception: the torch-free router registry imports the routers the first time it is read
    # (inside a function), and the routers register themselves in it.
    graph["hf_comet.modeling.routing_names"].discard("hf_comet.modeling.moe_routers")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, f"import cycle: {' -> '.join([*path, module, target])}"
            if target not in state:
                walk(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [])


def test_building_one_of_our_configs_imports_no_model_code(tmp_path):
    """A config (the router registry it validates against included) is as light as a stock one: no
    ``transformers.modeling_utils`` (seconds of imports) until a model is built."""
    script = (
        "import sys, hf_comet\nfrom transformers import AutoConfig\n"
        "AutoConfig.for_model('comet_gpt2', routing='switch', n_layer=1, n_embd=32, n_head=2)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('transformers.modeling_utils', 'hf_comet.modeling.modeling'))))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
