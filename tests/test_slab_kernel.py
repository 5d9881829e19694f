"""The compiled slab kernel (`hf_comet.modeling.slab_kernel`): the torch loop's values for every shape, layout,
activation and weighting; built once per machine into the cache, atomically; refused indices; a failed build said
once and decoding carried on the loop; the execution choice uses the threshold of the kernel that will run."""

import logging
import os
import shutil

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import hf_comet.modeling.moe_kernels as moe_kernels
from hf_comet.modeling import execution, slab_kernel
from hf_comet.modeling.execution import SLABS, thresholds, top_k_execution
from hf_comet.modeling.moe_kernels import FusedActivation, slab_experts, unit_major
from hf_comet.modeling.slab_kernel import kernel_cache_dir, native_library, slab_products

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")),
    reason="no C compiler on this machine: slabs run on the torch loop (tested in test_execution)",
)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A process that has not looked for the kernel yet, with its own empty kernel cache."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_COMET_NATIVE_SLABS", raising=False)
    native_library.cache_clear()
    yield tmp_path
    native_library.cache_clear()


def random_experts(experts, width, hidden, unit_major_down, with_down_bias, generator):
    up = torch.randn(experts, width, hidden, generator=generator)
    up_bias = torch.randn(experts, width, generator=generator)
    down = torch.randn(experts, hidden, width, generator=generator)
    down_bias = torch.randn(experts, hidden, generator=generator) if with_down_bias else None
    return up, up_bias, unit_major(down) if unit_major_down else down, down_bias


@pytest.mark.parametrize("shape", [(8, 48, 64, 1, 4), (4, 12, 40, 3, 2), (3, 5, 7, 2, 3), (6, 32, 96, 9, 6)])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu", "relu", "silu"])
@pytest.mark.parametrize("unit_major_down", [False, True])
def test_the_compiled_kernel_gives_the_torch_loop_s_values(shape, activation, unit_major_down, fresh):
    experts, width, hidden, tokens, top_k = shape  # widths and sizes that are not multiples of the vector width too
    generator = torch.Generator().manual_seed(sum(shape))
    act = FusedActivation(activation)
    x = torch.randn(tokens, hidden, generator=generator)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    for with_down_bias in (True, False):
        up, up_bias, down, down_bias = random_experts(experts, width, hidden, unit_major_down, with_down_bias, generator)
        for weights in (None, torch.rand(tokens, top_k, generator=generator)):
            if weights is not None:
                weights[0, 0] = 0.0  # a slot a capacity limit dropped
            args = (x, index, weights, up, up_bias, down, down_bias, act)
            compiled = slab_products(*args)
            assert compiled is not None
            reference = slab_experts(*args, compiled=False)
            torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
            torch.testing.assert_close(slab_experts(*args), compiled, rtol=0, atol=0)  # the default path runs it


def test_the_kernel_is_built_once_into_the_cache_and_reused(fresh, monkeypatch):
    calls = []
    run = slab_kernel.subprocess.run

    def spy(command, **kwargs):
        calls.append(command)
        return run(command, **kwargs)

    monkeypatch.setattr(slab_kernel.subprocess, "run", spy)
    assert native_library() is not None
    built = os.listdir(kernel_cache_dir())
    assert len(built) == 1 and built[0].endswith(".so")  # no temporary left beside it
    assert sum("-shared" in command for command in calls) == 1
    library = os.path.join(kernel_cache_dir(), built[0])
    stamp = os.stat(library).st_mtime_ns
    native_library.cache_clear()  # a new process on the same machine
    assert native_library() is not None
    assert sum("-shared" in command for command in calls) == 1  # not compiled again
    assert os.listdir(kernel_cache_dir()) == built and os.stat(library).st_mtime_ns == stamp


def test_an_expert_index_outside_the_experts_is_refused_before_anything_is_written(fresh):
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, _ = random_experts(4, 8, 16, True, False, generator)
    x = torch.randn(2, 16, generator=generator)
    for bad in (4, -1):
        index = torch.tensor([[0, 1], [2, bad]])
        with pytest.raises(IndexError, match=rf"expert indices must lie in \[0, 4\); got \[\[0, 1\], \[2, {bad}\]\]"):
            slab_experts(x, index, None, up, up_bias, down, None, FusedActivation("gelu"))


