"""Recipe ``bert_mlm_cls``: dense vs MoE BERT, byte-level masked-LM pre-training on CPython's bundled documentation,
then sequence classification of standard-library docstrings by topic; or both on a user's labelled texts
(``--dataset``)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import datasets
import torch
import transformers

from ...data import stdlib_docstrings
from .base import (
    DatasetSource,
    Recipe,
    RecipeData,
    Settings,
    VariantJob,
    VariantRun,
    accuracy,
    mean_label_loss,
    register_recipe,
    torch_dataset,
)
from .text_data import TEXT_COLUMN, byte_tokenize, check_text_settings, load_text_data, text_windows

PAD_ID, MASK_ID, CLS_ID = 256, 257, 258  # byte vocabulary (0-255) plus BERT's special tokens
BYTE_VOCAB = 259


def shared_config(settings: Settings) -> dict:
    return dict(
        vocab_size=BYTE_VOCAB, pad_token_id=PAD_ID, max_position_embeddings=settings.seq_len,
        hidden_size=settings.hidden_size, num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads, intermediate_size=4 * settings.hidden_size, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def mask_bytes(ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT's 80/10/10 masking of 15% of the non-padding, non-[CLS] positions."""
    real = attention_mask.bool() & (ids != CLS_ID)
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & real
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(ids, MASK_ID), ids)
    random_bytes = torch.randint(0, 256, ids.shape, generator=generator)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_bytes, masked)
    return {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}


class MaskingCollator:
    """Dynamic BERT masking of byte sequences: 15% of the real tokens, 80% -> [MASK], 10% random byte, 10% kept.
    Rows that already carry ``labels`` (the fixed evaluation set) are left as they are."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {name: torch.stack([row[name] for row in rows]) for name in rows[0]}
        if "labels" in batch:
            return batch
        return mask_bytes(batch["input_ids"], batch["attention_mask"], self.generator)


def _argmax_logits(logits, labels):
    return logits.argmax(-1)


def _docstring_topics(settings: Settings, seed: int):
    """Standard-library docstrings with their topic as a `datasets.Dataset` tokenised into [CLS]-prefixed byte rows,
    texts identical once truncated kept once (they would leak from train to test), split 80/20 in a seeded order.
    Returns the train and test datasets and the topic names."""
    texts, labels, names = stdlib_docstrings()
    seen: dict[bytes, int] = {}
    for index, text in enumerate(texts):
        seen.setdefault(text.encode("utf-8")[: settings.seq_len - 1], index)
    kept = sorted(seen.values())
    topics = datasets.Dataset.from_dict({"text": [texts[i] for i in kept], "labels": [labels[i] for i in kept]})
    tokenized = byte_tokenize(topics, TEXT_COLUMN, settings.seq_len, prefix=CLS_ID, pad=PAD_ID)
    order = torch.randperm(len(topics), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = len(topics) // 5
    return tokenized.select(order[n_test:]), tokenized.select(order[:n_test]), names


def load_data(source: DatasetSource, seed: int) -> RecipeData:
    """A user's labelled texts (text column default ``text``, label column default ``label``): masked-LM
    pre-training on the train texts, then classification by label."""
    return load_text_data(source, seed, "bert_mlm_cls", labelled=True)


def run(job: VariantJob) -> VariantRun:
    settings, seed = job.settings, job.seed
    if job.data is None:
        train, evaluation = text_windows(settings, seed, prefix=CLS_ID)  # [CLS] is seen in pre-training too
        mlm_train = torch_dataset({"input_ids": train, "attention_mask": torch.ones_like(train)})
        eval_ids, eval_mask = evaluation, torch.ones_like(evaluation)
        cls_train, cls_test, names = _docstring_topics(settings, seed)
    else:  # pre-train on the user's train texts, evaluate the masked LM on the test texts
        cls_train, cls_test = (
            byte_tokenize(split, TEXT_COLUMN, settings.seq_len, prefix=CLS_ID, pad=PAD_ID)
            for split in (job.data.train, job.data.test)
        )
        names = job.data.label_names
        mlm_train = cls_train.select_columns(["input_ids", "attention_mask"])
        every = cls_test[:]  # all rows as stacked tensors
        eval_ids, eval_mask = every["input_ids"], every["attention_mask"]
    model = job.build_model("AutoModelForMaskedLM")
    eval_masked = torch_dataset(mask_bytes(eval_ids, eval_mask, torch.Generator().manual_seed(seed + 7)))
    trainer, mlm_metrics, seconds = job.train(
        model,
        mlm_train,
        eval_masked,
        workdir=job.workdir / "mlm",
        compute_metrics=accuracy,
        data_collator=MaskingCollator(seed),
        preprocess_logits=_argmax_logits,
    )
    mlm_loss = mean_label_loss(trainer.model, eval_masked)  # the denominator every variant shares
    # fine-tune the pre-trained encoder on a real labelled text task: the topic of a standard-library docstring
    pretrained = job.workdir / "mlm_checkpoint"
    model.save_pretrained(pretrained)
    classifier_class = transformers.AutoModelForSequenceClassification
    if job.variant == "dense":
        classifier_class = transformers.BertForSequenceClassification
    torch.manual_seed(seed)
    classifier = classifier_class.from_pretrained(
        pretrained, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    finetune = replace(settings, steps=settings.finetune_steps, learning_rate=settings.learning_rate / 2)
    trainer_cls, cls_metrics, cls_seconds = job.train(
        classifier,
        cls_train,
        cls_test,
        settings=finetune,
        workdir=job.workdir / "cls",
        compute_metrics=accuracy,
    )
    shutil.rmtree(pretrained, ignore_errors=True)
    results = {
        "mlm_val_loss": mlm_loss,
        "mlm_masked_accuracy": mlm_metrics["eval_accuracy"],
        "topic_test_accuracy": cls_metrics["eval_accuracy"],
        "topic_test_loss": mean_label_loss(trainer_cls.model, cls_test),
    }
    trainer_cls.state.log_history = [  # one curve: pre-training steps, then fine-tuning steps after them
        *trainer.state.log_history,
        *({**e, "step": e["step"] + settings.steps} for e in trainer_cls.state.log_history if "step" in e),
    ]
    trainer_cls.routing_history = trainer.routing_history + [
        {**h, "step": h["step"] + settings.steps} for h in trainer_cls.routing_history
    ]
    sample = {k: v for k, v in cls_test[:64].items() if k != "labels"}
    return VariantRun(trainer_cls, results, seconds + cls_seconds, sample)


RECIPE = register_recipe(
    Recipe(
        name="bert_mlm_cls",
        family="comet_bert",
        fast=Settings(steps=8, batch_size=8, hidden_size=32, num_layers=2, num_heads=4, learning_rate=3e-3,
                      eval_steps=4, logging_steps=4, seq_len=64, finetune_steps=8, num_train=400, num_eval=32),
        full=Settings(steps=500, batch_size=32, hidden_size=96, num_layers=4, num_heads=4, learning_rate=2e-3,
                      eval_steps=100, logging_steps=25, seq_len=128, finetune_steps=400, num_train=20000,
                      num_eval=256),
        default_variants=("dense", "comet"),
        shared_config=shared_config,
        run=run,
        data_description="masked-LM pre-training on the bytes of CPython's bundled documentation, then topic "
        "classification (4 classes) of standard-library docstrings.",
        dataset_name="standard-library docstring topics",
        min_settings={"num_train": 1, "finetune_steps": 1},
        check_settings=check_text_settings,
        load_data=load_data,
    )
)  # fmt: skip
