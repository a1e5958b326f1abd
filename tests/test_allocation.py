"""Bit allocation (issue 4): pricing, costs, the 0/1 program against brute force, baselines, errors."""
import itertools
import math

import numpy as np
import pytest
import torch

from moecompress.allocation import (Allocation, AllocationConfig, allocate, allocation_table, budget_bytes,
                                    build_problem, expert_costs, expert_output_error, expert_shapes,
                                    overhead_bits, price_candidates, random_allocation, stored_bits, uniform_allocation)
from moecompress.allocation.lp import repair_budget
from moecompress.codecs import QuantSpec, nbytes
from moecompress.errors import MoeCompressError

SHAPES = expert_shapes(64, 128)  # (128, 64), (128, 64), (64, 128)


def brute_force(prob):
    """Exhaustive optimum over all feasible assignments: (objective, choice)."""
    L, E, C = prob.shape
    options = [np.flatnonzero(prob.allowed[l]) for l in range(L) for _ in range(E)]
    best = (math.inf, None)
    for flat in itertools.product(*options):
        ch = np.array(flat).reshape(L, E)
        by = np.take_along_axis(prob.bytes, ch[..., None], 2)[..., 0]
        if any(by[pool].sum() > cap for pool, cap in zip(prob.pools(), prob.budget)):
            continue
        if prob.top_two is not None and any(t not in ch[l] for l in range(L) for t in prob.top_two[l]):
            continue
        obj = np.take_along_axis(prob.cost, ch[..., None], 2)[..., 0].sum()
        if obj < best[0]:
            best = (obj, ch)
    return best


def small_instance(seed, L=2, E=3, C=3):
    rng = np.random.default_rng(seed)
    # data-dependent sizes (as for sub-1-bit codecs): per-expert measured bytes, increasing in width
    measured = np.cumsum(rng.integers(500, 1500, (L, E, C)), axis=2).astype(float)
    cost = np.sort(rng.lognormal(0, 1, (L, E, C)), axis=2)[..., ::-1].copy()  # falls with bits
    return measured, cost


