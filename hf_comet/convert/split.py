"""``split`` (MoEfication, Zhang et al. 2022; LLaMA-MoE): the FFN units are partitioned into ``num_experts`` slices.

The partition (``split_method``) is ``contiguous``, seeded ``random``, or balanced ``kmeans`` on the L2-normalised
first-layer weights; the second bias is added once (``expert_output_bias="shared"``). For ``topk``/``noisy_topk``
the router starts as a near-zero centroid router (input-dependent choice, uniform weights) and ``router_scale`` is
set to ``num_experts_per_tok`` so each selected slice gets weight ~1: exact when every expert is active (k = E).
Other routings mix slices with weights summing to 1 and are not exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..modeling.family_adapter import DenseFFN
from .method import ConversionError, ConversionMethod, config_default, slice_experts


# -- unit partitions: (up_weight (F, d), num_experts, generator) -> (F,) unit order ----------------------------------
def contiguous_units(up_weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    return torch.arange(up_weight.shape[0])


def random_units(up_weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(up_weight.shape[0], generator=generator)


def kmeans_units(up_weight: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    return balanced_kmeans(torch.nn.functional.normalize(up_weight.float(), dim=1), num_experts, generator)


SPLIT_METHODS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "contiguous": contiguous_units,
    "random": random_units,
    "kmeans": kmeans_units,
}
"""``split_method`` -> unit partition: expert e takes units ``order[e * F/E : (e + 1) * F/E]``."""
DEFAULT_SPLIT_METHOD = "contiguous"

SCALED_ROUTINGS = ("topk", "noisy_topk")
"""Routings whose kept gate weights are multiplied by ``router_scale`` (the config accepts it for these only)."""

SPLIT_ROUTER_NORM = 1e-6
"""Norm of a split router's rows: the direction of each expert's centroid (MoEfication's similarity router), so the
choice of experts depends on the input, at a scale where the gate is uniform to ~1e-6 and the k = E model stays exact."""


def balanced_kmeans(points: torch.Tensor, clusters: int, generator: torch.Generator, iters: int = 15) -> torch.Tensor:
    """Balanced k-means (MoEfication's parameter clustering): equal-size clusters of ``points`` (N, d).

    Centroids start at random points; each round assigns points greedily by increasing distance to clusters that
    still have room (capacity N / clusters), then recomputes the centroids. Returns the point order grouped by
    cluster (cluster c holds ``order[c * N/clusters : (c + 1) * N/clusters]``).
    """
    num, capacity = points.shape[0], points.shape[0] // clusters
    centroids = points[torch.randperm(num, generator=generator)[:clusters]].clone()
    assignment = torch.zeros(num, dtype=torch.long)
    for _ in range(iters):
        distance = torch.cdist(points, centroids)  # (N, C)
        order = distance.flatten().argsort()
        taken = torch.zeros(num, dtype=torch.bool)
        room = torch.full((clusters,), capacity)
        new = torch.empty(num, dtype=torch.long)
        for flat in order.tolist():
            point, cluster = divmod(flat, clusters)
            if not taken[point] and room[cluster] > 0:
                taken[point] = True
                room[cluster] -= 1
                new[point] = cluster
                if not room.any():
                    break
        if torch.equal(new, assignment):
            break
        assignment = new
        for c in range(clusters):
            centroids[c] = points[assignment == c].mean(dim=0)
    return torch.cat([torch.nonzero(assignment == c).flatten() for c in range(clusters)])


class SplitConversion(ConversionMethod):
    name = "split"
    expert_width = "FFN width / num_experts"
    takes_split_method = True

    def config_defaults(self, *, ffn_width: int, fields: dict[str, Any], routing: str, config_class: type) -> dict:
        experts = fields.get("num_experts", config_default(config_class, "num_experts"))
        if experts < 1 or ffn_width % experts:
            raise ConversionError(
                f"num_experts={experts} does not divide the FFN width {ffn_width}; split needs equal slices: pick a "
                "divisor of the FFN width."
            )
        defaults: dict[str, Any] = {"expert_output_bias": "shared"}
        if routing in SCALED_ROUTINGS:
            defaults["router_scale"] = fields.get(
                "num_experts_per_tok", config_default(config_class, "num_experts_per_tok")
            )
        return defaults

    def slices(self, num_experts: int) -> bool:
        return True

    def map_ffn(self, ffn: DenseFFN, num_experts: int, *, seed: int, split_method: str) -> dict[str, torch.Tensor]:
        order = SPLIT_METHODS[split_method](ffn.up_weight, num_experts, torch.Generator().manual_seed(seed))
        return slice_experts(ffn, order, num_experts)

    @torch.no_grad()
    def init_routers(self, moe: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
        """Split routers start as near-zero centroid routers: row e points at the mean of expert e's L2-normalised
        first-layer rows. Noise gates start at zero (the noisy gate's own init); other gates keep their init."""
        for name, module in moe.named_modules():
            if not hasattr(module, "router") or not hasattr(module, "experts_module"):
                continue
            weight = getattr(module.router, "weight", None)
            up = mapped.get(f"{name}.experts.up_proj")
            if weight is None or up is None:
                continue
            centroids = torch.nn.functional.normalize(up.float(), dim=-1).mean(dim=1)  # (E, d)
            weight.copy_(torch.nn.functional.normalize(centroids, dim=-1) * SPLIT_ROUTER_NORM)
            noise = getattr(module.router, "noise_weight", None)
            if noise is not None:
                noise.zero_()


SPLIT = SplitConversion()

__all__ = ["DEFAULT_SPLIT_METHOD", "SPLIT", "SPLIT_METHODS", "SplitConversion", "balanced_kmeans"]
