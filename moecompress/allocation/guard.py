"""The uniform guard: the LP's plan never predicts a higher cost than a uniform plan that fits its budget.

Every uniform plan (all experts at one candidate) that is allowed in every layer, meets the top-two rule
(none does: it needs two widths per layer) and fits every budget pool is a feasible point of the 0/1
program, so an exact solve never predicts worse. CBC stops at a relative gap (mip_gap) or a time limit,
though, and may return a plan up to that gap above the optimum. `uniform_guard` compares the solved plan's
objective with each feasible uniform plan's and, where a uniform plan predicts strictly less, returns that
plan instead (logged as a warning and marked in the Allocation's status, "uniform-guard"), so that where a
uniform plan fits the budget exactly the LP's plan cannot lose to it on the model's own cost.
"""
from __future__ import annotations

import logging

import numpy as np

from .lp import chosen, make_allocation
from .problem import AllocationProblem
from .result import Allocation

log = logging.getLogger("moecompress")


def feasible_uniform(prob: AllocationProblem) -> list[tuple[int, float]]:
    """[(candidate index, objective)] of every uniform plan that is a feasible point of the program."""
    L, E, C = prob.shape
    if prob.top_two is not None:  # the top-two rule needs two widths per layer: no uniform plan meets it
        return []
    out = []
    for c in range(C):
        if not prob.allowed[:, c].all():
            continue
        choice = np.full((L, E), c, dtype=np.int64)
        by = chosen(prob, choice, prob.bytes)
        if all(int(by[pool].sum()) <= int(cap) for pool, cap in zip(prob.pools(), prob.budget)):
            out.append((c, float(chosen(prob, choice, prob.cost).sum())))
    return out


def uniform_guard(prob: AllocationProblem, alloc: Allocation, rtol: float = 1e-12) -> tuple[Allocation, dict]:
    """(plan, record): `alloc`, or the best feasible uniform plan where that predicts a lower cost.
    record: {"uniform_objectives": {label: objective}, "fallback": label or None}."""
    uni = feasible_uniform(prob)
    rec = {"uniform_objectives": {prob.candidates[c].label: obj for c, obj in uni}, "fallback": None}
    if not uni:
        return alloc, rec
    c, obj = min(uni, key=lambda t: t[1])
    if obj < alloc.objective * (1 - rtol):
        L, E, _ = prob.shape
        label = prob.candidates[c].label
        log.warning("bit allocation: the solved plan predicts cost %.6g, above uniform %s's %.6g which fits the "
                    "budget (solver gap or time limit); using uniform %s", alloc.objective, label, obj, label)
        rec["fallback"] = label
        out = make_allocation(prob, np.full((L, E), c, dtype=np.int64), alloc.solve_seconds, "uniform-guard", "lp")
        return out, rec
    return alloc, rec
