"""The loss-weighted allocation cost (allocation/fisher.py) and the uniform guard (allocation/guard.py)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TEXT, V
from moecompress.errors import MoeCompressError


def _cfg(**kw):
    from moecompress.config import CalibConfig, QuantizeConfig
    base = dict(bits=2.5, group_size=32, method="gptq", allocation="lp", cost="fisher",
                calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    return QuantizeConfig(**{**base, **kw})


def _hf_grads(path, windows, dtype=torch.float64, perturb=None):
    """Full-model autograd: (summed next-token loss, [grad at each layer's experts output]); perturb =
    (layer, direction (B*T, H)) adds the direction to that layer's experts output."""
    from transformers import AutoModelForCausalLM
    from moecompress.layerwise import find_experts
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                             experts_implementation="eager").eval()  # grouped_mm: no float64
    outs, hooks, idx = [], [], []
    for i, layer in enumerate(m.model.layers):
        def hook(_mod, _args, out, i=i):
            if perturb is not None and perturb[0] == i:
                out = out + perturb[1].to(out.dtype)
            out.retain_grad()
            outs.append(out)
            idx.append(_args[1])
            return out
        found = find_experts(layer)
        if found is not None:  # dense layers (DeepSeek's first) have none
            hooks.append(found[1].register_forward_hook(hook))
    logits = m(windows).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).double(), windows[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    for h in hooks:
        h.remove()
    return float(loss.detach()), [o.grad for o in outs], idx


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2Moe", "DeepseekV3"])
def test_fisher_weights_match_full_model_autograd(tiny_dir, family):
    """The streamed reverse pass gives each MoE layer's sum_t g_t^2 / N as full-model autograd does (shared
    experts beside the routed ones: Qwen2-MoE; a dense first layer: DeepSeek-V3)."""
    from moecompress.allocation.fisher import SHRINK_TOKENS, fisher_pass
    from moecompress.checkpoint import CheckpointReader
    path = tiny_dir(family)
    windows = torch.randint(1, V, (5, 24), generator=torch.Generator().manual_seed(0))
    fis = fisher_pass(CheckpointReader(path), _cfg(), windows, progress=False)
    loss, grads, idx = _hf_grads(path, windows)
    N = 5 * 23
    assert fis.tokens == N and fis.loss == pytest.approx(loss / N, rel=1e-5)
    assert fis.weights.shape[0] == len(grads) >= 1
    for l, g in enumerate(grads):
        ref = (g.double() ** 2).reshape(-1, g.shape[-1]).sum(0).numpy() / N
        assert fis.weights[l] == pytest.approx(ref, rel=2e-4, abs=1e-12)
        assert ref.max() > 0
        g2 = (g.double() ** 2).reshape(-1, g.shape[-1])
        for e in range(fis.expert.shape[1]):  # per expert: its routed tokens' sum, shrunk towards the layer's
            routed = (idx[l] == e).any(1)
            want = (g2[routed].sum(0).numpy() + SHRINK_TOKENS * ref) / (int(routed.sum()) + SHRINK_TOKENS)
            assert fis.expert[l, e] == pytest.approx(want, rel=2e-4, abs=1e-12)
    per = fis.per_expert()
    assert per.shape == fis.expert.shape[:2] + (2, fis.weights.shape[1]) and (per[:, :, 0] == fis.weights[:, None]).all()


def test_fisher_gradient_is_the_loss_gradient(tiny_dir):
    """The gradient the weights square is the summed loss's: a central finite difference along a random
    direction of the experts output agrees with <g, v>."""
    path = tiny_dir("Mixtral")
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(1, V, (5, 24), generator=gen)
    _, grads, _ = _hf_grads(path, windows)
    # central finite differences on the last layer's experts output (float64 model; its norms compute in
    # float32; the last layer, since a perturbation of an earlier one can flip a later router's top-k):
    # dL/dt at t = 0 of L(y + t v) equals <g, v> (a wrong layer, scale or sign would be off by far more)
    v = torch.randn(grads[1].shape, generator=gen, dtype=torch.float64)
    d = 1e-4  # observed: 2e-5 relative (truncation grows as d^2 above, float32 norms' noise below)
    lp = _hf_grads(path, windows, perturb=(1, d * v))[0]
    lm = _hf_grads(path, windows, perturb=(1, -d * v))[0]
    assert (lp - lm) / (2 * d) == pytest.approx(float((grads[1] * v).sum()), rel=1e-4)


def test_weighted_output_error_and_fisher_costs():
    """weighted_output_error is the channel-weighted mean squared contribution error; fisher_costs scales it
    by n_e / (2N) and gives zero-token experts a floored, width-dependent layer mean."""
    from moecompress.allocation.fisher import fisher_costs, weighted_output_error
    torch.manual_seed(0)
    T, H, I = 40, 8, 12
    X, g = torch.randn(T, H), torch.rand(T)
    dense = (torch.randn(I, H), torch.randn(I, H), torch.randn(H, I))
    quant = tuple(w + 0.05 * torch.randn_like(w) for w in dense)
    wts = torch.rand(H)
    glu = lambda a, b: F.silu(a) * b  # noqa: E731

    def f(W):
        return F.linear(glu(F.linear(X, W[0]), F.linear(X, W[1])), W[2])
    ref = float((((g[:, None] * (f(dense) - f(quant))) ** 2) * wts).sum(1).mean())
    got = weighted_output_error(X, g, dense, quant, glu, (None, None, None), wts, chunk_tokens=7)
    assert got == pytest.approx(ref, rel=1e-5)
    assert np.isnan(weighted_output_error(X[:0], g[:0], dense, quant, glu, (None, None, None), wts))
    two = weighted_output_error(X, g, dense, quant, glu, (None, None, None), torch.stack([wts, 2 * wts]))
    assert two.shape == (2,) and two == pytest.approx([ref, 2 * ref], rel=1e-5)
    err = np.array([[[4.0, 1.0], [2.0, 0.5], [np.nan, np.nan]]])  # (1 layer, 3 experts, 2 candidates)
    c = fisher_costs(err, [[10, 30, 0]], tokens=100)
    assert c.cost[0, 0].tolist() == pytest.approx([10 / 200 * 4.0, 10 / 200 * 1.0])
    assert c.cost[0, 1].tolist() == pytest.approx([30 / 200 * 2.0, 30 / 200 * 0.5])
    assert c.cost[0, 2].tolist() == pytest.approx(1e-3 * (c.cost[0, 0] + c.cost[0, 1]) / 2)
    assert c.unmeasured == [(0, 2)]
    with pytest.raises(MoeCompressError, match="no finite Fisher error"):
        fisher_costs(err, [[10, 30, 5]], tokens=100)


def _problem(budget_stored, E=6, L=3, identical=False, seed=0):
    from moecompress.allocation import AllocationConfig, build_problem, expert_shapes, price_candidates
    cfg = AllocationConfig(candidates=(2, 3, 4), group_size=64, budget_bits=budget_stored)
    pricing = price_candidates(cfg.candidates, expert_shapes(128, 256), L, E)
    rng = np.random.default_rng(seed)
    scale = np.ones((L, E)) if identical else rng.lognormal(0, 1, (L, E))
    cost = scale[..., None] * 4.0 ** -np.array([2.0, 3.0, 4.0])  # convex in bytes, falls with bits
    return cfg, pricing, build_problem(cfg, cost, pricing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lp_at_a_uniform_budget_never_predicts_worse_than_uniform(seed):
    """Budget = uniform 3-bit's bytes exactly (3.5 stored bits at g64): the LP's objective is at most
    uniform 3's, and the guard keeps the LP's plan."""
    from moecompress.allocation import allocate, uniform_allocation
    from moecompress.allocation.guard import feasible_uniform, uniform_guard
    cfg, pricing, prob = _problem(3.5, seed=seed)
    u3 = uniform_allocation(prob, 3)
    assert u3.predicted_bytes == int(prob.budget.sum())  # fits exactly
    alloc = allocate(cfg, prob.cost, pricing)
    assert alloc.objective <= u3.objective * (1 + 1e-9)
    assert alloc.objective < 0.95 * u3.objective  # the skewed experts are worth mixing
    assert [c for c, _ in feasible_uniform(prob)] == [0, 1]  # int2 and int3 fit, int4 does not
    kept, rec = uniform_guard(prob, alloc)
    assert kept is alloc and rec["fallback"] is None
    assert rec["uniform_objectives"]["int3g64"] == pytest.approx(u3.objective)


def test_guard_falls_back_to_uniform_when_the_plan_predicts_worse(caplog):
    """Identical experts with convex costs: uniform 3 is optimal at its own budget, so a random mixed plan
    of the same bytes predicts worse and the guard replaces it, with a warning."""
    from moecompress.allocation import random_allocation, uniform_allocation
    from moecompress.allocation.guard import uniform_guard
    _, _, prob = _problem(3.5, identical=True)
    rnd = random_allocation(prob, seed=0)
    u3 = uniform_allocation(prob, 3)
    assert rnd.objective > u3.objective
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        out, rec = uniform_guard(prob, rnd)
    assert rec["fallback"] == "int3g64" and out.status == "uniform-guard" and out.method == "lp"
    assert out.choice == u3.choice and out.objective == pytest.approx(u3.objective)
    assert "using uniform int3g64" in caplog.text


def test_allocator_with_fisher_cost_records_both_models(tiny_dir):
    """--cost fisher end to end on a tiny model: the objective is the sum of the chosen Fisher costs, the
    legacy costs and the Fisher pass's time are recorded; --cost takes only fisher or legacy."""
    from moecompress.api import calibration_windows
    from moecompress.checkpoint import CheckpointReader
    from moecompress.cli import build_parser
    from moecompress.passes.allocate import Allocator
    path = tiny_dir("Mixtral")
    cfg = _cfg()
    alloc = Allocator(CheckpointReader(path), cfg)
    specs = alloc.specs(calibration_windows(path, cfg.calib), progress=False)
    rec = alloc.record
    assert len(specs) == 2 * 4 and rec["cost_model"] == "fisher" and rec["fisher_seconds"] > 0
    labels = [c.label for c in alloc.acfg.candidates]
    cost = np.stack([np.array(rec["cost"][lab]) for lab in labels], -1)  # (L, E, C)
    ch = alloc.allocation.choice_array()
    assert rec["allocation"]["objective"] == pytest.approx(float(np.take_along_axis(cost, ch[..., None], 2).sum()))
    assert (np.diff(cost, axis=2) <= 0).mean() > 0.9  # more bits, smaller predicted loss (nearly always)
    assert set(rec["cost_legacy"]) == set(labels) and rec["uniform_guard"]["fallback"] is None
    assert build_parser().parse_args(["quantize", "--cost", "legacy"]).cost == "legacy"
    from moecompress.config import QuantizeConfig
    assert QuantizeConfig(allocation="lp", bits=2.5).cost == "fisher"  # the default, by benchmarks/cost_model.py
    assert QuantizeConfig(allocation="lp", bits=2.5, candidates=("prune", 2, 3)).cost == "fisher"  # prune too
    with pytest.raises(MoeCompressError, match="--cost must be fisher or legacy"):
        QuantizeConfig(allocation="lp", bits=2.5, cost="hessian")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--cost", "hessian"])
