"""The allocation pass wired into quantize: LP widths from a sensitivity pass, plan replay, checks from shapes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TEXT
from moecompress.errors import MoeCompressError


def _cfg(**kw):
    from moecompress.config import CalibConfig, QuantizeConfig
    base = dict(bits=2.5, group_size=32, method="gptq", allocation="lp",
                calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    return QuantizeConfig(**{**base, **kw})


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def lp_run(tiny_dir, tmp_path_factory):
    from moecompress.api import quantize
    model = tiny_dir("Mixtral")
    out = str(tmp_path_factory.mktemp("alloc") / "lp")
    summary = quantize(model, out, _cfg(), progress=False)
    return model, out, summary


def test_lp_run_size_matches_plan_and_budget(lp_run):
    model, out, summary = lp_run
    man = _json(os.path.join(out, "moecompress.json"))
    rec = _json(os.path.join(out, "run", "allocation.json"))
    plan = _json(os.path.join(out, "run", "plan.json"))
    # --bits 2.5 code bits at group 32 with fp16 scale+zero: 2.5 + 32/32 = 3.5 stored bits
    assert rec["overhead_bits"] == pytest.approx(1.0)
    assert rec["budget_stored_bits"] == pytest.approx(3.5)
    measured, predicted = man["expert_bits_per_param"], rec["predicted_bits_per_param"]
    assert abs(measured - predicted) / predicted < 0.01, (measured, predicted)
    assert measured <= 3.5 + 1e-6
    assert measured > 3.5 - 0.3  # the budget is used (uniform 2 would be 3.0)
    widths = np.array(rec["widths"])
    assert widths.shape == (2, 4) and set(widths.ravel()) <= {2, 3, 4} and len(set(widths.ravel())) > 1
    # the manifest, the plan and the allocation record agree expert by expert
    for d in plan["experts"]:
        assert man["expert_bits"][f"{d['layer']}.{d['expert']}"] == f"int{d['bits']}g32"
        assert d["bits"] == widths[d["layer"], d["expert"]]
    assert rec["status"] == "optimal" and rec["sensitivity_seconds"] > 0 and rec["solve_seconds"] >= 0
    assert summary["allocation"]["status"] == "optimal"


def test_sensitivity_record_is_sane(lp_run):
    _, out, _ = lp_run
    rec = _json(os.path.join(out, "run", "allocation.json"))
    eps = np.array([rec["eps"][k] for k in ("int2g32", "int3g32", "int4g32")], dtype=float)  # (C, L, E)
    tokens = np.array(rec["tokens"])
    assert tokens.sum(axis=1).tolist() == [4 * 32 * 2] * 2  # every token routed to top-2 experts, each layer
    seen = tokens > 0
    assert np.isfinite(eps[:, seen]).all()
    # more bits, less error: int4 well below int2 for every measured expert (GPTQ, ~4x per bit)
    assert (eps[2][seen] < 0.5 * eps[0][seen]).all()
    assert 1e-4 < np.nanmedian(eps[0]) < 1.0
    assert np.allclose(np.array(rec["phi"]).mean(axis=1), 1.0, atol=0.01)  # mean-1 per layer


def test_plan_replay_reproduces_the_run_and_prints(lp_run, tmp_path, capsys):
    from moecompress.api import quantize
    from moecompress.cli import main
    model, out, _ = lp_run
    re_out = str(tmp_path / "replay")
    # --plan overrides the allocation: no sensitivity pass, the same specs, so the same bytes
    quantize(model, re_out, _cfg(allocation="uniform", bits=4), plan=os.path.join(out, "run", "plan.json"),
             progress=False)
    a, b = _json(os.path.join(out, "moecompress.json")), _json(os.path.join(re_out, "moecompress.json"))
    assert a["expert_bits"] == b["expert_bits"]
    assert a["expert_bytes"] == b["expert_bytes"]
    assert not os.path.exists(os.path.join(re_out, "run", "allocation.json"))
    assert main(["plan", out]) == 0
    table = capsys.readouterr().out
    assert "layer |" in table and "lp (optimal)" in table and "stored bits/param" in table
    assert main(["plan", os.path.join(re_out, "run", "plan.json")]) == 0
    assert "plan: mean nominal width" in capsys.readouterr().out


def _edited_plan(out, tmp_path, edit):
    plan = _json(os.path.join(out, "run", "plan.json"))
    edit(plan)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    return str(p)


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(source_fingerprint="0" * 32), "was made for checkpoint"),
    (lambda p: p["experts"].pop(3), "does not cover 1 experts"),
    (lambda p: p["experts"].append(dict(p["experts"][0])), "twice"),
    (lambda p: p["experts"][0].update(group_size=48), "layer 0 expert 0"),
    (lambda p: p["experts"][1].update(codec="nope"), "layer 0 expert 1"),
    (lambda p: p.update(format_version=9), "format_version 9"),
])
def test_bad_plan_fails_before_any_weight_is_read(lp_run, tmp_path, monkeypatch, edit, words):
    from moecompress import api
    model, out, _ = lp_run
    plan = _edited_plan(out, tmp_path, edit)

    from moecompress import validate
    real = validate.validate_checkpoint

    def boom(*a, **k):
        raise AssertionError("weights read before the plan was checked")

    def structural_only(path, check_values=True, **k):  # the header check reads no weights
        return real(path, check_values=False, **k) if check_values is False else boom()
    monkeypatch.setattr(validate, "validate_checkpoint", structural_only)
    monkeypatch.setattr(api, "calibration_windows", boom)
    with pytest.raises(MoeCompressError, match=words):
        api.quantize(model, str(tmp_path / "x"), _cfg(), plan=plan, progress=False)


def test_infeasible_budget_fails_before_sensitivity(tiny_dir, tmp_path, monkeypatch):
    from moecompress import api
    from moecompress.passes import allocate

    def boom(*a, **k):
        raise AssertionError("calibration started before the budget was checked")
    monkeypatch.setattr(allocate, "sensitivity_pass", boom)
    monkeypatch.setattr(api, "calibration_windows", boom)
    with pytest.raises(MoeCompressError, match=r"--bits 1.5 is infeasible.*needs 2.0000 code bits.*--bits 2 or more"):
        api.quantize(tiny_dir("Mixtral"), str(tmp_path / "x"), _cfg(bits=1.5), progress=False)
    with pytest.raises(MoeCompressError, match=r"needs 3.0000 code bits"):  # bounds count too
        api.quantize(tiny_dir("Mixtral"), str(tmp_path / "x"), _cfg(bits=2.9, min_bits=3), progress=False)
    with pytest.raises(MoeCompressError, match="--method gptq or rtn"):
        _cfg(method="ternary", bits=1)


def test_layer_eps_matches_expert_output_error_and_sample_is_seeded():
    from moecompress.allocation import expert_output_error
    from moecompress.codecs import QuantSpec
    from moecompress.experts import MoEExperts
    from moecompress.passes.allocate import LayerSensitivity, layer_eps
    from moecompress.quant.gptq import GPTQConfig, rtn
    from moecompress.quant.grids import AsymmetricGrid
    torch.manual_seed(0)
    E, H, I, T = 3, 16, 32, 200
    weights = [{"gate": torch.randn(I, H) / 4, "up": torch.randn(I, H) / 4, "down": torch.randn(H, I) / 6}
               for _ in range(E)]
    ex = MoEExperts(weights, lambda g, u: torch.nn.functional.silu(g) * u)
    x = torch.randn(T, H)
    idx = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)  # (T, 2)
    w = torch.rand(T, 2)

    def observe(seed):
        obs = LayerSensitivity(E, H, I, range(E), affinity=False, cap=50, seed=seed, hessians=False)
        ex.observer = obs
        ex(x, idx, w)
        ex.observer = None
        return obs
    obs, again = observe(7), observe(7)
    assert [len(s) for s in obs.X] == [50] * E and obs.tokens.tolist() == [133, 134, 133]
    assert all(torch.equal(a, b) for a, b in zip(obs.X, again.X))
    assert not torch.equal(obs.X[0], observe(8).X[0])
    spec = QuantSpec("int", 2, 16)
    eps = np.full((E, 1), np.nan)
    layer_eps(ex, obs, list(range(E)), (spec,), "rtn", GPTQConfig(), set(), eps)
    for e in range(E):
        ref = expert_output_error(obs.X[e], obs.g[e], [weights[e][p] for p in ("gate", "up", "down")],
                                  lambda W: rtn(W[None], AsymmetricGrid(2), 16).deq[0])
        assert eps[e, 0] == pytest.approx(ref, rel=1e-5)
        assert 0.01 < eps[e, 0] < 1.0


def test_cli_options_reach_the_allocation_config(tiny_dir):
    from moecompress.checkpoint import CheckpointReader
    from moecompress.cli import build_parser
    from moecompress.passes.allocate import Allocator
    a = build_parser().parse_args(["quantize", "--allocation", "lp", "--bits", "3", "--candidates", "4,2",
                                   "--budget-scope", "layer", "--top-two", "--min-bits", "2", "--beta", "2"])
    assert a.candidates == (4, 2) and a.budget_scope == "layer" and a.top_two and a.beta == 2.0
    alloc = Allocator(CheckpointReader(tiny_dir("Mixtral")),
                      _cfg(bits=a.bits, candidates=a.candidates, budget_scope=a.budget_scope, top_two=a.top_two,
                           min_bits=a.min_bits, beta=a.beta))
    c = alloc.acfg
    assert [s.label for s in c.candidates] == ["int2g32", "int4g32"]
    assert (c.budget_scope, c.top_two_each, c.min_bits, c.beta, c.budget_bits) == ("layer", True, 2.0, 2.0, 4.0)
    assert alloc.pricing.bytes.shape == (2, 4, 2)
    # int2 g32 of one tiny expert (3 x 64 x 128 weights): codes 2 bits + fp16 scale and zero per 32
    assert alloc.pricing.bytes[0, 0, 0] == 3 * 64 * 128 * (2 + 1) // 8


def test_sub1_is_an_lp_candidate(tiny_dir, tmp_path):
    """--candidates sub1,2,3: ternary dictionary-coded experts priced at 1 stored bit per weight; the packed
    model holds both codecs, stays within the byte budget and loads with finite outputs."""
    from moecompress import load
    from moecompress.api import quantize
    from moecompress.cli import build_parser
    assert build_parser().parse_args(["quantize", "--candidates", "sub1,2,3"]).candidates == ("sub1", 2, 3)
    out = str(tmp_path / "lp")
    # 1.5 code bits + 1.0 scale/zero bits at group 32: 2.5 stored bits, below int2's 3.0: sub1 must be used
    # --fp-target 0: the sub1 overrun below depends on every upstream layer's rounding (with auto, the int2
    # experts' moved targets change the later layers' ternary codes: measured 2.533, 1.3% over)
    quantize(tiny_dir("Mixtral"), out, _cfg(bits=1.5, candidates=("sub1", 2, 3), fp_target=0.0), progress=False)
    man = _json(os.path.join(out, "moecompress.json"))
    labels = set(man["expert_bits"].values())
    assert "sub1" in labels and labels & {"int2g32", "int3g32"}, labels
    # the tiny experts' rows (K = 64 / 128) spend 0.25-0.5 bits per weight on fp16 levels alone, so the
    # sub1 budget search cannot reach 1.0 on gate/up (it warns, ~1.22 bits): 1% over the LP's budget
    assert 2.3 < man["expert_bits_per_param"] <= 2.5 * 1.01
    m = load(out)
    ids = torch.arange(16).view(1, 16)
    assert torch.isfinite(m(ids).logits).all()
    with pytest.raises(MoeCompressError, match="sub1"):
        _cfg(candidates=("sub2", 3))


def test_dense_ternary_is_an_lp_candidate(tmp_path):
    """--candidates ternary,2,3,4 on the trained demo model at 2.0 code bits (2.5 stored, uniform int2's size):
    the LP spends bytes saved by dense ternary experts (1.6 bits + levels) on wider ones; the checkpoint stays
    within the budget and is clearly better than uniform int2 GPTQ on the same windows (measured 48.0 against
    52.5 on the first 8,192 tokens of eval_mix.txt)."""
    from conftest import TRAINED
    from moecompress.api import evaluate, quantize
    from moecompress.cli import build_parser
    from moecompress.config import CalibConfig
    assert build_parser().parse_args(["quantize", "--candidates", "ternary,2,3"]).candidates == ("ternary", 2, 3)
    calib = CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=16, seqlen=128)
    lp, u2 = str(tmp_path / "lp"), str(tmp_path / "u2")
    quantize(TRAINED, lp, _cfg(bits=2.0, group_size=64, candidates=("ternary", 2, 3, 4), calib=calib), progress=False)
    quantize(TRAINED, u2, _cfg(bits=2, group_size=64, allocation="uniform", calib=calib), progress=False)
    man = _json(os.path.join(lp, "moecompress.json"))
    n = {lab: list(man["expert_bits"].values()).count(lab) for lab in set(man["expert_bits"].values())}
    assert n.get("ternary", 0) >= 4 and n.get("int3g64", 0) + n.get("int4g64", 0) >= 4, n
    assert 2.4 < man["expert_bits_per_param"] <= 2.5, man["expert_bits_per_param"]
    text = [os.path.join(TEXT, "eval_mix.txt")]
    ppl = [next(iter(evaluate(d, text, max_tokens=8192, progress=False).values()))["perplexity"] for d in (lp, u2)]
    assert ppl[0] < 0.96 * ppl[1], ppl
