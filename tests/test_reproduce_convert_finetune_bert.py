"""The convert_finetune_bert claim (issue 14 §6, BERT): its splits, the variants' defining properties at conversion,
the accuracy counts against hand counts, and the quick claim end to end. The verdict itself comes from the full run."""

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
import transformers

from hf_comet.reproduce import convert_finetune_bert as bert
from hf_comet.reproduce.core import MissingRuns


def test_the_splits_are_disjoint_and_the_test_split_is_the_recipe_s():
    from hf_comet.training.recipes.bert_mlm_cls import _docstring_topics

    train, validation, test, names = bert.topic_splits(bert.QUICK)
    recipe_train, recipe_test, _ = _docstring_topics(bert.recipe_settings(bert.QUICK), 0)
    assert len(names) == 4 and len(validation) == len(recipe_train) // 5
    assert len(train) + len(validation) == len(recipe_train)
    assert torch.equal(test[:]["input_ids"], recipe_test[:]["input_ids"])
    rows = [tuple(r.tolist()) for split in (train, validation, test) for r in split[:]["input_ids"]]
    assert len(set(rows)) == len(rows)  # no text in two splits (the recipe keeps truncated duplicates once)


def _tiny_classifier() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=259, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=4)  # fmt: skip
    return transformers.BertForSequenceClassification(config).eval()


def test_scheduled_comet_and_upcycled_top_k_start_as_the_dense_model_and_comet_at_half_does_not():
    dense = _tiny_classifier()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    def features(model):  # the encoder's last hidden states: the classifier's logits are too small to tell apart
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]

    reference = features(dense)
    assert bert.convert("dense", dense) is dense
    assert torch.allclose(features(bert.convert("comet", dense, keep_rate=1.0)), reference, atol=1e-5)  # the schedule's start
    assert torch.allclose(features(bert.convert("topk", dense)), reference, atol=1e-5)
    assert (features(bert.convert("comet", dense, keep_rate=0.5)) - reference).abs().max() > 1e-2


class _Fixed:
    """A stand-in model whose logits are fixed: the accuracy counts read nothing else."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits[: len(input_ids)])

    def eval(self):
        return self

    def train(self):
        return self


def test_masked_and_topic_accuracy_match_a_hand_count():
    logits = torch.zeros(2, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[1, 2, 4] = 1.0  # predicts 1, 2, 0 / 0, 0, 4
    labels = torch.tensor([[1, -100, 3], [-100, 0, 4]])  # 4 masked bytes: right, wrong, right, right
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "labels": labels}
    scores = bert.masked_scores(_Fixed(logits), batch)
    assert scores["masked_accuracy"] == pytest.approx(3 / 4)
    chosen = [(0, 0, 1), (0, 2, 3), (1, 1, 0), (1, 2, 4)]
    hand = [-torch.log_softmax(logits[i, j], -1)[label] for i, j, label in chosen]
    assert scores["masked_loss"] == pytest.approx(float(sum(hand) / 4))
    rows = datasets.Dataset.from_dict({"input_ids": [[0, 0]] * 3, "attention_mask": [[1, 1]] * 3,
                                       "labels": [1, 2, 0]}).with_format("torch")  # fmt: skip
    predictions = torch.tensor([[0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # 1, 0, 0
    assert bert.topic_accuracy(_Fixed(predictions), rows) == pytest.approx(2 / 3)


def test_the_quick_claim_renders_its_verdict_and_plot_and_reruns_from_the_cache(quick_reproduction, tmp_path):
    cache = quick_reproduction[0] / "cache" / "quick"  # the session's quick run: these runs are there
    result = bert.claim(cache, tmp_path / "plots", quick=True)
    assert any(f"**{word}**" in result.verdict for word in ("met", "not met", "inconclusive"))  # a margin's words
    assert (tmp_path / "plots" / "convert_finetune_bert_curves.png").stat().st_size > 0
    entries = [json.loads(line) for line in (cache / "convert_finetune_bert.jsonl").read_text().splitlines()]
    assert len(entries) == 1 + len(bert.QUICK.variants) * len(bert.QUICK.seeds)
    first = {(e["spec"]["variant"], e["spec"]["seed"]): e["record"] for e in entries}
    for seed in bert.QUICK.seeds:  # same head for every variant of a seed; the schedule starts as the dense model
        assert first["comet_schedule", seed]["curve"][0] == first["dense", seed]["curve"][0]
        assert first["comet_schedule", seed]["masked_loss_start"] == first["dense", seed]["masked_loss_start"]
    assert not list((cache / "checkpoints").glob("bert-ft-*"))  # fine-tune scratch removed
    again = bert.claim(cache, tmp_path / "plots", quick=True, cached_only=True)
    assert again.verdict == result.verdict and again.markdown == result.markdown
    with pytest.raises(MissingRuns):
        bert.claim(tmp_path / "other", tmp_path / "plots", quick=True, cached_only=True)
