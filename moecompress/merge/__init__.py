"""Expert pruning and merging: fewer experts per MoE layer, decided from calibration statistics.

Pure tensor functions per method (one file each): prune.py (frequency, REAP), average.py (plain
mean), msmoe.py (M-SMoE), hcsmoe.py (HC-SMoE); shared pieces: stats.py (LayerStats), align.py
(Hungarian neuron alignment), router.py (router rows of merged groups), counts.py (adaptive
per-layer counts for --ratio), reduction.py (LayerReduction), refit.py (least-squares down projections
of the reduced layer). `reduce_layer` dispatches by name.

How the router treats a merged group: the group keeps one router row and the family's top-k routing
is unchanged, so a token reaches the merged expert exactly when that row is in its top-k. The default
row (DEFAULT_ROUTER) is the representative's ("dominant": tokens that chose the most-used member still
choose the group; tokens that chose only another member go to their next choice); "lse" fits a row
to logsumexp of the members' logits (the group receives their summed probability), "mean" and
"weighted" average the member rows. Pruned experts simply lose their rows. benchmarks/merge.py
--variants measures each choice on the trained fixture.
"""
from __future__ import annotations

import torch

from .reduction import LayerReduction, check_target
from .stats import LayerStats, compute_layer_stats

PRUNE_METHODS = ("frequency", "reap")
MERGE_METHODS = ("average", "msmoe", "hcsmoe")
METHODS = PRUNE_METHODS + MERGE_METHODS
# method -> neuron alignment used by default (measured in benchmarks/merge.py)
DEFAULT_ALIGN = {"average": None, "msmoe": "weight", "hcsmoe": "weight"}
# method -> router rows of merged groups (router.py); "dominant" measured best with refit on the fixture
DEFAULT_ROUTER = {"average": "lse", "msmoe": "dominant", "hcsmoe": "dominant"}
# method -> least-squares refit of the reduced layer (refit.py) unless asked otherwise; the naive
# baselines (frequency pruning, plain averaging) stay as published. REAP's refit uses a stronger ridge
# (prune.PRUNE_RIDGE, measured there).
DEFAULT_REFIT = {"frequency": False, "reap": True, "average": False, "msmoe": True, "hcsmoe": True}


def reduce_layer(
    method: str,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    stats: LayerStats,
    num_keep: int,
    *,
    top_k: int | None = None,
    align: str | None | type(...) = ...,
    router_mode: str | None = None,
    refit: bool | None = None,
) -> LayerReduction:
    """Reduce one layer's E experts (gate_up (E, 2I, H), down (E, H, I), router (E, H)) to num_keep."""
    from .average import average_layer
    from .hcsmoe import hcsmoe_layer
    from .msmoe import msmoe_layer
    from .prune import prune_layer
    from ..errors import MoeCompressError

    if method not in METHODS:
        raise MoeCompressError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    router_mode = router_mode or DEFAULT_ROUTER.get(method, "lse")
    refit = DEFAULT_REFIT[method] if refit is None else refit
    args = (gate_up, down, router_weight, router_bias, stats, num_keep)
    if method in PRUNE_METHODS:
        return prune_layer(*args, method=method, top_k=top_k, refit=refit)
    if method == "average":
        return average_layer(*args, top_k=top_k, router_mode=router_mode)
    al = DEFAULT_ALIGN[method] if align is ... else align
    fn = msmoe_layer if method == "msmoe" else hcsmoe_layer
    return fn(*args, top_k=top_k, align=al, router_mode=router_mode, refit=refit)


__all__ = ["LayerStats", "LayerReduction", "compute_layer_stats", "reduce_layer", "check_target",
           "METHODS", "PRUNE_METHODS", "MERGE_METHODS"]
