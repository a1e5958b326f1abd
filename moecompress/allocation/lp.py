"""The bit allocation as a 0/1 integer program, solved by PuLP's bundled CBC.

x[l, e, c] = 1 when expert e of MoE layer l is stored with candidate c. With cost c(l, e, c) from
importance.py and stored bytes s(l, e, c) from pricing.py:

    minimise    sum_{l,e,c} cost[l,e,c] x[l,e,c]
    subject to  sum_c x[l,e,c] = 1                              every expert gets exactly one width
                sum_{l in P, e, c} s[l,e,c] x[l,e,c] <= budget_P  one pool P = all layers ("model") or each layer
                x[l,e,c] = 0 for candidates outside [min_bits, max_bits] of layer l (not created)
                sum_e x[l,e,t1(l)] >= 1, sum_e x[l,e,t2(l)] >= 1   MC-MoE's top-two rule (optional)

This is MC-MoE's pre-loading mixed-precision program (Huang et al., ICLR 2025) with the budget in real
bytes (scales and zeros included), a model-wide budget as an option and an open solver. CBC runs
single-threaded with a fixed seed, so the same inputs give the same allocation. Byte coefficients are
divided by their greatest common divisor (exact) and costs by their mean (argmin unchanged) to keep
the solver's tolerances meaningful; the reported objective is in the caller's units.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from functools import reduce

import numpy as np
import pulp

from ..errors import MoeCompressError
from .config import AllocationConfig
from .problem import AllocationProblem, build_problem
from .result import Allocation

log = logging.getLogger(__name__)


def allocate(config: AllocationConfig, cost, pricing) -> Allocation:
    """Build, check (before solving) and solve the program: the one-call entry for the pipeline."""
    return solve_allocation(build_problem(config, cost, pricing), config)


def solve_allocation(prob: AllocationProblem, config: AllocationConfig) -> Allocation:
    """Solve one program per budget pool: the whole model, or (scope "layer") each layer on its own,
    which is exact because layers share no constraint, and much faster for CBC than one joint program."""
    t0 = time.perf_counter()
    L, E, C = prob.shape
    choice = np.full((L, E), -1, dtype=np.int64)
    statuses = []
    for pool, cap in zip(prob.pools(), prob.budget):
        left = max(1.0, config.time_limit_s - (time.perf_counter() - t0))
        statuses.append(_solve_pool(prob, [int(l) for l in pool], int(cap), config, left, choice))
    assert (choice >= 0).all(), "an expert got no width"
    choice = repair_budget(prob, choice)
    status = "optimal" if all(s == "optimal" for s in statuses) else "feasible"
    if status == "feasible":
        log.warning("bit allocation stopped at the %.0f s time limit with a feasible, unproven allocation",
                    config.time_limit_s)
    secs = time.perf_counter() - t0
    log.info("bit allocation: %d programs, %d binaries, %.2f s, %s", len(statuses),
             int(prob.allowed.sum()) * E, secs, status)
    return make_allocation(prob, choice, secs, status, "lp")


def _solve_pool(prob: AllocationProblem, layers: list[int], cap: int, config: AllocationConfig,
                time_limit: float, choice: np.ndarray) -> str:
    """Solve the program of the layers sharing budget `cap`; writes their rows of `choice` (L, E)."""
    E = prob.shape[1]
    by, cost, allowed = prob.bytes[layers], prob.cost[layers], prob.allowed[layers]  # (P, E, C), (P, C)
    g = reduce(math.gcd, [int(v) for v in np.unique(by)] + [cap])
    units = by // g  # exact: sum(by) <= cap  <=>  sum(units) <= cap // g
    mean = float(cost[np.broadcast_to(allowed[:, None, :], cost.shape)].mean())
    coef = cost / (mean if mean > 0 else 1.0)

    lp = pulp.LpProblem("moe_bit_allocation", pulp.LpMinimize)
    new_var = getattr(lp, "add_variable", None) or (lambda name, cat: pulp.LpVariable(name, cat=cat))  # PuLP >= 3.3
    x: dict[tuple[int, int, int], pulp.LpVariable] = {}
    obj, budget_terms = [], []
    for i, l in enumerate(layers):
        tops = () if prob.top_two is None else tuple(int(t) for t in prob.top_two[l])
        top_terms = {t: [] for t in tops}
        for e in range(E):
            row = []
            for c in np.flatnonzero(allowed[i]):
                c = int(c)
                v = new_var(f"x_{l}_{e}_{c}", cat=pulp.LpBinary)
                x[(l, e, c)] = v
                row.append((v, 1))
                obj.append((v, float(coef[i, e, c])))
                budget_terms.append((v, int(units[i, e, c])))
                if c in top_terms:
                    top_terms[c].append((v, 1))
            lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(row), pulp.LpConstraintEQ, rhs=1),
                             f"one_{l}_{e}")
        for t, terms in top_terms.items():
            lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), pulp.LpConstraintGE, rhs=1),
                             f"top_{l}_{t}")
    lp.setObjective(pulp.LpAffineExpression(obj))
    lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(budget_terms), pulp.LpConstraintLE,
                                       rhs=cap // g), "budget")

    seed = config.seed + 1  # CBC reads seed 0 as "use the time of day"
    # The feasibility pump spends most of the time on large instances (70 of 77 s at 58 x 256 x 4,
    # layer scope) and is not needed: CBC's diving heuristics find the same optimum without it.
    with warnings.catch_warnings():  # PuLP 3.3 deprecates the bundled CBC for PuLP 4.0
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=config.mip_gap, gapAbs=0,
                                   timeLimit=round(time_limit, 1),
                                   options=[f"randomCbcSeed {seed}", f"randomSeed {seed}", "feas off"])
        lp.solve(solver)
    if lp.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif lp.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "feasible"
    elif lp.status == pulp.LpStatusNotSolved:
        raise MoeCompressError(f"the bit allocation solver found no allocation within {config.time_limit_s:g} s; "
                               f"raise time_limit_s or mip_gap")
    else:
        raise MoeCompressError(f"the bit allocation solver found no allocation (CBC: {pulp.LpStatus[lp.status]}); "
                               f"raise the budget or relax min/max bits and the top-two rule")
    for (l, e, c), v in x.items():
        if (v.varValue or 0.0) > 0.5:
            assert choice[l, e] < 0, f"two widths chosen for layer {l} expert {e}"
            choice[l, e] = c
    return status


def chosen(prob: AllocationProblem, choice: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(L, E) entries of an (L, E, C) table at the chosen candidates."""
    return np.take_along_axis(table, choice[..., None], axis=2)[..., 0]


