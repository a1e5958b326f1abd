"""One byte budget for pruning and bit widths together: the 0/1 program with a `prune` candidate.

Every routed expert gets exactly one of the bit candidates of the allocation problem (problem.py:
int widths, sub1, ...) or `prune` (0 bytes; it leaves the checkpoint with its router row):

    minimise    sum_{l,e,c} cost[l,e,c] x[l,e,c] + sum_{l,e} prune_cost[l,e] p[l,e]
    subject to  sum_c x[l,e,c] + p[l,e] = 1                      one choice per expert
                sum s[l,e,c] x[l,e,c] <= budget_P                 per pool (the model, or each layer)
                sum_e p[l,e] <= E - min_keep[l]                   every layer keeps enough experts for top-k
                grouped routers (DeepSeek-V3: n_group groups of E / n_group consecutive experts):
                sum_{e in g} p[l,e] = sum_{e in g0} p[l,e]  (every g)   equal counts per group, and
                sum_{e in g0} p[l,e] <= E / n_group - per_group         at least per_group kept per group
                x[l,e,c] = 0 outside [min_bits, max_bits] of layer l (prune is always allowed)

Prune costs are in the units of the width costs (passes/prune_cost.py: the measured output error of
the MoE block without the expert, after the prune pass's refit, relative to the expert's contribution
energy on the same sample, times the same importance weights). They are not additive: the tokens of
a pruned expert go to the next-ranked experts and the refit depends on the whole pruned set. So
`solve_joint` solves, measures the chosen pruned set of every layer (`measure(l, pruned) -> r`, the
ratio of the set's measured error to the sum of its members' single-prune errors), scales the prune
costs of that set by r, and solves again, until the plan repeats or `max_rounds` is reached. Every
round is logged; the plan returned is the one with the lowest measured objective (width costs plus
measured prune costs) over the rounds.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import pulp

from ..errors import MoeCompressError
from .problem import AllocationProblem

log = logging.getLogger(__name__)
PRUNE = "prune"  # the candidate's name on the command line and in plan.json ({"codec": "prune"})
MAX_ROUNDS = 4


@dataclass(frozen=True, eq=False)
class JointProblem:
    """base: the bit-width problem (cost, bytes (L, E, C), params, allowed, budget, pools); prune_cost (L, E);
    min_keep (L,) fewest experts kept per layer; n_group / per_group: grouped routing (1 / 0 when none)."""

    base: AllocationProblem
    prune_cost: np.ndarray
    min_keep: np.ndarray
    n_group: int = 1
    per_group: int = 0

    @property
    def shape(self):
        return self.base.shape

    def min_bytes(self, layer: int) -> int:
        """Fewest bytes layer `layer` can take: its min_keep cheapest experts (per group under grouped routing)."""
        b = self.base
        m = np.where(b.allowed[layer][None, :], b.bytes[layer], np.iinfo(np.int64).max).min(axis=1)  # (E,)
        if self.n_group > 1:
            return int(sum(np.sort(g)[:self.per_group].sum() for g in np.split(m, self.n_group)))
        return int(np.sort(m)[:int(self.min_keep[layer])].sum())


def build_joint(base: AllocationProblem, prune_cost, top_k: int, n_group: int = 1, per_group: int = 0) -> JointProblem:
    """The joint problem; raises MoeCompressError when the budget cannot be met even with pruning."""
    L, E, _ = base.shape
    pc = np.asarray(prune_cost, dtype=np.float64)
    if pc.shape != (L, E) or not np.isfinite(pc).all() or (pc < 0).any():
        raise MoeCompressError(f"prune costs must be finite, >= 0 and (L, E) = {(L, E)}, got {pc.shape}")
    if base.top_two is not None:
        raise MoeCompressError("--top-two cannot be combined with the prune candidate; drop one of them")
    if n_group > 1:
        if E % n_group:
            raise MoeCompressError(f"{E} experts do not split into {n_group} router groups")
        if per_group > E // n_group:
            raise MoeCompressError(f"router groups of {E // n_group} experts cannot keep {per_group} each")
        min_keep = np.full(L, n_group * per_group)
    else:
        if top_k > E:
            raise MoeCompressError(f"top-{top_k} routing needs {top_k} experts but layers have {E}")
        min_keep = np.full(L, max(int(top_k), 1))
    return JointProblem(base, pc, min_keep.astype(np.int64), int(n_group), int(per_group))


def smallest_bytes(prob: JointProblem) -> list[int]:
    """Fewest routed-expert bytes of each budget pool."""
    return [sum(prob.min_bytes(int(l)) for l in pool) for pool in prob.base.pools()]


@dataclass
class JointResult:
    """choice (L, E): candidate index into base.candidates, or C (= len(candidates)) for prune."""

    choice: np.ndarray
    prune_index: int
    predicted_bytes: int
    objective: float
    status: str
    seconds: float
    rounds: list = field(default_factory=list)

    def pruned(self, layer: int) -> list[int]:
        return [int(e) for e in np.flatnonzero(self.choice[layer] == self.prune_index)]


def _with_prune(prob: JointProblem, pc: np.ndarray):
    """(L, E, C + 1) cost and bytes with prune as the last column; allowed (L, C + 1)."""
    b = prob.base
    L, E, C = b.shape
    cost = np.concatenate([b.cost, pc[..., None]], axis=2)
    by = np.concatenate([b.bytes, np.zeros((L, E, 1), dtype=np.int64)], axis=2)
    allowed = np.concatenate([b.allowed, np.ones((L, 1), dtype=bool)], axis=1)
    return cost, by, allowed


def solve_once(prob: JointProblem, pc: np.ndarray, mip_gap: float = 1e-4, time_limit_s: float = 300.0,
               seed: int = 0) -> tuple[np.ndarray, str]:
    """One solve with prune costs pc (L, E) -> (choice (L, E) with C = prune, status)."""
    b = prob.base
    L, E, C = b.shape
    cost, by, allowed = _with_prune(prob, pc)
    choice = np.full((L, E), -1, dtype=np.int64)
    statuses = []
    for pool, cap in zip(b.pools(), b.budget):
        layers = [int(l) for l in pool]
        sub = by[layers]
        g = reduce(math.gcd, [int(v) for v in np.unique(sub) if v > 0] + [int(cap)]) or 1
        mean = float(cost[layers][np.broadcast_to(allowed[layers][:, None, :], sub.shape)].mean())
        coef = cost[layers] / (mean if mean > 0 else 1.0)
        lp = pulp.LpProblem("moe_joint_allocation", pulp.LpMinimize)
        new_var = getattr(lp, "add_variable", None) or (lambda name, cat: pulp.LpVariable(name, cat=cat))  # PuLP >= 3.3
        x, obj, budget = {}, [], []
        for i, l in enumerate(layers):
            for e in range(E):
                row = []
                for c in np.flatnonzero(allowed[l]):
                    v = new_var(f"x_{l}_{e}_{int(c)}", cat=pulp.LpBinary)
                    x[(l, e, int(c))] = v
                    row.append((v, 1))
                    obj.append((v, float(coef[i, e, c])))
                    if sub[i, e, c]:
                        budget.append((v, int(sub[i, e, c]) // g))
                lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(row), pulp.LpConstraintEQ, rhs=1),
                                 f"one_{l}_{e}")
            p = [x[(l, e, C)] for e in range(E)]
            lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(v, 1) for v in p]), pulp.LpConstraintLE,
                                               rhs=E - int(prob.min_keep[l])), f"keep_{l}")
            if prob.n_group > 1:
                n = E // prob.n_group
                g0 = [(v, 1) for v in p[:n]]
                lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(g0), pulp.LpConstraintLE,
                                                   rhs=n - prob.per_group), f"group_keep_{l}")
                for k in range(1, prob.n_group):
                    terms = [(v, 1) for v in p[k * n:(k + 1) * n]] + [(v, -1) for v in p[:n]]
                    lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), pulp.LpConstraintEQ, rhs=0),
                                     f"group_eq_{l}_{k}")
        lp.setObjective(pulp.LpAffineExpression(obj))
        lp.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(budget), pulp.LpConstraintLE, rhs=int(cap) // g),
                         "budget")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            solver = pulp.PULP_CBC_CMD(msg=False, threads=1, gapRel=mip_gap, gapAbs=0, timeLimit=round(time_limit_s, 1),
                                       options=[f"randomCbcSeed {seed + 1}", f"randomSeed {seed + 1}", "feas off"])
            lp.solve(solver)
        if lp.sol_status == pulp.LpSolutionOptimal:
            statuses.append("optimal")
        elif lp.sol_status == pulp.LpSolutionIntegerFeasible:
            statuses.append("feasible")
        else:
            raise MoeCompressError(f"the joint allocation solver found no plan (CBC: {pulp.LpStatus[lp.status]}); "
                                   f"raise the budget or relax --min-bits/--max-bits")
        for (l, e, c), v in x.items():
            if (v.varValue or 0.0) > 0.5:
                choice[l, e] = c
    assert (choice >= 0).all(), "an expert got no choice"
    over = [int(by[np.arange(L)[:, None], np.arange(E)[None, :], choice][pool].sum()) - int(cap)
            for pool, cap in zip(b.pools(), b.budget)]
    if max(over) > 0:  # integral byte units: CBC's tolerance cannot exceed an integer budget
        raise MoeCompressError(f"the joint allocation exceeded its budget by {max(over)} bytes (solver tolerance)")
    return choice, "optimal" if all(s == "optimal" for s in statuses) else "feasible"


def plan_cost(prob: JointProblem, choice: np.ndarray, pc: np.ndarray) -> float:
    """Objective of a choice under prune costs pc."""
    cost, _, _ = _with_prune(prob, pc)
    return float(np.take_along_axis(cost, choice[..., None], 2).sum())


def plan_bytes(prob: JointProblem, choice: np.ndarray) -> int:
    _, by, _ = _with_prune(prob, prob.prune_cost)
    return int(np.take_along_axis(by, choice[..., None], 2).sum())


def solve_joint(prob: JointProblem, measure=None, *, max_rounds: int = MAX_ROUNDS, mip_gap: float = 1e-4,
                time_limit_s: float = 300.0, seed: int = 0) -> JointResult:
    """Solve, re-measure the pruned sets, re-solve (module docstring). measure(layer, pruned list) -> ratio
    of the set's measured error to the sum of its members' single errors (None: prune costs are taken as
    additive, one solve)."""
    t0 = time.perf_counter()
    L, E, C = prob.shape
    pc = prob.prune_cost.copy()
    measured: dict[tuple[int, tuple], float] = {}  # (layer, pruned set) -> ratio
    seen, best, rounds = set(), None, []
    status = "optimal"
    for r in range(max(1, max_rounds)):
        choice, st = solve_once(prob, pc, mip_gap, time_limit_s, seed)
        status = st if st != "optimal" else status
        key = choice.tobytes()
        true_pc = prob.prune_cost.copy()
        for l in range(L):
            P = tuple(int(e) for e in np.flatnonzero(choice[l] == C))
            if len(P) > 1 and measure is not None:
                if (l, P) not in measured:
                    measured[(l, P)] = float(measure(l, list(P)))
                true_pc[l, list(P)] *= measured[(l, P)]
        obj = plan_cost(prob, choice, true_pc)
        pruned = int((choice == C).sum())
        rounds.append({"round": r, "pruned": pruned, "predicted_objective": plan_cost(prob, choice, pc),
                       "measured_objective": obj, "bytes": plan_bytes(prob, choice),
                       "pruned_per_layer": [int((choice[l] == C).sum()) for l in range(L)]})
        log.info("joint allocation round %d: %d experts pruned (per layer %s), objective predicted %.6g, "
                 "measured %.6g", r, pruned, rounds[-1]["pruned_per_layer"], rounds[-1]["predicted_objective"], obj)
        if best is None or obj < best[0] - 1e-12:
            best = (obj, choice)
        if key in seen or measure is None:
            break
        seen.add(key)
        changed = False
        for l in range(L):  # scale each measured set's costs by its interaction ratio
            P = tuple(int(e) for e in np.flatnonzero(choice[l] == C))
            if (l, P) in measured:
                new = prob.prune_cost[l, list(P)] * measured[(l, P)]
                changed |= not np.allclose(new, pc[l, list(P)])
                pc[l, list(P)] = new
        if not changed:
            break
    obj, choice = best
    return JointResult(choice, C, plan_bytes(prob, choice), obj, status, time.perf_counter() - t0, rounds)


def parse_size(text: str) -> int:
    """'24GB', '1.5 GiB', '800MB', '123456' (bytes) -> bytes; one-line MoeCompressError otherwise."""
    import re
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units:
        raise MoeCompressError(f"--budget {text!r} is not a size: give a number with a unit, e.g. 24GB, 800MB, 1.5GiB")
    v = float(m.group(1)) * units[m.group(2).upper()]
    if not math.isfinite(v) or v < 1:
        raise MoeCompressError(f"--budget {text!r} must be a positive size, e.g. 24GB")
    return int(v)


def fmt_size(n: int) -> str:
    for unit, s in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= s:
            return f"{n / s:.3f} {unit}"
    return f"{n} B"
