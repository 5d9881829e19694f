"""The names ``hf-comet`` parses its arguments with, importable without torch or transformers.

``hf-comet --help`` and every ``hf-comet SUB --help`` must not load torch (argument parsing is all they do), so the
choices they offer are literals here instead of the registries that hold the real objects (which import torch).
``tests/test_cli_light.py`` compares each literal with its registry, so they never drift apart.
"""

from __future__ import annotations

RECIPE_NAMES = ("vit_digits", "gpt2_text", "bert_mlm_cls")
"""The built-in recipes, in `hf_comet.training.recipes.RECIPES` order."""
DEMO_RECIPE = "vit_digits"
"""The recipe ``hf-comet demo`` runs."""
ROUTINGS = ("comet", "topk", "noisy_topk", "switch", "attentive", "deep", "hash")
"""`hf_comet.modeling.ROUTINGS`, the built-in routings (a recipe variant is one of them, ``dense`` or ``block_comet``)."""
VARIANTS = ("dense", "block_comet", *ROUTINGS)
"""`hf_comet.training.recipes.variant_names()`: what ``hf-comet train --variants`` accepts."""

CONVERSION_METHODS = ("comet", "upcycle", "split")
"""`hf_comet.convert.METHODS`."""
SPLIT_METHODS = ("contiguous", "random", "kmeans")
"""`hf_comet.convert.SPLIT_METHODS`."""
DEFAULT_SPLIT_METHOD = "contiguous"
"""`hf_comet.convert.DEFAULT_SPLIT_METHOD`."""

BENCH_SECTIONS = ("sgemm", "blocks", "selection", "training", "generation", "router", "sparse", "execution")
"""`hf_comet.bench.SECTIONS`."""

SPARSIFY_CLUSTERS = ("none", "coactivation")
"""`hf_comet.convert.sparse.CLUSTERS`."""
SPARSIFY_ROUTERS = ("random", "fitted")
"""`hf_comet.convert.sparse.ROUTERS`."""

PROVENANCE_FIELDS = ("converted_from", "conversion_method", "split_method", "conversion_seed", "sparsify_cluster")
"""Config fields ``hf-comet convert`` (and `hf_comet.convert.sparsify`) records; nobody sets them by hand."""
MOE_FIELD_KINDS: dict[str, str] = {
    "routing": "str",
    "num_experts": "int",
    "num_experts_per_tok": "int",
    "norm_topk_prob": "bool",
    "moe_intermediate_size": "int",
    "comet_keep_rate": "float",
    "moe_layers": "list",
    "router_aux_loss_coef": "float",
    "router_z_loss_coef": "float",
    "output_router_logits": "bool",
    "routing_seed": "int",
    "comet_block_size": "int",
    "comet_router": "str",
    "comet_router_rank": "int",
    "capacity_factor": "float",
    "router_jitter_noise": "float",
    "gate_hidden_size": "int",
    "mixture_top_k": "int",
    "deep_constraint_steps": "int",
    "deep_constraint_margin": "float",
    "similarity_beta_s": "float",
    "similarity_beta_d": "float",
    "similarity_num_pairs": "int",
    "expert_output_bias": "str",
    "router_scale": "float",
    "converted_from": "str",
    "conversion_method": "str",
    "split_method": "str",
    "conversion_seed": "int",
    "sparsify_cluster": "str",
}
"""Every field of `hf_comet.modeling.configuration_comet.CometMoEConfigMixin` and its kind (``bool``, ``list`` of
layer indices, ``float``, ``int`` or ``str``): ``hf-comet convert`` offers each as a flag."""

ROUTING_LOGGING = ("summary", "layers", "none")
"""Levels of `hf_comet.training.CometTrainer`'s routing telemetry: model summaries (default), plus every layer, or
nothing."""