def repair_budget(prob: AllocationProblem, choice: np.ndarray) -> np.ndarray:
    """Guard against solver tolerances: while a pool is over budget, step one expert down to a cheaper
    allowed candidate (top-two rule kept), the step with the least cost increase per byte of overflow
    it removes (bytes saved beyond the overflow count for nothing)."""
    choice = choice.copy()
    L, E, C = prob.shape
    for pool, cap in zip(prob.pools(), prob.budget):
        while (over := int(chosen(prob, choice, prob.bytes)[pool].sum()) - int(cap)) > 0:
            moves = []  # (cost increase per overflow byte removed, cost increase, l, e, c)
            for l in pool:
                for e in range(E):
                    c0 = choice[l, e]
                    if prob.top_two is not None and c0 in prob.top_two[l] and (choice[l] == c0).sum() == 1:
                        continue
                    for c in np.flatnonzero(prob.allowed[l]):
                        saved = int(prob.bytes[l, e, c0] - prob.bytes[l, e, c])
                        if saved > 0:
                            dc = float(prob.cost[l, e, c] - prob.cost[l, e, c0])
                            moves.append((dc / min(saved, over), dc, int(l), e, int(c)))
            assert moves, "over budget and nothing to step down (feasibility check missed it)"
            _, _, l, e, c = min(moves)
            log.warning("bit allocation: budget exceeded after solving (solver tolerance); stepped layer %d "
                        "expert %d down to %s", l, e, prob.candidates[c].label)
            choice[l, e] = c
    return choice


def make_allocation(prob: AllocationProblem, choice: np.ndarray, secs: float, status: str,
                    method: str, budget=True) -> Allocation:
    """Package an (L, E) choice array as an Allocation with its exact bytes and objective."""
    total = int(chosen(prob, choice, prob.bytes).sum())
    return Allocation(prob.candidates, tuple(tuple(int(c) for c in r) for r in choice), total,
                      int(prob.params.sum()), int(prob.budget.sum()) if budget else None,
                      float(chosen(prob, choice, prob.cost).sum()), float(secs), status, method)