def test_a_failed_build_is_said_once_and_slabs_run_on_the_loop(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false"))  # a "compiler" that fails
    run = slab_kernel.subprocess.run
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, down_bias = random_experts(4, 8, 16, True, True, generator)
    args = (torch.randn(2, 16, generator=generator), torch.tensor([[0, 3], [2, 1]]), None, up, up_bias, down,
            down_bias, FusedActivation("gelu_new"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_comet.modeling.slab_kernel"):
        first = slab_experts(*args)
        second = slab_experts(*args)
    said = [r.getMessage() for r in caplog.records if "could not build the native slab kernel" in r.getMessage()]
    assert len(said) == 1 and "false exited 1" in said[0] and "HF_COMET_NATIVE_SLABS=0" in said[0]
    assert native_library() is None
    left = os.listdir(kernel_cache_dir())  # nothing half-written: only the record of the failure
    assert len(left) == 1 and left[0].endswith(".failed")
    caplog.clear()
    native_library.cache_clear()  # a later process on the machine: no second attempt, no second warning
    monkeypatch.setattr(slab_kernel.subprocess, "run", lambda command, **k: pytest.fail(f"ran {command}")
                        if "-shared" in command else run(command, **k))  # fmt: skip
    assert native_library() is None and "could not build" not in caplog.text
    torch.testing.assert_close(first, slab_experts(*args, compiled=False), rtol=0, atol=0)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_the_switch_keeps_slabs_on_the_loop_without_compiling(fresh, monkeypatch):
    monkeypatch.setenv("HF_COMET_NATIVE_SLABS", "0")
    monkeypatch.setattr(slab_kernel.subprocess, "run", lambda *a, **k: pytest.fail("compiled although switched off"))
    assert native_library() is None
    assert not os.path.exists(kernel_cache_dir())


def test_the_choice_uses_the_threshold_of_the_slab_kernel_that_will_run(fresh, tmp_path, monkeypatch):
    path = tmp_path / "execution.json"
    path.write_text('{"thresholds": {"slab_max_pairs_per_expert": 4.0, "loop_slab_max_pairs_per_expert": 1.0}}')
    monkeypatch.setenv("HF_COMET_EXECUTION", str(path))
    thresholds.cache_clear()
    try:
        model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_block_size=16,
                           comet_keep_rate=0.25).eval()  # fmt: skip  # 8 blocks, 2 kept: 2 pairs per expert at 8 tokens
        experts = model.transformer.h[0].mlp.experts
        for dtype, runs_compiled in ((torch.float32, True), (torch.float64, False)):
            hidden = torch.zeros(8, experts.hidden_size, dtype=dtype)
            experts.to(dtype)
            assert execution.slab_kernel_runs(experts, hidden) is runs_compiled
            with torch.no_grad():
                picked = top_k_execution(experts, (8, 2), True, hidden)
            assert (picked == SLABS) is runs_compiled  # 2 pairs per expert: within 4, above 1
    finally:
        thresholds.cache_clear()


def test_decoding_a_model_runs_the_compiled_kernel_and_gives_the_loop_s_tokens(fresh, monkeypatch):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_block_size=16,
                       comet_keep_rate=0.25).eval()  # fmt: skip
    ids = tiny_inputs("comet_gpt2", "AutoModelForCausalLM", batch=1, seq=4, with_labels=False)["input_ids"]
    ran = []
    original = moe_kernels.slab_products

    def spy(*args):
        result = original(*args)
        ran.append(result is not None)
        return result

    def generate():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)  # fmt: skip

    monkeypatch.setattr(moe_kernels, "slab_products", spy)
    compiled = generate()
    assert ran and all(ran)  # every slab call of the decode ran compiled
    monkeypatch.setenv("HF_COMET_NATIVE_SLABS", "0")
    native_library.cache_clear()
    ran.clear()
    loop = generate()
    assert ran and not any(ran)
    assert torch.equal(compiled.sequences, loop.sequences)
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(loop.scores), rtol=1e-5, atol=1e-5)


