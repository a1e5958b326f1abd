"""Adaptive per-layer expert counts for `--ratio R`: keep round(R * sum_l E_l) experts in total.

Layers are not equally redundant: where a few experts take most of the routing (or of the REAP
saliency) the rest can go cheaply, where usage is flat every expert matters. Each expert gets an
importance share within its layer, s_{l,e} = score_{l,e} / sum_e score_{l,e} (score: REAP saliency
for "reap", routed-token frequency otherwise), and experts are removed greedily in increasing order
of s over all layers, never below `min_experts` in a layer (top-k must stay satisfiable). The
per-layer redundancy score is then the share mass a layer gave up; the result is a non-uniform K_l.
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


def allocate_counts(shares: Sequence[torch.Tensor], ratio: float, min_experts: int) -> list[int]:
    """Per-layer expert counts whose sum is round(ratio * total), each >= min_experts."""
    if not 0 < ratio <= 1:
        raise MoeCompressError(f"--ratio must be in (0, 1], got {ratio}; e.g. --ratio 0.75 keeps 3/4 of the experts")
    sizes = [int(s.numel()) for s in shares]
    total = sum(sizes)
    keep_total = int(round(ratio * total))
    floor = sum(min(min_experts, n) for n in sizes)
    if keep_total < floor:
        raise MoeCompressError(
            f"--ratio {ratio} keeps {keep_total} experts but top-{min_experts} routing needs {floor}; "
            f"use --ratio >= {floor / total:.3f}")
    # every (share, layer, expert) candidate, cheapest first; deterministic tie-break by layer, expert
    cand = sorted((float(s[e]), l, e) for l, s in enumerate(shares) for e in range(s.numel()))
    counts = list(sizes)
    to_remove = total - keep_total
    for _, l, _ in cand:
        if to_remove == 0:
            break
        if counts[l] > min(min_experts, sizes[l]):
            counts[l] -= 1
            to_remove -= 1
    return counts
