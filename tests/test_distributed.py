"""Launching several processes on a CPU-only machine (issue 13 §5, §6): the start-up warning when a launch collapses
to one process per copy, a plain ``Accelerator()`` loop as two real ranks under the shipped accelerate config, and
FSDP2 (``fully_shard`` per transformer block, gloo) for COMET and top-k with a full state dict that loads with the
Auto class. Multi-process tests launch 2 processes with tiny models (hidden 32, 2 layers) and a few steps."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import TrainingArguments

from hf_comet.training import (
    CometTrainer,
    SingleProcessLaunchWarning,
    launch_collapse_message,
    warn_if_launch_collapsed,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")
LAUNCH_VARIABLES += ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "ACCELERATE_USE_CPU")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _run_together(commands: list[tuple[list[str], dict[str, str]]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run the commands at the same time (launches spend most of their time importing, one core each)."""
    started = [(command, subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)) for command, env in commands]  # fmt: skip
    done = []
    for command, process in started:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def _torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the start-up warning ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "environ, named",
    [
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "WORLD_SIZE=2"),  # torchrun / accelerate launch
        ({"LOCAL_WORLD_SIZE": "2"}, "LOCAL_WORLD_SIZE=2"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_SIZE=4"),  # mpirun
        ({"PMI_SIZE": "3"}, "PMI_SIZE=3"),
    ],
)
def test_a_multi_process_launch_that_formed_one_process_warns_naming_the_values_and_the_fix(environ, named):
    with pytest.warns(SingleProcessLaunchWarning, match=named) as caught:
        assert warn_if_launch_collapsed(1, environ)
    message = str(caught[0].message)
    assert "num_processes=1" in message and "ACCELERATE_USE_CPU=true" in message and "cpu=True" in message


def test_accelerates_cpu_launcher_starting_one_of_several_processes_warns():
    # what `accelerate launch --cpu --num_processes 2` leaves in the environment of the ONE process it starts
    environ = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.warns(SingleProcessLaunchWarning, match="started ONE process"):
        assert warn_if_launch_collapsed(1, environ)


@pytest.mark.parametrize(
    "num_processes, environ",
    [
        (2, {"WORLD_SIZE": "2", "RANK": "0"}),  # the group formed
        (1, {}),  # a plain single process
        (1, {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}),  # torchrun --nproc_per_node 1
        (1, {"ACCELERATE_USE_CPU": "True"}),  # accelerate launch --cpu, one process asked for
    ],
)
def test_no_warning_when_the_launch_and_the_process_count_agree(num_processes, environ):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_launch_collapsed(num_processes, environ)
    assert launch_collapse_message(num_processes, environ) is None


def test_a_launcher_variable_that_is_not_a_count_is_refused_by_name():
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two'"):
        launch_collapse_message(1, {"WORLD_SIZE": "two"})


def test_comet_trainer_warns_at_start_up_when_launched_as_several_but_formed_one(tmp_path, monkeypatch):
    # LOCAL_WORLD_SIZE alone: Accelerate forms no group from it (no LOCAL_RANK / WORLD_SIZE), so nothing blocks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    model = tiny_model("comet_gpt2", "AutoModelForCausalLM")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1)
    with pytest.warns(SingleProcessLaunchWarning, match="LOCAL_WORLD_SIZE=2"):
        CometTrainer(model=model, args=args)


# -- a plain Accelerator() loop ------------------------------------------------------------------------------------
LOOP = ["--steps", "4", "--hidden-size", "32", "--layers", "2", "--train-examples", "64", "--learning-rate", "1e-2"]


