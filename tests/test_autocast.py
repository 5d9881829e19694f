"""Mixed precision: every routing runs under ``torch.autocast`` (bf16 and fp16) with both experts kernels, in
training (forward and backward) and evaluation, and stays close to the fp32 model."""

import pytest
import torch
from conftest import ROUTING_NAMES, main_output, tiny_inputs, tiny_model

CAUSAL = ("comet_gpt2", "AutoModelForCausalLM")
CASES = {name: dict(routing=name) for name in ROUTING_NAMES}
CASES["deep_top2"] = dict(routing="deep", mixture_top_k=2)
CASES["block_comet_dense"] = dict(routing="block_comet", comet_keep_rate=0.75)  # masked dense execution
CASES["switch_capacity"] = dict(routing="switch", capacity_factor=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_routing_and_kernel_runs_under_autocast_forward_and_backward(case, implementation, dtype):
    model = tiny_model(*CAUSAL, **CASES[case])
    model.set_experts_implementation(implementation)
    inputs = tiny_inputs(*CAUSAL)
    model.eval()
    with torch.no_grad():
        reference = main_output(model(**inputs)).float()
        with torch.autocast("cpu", dtype=dtype):
            low = main_output(model(**inputs)).float()
    # same routing decisions up to rounding near ties; logits of a 2-layer model stay close
    assert torch.isfinite(low).all()
    assert (low - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-2
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        out = model(**inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert model.transformer.h[0].mlp.experts.up_proj.grad is not None
