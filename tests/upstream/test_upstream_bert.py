"""transformers' BERT model tests (ModelTesterMixin, GenerationTesterMixin, ...) run on the hf_comet BERT classes.

Skipped unless transformers' test files are available (see ``_upstream.py`` and the README's development section).
"""

from __future__ import annotations

import functools
from unittest import mock

from . import _upstream as U

upstream = U.load("models.bert.test_modeling_bert", required=("generation/test_utils.py",))
configuration_common = U.load("test_configuration_common")

from hf_comet import (  # noqa: E402
    CometBertConfig,
    CometBertForMaskedLM,
    CometBertForSequenceClassification,
    CometBertForTokenClassification,
    CometBertModel,
)

OUR_CLASSES = {
    "BertModel": CometBertModel,
    "BertForMaskedLM": CometBertForMaskedLM,
    "BertForSequenceClassification": CometBertForSequenceClassification,
    "BertForTokenClassification": CometBertForTokenClassification,
}
# Top-k splits the FFN into 4 experts: the tester's width 37 becomes 64 (experts of 16, a multiple of 4 for
# grouped_mm). COMET keeps the upstream width.
TOPK_INTERMEDIATE_SIZE = 64

COMMON_MARKS = {
    "test_feed_forward_chunking": U.design(
        "comet_bert refuses chunk_size_feed_forward > 0, also when assigned after construction (routing statistics "
        "and aux losses need whole sequences; docs/decisions.md, 'BERT feed-forward chunking')"
    ),
    "test_for_causal_lm": U.not_provided("BertLMHeadModel"),
    "test_for_causal_lm_decoder": U.not_provided("BertLMHeadModel"),
    "test_decoder_model_past_with_large_inputs": U.not_provided("BertLMHeadModel"),
    "test_for_multiple_choice": U.not_provided("BertForMultipleChoice"),
    "test_for_next_sequence_prediction": U.not_provided("BertForNextSentencePrediction"),
    "test_for_pretraining": U.not_provided("BertForPreTraining"),
    "test_for_question_answering": U.not_provided("BertForQuestionAnswering"),
    "test_generation_tester_mixin_inheritance": U.design(
        "hf_comet provides no generative BERT head (BertLMHeadModel), so no class here can generate while the "
        "upstream test class inherits GenerationTesterMixin for BertLMHeadModel"
    ),
    **U.BATCHED_MM_REFUSED,
}
VARIANT_MARKS: dict[str, dict] = {"comet": {}, "topk": {}}


def _make(variant: str):
    moe = U.VARIANTS[variant]

    class Tester(upstream.BertModelTester):
        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            if moe["routing"] != "comet":
                self.intermediate_size = TOPK_INTERMEDIATE_SIZE

        def get_config(self):
            # The upstream tester builds `BertConfig(...)` by its module-level name: build ours with the same fields.
            with mock.patch.object(upstream, "BertConfig", functools.partial(CometBertConfig, **moe)):
                return super().get_config()

    class Test(upstream.BertModelTest):
        all_model_classes = (
            CometBertModel,
            CometBertForMaskedLM,
            CometBertForSequenceClassification,
            CometBertForTokenClassification,
        )
        pipeline_model_mapping = {
            "feature-extraction": CometBertModel,
            "fill-mask": CometBertForMaskedLM,
            "text-classification": CometBertForSequenceClassification,
            "token-classification": CometBertForTokenClassification,
            "zero-shot": CometBertForSequenceClassification,
        }

        def test_config(self):
            # Design: comet_bert refuses chunk_size_feed_forward > 0 (README, "Decisions": BERT), which the
            # upstream common kwargs set to 5; every other common check runs as upstream.
            kwargs = {
                k: v for k, v in configuration_common.config_common_kwargs.items() if k != "chunk_size_feed_forward"
            }
            with mock.patch.object(configuration_common, "config_common_kwargs", kwargs):
                super().test_config()

        def setUp(self):
            U.patch_module_globals(self, upstream, {**OUR_CLASSES, "BertModelTester": Tester})
            super().setUp()
            self.config_tester = configuration_common.ConfigTester(
                self, config_class=CometBertConfig, hidden_size=32, **moe
            )

    name = f"{'TopK' if variant == 'topk' else variant.capitalize()}BertUpstreamTest"
    Test.__name__ = Test.__qualname__ = name
    U.apply_marks(Test, U.marks_for(variant, COMMON_MARKS, VARIANT_MARKS))
    return Test


CometBertUpstreamTest = _make("comet")
TopKBertUpstreamTest = _make("topk")

if U.baseline_enabled():

    class DenseBertUpstreamTest(upstream.BertModelTest):
        """The upstream class unmodified (stock dense BERT): the reference run."""
