"""The one execution choice (`hf_comet.modeling.execution`) and the decode path it picks: per-token weight slabs give
the masked reference's outputs for every family, and the measured thresholds are read from their file."""

import json

import pytest
import torch
from conftest import main_output, tiny_inputs, tiny_model

from hf_comet.modeling import execution
from hf_comet.modeling.execution import ExecutionThresholds, choose_execution, thresholds
from hf_comet.modeling.slab_kernel import native_library

FAMILIES = [
    ("comet_gpt2", "AutoModelForCausalLM"),
    ("comet_vit", "AutoModelForImageClassification"),
    ("comet_bert", "AutoModelForSequenceClassification"),
]
BLOCKS = dict(routing="comet", comet_block_size=16, comet_keep_rate=0.25)  # 8 blocks of 16 units, 2 kept per token


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Point the thresholds file at ``tmp_path`` and return a writer; the cache is cleared before and after."""
    path = tmp_path / "execution.json"
    monkeypatch.setenv("HF_COMET_EXECUTION", str(path))
    thresholds.cache_clear()

    def write(**fields):
        if "slab_max_pairs_per_expert" in fields:  # both slab kernels: a test's slabs run on whichever this one is
            fields.setdefault("loop_slab_max_pairs_per_expert", fields["slab_max_pairs_per_expert"])
        path.write_text(json.dumps({"thresholds": fields, "measured": {}}))
        thresholds.cache_clear()

    yield write
    thresholds.cache_clear()


def executions_of(model, inputs) -> list[str]:
    """What `choose_execution` picked in each MoE block during one forward."""
    picked = []
    original = execution.choose_execution

    def spy(experts, decision, hidden_states=None):
        picked.append(original(experts, decision, hidden_states))
        return picked[-1]

    import hf_comet.modeling.moe_experts as moe_experts

    moe_experts.choose_execution, saved = spy, moe_experts.choose_execution
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        moe_experts.choose_execution = saved
    return picked


@pytest.fixture(params=["compiled", "loop"])
def slab_kernel(request, monkeypatch):
    """Each slab test twice: on the compiled kernel (skipped where this machine cannot build it) and on the torch
    loop (``HF_COMET_NATIVE_SLABS=0``)."""
    monkeypatch.setenv("HF_COMET_NATIVE_SLABS", "1" if request.param == "compiled" else "0")
    native_library.cache_clear()
    if request.param == "compiled" and native_library() is None:
        pytest.skip("no C compiler could build the slab kernel here")
    yield request.param
    native_library.cache_clear()


@pytest.mark.parametrize("family, head", FAMILIES)
def test_decoding_sized_batches_run_on_slabs_and_equal_the_masked_reference(family, head, measured, slab_kernel):
    model = tiny_model(family, head, **BLOCKS).eval()
    inputs = tiny_inputs(family, head, batch=1, seq=5, with_labels=False)
    measured(slab_max_pairs_per_expert=3.0)
    assert set(executions_of(model, inputs)) == {"slabs"}
    with torch.no_grad():
        slabs = main_output(model(**inputs))
    measured(slab_max_pairs_per_expert=0.0)  # the kernel instead
    assert set(executions_of(model, inputs)) == {"bucketed"}
    with torch.no_grad():
        kernel = main_output(model(**inputs))
    measured(dense_block_fraction=0.1)  # every block decision as masked dense compute: the reference
    assert set(executions_of(model, inputs)) == {"masked_dense"}
    with torch.no_grad():
        masked = main_output(model(**inputs))
    torch.testing.assert_close(slabs, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel, masked, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_with_the_cache_is_the_same_on_slabs_and_on_the_kernel(measured, slab_kernel):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).eval()
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]

    def generate():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)  # fmt: skip

    measured(slab_max_pairs_per_expert=3.0)
    slabs = generate()
    measured(slab_max_pairs_per_expert=0.0)
    kernel = generate()
    assert torch.equal(slabs.sequences, kernel.sequences)
    torch.testing.assert_close(torch.stack(slabs.scores), torch.stack(kernel.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["topk", "switch"])
def test_learned_top_k_on_slabs_keeps_its_weights_biases_and_dropped_tokens(routing, measured, slab_kernel):
    extra = {"capacity_factor": 0.5} if routing == "switch" else {}  # Switch drops tokens over capacity
    model = tiny_model("comet_bert", "AutoModel", routing=routing, **extra).eval()
    inputs = tiny_inputs("comet_bert", "AutoModel", batch=1, seq=6, with_labels=False)
    measured(slab_max_pairs_per_expert=10.0)
    assert set(executions_of(model, inputs)) == {"slabs"}
    with torch.no_grad():
        slabs = model(**inputs).last_hidden_state
    measured(slab_max_pairs_per_expert=0.0)
    with torch.no_grad():
        kernel = model(**inputs).last_hidden_state
    torch.testing.assert_close(slabs, kernel, rtol=1e-5, atol=1e-5)


def test_training_an_explicit_kernel_and_autocast_never_run_on_slabs(measured):
    measured(slab_max_pairs_per_expert=100.0)
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS)
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=3, with_labels=False)
    block = model.moe_blocks()[0]
    x = torch.randn(3, 32)
    decision = block.router(x)
    assert choose_execution(block.experts, decision, x) == "bucketed"  # weights that need gradients: training
    with torch.no_grad():
        assert choose_execution(block.experts, decision, x) == "slabs"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert choose_execution(block.experts, decision, x) == "bucketed"
        assert choose_execution(block.experts, decision, x.double()) == "bucketed"
        assert choose_execution(block.experts, decision) == "bucketed"  # no input: the choice for any size
    model.set_experts_implementation("eager")
    assert set(executions_of(model.eval(), inputs)) == {"eager"}


def test_the_thresholds_come_from_their_file_and_a_damaged_file_falls_back_to_the_defaults(measured, tmp_path):
    assert thresholds() == ExecutionThresholds()  # no file yet
    measured(dense_block_fraction=0.75, slab_max_pairs_per_expert=3.0, loop_slab_max_pairs_per_expert=1.0)
    assert thresholds() == ExecutionThresholds(0.75, slab_max_pairs_per_expert=3.0, loop_slab_max_pairs_per_expert=1.0)
    (tmp_path / "execution.json").write_text(json.dumps({"thresholds": {"slab_max_pairs_per_expert": 3.0}}))
    thresholds.cache_clear()  # a file from before the loop's own threshold: the loop keeps its default
    assert thresholds() == ExecutionThresholds(slab_max_pairs_per_expert=3.0)
    for damaged in ("{", json.dumps({"thresholds": {"dense_block_fraction": 3}}), json.dumps({"other": 1})):
        (tmp_path / "execution.json").write_text(damaged)
        thresholds.cache_clear()
        assert thresholds() == ExecutionThresholds()
    with pytest.raises(ValueError, match=r"dense_block_fraction=0 must be in \(0, 1\]"):
        ExecutionThresholds(dense_block_fraction=0)
    with pytest.raises(ValueError, match="slab_max_pairs_per_expert=-1 must be 0 or more"):
        ExecutionThresholds(slab_max_pairs_per_expert=-1)
    with pytest.raises(ValueError, match="loop_slab_max_pairs_per_expert=-0.5 must be 0 or more"):
        ExecutionThresholds(loop_slab_max_pairs_per_expert=-0.5)


def test_generate_leaves_the_statistics_windows_alone_unless_asked():
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).eval()
    ids = torch.randint(3, 64, (1, 4), generator=torch.Generator().manual_seed(0))  # no pad token: every one counts
    blocks = model.moe_blocks()

    def tokens() -> list[int]:
        return [int(block.statistics().tensors["tokens"]) for block in blocks]

    with torch.no_grad():
        model(input_ids=ids)  # an evaluation forward is counted
        counted = tokens()
        assert counted == [4] * len(blocks)
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert tokens() == counted and all(block.track_statistics for block in blocks)  # paused, then restored
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, routing_statistics=True)
        assert tokens() == [c + 4 + 2 for c in counted]  # the prompt, then one token per further step


def test_a_trainable_router_alone_keeps_its_gradient_on_a_decoding_sized_batch(measured):
    """Frozen experts, trainable gate (or biases only): slabs build no autograd node, so the kernel must run."""
    measured(slab_max_pairs_per_expert=100.0)
    model = tiny_model("comet_bert", "AutoModel", routing="topk").train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".router." in name)
    ids = torch.tensor([[5, 17]])  # 2 tokens x 2 experts = 4 routed pairs: a decoding-sized batch
    model(input_ids=ids).last_hidden_state.pow(2).sum().backward()  # (before the fix: no graph at all)
    gate = [p for n, p in model.named_parameters() if ".router." in n]
    assert gate and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate)


def test_compiled_top_k_reads_no_file_and_matches_eager(measured):
    measured(slab_max_pairs_per_expert=2.0)
    model = tiny_model("comet_bert", "AutoModelForMaskedLM", routing="topk").eval()
    inputs = tiny_inputs("comet_bert", "AutoModelForMaskedLM", batch=2, seq=5, with_labels=False)
    thresholds.cache_clear()  # nothing read yet: compiled code must not read the file itself
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")(**inputs).logits
        assert not execution._LOADED  # the compiled forward read no file (its defaults equal the file's here)
        eager = model(**inputs).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_model_reads_the_measured_thresholds_when_it_is_built(measured):
    # read at construction, so a process that then runs only compiled forwards uses this machine's measurements
    measured(dense_block_fraction=0.5, slab_max_pairs_per_expert=7.0)
    assert not execution._LOADED
    tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="topk")
    assert execution._LOADED == [ExecutionThresholds(0.5, slab_max_pairs_per_expert=7.0, loop_slab_max_pairs_per_expert=7.0)]


@pytest.mark.parametrize(
    ("content", "warned"),
    [
        ('{"thresholds": {"dense_block_fraction": true, "slab_max_pairs_per_expert": 2.0}}', "must be a number, not bool"),
        ('{"thresholds": {"dense_block_fraction": "0.5", "slab_max_pairs_per_expert": 2.0}}', "must be a number, not str"),
        (None, "is not a file"),
    ],
)
def test_a_bad_thresholds_file_is_named_and_the_defaults_used(content, warned, tmp_path, monkeypatch, caplog):
    path = tmp_path / ("execution.json" if content is not None else "missing.json")
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("HF_COMET_EXECUTION", str(path))
    thresholds.cache_clear()
    from transformers.utils import logging

    logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            assert thresholds() == ExecutionThresholds()
    finally:
        logging.disable_propagation()
        thresholds.cache_clear()
    assert warned in caplog.text and str(path) in caplog.text


def test_the_suite_runs_on_the_default_thresholds_without_a_warning(caplog):
    # conftest writes the defaults to HF_COMET_EXECUTION, so no measured file of this machine leaks into the tests
    thresholds.cache_clear()
    try:
        assert thresholds() == ExecutionThresholds()
    finally:
        thresholds.cache_clear()
    assert "HF_COMET_EXECUTION" not in caplog.text


def down_projections(model) -> list[torch.nn.Parameter]:
    return [block.experts.down_proj for block in model.moe_blocks()]


def test_the_first_decode_lays_down_proj_out_unit_major_in_place_and_every_saver_gets_the_checkpoint_layout(
    tmp_path, measured
):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_comet.modeling.moe_kernels import is_unit_major

    measured(slab_max_pairs_per_expert=3.0)
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).eval()
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    params = down_projections(model)
    before = [p.detach().clone() for p in params]
    assert params and all(p.is_contiguous() for p in params)
    measured(slab_max_pairs_per_expert=0.0)  # the kernel on the checkpoint layout: the reference
    reference = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)  # fmt: skip
    assert all(p.is_contiguous() for p in params)  # only slabs reorder
    measured(slab_max_pairs_per_expert=3.0)
    with torch.inference_mode():  # the strictest mode a user decodes in
        decoded = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(decoded.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(decoded.scores), torch.stack(reference.scores), rtol=1e-5, atol=1e-5)
    for param, old, now in zip(params, before, down_projections(model), strict=True):
        assert now is param  # the same Parameter: optimizers and hooks that hold it still do
        assert is_unit_major(param) and not param.is_contiguous() and not param.is_inference()
        assert torch.equal(param, old)
    # every saver gets the checkpoint layout: safetensors' save_file refuses strided tensors
    state = model.state_dict()
    assert all(value.is_contiguous() for value in state.values())
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "state.safetensors")  # (tied)
    assert torch.equal(load_file(tmp_path / "state.safetensors")["transformer.h.0.mlp.experts.down_proj"], before[0])
    assert model.state_dict(keep_vars=True)["transformer.h.0.mlp.experts.down_proj"] is params[0]
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert all(p.is_contiguous() for p in down_projections(loaded))
    again = loaded.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(again, reference.sequences)


def test_train_lays_down_proj_back_out_and_training_after_a_decode_equals_training_a_model_never_decoded(measured):
    measured(slab_max_pairs_per_expert=3.0)
    decoded, fresh = (tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS) for _ in range(2))
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    with torch.inference_mode():
        decoded.eval().generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert not down_projections(decoded)[0].is_contiguous()
    inputs = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=3, seq=7)
    params = down_projections(decoded)
    before = [p.detach().clone() for p in params]
    decoded.train()  # FSDP (fully_shard) refuses non-contiguous parameters: training starts from the checkpoint layout
    assert all(p.is_contiguous() and now is p for p, now in zip(params, down_projections(decoded), strict=True))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    steps = []
    for model in (decoded, fresh):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # (Adam would magnify rounding in tiny gradients)
        model(**inputs).loss.backward()
        grads = [p.grad.clone() for p in down_projections(model)]
        optimizer.step()
        steps.append((grads, [p.detach().clone() for p in model.parameters()]))
    for got, want in zip(steps[0][0], steps[1][0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(steps[0][1], steps[1][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_slabs_leave_memory_that_is_not_the_module_s_own_in_its_layout():
    """A Parameter viewing part of a storage (FSDP-flattened, or at an offset), one in shared memory, a parametrized
    weight (PEFT's LoRA), weights swapped in per forward (Accelerate's offloading hooks) and a module in training
    mode keep their layout; the slabs still give the same values."""
    import gc

    from torch.nn.utils import parametrize

    class Identity(torch.nn.Module):
        def forward(self, weight):
            return weight

    def experts():
        return tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).moe_blocks()[0].experts.eval()

    def viewing(module, offset):
        size = module.down_proj.numel()
        storage = torch.zeros(size + 7)
        storage[offset : offset + size] = module.down_proj.detach().reshape(-1)
        module.down_proj = torch.nn.Parameter(storage[offset : offset + size].view_as(module.down_proj))
        return module

    head, offset = viewing(experts(), 0), viewing(experts(), 7)
    shared = experts()
    shared.down_proj.data.share_memory_()
    hooked = experts()
    hooked._hf_hook = object()
    wrapped = experts()
    parametrize.register_parametrization(wrapped, "down_proj", Identity())
    training = experts().train()
    for module in (head, offset, shared, hooked, wrapped, training):
        assert module.lay_out_for_slabs() is False
        assert module.down_proj.is_contiguous()

    swapped = experts()  # a new Parameter each forward, the old one freed (its id free for reuse), as offloading does
    laid_out = []
    for _ in range(5):
        laid_out.append(swapped.lay_out_for_slabs())
        values = swapped.down_proj.detach().contiguous().clone()
        swapped.down_proj = None  # the old Parameter freed before the new one exists: Python may reuse its id
        gc.collect()
        swapped.down_proj = torch.nn.Parameter(values)
    assert laid_out == [True, True, False, False, False]  # one swap is allowed (a deepcopy drops the mark), not two
    assert swapped.down_proj.is_contiguous()

    own = experts()
    assert own.lay_out_for_slabs() is True and not own.down_proj.is_contiguous()
    assert own.lay_out_for_slabs() is True  # once: a second call is a no-op
    own.train()
    assert own.down_proj.is_contiguous() and own.lay_out_for_slabs() is False  # training: left alone
    own.eval()
    assert own.lay_out_for_slabs() is True  # the same Parameter: laid out again
    x = torch.randn(2, own.hidden_size)
    index = torch.tensor([[0, 3], [5, 1]])
    with torch.no_grad():
        expected = own.sparse_forward(x, index, None, "slabs")
        for module in (head, offset, shared, hooked, wrapped, training, swapped):
            torch.testing.assert_close(module.sparse_forward(x, index, None, "slabs"), expected)


def test_state_dict_lays_down_proj_back_out_so_its_tensors_write_through_to_the_model(measured):
    """EMA updates and in-place loads write through ``state_dict()``'s tensors; a decode then lays it out again."""
    measured(slab_max_pairs_per_expert=3.0)
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).eval()
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    params = down_projections(model)
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert not params[0].is_contiguous()
    state = model.state_dict()
    assert all(p.is_contiguous() for p in params)
    with torch.no_grad():
        state["transformer.h.0.mlp.experts.down_proj"].mul_(2.0)
    torch.testing.assert_close(params[0], state["transformer.h.0.mlp.experts.down_proj"], rtol=0, atol=0)
    assert params[0].data_ptr() == state["transformer.h.0.mlp.experts.down_proj"].data_ptr()
    for _ in range(2):  # a state dict, then a decode, again: laying the same Parameter out again is not a swap
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        assert not params[0].is_contiguous()
        model.state_dict()
        assert params[0].is_contiguous()


def test_a_parameter_shared_after_a_decode_stays_in_its_shared_memory(measured):
    """``share_memory()`` after a decode: train() and state_dict() must not move it to a private storage, which
    would stop the other processes seeing its updates; the state dict gets a contiguous copy."""
    measured(slab_max_pairs_per_expert=3.0)
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).eval()
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    model.share_memory()
    param = down_projections(model)[0]
    pointer = param.data_ptr()
    assert param.is_shared() and not param.is_contiguous()
    entry = model.state_dict()["transformer.h.0.mlp.experts.down_proj"]
    assert entry.is_contiguous() and torch.equal(entry, param)
    model.train()
    assert param.is_shared() and param.data_ptr() == pointer


def test_a_decode_in_training_mode_leaves_the_layout_alone(measured):
    """RL-style rollouts (``train()`` then ``generate`` under no_grad) keep the contiguous layout training expects."""
    measured(slab_max_pairs_per_expert=3.0)
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", **BLOCKS).train()
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    with torch.no_grad():
        assert set(executions_of(model, {"input_ids": ids[:, :1]})) == {"slabs"}
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert all(p.is_contiguous() for p in down_projections(model))