@pytest.mark.parametrize("scope", ["model", "layer"])
@pytest.mark.parametrize("top_two", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lp_matches_brute_force(scope, top_two, seed):
    measured, cost = small_instance(seed)
    L, E, C = cost.shape
    pricing = price_candidates(AllocationConfig().candidates, SHAPES, L, E, measured_bytes=measured)
    probe = build_problem(AllocationConfig(budget_bits=64, top_two_each=top_two), cost, pricing)
    lo_bits = max(8 * probe.min_bytes(l) / pricing.params[l].sum() for l in range(L))  # feasible in both scopes
    hi_bits = 8 * measured[..., -1].sum() / pricing.params.sum()
    budget = round(lo_bits + (0.3 + 0.1 * seed) * (hi_bits - lo_bits), 3)
    cfg = AllocationConfig(candidates=(2, 3, 4), budget_bits=budget, budget_scope=scope, top_two_each=top_two,
                           mip_gap=0.0)  # prove optimality
    prob = build_problem(cfg, cost, pricing)
    alloc = allocate(cfg, cost, pricing)
    obj, ch = brute_force(prob)
    assert alloc.status == "optimal"
    assert alloc.objective == pytest.approx(obj, rel=1e-9)
    got = alloc.choice_array()
    assert np.take_along_axis(prob.cost, got[..., None], 2).sum() == pytest.approx(obj, rel=1e-9)
    for pool, cap in zip(prob.pools(), prob.budget):
        assert np.take_along_axis(prob.bytes, got[..., None], 2)[pool].sum() <= cap
    if top_two:
        assert all(t in got[l] for l in range(L) for t in prob.top_two[l])


def test_lp_matches_brute_force_with_width_bounds():
    measured, cost = small_instance(7, L=3, E=2)
    cfg = AllocationConfig(candidates=(2, 3, 4), budget_bits=2.0, min_bits=(3, None, None), max_bits=(None, 3, None),
                           mip_gap=0.0)
    pricing = price_candidates(cfg.candidates, SHAPES, 3, 2, measured_bytes=measured)
    prob = build_problem(cfg, cost, pricing)
    alloc = allocate(cfg, cost, pricing)
    assert alloc.objective == pytest.approx(brute_force(prob)[0], rel=1e-9)
    w = alloc.widths()
    assert (w[0] >= 3).all() and (w[1] <= 3).all()


def test_prices_are_codec_bytes_and_budget_is_floored():
    cands = AllocationConfig().candidates
    pr = price_candidates(cands, SHAPES, 2, 4)
    for c, spec in enumerate(cands):
        assert pr.bytes[1, 3, c] == sum(nbytes(s, spec) for s in SHAPES)
    assert pr.bytes[0, 0].tolist() == [6144 + 1536, 9216 + 1536, 12288 + 1536]  # codes + fp16 scale/zero per 64
    assert pr.params.sum() == 8 * 3 * 64 * 128
    assert budget_bytes(pr.params, 2.7, "model").tolist() == [int(2.7 * 8 * 3 * 64 * 128) // 8]  # 66355.2 -> 66355
    assert budget_bytes(pr.params, 2.7, "layer").tolist() == [33177, 33177]
    assert stored_bits(QuantSpec("int", 2, 64), SHAPES) == 2.5
    assert overhead_bits(QuantSpec("int", 3, 32), SHAPES) == 1.0  # fp16 scale + zero per 32 weights
    with pytest.raises(MoeCompressError, match="does not divide"):
        price_candidates((QuantSpec("int", 4, 48),), SHAPES, 1, 2)


def test_budget_respected_in_real_bytes_and_beats_baselines():
    rng = np.random.default_rng(3)
    L, E = 4, 16
    cfg = AllocationConfig(candidates=(2, 3, 4, 8), budget_bits=3.3)
    pricing = price_candidates(cfg.candidates, [expert_shapes(64, 128), expert_shapes(64, 192)] * 2, L, E)
    cost = 4.0 ** -np.arange(4)[None, None, :] * rng.lognormal(0, 1, (L, E, 1))
    alloc = allocate(cfg, cost, pricing)
    recount = sum(nbytes(s, alloc.spec(l, e)) for l in range(L) for e in range(E)
                  for s in (expert_shapes(64, 128) if l % 2 == 0 else expert_shapes(64, 192)))
    assert alloc.predicted_bytes == recount <= alloc.budget_bytes
    assert 3.2 < alloc.average_bits <= 3.3
    prob = build_problem(cfg, cost, pricing)
    for s in range(3):
        rnd = random_allocation(prob, s)
        assert rnd.predicted_bytes <= alloc.budget_bytes and rnd.average_bits > 3.0
        assert alloc.objective < rnd.objective
    assert alloc.objective < uniform_allocation(prob, 2).objective
    assert uniform_allocation(prob, 3).average_bits == 3.5


def test_infeasible_budget_names_minimum_before_solving(monkeypatch):
    import pulp
    monkeypatch.setattr(pulp, "PULP_CBC_CMD", lambda *a, **k: pytest.fail("solver called"))
    cost = np.ones((2, 4, 3))
    pr = price_candidates(AllocationConfig().candidates, SHAPES, 2, 4)
    with pytest.raises(MoeCompressError, match=r"needs 2\.5000 bits.*--bits 2\.5 or more"):
        allocate(AllocationConfig(budget_bits=2.4), cost, pr)
    # top-two in every layer: two of four experts lifted to 4.5 and 3.5 bits -> (2*2.5 + 3.5 + 4.5) / 4 = 3.25
    with pytest.raises(MoeCompressError, match=r"needs 3\.2500 bits \(layer 0\)"):
        allocate(AllocationConfig(budget_bits=3.2, budget_scope="layer", top_two_each=True), cost, pr)
    with pytest.raises(MoeCompressError, match="two allowed widths"):
        allocate(AllocationConfig(budget_bits=4, top_two_each=True, max_bits=2), cost, pr)
    with pytest.raises(MoeCompressError, match="no candidate width"):
        allocate(AllocationConfig(budget_bits=4, min_bits=8), cost, pr)
    with pytest.raises(MoeCompressError, match="one value"):
        allocate(AllocationConfig(budget_bits=4, min_bits=(2, 3, 4)), cost, pr)
    monkeypatch.undo()  # the exact feasible minimum is accepted (all int2):
    assert allocate(AllocationConfig(budget_bits=2.5), cost, pr).widths().max() == 2


@pytest.mark.parametrize("kw", [dict(candidates=(5,)), dict(candidates=()), dict(candidates=(2, 2)),
                                dict(budget_bits=0), dict(budget_bits=float("nan")), dict(budget_scope="expert"),
                                dict(beta=-1), dict(min_bits=4, max_bits=2), dict(group_size=0),
                                dict(format_version=99), dict(candidates=("4",))])
def test_config_rejects_bad_input(kw):
    with pytest.raises(MoeCompressError):
        AllocationConfig(**kw)


def test_config_and_allocation_round_trip_json():
    cfg = AllocationConfig(candidates=(2, QuantSpec("int", 4, 32)), min_bits=(2, None), top_two_each=True)
    assert AllocationConfig.from_json(cfg.to_json()) == cfg
    pr = price_candidates(cfg.candidates, SHAPES, 2, 3)
    a = allocate(AllocationConfig(budget_bits=3.2), np.random.default_rng(0).random((2, 3, 3)),
                 price_candidates(AllocationConfig().candidates, SHAPES, 2, 3))
    assert Allocation.from_json(a.to_json()) == a
    assert pr.bytes[0, 0].tolist() == [6144 + 1536, 12288 + 3072]  # int4 g32: twice the scale/zero bytes


def test_deterministic():
    rng = np.random.default_rng(5)
    L, E = 3, 24
    cfg = AllocationConfig(candidates=(2, 3, 4), budget_bits=3.1, top_two_each=True)
    pricing = price_candidates(cfg.candidates, SHAPES, L, E)
    cost = np.sort(rng.random((L, E, 3)), axis=2)[..., ::-1].copy()
    a, b = allocate(cfg, cost, pricing), allocate(cfg, cost, pricing)
    assert a.choice == b.choice and a.objective == b.objective
    prob = build_problem(cfg, cost, pricing)
    assert random_allocation(prob, 1).choice == random_allocation(prob, 1).choice
    assert random_allocation(prob, 1).choice != random_allocation(prob, 2).choice
    r = random_allocation(prob, 3).choice_array()
    assert all(t in r[l] for l in range(L) for t in prob.top_two[l])  # the top-two rule holds for baselines too


def test_expert_output_error_is_relative_contribution_error():
    g = torch.Generator().manual_seed(0)
    H, I, T = 16, 24, 40
    X, gw = torch.randn(T, H, generator=g), torch.rand(T, generator=g)
    W = (torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
    assert expert_output_error(X, gw, W, lambda w: w) == 0.0
    # only down (H, I) scaled by 1.1: the contribution scales by 1.1, relative squared error 0.01
    scale_down = lambda w: w * 1.1 if w.shape == (H, I) else w  # noqa: E731
    assert expert_output_error(X, gw, W, scale_down, chunk_tokens=7) == pytest.approx(0.01, rel=1e-5)
    # against a direct computation with a real quantizer (round to a 1/4 grid)
    q = lambda w: torch.round(w * 4) / 4  # noqa: E731
    f = lambda a, b, c: gw[:, None] * ((torch.nn.functional.silu(X @ a.T) * (X @ b.T)) @ c.T)  # noqa: E731
    ref = ((f(*W) - f(*(q(w) for w in W))) ** 2).sum() / (f(*W) ** 2).sum()
    assert expert_output_error(X, gw, W, q) == pytest.approx(float(ref), rel=1e-4)
    assert math.isnan(expert_output_error(X[:0], gw[:0], W, q))


def test_costs_formula_and_zero_token_experts_are_finite():
    eps = np.array([[[0.4, 0.1], [0.2, 0.05], [np.nan, np.nan], [0.6, 0.3]]])  # (1, 4, 2)
    counts = np.array([[30.0, 10.0, 0.0, 40.0]])
    mass = np.array([[6.0, 4.0, 0.0, 10.0]])
    c = expert_costs(eps, counts, mass, alpha=1.0, beta=1.5, importance_floor=1e-3)
    np.testing.assert_allclose(c.phi, [[1.5, 0.5, 1e-3, 2.0]])  # mean-1 per layer, floored
    np.testing.assert_allclose(c.w, [[1.2, 0.8, 1e-3, 2.0]])
    np.testing.assert_allclose(c.cost[0, 0], 1.5 * 1.2 ** 1.5 * np.array([0.4, 0.1]))
    np.testing.assert_allclose(c.cost[0, 2], 1e-3 * 1e-3 ** 1.5 * np.array([0.4, 0.15]))  # layer-mean eps
    assert np.isfinite(c.cost).all() and c.unmeasured == [(0, 2)]
    with pytest.raises(MoeCompressError, match="layer 0 expert 1"):
        expert_costs(np.where(np.arange(4)[None, :, None] == 1, np.nan, eps), counts, mass)


def test_repair_steps_down_cheapest_until_within_budget():
    cost = np.array([[[3.0, 2.0, 1.0], [3.0, 1.0, 0.5]]])  # (1, 2, 3)
    pr = price_candidates(AllocationConfig().candidates, SHAPES, 1, 2)
    prob = build_problem(AllocationConfig(budget_bits=3.5), cost, pr)
    fixed = repair_budget(prob, np.array([[2, 2]]))  # both int4: 9 bits over a 7-bit budget
    # 6144 bytes over: expert 1 -> int3 costs +0.5 per 3072 bytes (best), then the 3072 left are removed
    # most cheaply by expert 0 -> int3 (+1.0; -> int2 would cost +2.0 for the same 3072 counted bytes)
    assert fixed.tolist() == [[1, 1]]
    assert repair_budget(prob, np.array([[1, 1]])).tolist() == [[1, 1]]  # within budget: unchanged


def test_table_lists_widths_per_layer():
    cost = np.random.default_rng(0).random((2, 5, 3))
    pr = price_candidates(AllocationConfig().candidates, SHAPES, 2, 5)
    a = allocate(AllocationConfig(budget_bits=3.5), cost, pr)
    lines = allocation_table(a, columns=3).splitlines()
    rows = [ln for ln in lines if ln.strip()[:1].isdigit()]
    assert len(rows) == 4  # 2 layers x 2 column blocks
    assert rows[0].split("|")[1].split() == [str(b) for b in a.widths()[0, :3]]
    assert rows[3].split("|")[1].split() == [str(b) for b in a.widths()[1, 3:]]
    assert f"{a.widths()[1].mean():.2f}" in rows[3] and "3.5000 stored bits/param" in lines[-1]
