"""Run by tests/test_parallel_plans.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): load each saved tiny
checkpoint twice, with transformers' tensor parallelism (``DistributedConfig(tp_size=2)``, the configs'
``base_model_tp_plan``) and as a plain model, and compare them. Writes OUT/rank{r}.json: per checkpoint the sharded
parameters (local and full shapes), the largest logit difference (eval), the loss difference and the gradient
mismatches (train: the local slice of every reference gradient). Usage: python tp_script.py OUT CKPT_DIR..."""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForMaskedLM  # noqa: E402
from transformers.distributed import DistributedConfig  # noqa: E402

import hf_comet  # noqa: E402, F401

HEADS = {
    "comet_gpt2": AutoModelForCausalLM,
    "comet_vit": AutoModelForImageClassification,
    "comet_bert": AutoModelForMaskedLM,
}


def inputs_for(model_type: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if model_type == "comet_vit":
        return {"pixel_values": torch.randn(3, 1, 8, 8, generator=g), "labels": torch.randint(0, 3, (3,), generator=g)}
    input_ids = torch.randint(3, 64, (3, 7), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()}


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def compare(path: str, rank: int, world: int) -> dict:
    model_type = json.load(open(os.path.join(path, "config.json")))["model_type"]
    cls = HEADS[model_type]
    tp = cls.from_pretrained(path, distributed_config=DistributedConfig(tp_size=world))
    ref = cls.from_pretrained(path)
    inputs = inputs_for(model_type)
    params = list(zip(tp.named_parameters(), ref.named_parameters(), strict=True))
    sharded = {n: [list(local(p).shape), list(q.shape)] for (n, p), (_, q) in params if local(p).shape != q.shape}

    tp.eval(), ref.eval()
    with torch.no_grad():
        logits_diff = (tp(**inputs).logits - ref(**inputs).logits).abs().max().item()

    tp.train(), ref.train()
    torch.manual_seed(1)  # noisy top-k draws its noise in training
    loss_ref = ref(**inputs).loss
    torch.manual_seed(1)
    loss_tp = tp(**inputs).loss
    loss_ref.backward()
    loss_tp.backward()
    grad_mismatch = {}
    for (name, p), (_, q) in params:
        if q.grad is None:
            continue
        if p.grad is None:
            grad_mismatch[name] = "missing"
            continue
        grad, expected = local(p.grad), q.grad
        for dim in range(expected.ndim):  # a sharded dim: this rank's torch.chunk slice
            if expected.shape[dim] != grad.shape[dim]:
                expected = expected.narrow(dim, rank * -(-expected.shape[dim] // world), grad.shape[dim])
                break
        if (error := (grad - expected).abs().max().item()) > 1e-5:
            grad_mismatch[name] = error
    return {
        "sharded": sharded,
        "logits_diff": logits_diff,
        "loss_diff": abs(loss_tp.item() - loss_ref.item()),
        "grad_mismatch": grad_mismatch,
    }


def main():
    out, paths = sys.argv[1], sys.argv[2:]
    results = {}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for path in paths:
        results[os.path.basename(path)] = compare(path, rank, world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()  # in order, not at interpreter exit (where a rank can abort: ddp_train_script.py)


if __name__ == "__main__":
    main()