def test_inconsistent_shapes_never_reach_the_compiled_kernel(fresh):
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, down_bias = random_experts(4, 8, 16, True, True, generator)
    index = torch.tensor([[0, 1], [2, 3]])
    act = FusedActivation("gelu")
    cases = [  # (inputs, whether the torch loop raises for them)
        ((torch.randn(2, 12), index, None, down, down_bias), True),  # hidden size 12, experts take 16
        ((torch.randn(3, 16), index, None, down, down_bias), False),  # 3 tokens, 2 rows of indices
        ((torch.randn(2, 16), index, torch.ones(2, 3), down, down_bias), False),  # 3 weights per token for 2 slots
        ((torch.randn(2, 16), index, None, down[:, :12], down_bias), True),  # down of another hidden size
        ((torch.randn(2, 16), index, None, down, down_bias[:, :8]), True),
    ]
    for (x, idx, weights, d, db), loop_raises in cases:
        assert slab_products(x, idx, weights, up, up_bias, d, db, act) is None
        if loop_raises:
            with pytest.raises(RuntimeError):  # the torch loop's own error
                slab_experts(x, idx, weights, up, up_bias, d, db, act)


def test_a_compiler_command_with_arguments_is_split_like_a_shell(fresh, monkeypatch):
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    monkeypatch.setenv("CC", f"env LC_ALL=C {compiler}")  # as CC="ccache gcc" is
    assert native_library() is not None


def test_inputs_the_kernel_cannot_read_go_to_the_loop(fresh):
    generator = torch.Generator().manual_seed(0)
    up, up_bias, down, _ = random_experts(4, 8, 16, True, False, generator)
    x = torch.randn(2, 16, generator=generator)
    index = torch.tensor([[0, 1], [2, 3]])
    act = FusedActivation("gelu")
    assert slab_products(x, index, None, up, up_bias, down, None, act) is not None
    expanded = torch.randn(1, 16, 8, generator=generator).expand(4, 16, 8)  # one expert's storage for four
    rejected = [
        (x, index.to("meta"), None, down),  # indices on another device (a null pointer to C)
        (x, index.float(), None, down),  # float indices
        (x, index, torch.ones(2, 2, device="meta"), down),  # weights on another device
        (x.double(), index, None, down),
        (x, index, None, expanded),  # neither contiguous nor unit-major memory: never taken on trust
        (x, index, None, down.transpose(-1, -2).contiguous().transpose(-1, -2)[:, :, :4]),  # a strided view
    ]
    for hidden, idx, weights, d in rejected:
        assert slab_products(hidden, idx, weights, up, up_bias, d, None, act) is None


def test_duplicate_experts_and_strided_inputs_give_the_loop_s_values(fresh):
    generator = torch.Generator().manual_seed(1)
    up, up_bias, down, down_bias = random_experts(4, 24, 40, True, True, generator)
    x = torch.randn(40, 6, generator=generator).t()  # (6, 40), not contiguous
    index = torch.tensor([[1, 1], [0, 3], [3, 3], [2, 0], [1, 2], [0, 0]])  # an expert twice in a token
    weights = torch.rand(6, 2, generator=generator)
    act = FusedActivation("gelu_new")
    compiled = slab_products(x, index, weights, up, up_bias, down, down_bias, act)
    assert compiled is not None
    reference = slab_experts(x, index, weights, up, up_bias, down, down_bias, act, compiled=False)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_a_traced_forward_never_runs_on_slabs(fresh, tmp_path, monkeypatch):
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM", routing="comet", comet_block_size=16,
                       comet_keep_rate=0.25).eval().requires_grad_(False)  # fmt: skip
    experts = model.transformer.h[0].mlp.experts
    hidden = torch.zeros(1, experts.hidden_size)
    with torch.no_grad():
        assert top_k_execution(experts, (1, 2), True, hidden) == SLABS
        traced = []
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
        traced.append(top_k_execution(experts, (1, 2), True, hidden))
    assert traced == ["bucketed"]
