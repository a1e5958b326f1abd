"""Adaptive per-layer expert counts for `--ratio R`: keep round(R * sum_l E_l) experts in total.

Layers are not equally redundant: where a few experts take most of the routing (or of the REAP
saliency) the rest can go cheaply, where usage is flat every expert matters. Each expert gets an
importance share within its layer, s_{l,e} = score_{l,e} / sum_e score_{l,e} (score: REAP saliency
for "reap", routed-token frequency otherwise), and experts are removed greedily in increasing order
of s over all layers, never below `min_experts` in a layer (top-k must stay satisfiable). The
per-layer redundancy score is then the share mass a layer gave up; the result is a non-uniform K_l.
Under group-limited routing (DeepSeek-V3: n_group groups of experts) every K_l stays a multiple of
n_group and experts leave n_group at a time (`routing_floor`). Which experts stay is left to the
merge method, and the router regroups the reduced layer by position: an expert can land in another
group than the one it came from (group-aware reduction is not done).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import MoeCompressError
from .stats import LayerStats


def importance(stats: LayerStats, method: str) -> torch.Tensor:
    """(E,) importance share of each expert in its layer (sums to 1; uniform when nothing was routed)."""
    s = stats.reap if method == "reap" else stats.counts.double()
    s = s.double().clamp_min(0)
    if float(s.sum()) <= 0:
        return torch.full_like(s, 1.0 / s.numel())
    return s / s.sum()


def routing_floor(config: dict, top_k: int) -> tuple[int, int]:
    """(fewest experts a layer may keep, the multiple its count must be) under the model's routing.

    Group-limited routing (DeepSeek-V3 and its kin, DeepSeek-V2's "group_limited_greedy") views a
    layer's E router scores as n_group groups of E / n_group: E must stay a multiple of n_group, or the
    view silently mixes tokens. Each group must keep enough experts for the group score (V3: the sum of
    a group's top 2) and for top-k out of the topk_group chosen groups.
    """
    n_group = int(config.get("n_group") or 1)
    method = config.get("topk_method")
    if n_group <= 1 or method == "greedy":
        return max(top_k, 1), 1
    topk_group = int(config.get("topk_group") or n_group)
    per_group = max(-(-top_k // topk_group), 1 if method == "group_limited_greedy" else 2)
    return n_group * per_group, n_group


def allocate_counts(shares: Sequence[torch.Tensor], ratio: float, min_experts: int, multiple: int = 1) -> list[int]:
    """Per-layer expert counts whose sum is round(ratio * total) (to a multiple of `multiple` per layer),
    each >= min_experts and a multiple of `multiple` (experts leave a layer `multiple` at a time, the
    least important first: `routing_floor`)."""
    if not 0 < ratio <= 1:
        raise MoeCompressError(f"--ratio must be in (0, 1], got {ratio}; e.g. --ratio 0.75 keeps 3/4 of the experts")
    sizes = [int(s.numel()) for s in shares]
    if any(n % multiple for n in sizes):
        raise MoeCompressError(f"layers of {sizes} experts cannot be cut in groups of {multiple}")
    total = sum(sizes)
    keep_total = multiple * int(round(ratio * total / multiple))
    floors = [min(n, -(-min_experts // multiple) * multiple) for n in sizes]
    if keep_total < sum(floors):
        raise MoeCompressError(
            f"--ratio {ratio} keeps {keep_total} experts but the routing needs at least {sum(floors)} "
            f"({min_experts} per layer{f', in multiples of {multiple}' if multiple > 1 else ''}); "
            f"use --ratio >= {sum(floors) / total:.3f}")
    # each layer's experts, least important first; a removal unit is the next `multiple` of them, and
    # the cheapest unit over all layers goes first (ties: lower layer, then lower expert)
    order = [sorted(range(n), key=lambda e, s=s: (float(s[e]), e)) for s, n in zip(shares, sizes)]
    counts = list(sizes)
    for _ in range((total - keep_total) // multiple):
        best = None
        for l, s in enumerate(shares):
            if counts[l] - multiple < floors[l]:
                continue
            gone = sizes[l] - counts[l]
            unit = order[l][gone:gone + multiple]
            key = (sum(float(s[e]) for e in unit), l)
            if best is None or key < best:
                best = key
        counts[best[1]] -= multiple
    return counts
