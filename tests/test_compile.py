"""torch.compile(fullgraph=True) traces every routing with no graph break: the training forward with its aux loss
and backward, evaluation, and cached generation with a fullgraph compile config. Dynamo's ``eager`` backend checks
the capture (what fullgraph is about) without Inductor's code generation, which would not fit the test budget."""

import pytest
import torch
from conftest import ROUTING_NAMES, tiny_inputs, tiny_model
from transformers import CompileConfig

CAUSAL = ("comet_gpt2", "AutoModelForCausalLM")
EXTRA = {  # options that add a code path of their own
    "switch_capacity": dict(routing="switch", capacity_factor=1.0),
    "topk_similarity": dict(routing="topk", similarity_beta_s=0.5, similarity_beta_d=0.1, router_z_loss_coef=0.01),
    "deep_top2": dict(routing="deep", mixture_top_k=2),
}
CASES = {name: dict(routing=name) for name in ROUTING_NAMES} | EXTRA


def _compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend="eager")


@pytest.mark.parametrize("case", list(CASES))
def test_a_training_step_compiles_with_fullgraph_and_matches_eager(case):
    inputs = tiny_inputs(*CAUSAL)
    eager, compiled_model = (tiny_model(*CAUSAL, **CASES[case]).train() for _ in range(2))
    compiled = _compiled(compiled_model)
    torch.manual_seed(3)
    expected = eager(**inputs)
    torch.manual_seed(3)
    got = compiled(**inputs)  # raises on any graph break
    torch.testing.assert_close(got.loss, expected.loss)
    assert (got.router_aux_loss is None) == (expected.router_aux_loss is None)
    if expected.router_aux_loss is not None:
        torch.testing.assert_close(got.router_aux_loss, expected.router_aux_loss)
    got.loss.backward()
    expected.loss.backward()
    for (name, a), b in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    # the statistics and running state were committed inside the compiled forward, as in eager mode
    assert compiled_model.routing_statistics()[0]["tokens"] == eager.routing_statistics()[0]["tokens"] > 0


@pytest.mark.parametrize(
    "family, head", [("comet_vit", "AutoModelForImageClassification"), ("comet_bert", "AutoModelForMaskedLM")]
)
@pytest.mark.parametrize("routing", ["comet", "topk"])
def test_evaluation_compiles_with_fullgraph_for_the_other_families(family, head, routing):
    model = tiny_model(family, head, routing=routing).eval()
    inputs = tiny_inputs(family, head)
    with torch.no_grad():
        expected = model(**inputs).logits
        got = _compiled(model)(**inputs).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("routing", ["comet", "block_comet", "topk", "switch"])
def test_generate_with_a_fullgraph_compile_config_equals_eager_generation(routing):
    torch._dynamo.reset()
    model = tiny_model(*CAUSAL, routing=routing).eval()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    got = model.generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static", compile_config=config
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    assert torch.equal(got, expected)
