"""DeepSpeed ZeRO-3 training of a COMET or top-k GPT-2 (the model and data of ``fsdp_train.py``), CPU or GPU.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 recipes/deepspeed_train.py [--routing topk]
    deepspeed --num_gpus 2 recipes/deepspeed_train.py                          # GPUs

DeepSpeed is not a dependency of hf_comet: ``pip install deepspeed``. ``recipes/deepspeed_zero3.json`` is the
config (its ``"auto"`` values are filled in here, or by Trainer / Accelerate when they read it). The MoE block is
registered as a ZeRO-3 leaf module (``deepspeed.utils.set_z3_leaf_modules``): which experts run depends on the
data, and ZeRO-3 would otherwise prefetch and wait for expert parameters per sub-module. The full weights are
gathered with ``deepspeed.zero.GatheredParameters`` and rank 0 saves them with ``save_pretrained`` to
``--output-dir``. ``DS_ACCELERATOR=cpu`` runs DeepSpeed's CPU accelerator over gloo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers

import hf_comet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp_train import build_model, global_batch, training_arguments  # noqa: E402  (same model and data as the FSDP recipe)

CONFIG = Path(__file__).resolve().parent / "deepspeed_zero3.json"


def deepspeed_config(path: Path, micro_batch: int) -> dict:
    """The JSON config with its ``"auto"`` values filled in for this plain loop (fp32, no clipping, no GA)."""
    config = json.loads(Path(path).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = 0.0
    config["bf16"] = {"enabled": False}
    return config


def main() -> None:
    parser = training_arguments(__doc__, "runs/deepspeed")
    parser.add_argument("--deepspeed-config", type=Path, default=CONFIG)
    args = parser.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args.routing, args.hidden_size, args.layers)
    deepspeed.utils.set_z3_leaf_modules(model, [hf_comet.MoEBlock])
    optimizer_class = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=args.learning_rate)
    config = deepspeed_config(args.deepspeed_config, args.per_device_batch_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch, losses = args.per_device_batch_size, []
    engine.train()
    for step in range(args.steps):
        ids = global_batch(step, world * batch, args.seq_len)[rank * batch : (rank + 1) * batch].to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss  # includes the router aux loss (training mode)
        engine.backward(loss)  # gradients averaged over ranks
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):  # collective
        full = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    if rank == 0:
        fresh = transformers.AutoModelForCausalLM.from_config(model.config)
        fresh.load_state_dict(full, strict=True)
        fresh.save_pretrained(args.output_dir)
        record = {"world_size": world, "zero_stage": engine.zero_optimization_stage(), "losses": losses}
        Path(args.output_dir, "deepspeed.json").write_text(json.dumps(record, indent=1))
        print(f"world size {world}: final loss {losses[-1]:.4f}, saved to {args.output_dir}")
    dist.barrier()


if __name__ == "__main__":
    main()
