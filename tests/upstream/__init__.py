"""Adapters running transformers' own model tests on the hf_comet classes (a package, so its conftest is not the
top-level module ``conftest`` that spawned test workers import)."""
