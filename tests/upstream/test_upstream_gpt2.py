"""transformers' GPT-2 model tests (ModelTesterMixin, GenerationTesterMixin, ...) run on the hf_comet GPT-2 classes.

Skipped unless transformers' test files are available (see ``_upstream.py`` and the README's development section).
"""

from __future__ import annotations

from . import _upstream as U

upstream = U.load("models.gpt2.test_modeling_gpt2", required=("causal_lm_tester.py", "generation/test_utils.py"))
configuration_common = U.load("test_configuration_common")

from hf_comet import (  # noqa: E402
    CometGPT2Config,
    CometGPT2ForCausalLM,
    CometGPT2ForSequenceClassification,
    CometGPT2Model,
)

OUR_CLASSES = {
    "GPT2Model": CometGPT2Model,
    "GPT2LMHeadModel": CometGPT2ForCausalLM,
    "GPT2ForSequenceClassification": CometGPT2ForSequenceClassification,
}

COMMON_MARKS = {
    "test_gpt2_double_lm_head_model": U.not_provided("GPT2DoubleHeadsModel"),
    **U.BATCHED_MM_REFUSED,
    "test_sdpa_padding_matches_padding_free_with_position_ids": U.design(
        "routing is discrete (COMET's unit choice, top-k's expert choice): in bf16/fp16 the padded and the "
        "padding-free layouts round the FFN input differently, which can flip a near-tie choice and move a few "
        "logits by more than the test's 8e-3 (0.1-0.8% of them in our runs; the fp32 comparison passes)"
    ),
    "test_moe_parallel_plans_shard_experts": U.design(
        "the TP plan shards every expert weight (tests/test_parallel_plans.py), but hf_comet has no expert-parallel "
        "plan: transformers' EP dispatch calls experts with (hidden_states, top_k_index, top_k_weights), ours take "
        "a routing decision (docs/decisions.md, 'Parallelism plans'), and this test checks the EP plan too"
    ),
}
VARIANT_MARKS: dict[str, dict] = {"comet": {}, "topk": {}}
# Fail for the dense GPT2LMHeadModel too when the checkout is older than the installed transformers.
SKEW = {
    name: "the older checkout's assisted-decoding tests ask for cache_implementation='dynamic_full', which the "
    "installed transformers no longer accepts (the dense GPT2LMHeadModel fails the same way)"
    for name in (
        "test_assisted_decoding_matches_greedy_search_0_random",
        "test_assisted_decoding_matches_greedy_search_1_same",
        "test_assisted_decoding_sample",
    )
}
SKEW["test_eager_padding_matches_padding_free_with_position_ids"] = (
    "the older checkout's generation/test_utils.py reads model_class._is_stateful, which transformers 5.25 removed "
    "(AttributeError; the dense GPT2LMHeadModel has no such attribute either)"
)


def _make(variant: str):
    moe = U.VARIANTS[variant]

    class Tester(upstream.GPT2ModelTester):
        config_class = CometGPT2Config
        base_model_class = CometGPT2Model
        causal_lm_class = CometGPT2ForCausalLM
        sequence_classification_class = CometGPT2ForSequenceClassification

        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            # CausalLMModelTester passes every tester attribute named like a config argument: set the MoE ones
            # (its own MoE defaults, e.g. moe_intermediate_size=16, are for other models' fields of the same name).
            for key, value in moe.items():
                setattr(self, key, value)

    class Test(upstream.GPT2ModelTest):
        model_tester_class = Tester
        all_model_classes = (CometGPT2Model, CometGPT2ForCausalLM, CometGPT2ForSequenceClassification)
        pipeline_model_mapping = {
            "feature-extraction": CometGPT2Model,
            "text-classification": CometGPT2ForSequenceClassification,
            "text-generation": CometGPT2ForCausalLM,
            "zero-shot": CometGPT2ForSequenceClassification,
        }

        def setUp(self):
            U.patch_module_globals(self, upstream, OUR_CLASSES)
            super().setUp()
            self.config_tester = configuration_common.ConfigTester(self, config_class=CometGPT2Config, **moe)

    name = f"{'TopK' if variant == 'topk' else variant.capitalize()}GPT2UpstreamTest"
    Test.__name__ = Test.__qualname__ = name
    U.apply_marks(Test, U.marks_for(variant, COMMON_MARKS, VARIANT_MARKS, SKEW))
    return Test


CometGPT2UpstreamTest = _make("comet")
TopKGPT2UpstreamTest = _make("topk")

if U.baseline_enabled():

    class DenseGPT2UpstreamTest(upstream.GPT2ModelTest):
        """The upstream class unmodified (stock dense GPT-2): the reference run."""
