"""FSDP2 training of a COMET or top-k GPT-2 (byte-level LM on CPython's bundled docs), CPU (gloo) or GPU (nccl).

    torchrun --standalone --nproc_per_node 2 recipes/fsdp_train.py [--routing topk] [--steps 50]

Each transformer block (``model._no_split_modules``: ``GPT2Block``, ``ViTLayer``, ``BertLayer``) is one FSDP unit
(`torch.distributed.fsdp.fully_shard`), then the root, so a block's router and experts are sharded, gathered and
freed together; the COMET projection is a buffer and stays replicated. Gradients are averaged over ranks, so a step
is a step on the global batch (ranks x ``--per-device-batch-size`` windows). At the end every rank takes part in
gathering the full state dict (`get_model_state_dict` with ``full_state_dict=True, cpu_offload=True``) and rank 0
saves it with ``save_pretrained`` to ``--output-dir``, where ``AutoModelForCausalLM.from_pretrained`` loads it.
``--save-shards`` also writes each rank's local shards (``shards_rank{r}.pt``; the tests check the saved model
against them).

Accelerate turns FSDP on only with GPUs: on GPUs ``accelerate launch --config_file recipes/accelerate_fsdp.yaml``
runs Trainer or an Accelerate loop with the same per-block wrapping.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoConfig

import hf_comet  # noqa: F401  (registers the comet_* model types)
from hf_comet.data import byte_windows, english_text_split


def build_model(routing: str, hidden_size: int = 64, layers: int = 4) -> transformers.PreTrainedModel:
    """A small byte-level COMET (or other routing) GPT-2, initialised from seed 0 (identical on every rank)."""
    moe = {} if routing == "comet" else dict(num_experts=4, num_experts_per_tok=2)
    config = AutoConfig.for_model(
        "comet_gpt2", routing=routing, **moe, vocab_size=256, n_positions=64, n_embd=hidden_size, n_layer=layers,
        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def global_batch(step: int, size: int, seq_len: int) -> torch.Tensor:
    """The ``step``-th global batch: ``size`` byte windows of the training text, the same on every rank."""
    train, _ = english_text_split()
    return byte_windows(train, seq_len, size, seed=step)


def shard_per_block(model: torch.nn.Module, mesh) -> list[str]:
    """`fully_shard` every transformer block (the classes in ``model._no_split_modules``), then the root. Returns the
    names of the modules that became FSDP units, root (``""``) last."""
    classes = set(model._no_split_modules or ())
    if not classes:
        raise ValueError(f"{type(model).__name__} names no transformer block class in _no_split_modules")
    units = [name for name, module in model.named_modules() if type(module).__name__ in classes]
    if not units:
        raise ValueError(f"no module of {type(model).__name__} is one of its _no_split_modules {sorted(classes)}")
    for name in units:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return units + [""]


def training_arguments(description: str, output_dir: str) -> argparse.ArgumentParser:
    """The model, data and optimizer flags this recipe shares with ``deepspeed_train.py``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", default="comet")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per-device-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--output-dir", default=output_dir)
    return parser


def main() -> None:
    parser = training_arguments(__doc__, "runs/fsdp")
    parser.add_argument("--save-shards", action="store_true", help="also write each rank's local shards")
    args = parser.parse_args()

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    model = build_model(args.routing, args.hidden_size, args.layers).to(device)
    units = shard_per_block(model, mesh)
    parameters = list(model.parameters())
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate)
    batch = args.per_device_batch_size
    losses = []
    model.train()
    for step in range(args.steps):
        ids = global_batch(step, world * batch, args.seq_len)[rank * batch : (rank + 1) * batch].to(device)
        loss = model(input_ids=ids, labels=ids).loss  # includes the router aux loss (training mode)
        loss.backward()  # FSDP reduce-scatters the gradients: the mean over ranks
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if args.save_shards:
        shards = {
            name: (tensor.to_local().cpu(), [str(p) for p in tensor.placements])
            for name, tensor in model.state_dict().items()
            if isinstance(tensor, DTensor)
        }
        torch.save(shards, Path(args.output_dir, f"shards_rank{rank}.pt"))
    # collective: every rank takes part; rank 0 receives the full tensors on the CPU
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        fresh = transformers.AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(full, strict=True)  # parameters and persistent buffers (COMET's projection)
        fresh.save_pretrained(args.output_dir)
        record = {
            "world_size": world,
            "fsdp_units": units,
            "fsdp_unit_classes": [type(model.get_submodule(n)).__name__ for n in units],
            "all_fsdp": all(isinstance(model.get_submodule(n), FSDPModule) for n in units),
            "sharded_parameters": sum(isinstance(p, DTensor) for p in model.parameters()),
            "parameters": len(parameters),
            "losses": losses,
        }
        Path(args.output_dir, "fsdp.json").write_text(json.dumps(record, indent=1))
        print(f"world size {world}: final loss {losses[-1]:.4f}, saved to {args.output_dir}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
