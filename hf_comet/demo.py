"""The README's main job: build each MoE family with each router, train briefly on real bundled data, evaluate,
save, reload through the Auto classes and check the reloaded model gives identical outputs.

* ViT on scikit-learn's digits (image classification, test accuracy);
* GPT-2 causal LM on CPython's bundled English documentation text (byte-level, validation perplexity);
* BERT masked LM on the same text (masked-byte accuracy on held-out text).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig

from .data import byte_windows, digits_images, english_text_bytes
from .io import atomic_save_pretrained

MASK_ID = 256  # the extra token of the byte vocabulary used by BERT's masked LM


@dataclass
class DemoResult:
    family: str
    routing: str
    metric: str
    before: float
    after: float
    seconds: float
    reload_identical: bool
    checkpoint: str


def _train(model: torch.nn.Module, next_batch: Callable[[int], dict], steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        loss = model(**next_batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _mask_bytes(ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """BERT-style masking of 15% of the bytes (always replaced by the mask token, for simplicity)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(ids.shape, generator=g) < 0.15
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(chosen, torch.full_like(ids, MASK_ID), ids), "labels": labels}


def _vit_digits(routing: str, steps: int) -> tuple[torch.nn.Module, Callable, Callable, dict, str]:
    train, test = digits_images()
    config = AutoConfig.for_model(
        "comet_vit", routing=routing, image_size=8, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, num_labels=10, num_experts=4, num_experts_per_tok=1,
        comet_keep_rate=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.AutoModelForImageClassification.from_config(config)

    def next_batch(step: int) -> dict:
        idx = torch.randint(0, len(train["labels"]), (64,), generator=torch.Generator().manual_seed(step))
        return {k: v[idx] for k, v in train.items()}

    @torch.no_grad()
    def evaluate(m) -> float:
        return (m(pixel_values=test["pixel_values"]).logits.argmax(-1) == test["labels"]).float().mean().item()

    return model, next_batch, evaluate, {"pixel_values": test["pixel_values"][:16]}, "test accuracy"


def _text_split() -> tuple:
    data = english_text_bytes()
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def _gpt2_text(routing: str, steps: int) -> tuple:
    train, held_out = _text_split()
    config = AutoConfig.for_model(
        "comet_gpt2", routing=routing, vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=256,
        num_experts=4, num_experts_per_tok=1, comet_keep_rate=0.5, bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    eval_ids = byte_windows(held_out, 64, 64, seed=1)

    def next_batch(step: int) -> dict:
        ids = byte_windows(train, 64, 32, seed=100 + step)
        return {"input_ids": ids, "labels": ids}

    @torch.no_grad()
    def evaluate(m) -> float:
        return math.exp(m(input_ids=eval_ids, labels=eval_ids).loss.item())

    return model, next_batch, evaluate, {"input_ids": eval_ids[:4]}, "val perplexity"


def _bert_mlm(routing: str, steps: int) -> tuple:
    train, held_out = _text_split()
    config = AutoConfig.for_model(
        "comet_bert", routing=routing, vocab_size=257, max_position_embeddings=64, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, num_experts=4, num_experts_per_tok=1, comet_keep_rate=0.5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.AutoModelForMaskedLM.from_config(config)
    eval_batch = _mask_bytes(byte_windows(held_out, 64, 64, seed=2), seed=3)

    def next_batch(step: int) -> dict:
        return _mask_bytes(byte_windows(train, 64, 32, seed=200 + step), seed=step)

    @torch.no_grad()
    def evaluate(m) -> float:
        logits = m(input_ids=eval_batch["input_ids"]).logits
        chosen = eval_batch["labels"] != -100
        return (logits.argmax(-1)[chosen] == eval_batch["labels"][chosen]).float().mean().item()

    return model, next_batch, evaluate, {"input_ids": eval_batch["input_ids"][:4]}, "masked-byte accuracy"


TASKS = {"comet_vit": _vit_digits, "comet_gpt2": _gpt2_text, "comet_bert": _bert_mlm}


def run_demo(
    output_dir: str | Path = "runs/demo", steps: int = 300, seed: int = 0, log: Callable[[str], None] = print
) -> list[DemoResult]:
    """Train, evaluate, save and reload every family with both routers; returns one `DemoResult` each."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    output_dir = Path(output_dir)
    results = []
    for family, build in TASKS.items():
        for routing in ("comet", "topk"):
            torch.manual_seed(seed)
            start = time.perf_counter()
            model, next_batch, evaluate, probe, metric = build(routing, steps)
            model.eval()
            before = evaluate(model)
            _train(model, next_batch, steps, lr=3e-3)
            after = evaluate(model)
            path = atomic_save_pretrained(model, output_dir / f"{family}-{routing}")
            auto = getattr(transformers, next(a for a, c in model._comet_auto_classes.items() if c is type(model)))
            reloaded = auto.from_pretrained(path).eval()
            with torch.no_grad():
                identical = torch.equal(model(**probe).logits, reloaded(**probe).logits)
            result = DemoResult(
                family, routing, metric, before, after, time.perf_counter() - start, identical, str(path)
            )
            log(
                f"{family:<11} {routing:<6} {metric:<21} {before:>8.3f} -> {after:>8.3f}  reload {'identical' if identical else 'DIFFERENT'}  ({result.seconds:.1f}s)"
            )
            results.append(result)
    return results
