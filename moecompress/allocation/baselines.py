"""Baseline allocations for comparison with the LP: uniform width, and random widths under the same budget.

random_allocation: start every expert at its cheapest allowed candidate (and, with the top-two rule,
two random experts per layer at the layer's two widest). Then visit the other experts in a random
order; each picks uniformly among the allowed candidates that still fit the remaining budget of its
pool. A second random pass lets experts move up to a random wider candidate that still fits, so the
budget is used about as fully as the LP uses it. Seeded with numpy's default_rng: deterministic.
"""
from __future__ import annotations

import numpy as np

from ..codecs import QuantSpec
from ..errors import MoeCompressError
from .lp import chosen, make_allocation
from .problem import AllocationProblem
from .result import Allocation


def _index(prob: AllocationProblem, candidate) -> int:
    if isinstance(candidate, QuantSpec):
        if candidate not in prob.candidates:
            raise MoeCompressError(f"{candidate.label} is not one of the candidates "
                                   f"{[c.label for c in prob.candidates]}")
        return prob.candidates.index(candidate)
    hits = [i for i, c in enumerate(prob.candidates) if c.bits == candidate]
    if len(hits) != 1:
        raise MoeCompressError(f"{candidate!r} bits does not name exactly one candidate of "
                               f"{[c.label for c in prob.candidates]}; pass the QuantSpec")
    return hits[0]


def uniform_allocation(prob: AllocationProblem, candidate) -> Allocation:
    """Every expert at one candidate (a QuantSpec, or its bits); ignores budget and bounds."""
    c = _index(prob, candidate)
    L, E, _ = prob.shape
    return make_allocation(prob, np.full((L, E), c, dtype=np.int64), 0.0, "uniform", "uniform", budget=False)


def random_allocation(prob: AllocationProblem, seed: int = 0) -> Allocation:
    """Random widths within the problem's budget(s), bounds and top-two rule (see module docstring)."""
    rng = np.random.default_rng(seed)
    L, E, C = prob.shape
    big = np.iinfo(np.int64).max
    price = np.where(prob.allowed[:, None, :], prob.bytes, big)  # (L, E, C); disallowed never fit
    choice = price.argmin(axis=2)  # (L, E) cheapest allowed
    for pool, cap in zip(prob.pools(), prob.budget):
        fixed = np.zeros((L, E), dtype=bool)
        if prob.top_two is not None:
            for _attempt in range(100):
                trial = choice.copy()
                for l in pool:
                    e1, e2 = rng.choice(E, size=2, replace=False)
                    trial[l, e1], trial[l, e2] = prob.top_two[l]
                if chosen(prob, trial, prob.bytes)[pool].sum() <= cap:
                    break
            else:
                raise MoeCompressError("could not place the top-two widths at random within the budget; "
                                       "raise the budget or turn top_two_each off")
            fixed[pool] = trial[pool] != choice[pool]
            choice = trial
        left = int(cap) - int(chosen(prob, choice, prob.bytes)[pool].sum())
        free = [(int(l), e) for l in pool for e in range(E) if not fixed[l, e]]
        for upward in (False, True):
            for i in rng.permutation(len(free)):
                l, e = free[i]
                cur = choice[l, e]
                delta = price[l, e] - prob.bytes[l, e, cur]  # (C,) extra bytes of each candidate
                ok = (price[l, e] < big) & (delta <= left) & ((delta > 0) if upward else True)
                ok[cur] = ok[cur] or not upward
                opts = np.flatnonzero(ok)
                if len(opts):
                    c = int(opts[rng.integers(len(opts))])
                    left -= int(delta[c])
                    choice[l, e] = c
        assert left >= 0
    return make_allocation(prob, choice, 0.0, "random", "random")
