"""Model cards for hf_comet checkpoints, rendered with huggingface_hub's ``ModelCard``/``ModelCardData``.

The card says in words how the model routes, shows results and plots when a run provides them, how to load it, and
what to cite. (Conversion provenance and Hub templates extend this in the conversion/sharing work.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

PIPELINE_TAGS = {
    "ForCausalLM": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForImageClassification": "image-classification",
}

CITATIONS = {
    "comet": "Shaier, Y. et al. *Conditionally Overlapping Mixture of ExperTs.* ICLR 2025.",
    "topk": "Fedus, W., Zoph, B., Shazeer, N. *Switch Transformers.* JMLR 2022 (load-balancing loss).",
    "noisy_topk": "Shazeer, N. et al. *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts "
    "Layer.* ICLR 2017.",
    "switch": "Fedus, W., Zoph, B., Shazeer, N. *Switch Transformers.* JMLR 2022.",
    "attentive": "Krishnamurthy, Y., Watkins, C., Gärtner, T. *Improving Expert Specialization in Mixture of Experts.* "
    "arXiv:2302.14703, 2023.",
    "deep": "Eigen, D., Ranzato, M., Sutskever, I. *Learning Factored Representations in a Deep Mixture of Experts.* "
    "arXiv:1312.4314, 2013.",
}


def describe_routing(config) -> str:
    """The routing configuration of ``config`` in words."""
    layers = "every block" if config.moe_layers is None else f"blocks {config.moe_layers}"
    if config.routing == "comet":
        if config.comet_block_size > 1:
            groups = config.ffn_width // config.comet_block_size
            what = f"blocks of {config.comet_block_size} units ({groups} blocks)"
        else:
            what = f"units of the FFN (width {config.ffn_width})"
        return (
            f"COMET routing in {layers}: a frozen random projection of each token's FFN input (seed "
            f"{config.routing_seed}, stored in the checkpoint) keeps the top {config.comet_keep_rate:g} fraction of "
            f"the {what} per token, weight 1. No trainable router, no auxiliary loss."
        )
    experts = f"{config.num_experts} experts of width {config.expert_intermediate_size}"
    words = {
        "topk": f"a learned softmax gate sends each token to its top {config.num_experts_per_tok} of {experts}",
        "noisy_topk": f"a noisy top-{config.num_experts_per_tok} gate (Shazeer et al.) over {experts}",
        "switch": f"a Switch top-1 gate over {experts}"
        + (f", capacity factor {config.capacity_factor:g}" if config.capacity_factor else ", dropless"),
        "attentive": f"an attentive gate (query from a {config.gate_hidden_size}-unit trunk, keys from each expert) "
        f"mixing {experts}",
        "deep": f"a two-layer softmax gate ({config.gate_hidden_size} hidden units, Deep MoE) mixing {experts}",
    }[config.routing]
    return f"Learned routing in {layers}: {words}; aux-loss weight {config.router_aux_loss_coef:g}."


def render_model_card(
    model,
    results: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    datasets_text: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """A `ModelCard` for ``model`` (an hf_comet model) with optional results table, plot files (names relative to
    the card) and a line about the training data."""
    config = model.config
    head = next((suffix for suffix in PIPELINE_TAGS if type(model).__name__.endswith(suffix)), None)
    tags = ["moe", "mixture-of-experts", "hf_comet", config.routing, config.model_type, "custom_code"]
    data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=PIPELINE_TAGS.get(head, "feature-extraction"),
        tags=tags,
        base_model=base_model,
    )
    auto = f"AutoModel{head}" if head else "AutoModel"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {type(model).__name__} ({config.routing} routing)",
        "",
        f"A {config.model_type.removeprefix('comet_').upper()} model whose feed-forward blocks are mixture-of-experts "
        "blocks, built with hf_comet on Hugging Face Transformers.",
        "",
        "## Routing",
        "",
        describe_routing(config),
        "",
    ]
    if datasets_text:
        lines += ["## Training data", "", datasets_text, ""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in results.items()
        ]
        lines.append("")
    for plot in plots or []:
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    lines += [
        "## How to load",
        "",
        "```python",
        "import hf_comet  # registers the comet_* model types",
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("path/or/repo")',
        f'# without hf_comet installed: {auto}.from_pretrained("path/or/repo", trust_remote_code=True)',
        "```",
        "",
        "## Citation",
        "",
        f"- {CITATIONS[config.routing]}",
        "",
    ]
    return ModelCard("\n".join(lines))


def write_model_card(model, directory: str | Path, **kwargs) -> Path:
    """Render the card and write ``directory/README.md`` atomically (temp file, then rename)."""
    card = render_model_card(model, **kwargs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".README.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        f.write(str(card))
    target = directory / "README.md"
    os.replace(temp, target)
    return target


__all__ = ["describe_routing", "render_model_card", "write_model_card"]
