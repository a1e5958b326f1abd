"""Plain averaging of expert groups: the naive merge baseline.

Groups are formed as in M-SMoE (msmoe.py: the K most-used experts are dominant, every other expert
joins the dominant expert whose router logits it correlates with most), and each group becomes the
unweighted mean of its members, W_G = (1/|G|) sum_{e in G} W_e, with no neuron alignment. Because
the hidden units of independently trained experts do not correspond, this usually destroys the
layer; it is here to show what alignment and weighting buy.
"""
from __future__ import annotations

import torch

from .msmoe import dominant_groups
from .reduction import LayerReduction, check_target, merge_groups
from .stats import LayerStats


def average_layer(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    stats: LayerStats,
    num_keep: int,
    *,
    top_k: int | None = None,
    router_mode: str = "lse",
) -> LayerReduction:
    """E experts -> num_keep unweighted, unaligned group means."""
    check_target(gate_up.shape[0], num_keep, top_k)
    groups = dominant_groups(stats, num_keep)
    return merge_groups(gate_up, down, router_weight, router_bias, groups, method="average",
                        stats=stats, weights=None, align=None, router_mode=router_mode)
