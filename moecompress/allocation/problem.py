"""The allocation problem as plain arrays, and its feasibility check (run before any solve).

A problem holds, for L MoE layers, E experts and C candidates: cost (L, E, C), bytes (L, E, C),
params (L, E), which candidates each layer allows (min/max bits), the two widest allowed candidates
of each layer when MC-MoE's top-two rule is on, and the byte budget: one number (model scope) or one
per layer. `build_problem` refuses a budget no assignment can meet, naming the least feasible
average bits, so the user learns it before calibration or quantization starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codecs import QuantSpec
from ..errors import MoeCompressError
from .config import AllocationConfig
from .pricing import Pricing, budget_bytes


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """cost, bytes: (L, E, C); params: (L, E); allowed: (L, C) bool; top_two: (L, 2) candidate
    indices (widest first) or None; budget: (1,) or (L,) bytes for scope "model" / "layer"."""

    candidates: tuple[QuantSpec, ...]
    cost: np.ndarray
    bytes: np.ndarray
    params: np.ndarray
    allowed: np.ndarray
    top_two: np.ndarray | None
    budget: np.ndarray
    scope: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.cost.shape

    def pools(self) -> list[np.ndarray]:
        """Layer indices sharing each budget entry."""
        L = self.cost.shape[0]
        return [np.arange(L)] if self.scope == "model" else [np.array([l]) for l in range(L)]

    def min_bytes(self, layer: int) -> int:
        """Fewest bytes layer `layer` can take under its allowed widths and the top-two rule."""
        b = np.where(self.allowed[layer][None, :], self.bytes[layer], np.iinfo(np.int64).max)  # (E, C)
        m = b.min(axis=1)  # (E,)
        extra = 0
        if self.top_two is not None:
            t1, t2 = self.top_two[layer]
            d1, d2 = b[:, t1] - m, b[:, t2] - m  # extra bytes to lift each expert to the top widths
            i1, i2 = int(d1.argmin()), int(d2.argmin())
            if i1 != i2:
                extra = d1[i1] + d2[i2]
            else:
                extra = min(d1[i1] + np.delete(d2, i1).min(), d2[i2] + np.delete(d1, i2).min())
        return int(m.sum() + extra)


def _widest_two(cands: tuple[QuantSpec, ...], price: np.ndarray, allowed: np.ndarray) -> tuple[int, int]:
    order = sorted(np.flatnonzero(allowed), key=lambda c: (price[c], cands[c].bits), reverse=True)
    return int(order[0]), int(order[1])


def build_problem(config: AllocationConfig, cost, pricing: Pricing) -> AllocationProblem:
    """Assemble and check the problem; raises MoeCompressError if the budget cannot be met."""
    cost = np.asarray(cost, dtype=np.float64)
    by, params = pricing
    cands = config.candidates
    L, E, C = by.shape
    if cost.shape != (L, E, C) or len(cands) != C:
        raise MoeCompressError(f"costs {cost.shape} do not match prices {by.shape} of {len(cands)} candidates")
    if not np.isfinite(cost).all() or (cost < 0).any():
        raise MoeCompressError("allocation costs must be finite and >= 0")
    allowed = np.zeros((L, C), dtype=bool)
    for l in range(L):
        lo, hi = config.layer_bounds(l, L)
        allowed[l] = [lo <= s.bits <= hi for s in cands]
        if not allowed[l].any():
            raise MoeCompressError(f"layer {l}: no candidate width lies in [{lo}, {hi}] bits "
                                   f"(candidates {[s.label for s in cands]}); widen min_bits/max_bits")
    top_two = None
    if config.top_two_each:
        if E < 2:
            raise MoeCompressError("top_two_each needs at least two experts per layer; turn it off")
        rows = []
        for l in range(L):
            if allowed[l].sum() < 2:
                raise MoeCompressError(f"top_two_each needs two allowed widths in layer {l}, which allows only "
                                       f"{[cands[c].label for c in np.flatnonzero(allowed[l])]}; "
                                       f"widen min_bits/max_bits or turn top_two_each off")
            rows.append(_widest_two(cands, by[l].mean(axis=0), allowed[l]))
        top_two = np.array(rows, dtype=np.int64)
    budget = budget_bytes(params, config.budget_bits, config.budget_scope)
    prob = AllocationProblem(cands, cost, by, params, allowed, top_two, budget, config.budget_scope)
    check_feasible(prob, config.budget_bits)
    return prob


def check_feasible(prob: AllocationProblem, budget_bits: float) -> None:
    """Raise MoeCompressError naming the least feasible average bits if the budget is too small."""
    worst, where = 0.0, ""
    for pool, cap in zip(prob.pools(), prob.budget):
        need = sum(prob.min_bytes(int(l)) for l in pool)
        bits = 8 * need / int(prob.params[pool].sum())
        if need > cap and bits > worst:
            worst, where = bits, ("" if prob.scope == "model" else f" (layer {int(pool[0])})")
    if worst:
        if prob.scope == "layer":  # every layer must fit: the answer is the largest per-layer minimum
            worst = max(8 * prob.min_bytes(l) / int(prob.params[l].sum()) for l in range(prob.shape[0]))
        up = math.ceil(worst * 1e4) / 1e4
        raise MoeCompressError(f"a budget of {budget_bits:g} bits per expert parameter is infeasible: the smallest "
                               f"allocation needs {worst:.4f} bits{where} (scales and zeros included); "
                               f"use --bits {up:g} or more, or allow narrower candidates")