def test_plain_accelerator_loop_runs_as_two_ranks_under_the_shipped_config(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    # the README's command: ACCELERATE_USE_CPU=true accelerate launch --config_file recipes/accelerate_ddp_cpu.yaml
    command = [str(accelerate), "launch", "--config_file", str(RECIPES / "accelerate_ddp_cpu.yaml")]
    command += ["--main_process_port", str(_free_port()), str(RECIPES / "accelerate_loop.py"), *LOOP]
    command += ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "two")]
    single = [sys.executable, str(RECIPES / "accelerate_loop.py"), *LOOP, "--per-device-batch-size", "16"]
    two, _ = _run_together([(command, _clean_env(ACCELERATE_USE_CPU="true")),
                            (single + ["--output-dir", str(tmp_path / "one")], _clean_env())], tmp_path)  # fmt: skip

    assert "SingleProcessLaunchWarning" not in two.stderr
    record = json.loads((tmp_path / "two" / "launch.json").read_text())
    reference = json.loads((tmp_path / "one" / "launch.json").read_text())
    assert record["num_processes"] == 2 and record["distributed_type"] == "DistributedType.MULTI_CPU"
    assert record["gathered_ranks"] == [0, 1]  # gather returns both ranks' values
    assert reference["num_processes"] == 1 and reference["gathered_ranks"] == [0]
    # the same global batches: every training token routed once (summed over ranks), the same loss curve, and
    # gather_for_metrics counts each test image once
    assert record["training_tokens_routed"] == reference["training_tokens_routed"]
    assert record["evaluated"] == reference["evaluated"] == 359
    torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    trained = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "two").state_dict()
    expected = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "one").state_dict()
    assert trained.keys() == expected.keys()
    for name in expected:  # AdamW: float-order noise of ~1e-7 grows to ~1e-5; a wrong split moves them by ~lr
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)


def test_a_plain_accelerator_under_torchrun_without_the_cpu_switch_warns_at_start_up(tmp_path):
    command = _torchrun() + [str(RECIPES / "accelerate_loop.py"), *LOOP[:1], "1", *LOOP[2:]]
    proc = _run(command + ["--output-dir", str(tmp_path / "out")], _clean_env(), tmp_path)
    assert proc.stderr.count("SingleProcessLaunchWarning") == 2  # once per launched copy
    assert "WORLD_SIZE=2" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert json.loads((tmp_path / "out" / "launch.json").read_text())["num_processes"] == 1


# -- FSDP2 ---------------------------------------------------------------------------------------------------------
FSDP = dict(steps=3, batch=4, seq_len=16, lr=0.1)


