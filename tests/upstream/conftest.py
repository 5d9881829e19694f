"""Settings for the adapters that run transformers' own tests: its markers, and transformers' warnings back on."""

import pytest

# Registered by transformers' root conftest and testing_utils (neither is loaded here): avoids unknown-mark warnings.
UPSTREAM_MARKERS = (
    "generate",
    "torch_compile_test",
    "torch_export_test",
    "onnx_export_test",
    "executorch_export_test",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "timeout",
    "slow",
    "order",
    "is_agent_test",
    "is_expert_parallel_test",
    "is_fsdp_test",
    "is_pipeline_test",
    "is_staging_test",
    "is_tensor_parallel_test",
    "is_training_test",
)


def pytest_configure(config):
    for marker in UPSTREAM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: transformers' own marker (upstream tests)")


@pytest.fixture(autouse=True)
def _transformers_warnings_on():
    """tests/conftest.py silences transformers' logging; upstream tests assert on its warnings (CaptureLogger)."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_warning()
    yield
    logging.set_verbosity(previous)
