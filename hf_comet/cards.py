"""Model cards for hf_comet checkpoints, rendered with huggingface_hub's ``ModelCard``/``ModelCardData``.

The card says in words how the model routes, shows results and plots when a run provides them, how to load it, and
what to cite. Every value that comes from outside the library (a source folder's name, a user's dataset file name, a
repo id or base model, plot file names, tags) reaches the card only through `card_text` / `card_code` (control
characters and newlines gone, HTML and markdown punctuation escaped, bounded length) or after validation; the front
matter is serialised by ``ModelCardData`` from those values, never copied. ``datasets_text`` is the caller's own
markdown (a recipe passes a user's data description through `card_text`).
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .convert.companions import is_hub_id, recorded_source
from .io import atomic_write_text
from .modeling.moe_routers import ROUTER_CLASSES

PIPELINE_TAGS = {
    "ForCausalLM": "text-generation",
    "DoubleHeadsModel": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForPreTraining": "fill-mask",  # BERT's pre-training heads (the Hub tags bert-base-uncased so)
    "ForSequenceClassification": "text-classification",
    "ForNextSentencePrediction": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForImageClassification": "image-classification",
    "ForMaskedImageModeling": "image-feature-extraction",
}
"""Our class name's suffix -> the card's ``pipeline_tag``; any other head (a base model, multiple choice) is tagged
``feature-extraction``."""

MAX_CARD_VALUE = 300
"""The most characters of one outside value a card shows (longer ones are cut, with an ellipsis)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|~>-])")
_PLOT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.png")


def _one_line(value: Any) -> str:
    text = _CONTROL.sub(" ", str(value)).strip()
    return text if len(text) <= MAX_CARD_VALUE else text[: MAX_CARD_VALUE - 1] + "…"


def card_text(value: Any) -> str:
    """``value`` as inert markdown text: one line, HTML-escaped, markdown punctuation backslash-escaped."""
    return _MARKDOWN.sub(r"\\\1", html.escape(_one_line(value), quote=False))


def card_code(value: Any) -> str:
    """``value`` for an inline code span: one line without backticks (a code span shows HTML as text)."""
    return _one_line(value).replace("`", "'")


def _repo_hint(repo_id: str | None) -> str:
    """A repo id the loading snippet may quote in a Python string, else the placeholder."""
    return repo_id if repo_id and is_hub_id(repo_id) and len(repo_id) <= 96 else "path/or/org-name"


def describe_routing(config) -> str:
    """The routing configuration of ``config`` in words (each router describes itself)."""
    return ROUTER_CLASSES[config.routing].describe(config)


TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
CONFIG_ROWS = ("routing", "num_experts", "num_experts_per_tok", "mixture_top_k", "comet_keep_rate", "comet_block_size")
CONFIG_ROWS += ("comet_router", "capacity_factor", "moe_layers", "router_aux_loss_coef", "routing_seed")
"""The config fields a card's table may show, in order; a card shows those its routing reads (`config_rows`)."""


def config_rows(config) -> list[tuple[str, Any]]:
    """``(field, value)`` of every `CONFIG_ROWS` field the routing of ``config`` reads: the fields every routing reads
    (``routing``, ``moe_layers``, ``routing_seed``), the router's ``config_fields`` and the fields it fixes
    (``fixed_fields``: Switch's ``num_experts_per_tok = 1``). A COMET card so lists no expert count, top-k or aux-loss
    weight, which COMET never reads."""
    from .modeling.configuration_comet import MOE_FIELD_RULES

    router = ROUTER_CLASSES[config.routing]
    read = {name for name, rule in MOE_FIELD_RULES.items() if rule.common}
    read |= set(router.config_fields) | set(getattr(router, "fixed_fields", {}))
    return [(name, getattr(config, name)) for name in CONFIG_ROWS if name in read and hasattr(config, name)]