def _fsdp_reference(recipe, routing: str) -> dict[str, torch.Tensor]:
    """One process, the same steps: each rank's half of the global batch is a micro-batch of half weight (FSDP
    averages the ranks' gradients), so a per-batch aux loss (top-k's balance loss) is the one each rank computed."""
    model = recipe.build_model(routing, hidden_size=32, layers=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=FSDP["lr"])
    model.train()
    for step in range(FSDP["steps"]):
        ids = recipe.global_batch(step, 2 * FSDP["batch"], FSDP["seq_len"])
        for rank in range(2):
            part = ids[rank * FSDP["batch"] : (rank + 1) * FSDP["batch"]]
            (model(input_ids=part, labels=part).loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("routing", ["comet", "topk"])
def test_fsdp_per_block_on_two_cpu_processes_saves_a_full_state_dict_that_loads_and_equals_the_trained_weights(
    routing, tmp_path
):
    out = tmp_path / "fsdp"
    command = _torchrun() + [str(RECIPES / "fsdp_train.py"), "--routing", routing, "--steps", str(FSDP["steps"])]
    command += ["--per-device-batch-size", str(FSDP["batch"]), "--seq-len", str(FSDP["seq_len"]), "--optimizer"]
    command += ["sgd", "--learning-rate", str(FSDP["lr"]), "--hidden-size", "32", "--layers", "2"]
    _run(command + ["--save-shards", "--output-dir", str(out)], _clean_env(), tmp_path)

    record = json.loads((out / "fsdp.json").read_text())
    assert record["world_size"] == 2 and record["all_fsdp"]
    # one FSDP unit per transformer block (its attention, router and experts together), then the root
    assert record["fsdp_units"] == ["transformer.h.0", "transformer.h.1", ""]
    assert record["fsdp_unit_classes"][:2] == ["FSDPGPT2Block", "FSDPGPT2Block"]
    assert record["sharded_parameters"] == record["parameters"]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.routing == routing
    saved = loaded.state_dict()
    # the saved weights are the trained ones: each sharded tensor is its ranks' local shards put back together
    shards = [torch.load(out / f"shards_rank{rank}.pt") for rank in range(2)]
    assert shards[0].keys() <= saved.keys()
    for name, (local, placements) in shards[0].items():
        assert placements == ["S(0)"], name  # sharded on dim 0 over the 2 ranks
        torch.testing.assert_close(saved[name], torch.cat([local, shards[1][name][0]]), rtol=0, atol=0, msg=name)
    # ... and they are what one process computes from the same global batches (SGD: float-order noise only)
    recipe = _load_recipe("fsdp_train")
    reference = _fsdp_reference(recipe, routing)
    initial = recipe.build_model(routing, hidden_size=32, layers=2).state_dict()
    moved = max((reference[n] - initial[n]).abs().max().item() for n in reference if reference[n].is_floating_point())
    assert moved > 1e-2  # training moved the weights far beyond the tolerance below
    assert saved.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(saved[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
    buffers = [name for name, _ in loaded.named_buffers() if name in saved]
    assert any(name.endswith("router.projection") for name in buffers) == (routing == "comet")
    for name in buffers:  # COMET's projection and the routing records survive sharding bit for bit
        assert torch.equal(saved[name], reference[name]), name
    assert max(record["losses"]) < 10 and all(loss == loss for loss in record["losses"])


@pytest.mark.parametrize(
    "family, head, block",
    [
        ("comet_gpt2", "AutoModelForCausalLM", "GPT2Block"),
        ("comet_vit", "AutoModelForImageClassification", "ViTLayer"),
        ("comet_bert", "AutoModelForMaskedLM", "BertLayer"),
    ],
)
def test_the_shipped_accelerate_fsdp_config_wraps_each_transformer_block_with_its_moe_block(
    family, head, block, monkeypatch
):
    # Accelerate runs FSDP only on GPUs: check what it reads from the file, the way `accelerate launch` does
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(RECIPES / "accelerate_fsdp.yaml"), "--main_process_port", "0", "train.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_fsdp and args.fsdp_version == 2 and args.num_processes == 2
    for name, value in prepare_multi_gpu_env(args).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and str(plugin.state_dict_type) == "StateDictType.FULL_STATE_DICT"
    model = tiny_model(family, head)
    plugin.set_auto_wrap_policy(model)
    wrapped = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert block in wrapped
    moe_blocks = [name for name, module in model.named_modules() if type(module).__name__ == "MoEBlock"]
    units = [name for name, module in model.named_modules() if type(module).__name__ == block]
    assert moe_blocks and all(any(m.startswith(unit + ".") for unit in units) for m in moe_blocks)


# -- DeepSpeed ZeRO-3 (not a test dependency: skipped unless deepspeed is installed) -------------------------------
@pytest.mark.parametrize("routing", ["comet", "topk"])
def test_deepspeed_zero3_on_two_cpu_processes_saves_weights_equal_to_one_process(routing, tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; it is not a test dependency)")
    out = tmp_path / "ds"
    command = _torchrun() + [str(RECIPES / "deepspeed_train.py"), "--routing", routing, "--steps", str(FSDP["steps"])]
    command += ["--per-device-batch-size", str(FSDP["batch"]), "--seq-len", str(FSDP["seq_len"]), "--optimizer"]
    command += ["sgd", "--learning-rate", str(FSDP["lr"]), "--hidden-size", "32", "--layers", "2"]
    _run(command + ["--output-dir", str(out)], _clean_env(DS_ACCELERATOR="cpu"), tmp_path)

    record = json.loads((out / "deepspeed.json").read_text())
    assert record["world_size"] == 2 and record["zero_stage"] == 3
    saved = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    reference = _fsdp_reference(_load_recipe("fsdp_train"), routing)  # the same model, data and steps
    assert saved.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(saved[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
