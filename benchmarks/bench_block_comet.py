"""Block-COMET vs the dense FFN and unit-level COMET: time of one FFN forward (+ backward) at GPT-2-small width.

Ratios against the dense FFN measured in the same process (median of repeats after warm-up). Unit-level COMET
computes every unit and masks (it costs the dense FFN plus the router); block-COMET runs only the kept blocks
through the packed-expert kernels, so its FFN work scales with the keep rate, and switches to masked dense compute
when more than half the blocks are kept (the one execution choice, ``moe_experts.choose_execution``).

    python benchmarks/bench_block_comet.py [--tokens 2048] [--hidden 768] [--threads 2] [--backward]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig

import hf_comet  # noqa: F401  (registers comet_gpt2)
from hf_comet.modeling.moe_block import MoEBlock


def median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    parser.add_argument("--implementation", default="grouped_mm", choices=["grouped_mm", "eager"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, ffn = args.hidden, 4 * args.hidden
    x = torch.randn(args.tokens, d, requires_grad=args.backward)

    dense = torch.nn.Sequential(torch.nn.Linear(d, ffn), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(ffn, d))

    def make(**fields) -> MoEBlock:
        config = AutoConfig.for_model("comet_gpt2", n_embd=d, n_layer=1, n_head=12, routing="comet", **fields)
        config._experts_implementation = args.implementation
        block = MoEBlock(config, 0, d, "gelu_new")
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.02)
            block.router.projection.uniform_(-(d**-0.5), d**-0.5)
        return block

    def timed(module) -> float:
        def step():
            if args.backward:
                module(x).square().mean().backward()
            else:
                with torch.no_grad():
                    module(x)

        return median_ms(step, args.repeats)

    baseline = timed(dense)
    mode = "forward+backward" if args.backward else "forward"
    print(f"{args.tokens} tokens, d={d}, F={ffn}, {args.threads} threads, {mode}, kernels={args.implementation}")
    print(f"{'module':42s} {'ms':>9s} {'vs dense':>9s}")
    print(f"{'dense FFN':42s} {baseline:9.1f} {1.0:9.2f}")
    rows = [("unit COMET, keep 0.5", dict(comet_keep_rate=0.5))]
    for block_size in (64, 256):
        for keep in (0.25, 0.5, 0.75, 1.0):
            rows.append(
                (f"block-COMET b={block_size}, keep {keep}", dict(comet_keep_rate=keep, comet_block_size=block_size))
            )
    for name, fields in rows:
        ms = timed(make(**fields))
        print(f"{name:42s} {ms:9.1f} {ms / baseline:9.2f}")


if __name__ == "__main__":
    main()
