"""transformers' ViT model tests (ModelTesterMixin, ...) run on the hf_comet ViT classes.

Skipped unless transformers' test files are available (see ``_upstream.py`` and the README's development section).
"""

from __future__ import annotations

import functools
from unittest import mock

from . import _upstream as U

upstream = U.load("models.vit.test_modeling_vit")
configuration_common = U.load("test_configuration_common")

from hf_comet import CometViTConfig, CometViTForImageClassification, CometViTModel  # noqa: E402

OUR_CLASSES = {"ViTModel": CometViTModel, "ViTForImageClassification": CometViTForImageClassification}
# Top-k splits the FFN into 4 experts: the tester's width 37 becomes 64 (experts of 16, a multiple of 4 for
# grouped_mm). COMET keeps the upstream width.
TOPK_INTERMEDIATE_SIZE = 64

COMMON_MARKS = {
    "test_for_masked_image_modeling": U.not_provided("ViTForMaskedImageModeling"),
    **U.BATCHED_MM_REFUSED,
}
VARIANT_MARKS: dict[str, dict] = {"comet": {}, "topk": {}}


def _make(variant: str):
    moe = U.VARIANTS[variant]

    class Tester(upstream.ViTModelTester):
        def __init__(self, parent, **kwargs):
            super().__init__(parent, **kwargs)
            if moe["routing"] != "comet":
                self.intermediate_size = TOPK_INTERMEDIATE_SIZE

        def get_config(self):
            # The upstream tester builds `ViTConfig(...)` by its module-level name: build ours with the same fields.
            with mock.patch.object(upstream, "ViTConfig", functools.partial(CometViTConfig, **moe)):
                return super().get_config()

    class Test(upstream.ViTModelTest):
        all_model_classes = (CometViTModel, CometViTForImageClassification)
        pipeline_model_mapping = {
            "image-feature-extraction": CometViTModel,
            "image-classification": CometViTForImageClassification,
        }

        def setUp(self):
            U.patch_module_globals(self, upstream, {**OUR_CLASSES, "ViTModelTester": Tester})
            super().setUp()
            self.config_tester = configuration_common.ConfigTester(
                self, config_class=CometViTConfig, has_text_modality=False, hidden_size=32, **moe
            )

    name = f"{'TopK' if variant == 'topk' else variant.capitalize()}ViTUpstreamTest"
    Test.__name__ = Test.__qualname__ = name
    U.apply_marks(Test, U.marks_for(variant, COMMON_MARKS, VARIANT_MARKS))
    return Test


CometViTUpstreamTest = _make("comet")
TopKViTUpstreamTest = _make("topk")

if U.baseline_enabled():

    class DenseViTUpstreamTest(upstream.ViTModelTest):
        """The upstream class unmodified (stock dense ViT): the reference run."""
