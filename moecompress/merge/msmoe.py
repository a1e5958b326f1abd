"""M-SMoE: merge experts into the dominant ones, grouped by routing policy, aligned, usage-weighted.

Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy"
(MC-SMoE, ICLR 2024). Per layer:
  1. dominant experts D = the K most-used experts on calibration data (usage = routed tokens);
  2. every other expert e joins argmax_{d in D} cos(L[:, e], L[:, d]), the dominant expert whose
     column of router logits over the calibration tokens is most similar (centred cosine);
  3. each member's hidden units are permuted into alignment with its dominant expert by Hungarian
     matching (align.py), applied to gate rows, up rows and down columns alike;
  4. W_G = sum_{e in G} u_e P_e(W_e) / sum_{e in G} u_e with u_e the usage frequency.
The router row of the group follows router.py (default: least-squares fit to logsumexp of members).
"""
from __future__ import annotations

import torch

from .prune import rank_experts
from .reduction import LayerReduction, check_target, merge_groups
from .stats import LayerStats


def dominant_groups(stats: LayerStats, num_keep: int, router_weight: torch.Tensor | None = None) -> list[tuple[int, ...]]:
    """Groups (dominant first, then members ascending), ordered by the dominant's index.

    Similarity is router-logit similarity; with no calibration tokens it falls back to the cosine of
    the router rows when given, else every non-dominant expert joins the most-used dominant one."""
    E = stats.num_experts
    dom = sorted(rank_experts(stats.counts, stats.gate_sum)[:num_keep])
    if stats.tokens >= 2:
        sim = stats.logit_similarity()
    elif router_weight is not None:
        R = torch.nn.functional.normalize(router_weight.double(), dim=1)
        sim = R @ R.T
    else:
        sim = torch.zeros(E, E, dtype=torch.float64)
    members = {d: [d] for d in dom}
    for e in range(E):
        if e in members:
            continue
        best = max(dom, key=lambda d: (float(sim[e, d]), float(stats.counts[d]), -d))
        members[best].append(e)
    return [tuple(members[d]) for d in dom]


def msmoe_layer(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    stats: LayerStats,
    num_keep: int,
    *,
    top_k: int | None = None,
    align: str | None = "weight",
    router_mode: str = "lse",
    refit: bool = True,
) -> LayerReduction:
    """E experts -> num_keep M-SMoE groups (gate_up (E, 2I, H), down (E, H, I), router (E, H))."""
    check_target(gate_up.shape[0], num_keep, top_k)
    groups = dominant_groups(stats, num_keep, router_weight)
    return merge_groups(gate_up, down, router_weight, router_bias, groups, method="msmoe", stats=stats,
                        weights=stats.counts, align=align, router_mode=router_mode,
                        refit=refit, top_k=top_k)