def _statistics_rows(model) -> tuple[list[list[str]], int]:
    rows, tokens = [], 0
    if not hasattr(model, "routing_statistics"):
        return rows, tokens
    for layer, stats in sorted(model.routing_statistics().items()):
        if not stats["tokens"]:
            continue
        tokens = stats["tokens"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
        keys = ("max_load_share", "min_load_share", "dead_experts", "gate_entropy", "usage_entropy")
        rows.append([str(layer), *(fmt(stats[k]) for k in keys), fmt(stats["overlap_similarity_correlation"])])
    return rows, tokens


def render_model_card(
    model,
    results: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    datasets_text: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
) -> ModelCard:
    """The `ModelCard` of ``model`` (an hf_comet model), rendered from ``templates/model_card.md``.

    Metadata: ``library_name``, ``pipeline_tag`` (from the head), ``tags`` (``moe``, the routing, ``custom_code``,
    and the model's own tags), ``license``, ``base_model`` (the conversion source when it is a Hub repo id, or the
    ``base_model`` argument), ``datasets`` and, with ``results``, ``eval_results`` (rendered as ``model-index``).
    The body says how the model routes in words, its provenance, results, routing statistics of the current
    window (when it has data), the plots (file names relative to the card), how to load it, and what to cite.
    """
    config = model.config
    head = next((suffix for suffix in PIPELINE_TAGS if type(model).__name__.endswith(suffix)), None)
    source = recorded_source(getattr(config, "converted_from", None))  # older checkpoints recorded absolute paths
    inherited = getattr(model, "conversion_source", None)  # set by convert_to_moe (hf_comet.convert.companions)
    inherited_card = inherited.card if inherited is not None else {}
    if base_model is None and inherited is not None:
        base_model = inherited.base_model  # the Hub id converted from, or the base model the source's card names
    if base_model is None and source and is_hub_id(source):
        base_model = source  # converted from a Hub checkpoint (local sources are recorded as ./<folder name>)
    if base_model is not None and not is_hub_id(str(base_model)):
        base_model = None  # the card's base_model names a Hub repo; anything else stays out of the front matter
    # a conversion is a derived work: the source's license, or none stated when its card gives none
    license_ = inherited_card.get("license") if getattr(config, "conversion_method", None) else "apache-2.0"
    datasets = datasets if datasets is not None else inherited_card.get("datasets")
    tags = ["moe", "mixture-of-experts", "hf_comet", config.routing, config.model_type, "custom_code"]
    tags += [t for t in (getattr(model, "model_tags", None) or []) if t not in tags and isinstance(t, str)
             and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}", t)]  # fmt: skip
    pipeline_tag = PIPELINE_TAGS.get(head, "feature-extraction")
    eval_results = None
    if results:
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=(datasets or ["custom"])[0],
                dataset_name=html.escape(_one_line(dataset_name or "evaluation set"), quote=False),
                metric_type=key,
                metric_value=value,
            )
            for key, value in results.items()
            if isinstance(value, float) and not math.isnan(value)
        ]
    extra = {key: inherited_card[key] for key in ("license_name", "license_link") if key in inherited_card}
    data = ModelCardData(
        library_name="transformers",
        license=license_,
        language=inherited_card.get("language"),
        pipeline_tag=pipeline_tag,
        tags=tags,
        base_model=base_model,
        datasets=datasets,
        model_name=_repo_hint(repo_id) if repo_id else f"{type(model).__name__}-{config.routing}",
        eval_results=eval_results,
        **extra,
    )
    provenance = None
    if getattr(config, "conversion_method", None):
        where = "the dense checkpoint" if source and is_hub_id(source) else "the dense checkpoint in the local folder"
        provenance = (
            f"Converted from {where} `{card_code(source)}`"
            + (f" (base model `{card_code(base_model)}`)" if base_model and base_model != source else "")
            + f" with method `{config.conversion_method}`"
            + (f" (unit partition `{config.split_method}`)" if config.split_method else "")
            + f", conversion seed {config.conversion_seed}."
        )
    statistics, statistics_tokens = _statistics_rows(model)
    citations = [ROUTER_CLASSES[config.routing].citation] if ROUTER_CLASSES[config.routing].citation else []
    if getattr(config, "conversion_method", None) == "upcycle":
        citations.append("Komatsuzaki, A. et al. *Sparse Upcycling.* ICLR 2023.")
    if getattr(config, "conversion_method", None) == "split":
        citations.append("Zhang, Z. et al. *MoEfication.* Findings of ACL 2022.")
    family = getattr(model, "family", None)
    # the first Auto class our class is registered with (GPT-2's LM head: AutoModelForCausalLM), or none (DoubleHeads)
    auto = next((name for name, cls in (family.auto_classes.items() if family else ()) if cls is type(model)), None)
    if family is None:
        auto = f"AutoModel{head}" if head else "AutoModel"
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        model_title=f"{type(model).__name__} ({config.routing} routing)",
        family_name=getattr(getattr(model, "family", None), "display_name", config.model_type),
        model_class=type(model).__name__,
        routing_description=describe_routing(config),
        config_rows=config_rows(config),
        provenance=provenance,
        training_data=datasets_text,
        results=[(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in (results or {}).items()],
        statistics=statistics,
        statistics_tokens=statistics_tokens,
        plots=[plot for plot in plots or [] if _PLOT.fullmatch(plot)],
        auto_class=auto,
        module_name=type(model).__module__.rsplit(".", 1)[-1],
        repo_hint=_repo_hint(repo_id),
        citations=citations,
    )


def write_model_card(model, directory: str | Path, **kwargs) -> Path:
    """Render the card and write ``directory/README.md`` atomically (`hf_comet.io.atomic_write_text`)."""
    card = render_model_card(model, **kwargs)
    return atomic_write_text(Path(directory) / "README.md", str(card))


__all__ = ["card_code", "card_text", "describe_routing", "render_model_card", "write_model_card"]
