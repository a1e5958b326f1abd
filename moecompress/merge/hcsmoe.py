"""HC-SMoE: hierarchical clustering of experts by their outputs, then a usage-weighted merge.

Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (HC-SMoE,
ICML 2025). Each expert is represented by its mean output over the calibration tokens,
o_e = (1/T) sum_t f_e(x_t) (every expert run on every sampled token, routed or not). Agglomerative
clustering with average linkage,

    d(A, B) = (1/|A||B|) sum_{a in A, b in B} ||o_a - o_b||_2,

repeatedly joins the two closest clusters until K remain (our own loop, so exactly K clusters come
out even with ties). Each cluster is merged by frequency-weighted averaging; its representative is
the most-used member. The paper merges without alignment; `align="weight"|"activation"` permutes
members into the representative's unit order first (measured in benchmarks/merge.py).
"""
from __future__ import annotations

import torch

from .prune import rank_experts
from .reduction import LayerReduction, check_target, merge_groups
from .stats import LayerStats


def average_linkage_clusters(features: torch.Tensor, num_clusters: int) -> list[list[int]]:
    """Agglomerative clustering of rows of features (E, D) into num_clusters, average linkage, euclidean."""
    E = features.shape[0]
    D = torch.cdist(features.double(), features.double())  # (E, E)
    clusters = [[e] for e in range(E)]
    while len(clusters) > num_clusters:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                d = float(D[clusters[i]][:, clusters[j]].mean())
                if best is None or d < best[0] - 1e-12:
                    best = (d, i, j)
        _, i, j = best
        clusters[i] = sorted(clusters[i] + clusters[j])
        del clusters[j]
    return clusters


def hcsmoe_layer(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    stats: LayerStats,
    num_keep: int,
    *,
    top_k: int | None = None,
    align: str | None = None,
    router_mode: str = "lse",
    refit: bool = True,
) -> LayerReduction:
    """E experts -> num_keep output-clustered, usage-weighted merges."""
    check_target(gate_up.shape[0], num_keep, top_k)
    order = rank_experts(stats.counts, stats.gate_sum)
    pos = {e: i for i, e in enumerate(order)}
    clusters = average_linkage_clusters(stats.mean_output, num_keep)
    groups = []
    for c in clusters:
        rep = min(c, key=pos.get)  # most-used member represents the cluster
        groups.append((rep, *[e for e in c if e != rep]))
    groups.sort(key=lambda g: g[0])
    return merge_groups(gate_up, down, router_weight, router_bias, groups, method="hcsmoe", stats=stats,
                        weights=stats.counts, align=align, router_mode=router_mode,
                        refit=refit, top_k=top_k)
