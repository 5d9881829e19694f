"""Checkpoints: safetensors round trips with identical outputs, complete auto_map, and remote code without hf_comet."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from conftest import ALL_HEADS, HEADS, MAIN_OUTPUTS, MORE, ROUTING_NAMES, main_output, tiny_inputs, tiny_model

from hf_comet.modeling import FAMILY_ADAPTERS

CODE_FILES = {
    "configuration_comet.py",
    "modeling_comet_common.py",
    "moe_block.py",
    "moe_experts.py",
    "moe_kernels.py",
    "moe_routers.py",
    "routing_names.py",
}


@pytest.mark.parametrize("family, head", ALL_HEADS)
def test_save_and_load_give_identical_outputs(family, head, routing, tmp_path):
    model = tiny_model(family, head, routing=routing).eval()
    inputs = tiny_inputs(family, head)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert CODE_FILES | {f"modeling_{family}.py", "config.json"} <= files
    loaded = getattr(transformers, head).from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        before, after = model(**inputs, output_router_logits=True), loaded(**inputs, output_router_logits=True)
    # Loaded weights are memory-mapped with another alignment, which can change the CPU kernels' summation order by
    # an ulp (seen with switch); anything beyond float rounding would be a real difference.
    torch.testing.assert_close(main_output(before), main_output(after), rtol=1e-5, atol=1e-6)
    for a, b in zip(before.router_logits or (), after.router_logits or (), strict=True):  # None for COMET
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same gate scores
    assert (before.router_logits is None) == (after.router_logits is None)
    if "loss" in before:
        torch.testing.assert_close(before.loss, after.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(HEADS))
def test_saved_config_has_a_complete_auto_map(family, tmp_path):
    head = HEADS[family][1]
    tiny_model(family, head).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    auto_classes = FAMILY_ADAPTERS[family].auto_classes  # every Auto class (tests/test_heads.py: all upstream's)
    assert set(auto_map) == {"AutoConfig", *auto_classes} and set(HEADS[family]) <= set(auto_classes)
    module = f"modeling_{family}"
    assert auto_map["AutoConfig"].startswith("configuration_comet.")
    assert all(auto_map[h] == f"{module}.{cls.__name__}" for h, cls in auto_classes.items())


REMOTE_LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockHfComet(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_comet" or name.startswith("hf_comet."):
                raise ImportError("hf_comet is blocked in this process")

    sys.meta_path.insert(0, BlockHfComet())
    import torch, transformers
    torch.set_num_threads(2)  # the same as the test process: thread count changes float reductions
    try:
        import hf_comet  # noqa: F401
        raise SystemExit("hf_comet should not be importable here")
    except ImportError:
        pass
    MAIN_OUTPUTS = __MAIN_OUTPUTS__
    results = []
    for case in json.load(open(sys.argv[1])):
        inputs = torch.load(case["inputs"])
        reference = torch.load(case["reference"])
        for head in case["load_as"]:
            if hasattr(transformers, head):  # an Auto class, through the saved auto_map
                model = getattr(transformers, head).from_pretrained(case["path"], trust_remote_code=True).eval()
            else:  # a head with no Auto class (GPT2DoubleHeadsModel): its class from the saved code
                from transformers.dynamic_module_utils import get_class_from_dynamic_module

                module = json.load(open(case["path"] + "/config.json"))["model_type"]
                cls = get_class_from_dynamic_module(f"modeling_{module}.{head}", case["path"])
                model = cls.from_pretrained(case["path"]).eval()
            assert "transformers_modules" in type(model).__module__, type(model).__module__
            with torch.no_grad():
                out = model(**inputs)
            if head == case["saved_as"]:
                got = next(out[k] for k in MAIN_OUTPUTS if k in out)
                results.append([case["path"], head, bool(torch.allclose(got, reference, rtol=1e-5, atol=1e-6))])
            else:
                results.append([case["path"], head, type(model).__name__])
    print("RESULTS=" + json.dumps(results))
    """
).replace("__MAIN_OUTPUTS__", repr(MAIN_OUTPUTS))


def run_remote_loader(cases: list[dict], workdir, **env_extra: str) -> list:
    """Run `REMOTE_LOADER` on ``cases`` in a fresh process where hf_comet cannot be imported; its results."""
    (workdir / "cases.json").write_text(json.dumps(cases))
    (workdir / "loader.py").write_text(REMOTE_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"), PYTHONNOUSERSITE="1", **env_extra)
    proc = subprocess.run(
        [sys.executable, str(workdir / "loader.py"), str(workdir / "cases.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS=")[-1])


def test_every_head_loads_with_remote_code_where_hf_comet_is_not_importable(tmp_path):
    """Every routing, every family: a checkpoint of the family's first task head (outputs compared) that every other head
    of the family loads from too. For COMET every head is also saved and compared on its own, and every other upstream
    head (`MORE`) with one routing; the head without an Auto class loads through its class in the saved code."""
    cases = []
    for routing in ROUTING_NAMES:
        for family, head in ALL_HEADS:
            if head != HEADS[family][1] and routing != "comet":
                continue
            path = tmp_path / f"{family}-{head}-{routing}"
            model = tiny_model(family, head, routing=routing).eval()
            model.save_pretrained(path)
            inputs = tiny_inputs(family, head, with_labels=False)
            with torch.no_grad():
                torch.save(main_output(model(**inputs)), path / "reference.pt")
            torch.save(inputs, path / "inputs.pt")
            # the checkpoint of one head must also serve every other head of its family
            load_as = [head] + ([h for h in HEADS[family] if h != head] if head == HEADS[family][1] else [])
            cases.append(
                dict(
                    path=str(path),
                    saved_as=head,
                    load_as=load_as,
                    inputs=str(path / "inputs.pt"),
                    reference=str(path / "reference.pt"),
                )
            )
    for index, (family, head) in enumerate(MORE):  # the other upstream heads, one routing each (tests/test_heads.py)
        path = tmp_path / f"{family}-{head}"
        model = tiny_model(family, head, routing=("comet", "topk")[index % 2]).eval()
        model.save_pretrained(path)
        inputs = tiny_inputs(family, head, with_labels=False)
        with torch.no_grad():
            torch.save(main_output(model(**inputs)), path / "reference.pt")
        torch.save(inputs, path / "inputs.pt")
        name = head if head.startswith("Auto") else type(model).__name__  # no Auto class: loaded by its class
        cases.append(dict(path=str(path), saved_as=name, load_as=[name], inputs=str(path / "inputs.pt"),
                          reference=str(path / "reference.pt")))  # fmt: skip
    results = run_remote_loader(cases, tmp_path)
    assert len(results) == sum(len(c["load_as"]) for c in cases)
    for path, head, outcome in results:
        saved_head = next(c["saved_as"] for c in cases if c["path"] == path)
        if head == saved_head:
            assert outcome is True, f"{path} loaded as {head} gave different outputs"
        else:
            assert outcome.startswith("Comet"), (path, head, outcome)
