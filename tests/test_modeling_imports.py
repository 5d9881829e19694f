"""``hf_comet/modeling`` is what travels with a checkpoint (remote code): its files import only the standard library,
torch, transformers, huggingface_hub and each other (flat sibling imports), never ``hf_comet`` — not even lazily."""

import ast
import sys
from pathlib import Path

import pytest

MODELING = Path(__file__).resolve().parents[1] / "hf_comet" / "modeling"
ALLOWED = {"torch", "transformers", "huggingface_hub"}


@pytest.mark.parametrize("path", sorted(MODELING.glob("*.py")), ids=lambda p: p.name)
def test_a_modeling_file_imports_only_what_a_checkpoint_can_carry(path):
    siblings = {p.stem for p in MODELING.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):  # every import, also inside functions and try blocks
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in siblings, f"{path.name}: from {'.' * node.level}{node.module}"
            continue
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top in ALLOWED or top in sys.stdlib_module_names, f"{path.name} imports {name}"
