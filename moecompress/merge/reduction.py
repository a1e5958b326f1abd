"""`LayerReduction`: the result of pruning or merging one MoE layer, and the shared merge core.

Every method reduces E experts to K groups (a pruned expert is a group of one; dropped experts belong
to no group). `merge_groups` builds the new weights: for a group G with representative r = G[0],
each member is optionally permuted into alignment with r (align.py), then

    W_G = sum_{e in G} a_e P_e(W_e) / sum_{e in G} a_e        (a_e = usage weight, or 1 for "average")

for the gate, up and down projections, and the router row comes from router.py. With `refit` the
down projections of the reduced layer are then fitted by least squares so that the reduced layer's
routed output tracks the original layer's on the calibration sample (refit.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import MoeCompressError
from .align import align_expert, permute_expert
from .refit import moe_output, refit_layer
from .router import merge_router
from .stats import LayerStats


@dataclass(frozen=True)
class LayerReduction:
    """One reduced MoE layer. groups[k] lists the old experts merged into new expert k (representative
    first); expert_map[e] is e's new index or -1 when it was dropped."""

    gate_up: torch.Tensor  # (K, 2I, H)
    down: torch.Tensor  # (K, H, I)
    router_weight: torch.Tensor  # (K, H)
    router_bias: torch.Tensor | None  # (K,) or None
    expert_map: tuple[int, ...]  # (E,)
    groups: tuple[tuple[int, ...], ...]  # (K,)
    method: str
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        K = len(self.groups)
        assert self.gate_up.shape[0] == K and self.down.shape[0] == K and self.router_weight.shape[0] == K
        for k, g in enumerate(self.groups):
            assert all(self.expert_map[e] == k for e in g)

    @property
    def num_experts(self) -> int:
        return len(self.groups)

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(e for e, k in enumerate(self.expert_map) if k < 0)


def check_target(num_experts: int, target: int, top_k: int | None) -> None:
    """Fail fast on an impossible expert count (top-k routing needs at least top_k experts)."""
    if target > num_experts:
        raise MoeCompressError(f"cannot keep {target} experts of {num_experts}; choose --experts <= {num_experts}")
    floor = max(top_k or 1, 1)
    if target < floor:
        raise MoeCompressError(
            f"{target} experts per layer cannot serve top-{top_k} routing; choose --experts >= {floor}")


def groups_to_map(groups: Sequence[Sequence[int]], num_experts: int) -> tuple[int, ...]:
    emap = [-1] * num_experts
    for k, g in enumerate(groups):
        for e in g:
            assert emap[e] == -1, f"expert {e} in two groups"
            emap[e] = k
    return tuple(emap)


def merge_groups(
    gate_up: torch.Tensor,
    down: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor | None,
    groups: Sequence[Sequence[int]],
    *,
    method: str,
    stats: LayerStats | None = None,
    weights: torch.Tensor | None = None,
    align: str | None = None,
    router_mode: str = "lse",
    refit: bool = False,
    top_k: int | None = None,
    ridge: float = 0.1,
) -> LayerReduction:
    """Merge each group (representative first) into one expert. weights (E,) None = plain mean;
    align None = no permutation, else "weight" or "activation" matching to the representative;
    refit: least-squares down projections so the reduced layer reproduces the original layer's routed
    output on the calibration sample (refit.py), pulled towards the starting weights by `ridge`."""
    E = gate_up.shape[0]
    groups = tuple(tuple(int(e) for e in g) for g in groups)
    inputs = stats.router_inputs if stats is not None else None
    new_gu, new_dn, scores = [], [], {}
    for g in groups:
        rep = g[0]
        a = torch.ones(len(g), dtype=torch.float64) if weights is None else weights[list(g)].double().clamp_min(0)
        if float(a.sum()) <= 0:
            a = torch.ones(len(g), dtype=torch.float64)  # a group nobody routed to: plain mean
        a = a / a.sum()
        acc_gu = torch.zeros_like(gate_up[rep], dtype=torch.float32)
        acc_dn = torch.zeros_like(down[rep], dtype=torch.float32)
        for ae, e in zip(a.tolist(), g):
            gu, dn = gate_up[e].float(), down[e].float()
            if align and e != rep:
                al = align_expert(gate_up[rep], down[rep], gu, dn, match=align, inputs=inputs)
                gu, dn = permute_expert(gu, dn, al.perm)
                scores[e] = round(al.score, 4)
            acc_gu += ae * gu
            acc_dn += ae * dn
        new_gu.append(acc_gu.to(gate_up.dtype))
        new_dn.append(acc_dn.to(down.dtype))
    usage = stats.counts if stats is not None else None
    r = merge_router(router_weight, router_bias, groups, mode=router_mode, inputs=inputs, usage=usage)
    new_gu, new_dn = torch.stack(new_gu), torch.stack(new_dn)  # (K, 2I, H), (K, H, I)
    refitted = bool(refit and top_k and inputs is not None and inputs.shape[0] > 0)
    if refitted:
        idx, w = stats.router_topk_index, stats.router_topk_weight
        target = moe_output(inputs, gate_up, down, idx, w)  # (N, H) what the original layer computed
        renorm = bool(torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-3))
        new_dn = refit_layer(new_gu, new_dn, r.weight, r.bias, target, inputs, top_k, renormalize=renorm, ridge=ridge)
    emap = groups_to_map(groups, E)
    record = {
        "method": method, "experts_before": E, "experts_after": len(groups),
        "groups": [list(g) for g in groups],
        "dropped": [e for e in range(E) if emap[e] < 0],
        "router": router_mode, "align": align or "none", "refit": refitted, "refit_ridge": ridge if refitted else None,
    }
    if scores:
        record["alignment_score"] = {str(k): v for k, v in scores.items()}
    if stats is not None:
        record["usage"] = stats.summary()
    return LayerReduction(
        gate_up=new_gu, down=new_dn,
        router_weight=r.weight, router_bias=r.bias, expert_map=emap, groups=groups,
        method=method, record=record)
