"""Expert pruning: keep the K experts with the highest saliency, drop the rest and their router rows.

frequency: s_e = number of calibration tokens routed to e (usage-count pruning, the naive baseline;
    e.g. Muzio et al. 2024, "SEER-MoE").
reap:      s_e = (1/|X_e|) sum_{x in X_e} g_e(x) * ||f_e(x)||_2, the mean over the tokens routed to e of
    the gate weight times the norm of the expert's output (Router-weighted Expert Activation
    Pruning; Lasby et al. 2025, "REAP the Experts: Why Pruning Prevails for One-Shot MoE
    Compression"). Experts that receive no tokens score 0.

Ties are broken by frequency, then by the lower index, so the result is deterministic. The kept
experts stay in their original order and keep their router rows unchanged; the renormalised top-k
softmax over the remaining rows is the pruned router.
"""
from __future__ import annotations

import torch

from .reduction import LayerReduction, check_target, merge_groups
from .stats import LayerStats

PRUNE_METHODS = ("frequency", "reap")


def prune_scores(stats: LayerStats, method: str) -> torch.Tensor:
    """(E,) saliency; higher = keep."""
    if method == "frequency":
        return stats.counts.double()
    if method == "reap":
        return stats.reap.double()
    raise ValueError(f"unknown prune method {method!r}; known: {PRUNE_METHODS}")


def rank_experts(scores: torch.Tensor, tiebreak: torch.Tensor) -> list[int]:
    """Expert indices from most to least salient (score, then tiebreak, then lower index)."""
    E = scores.shape[0]
    return sorted(range(E), key=lambda e: (-float(scores[e]), -float(tiebreak[e]), e))


def prune_layer(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    stats: LayerStats,
    num_keep: int,
    *,
    method: str = "reap",
    top_k: int | None = None,
    refit: bool = False,
) -> LayerReduction:
    """Keep `num_keep` of the E experts (gate_up (E, 2I, H), down (E, H, I), router (E, H)).

    refit: least-squares down projections of the kept experts so the pruned layer reproduces the
    original layer's routed output, the dropped experts' share included (refit.py)."""
    check_target(gate_up.shape[0], num_keep, top_k)
    s = prune_scores(stats, method)
    keep = sorted(rank_experts(s, stats.counts)[:num_keep])
    red = merge_groups(gate_up, down, router_weight, router_bias, [(e,) for e in keep],
                       method=method, stats=stats, router_mode="dominant", refit=refit, top_k=top_k)
    red.record["scores"] = [round(float(x), 6) for x in s]
    return red
