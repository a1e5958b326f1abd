"""Pruning and bit widths under one budget (issue 22): the joint program against brute force, its routing
constraints, --budget parsing, and `quantize --allocation lp --candidates prune,2,3,4` end to end."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TEXT, TRAINED
from moecompress.allocation import AllocationConfig, build_problem, expert_shapes, price_candidates
from moecompress.allocation.joint import (build_joint, parse_size, plan_bytes, plan_cost, smallest_bytes, solve_joint,
                                          solve_once)
from moecompress.errors import MoeCompressError

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPES = expert_shapes(64, 128)


def instance(seed, L, E, frac, top_k=2, n_group=1, per_group=0):
    """A random joint problem: width costs falling with bits, prune costs around the narrowest width's, and a
    budget `frac` of the way from the smallest feasible plan to every expert at the widest width."""
    rng = np.random.default_rng(seed)
    measured = np.cumsum(rng.integers(500, 1500, (L, E, 2)), axis=2).astype(float)  # two widths
    cost = np.sort(rng.lognormal(0, 1, (L, E, 2)), axis=2)[..., ::-1].copy()
    prune = cost[..., 0] * rng.uniform(0.5, 4.0, (L, E))
    pricing = price_candidates(AllocationConfig(candidates=(2, 3)).candidates, SHAPES, L, E, measured_bytes=measured)
    base = build_problem(AllocationConfig(candidates=(2, 3), budget_bits=64), cost, pricing)  # budget set below
    lo = smallest_bytes(build_joint(base, prune, top_k, n_group, per_group))[0]
    cap = int(lo + frac * (measured[..., -1].sum() - lo))
    base = base.__class__(base.candidates, base.cost, base.bytes, base.params, base.allowed, None,
                          np.array([cap], dtype=np.int64), "model")
    return build_joint(base, prune, top_k, n_group, per_group)


def brute_force(prob):
    """Exhaustive optimum over every assignment (2 widths or prune per expert) that meets all constraints."""
    L, E, C = prob.shape
    best = (math.inf, None)
    for flat in itertools.product(range(C + 1), repeat=L * E):
        ch = np.array(flat).reshape(L, E)
        if plan_bytes(prob, ch) > prob.base.budget[0]:
            continue
        ok = True
        for l in range(L):
            pruned = ch[l] == C
            if (~pruned).sum() < prob.min_keep[l]:
                ok = False
            if prob.n_group > 1:
                kept = [(~g).sum() for g in np.split(pruned, prob.n_group)]
                ok &= len(set(kept)) == 1 and kept[0] >= prob.per_group
        if ok:
            obj = plan_cost(prob, ch, prob.prune_cost)
            if obj < best[0]:
                best = (obj, ch)
    return best


@pytest.mark.parametrize("seed,frac", [(0, 0.15), (1, 0.3), (2, 0.45), (3, 0.6)])
def test_joint_matches_brute_force(seed, frac):
    prob = instance(seed, L=2, E=4, frac=frac)
    obj, ch = brute_force(prob)
    choice, status = solve_once(prob, prob.prune_cost, mip_gap=0.0)
    assert status == "optimal"
    assert plan_cost(prob, choice, prob.prune_cost) == pytest.approx(obj, rel=1e-9)
    assert plan_bytes(prob, choice) <= prob.base.budget[0]
    C = prob.shape[2]
    assert ((choice == C).sum(axis=1) <= 4 - 2).all()  # top-2: at least 2 kept per layer


def test_tight_budget_prunes_and_keeps_top_k():
    prob = instance(5, L=2, E=4, frac=0.05)
    obj, ch = brute_force(prob)
    choice, _ = solve_once(prob, prob.prune_cost, mip_gap=0.0)
    C = prob.shape[2]
    assert (choice == C).sum() >= 2  # 5% of the widest bytes: something must go
    assert ((choice != C).sum(axis=1) >= 2).all()
    assert plan_cost(prob, choice, prob.prune_cost) == pytest.approx(obj, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_router_keeps_equal_counts_per_group(seed):
    """DeepSeek-V3 style: 2 groups of 3 experts, at least 2 kept per group, the same count in each group."""
    prob = instance(seed, L=1, E=6, frac=0.2, top_k=2, n_group=2, per_group=2)
    obj, ch = brute_force(prob)
    choice, _ = solve_once(prob, prob.prune_cost, mip_gap=0.0)
    C = prob.shape[2]
    kept = [int((g != C).sum()) for g in np.split(choice[0], 2)]
    assert kept[0] == kept[1] >= 2
    assert plan_cost(prob, choice, prob.prune_cost) == pytest.approx(obj, rel=1e-9)
    assert smallest_bytes(prob)[0] == sum(np.sort(g)[:2].sum() for g in np.split(prob.base.bytes[0].min(axis=1), 2))


def test_rounds_remeasure_until_the_plan_repeats():
    """Interacting prunes: pruning two experts of a layer together costs 5x their sum. The first solve prunes
    pairs; after re-measuring, the solver must move away from them, and the returned plan is the best measured."""
    prob = instance(1, L=2, E=4, frac=0.2)
    calls = []

    def measure(l, pruned):
        calls.append((l, tuple(pruned)))
        return 5.0
    res = solve_joint(prob, measure, max_rounds=4, mip_gap=0.0)
    assert 1 <= len(res.rounds) <= 4 and calls
    assert res.objective == min(r["measured_objective"] for r in res.rounds)
    first = res.rounds[0]
    assert first["measured_objective"] >= first["predicted_objective"]
    assert res.predicted_bytes <= prob.base.budget[0]
    additive = solve_joint(prob, None)  # no measure: one solve
    assert len(additive.rounds) == 1


def test_build_joint_refuses_bad_input():
    prob = instance(0, L=1, E=4, frac=0.5)
    with pytest.raises(MoeCompressError, match="groups"):
        build_joint(prob.base, prob.prune_cost, 2, n_group=3, per_group=1)
    with pytest.raises(MoeCompressError, match="finite"):
        build_joint(prob.base, np.full((1, 4), np.nan), 2)


@pytest.mark.parametrize("text,n", [("24GB", 24 * 10 ** 9), ("1.5GiB", int(1.5 * 2 ** 30)), ("800 MB", 800 * 10 ** 6),
                                    ("123456", 123456), ("2kb", 2000)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["24XB", "GB", "-3GB", "0", "1.2.3MB", ""])
def test_parse_size_refuses(text):
    with pytest.raises(MoeCompressError, match="budget"):
        parse_size(text)


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "moecompress", *args], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(__file__))


def test_cli_budget_errors_are_one_line(tmp_path):
    bad = _cli("quantize", "--out", str(tmp_path / "x"), "--allocation", "lp", "--budget", "24XB")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "24XB" in bad.stderr
    from moecompress.api import quantize
    from moecompress.config import QuantizeConfig
    with pytest.raises(MoeCompressError) as err:  # the demo model (the CLI's default), from shapes
        quantize(None, str(tmp_path / "y"), QuantizeConfig(allocation="lp", candidates=("prune", 2, 3), budget="1MB"),
                 progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "infeasible" in msg and "smallest plan" in msg and "MB on disk" in msg
    assert "4.220 MB besides the routed experts" in msg  # attention, embeddings, tokenizer, metadata bound
    assert not os.path.exists(tmp_path / "y")


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    out = str(tmp_path_factory.mktemp("joint") / "j")
    cfg = QuantizeConfig(bits=2.0, allocation="lp", candidates=("prune", 2, 3, 4), group_size=64,
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=8, seqlen=64))
    summary = quantize(TRAINED, out, cfg, progress=False)
    return out, summary, cfg


def test_joint_run_prunes_packs_and_matches_the_plan(joint_run):
    from moecompress.checkpoint import CheckpointReader
    out, summary, _ = joint_run
    rec = json.load(open(os.path.join(out, "run", "allocation.json")))
    man = json.load(open(os.path.join(out, "moecompress.json")))
    cfg = json.load(open(os.path.join(out, "config.json")))
    src = CheckpointReader(TRAINED)
    pruned = {int(i): p for i, p in rec["pruned"].items()}
    assert sum(map(len, pruned.values())) > 0 and summary["pruned_experts"] == sum(map(len, pruned.values()))
    counts = cfg["moecompress_merge"]["experts_per_layer"]
    for i in src.moe_layers:
        assert counts[str(i)] == 8 - len(pruned[i]) >= 2  # top-2 kept
        emap = cfg["moecompress_merge"]["expert_map"][str(i)]
        assert [e for e, k in enumerate(emap) if k < 0] == pruned[i]
    # size: the plan's prediction is the packed checkpoint's tensor bytes; files (headers included) within 1%
    assert man["total_bytes"] == rec["predicted_total_bytes"]
    files = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    assert abs(files - rec["predicted_total_bytes"]) / rec["predicted_total_bytes"] < 0.01
    assert rec["predicted_bytes"] <= rec["budget_bytes"] == int(2.0 * src.expert_params / 8)
    assert summary["expert_bits_per_param"] <= 2.0 and summary["expert_bits_per_param"] > 1.9
    plan = json.load(open(os.path.join(out, "run", "plan.json")))
    assert plan["source_fingerprint"] == src.fingerprint and len(plan["experts"]) == 32
    assert sum(e["codec"] == "prune" for e in plan["experts"]) == summary["pruned_experts"]
    assert os.path.isfile(os.path.join(out, "run", "merge_record.json"))
    assert rec["rounds"] and rec["prune_cost_seconds"] > 0
    assert all(0 < v < 10 for row in rec["eps"]["prune"] for v in row)


def test_joint_run_loads_both_ways_with_sane_perplexity(joint_run):
    from transformers import AutoModelForCausalLM

    import moecompress
    from moecompress.calibration.data import load_tokenizer, read_source, tokenize
    from moecompress.evaluate import perplexity
    out, _, _ = joint_run
    m = moecompress.load(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    x = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        a, b = m(x).logits, hf(x).logits
    assert torch.equal(a, b)
    cfg = json.load(open(os.path.join(out, "config.json")))
    for i, k in cfg["moecompress_merge"]["experts_per_layer"].items():
        assert hf.model.layers[int(i)].mlp.gate.weight.shape[0] == k
    ids = tokenize(load_tokenizer(out), read_source(os.path.join(TEXT, "eval_mix.txt")))[:2048]
    ppl = perplexity(m, ids, 256, 8)["perplexity"]
    from moecompress.evaluate import load_any
    base = perplexity(load_any(TRAINED), ids, 256, 8)["perplexity"]
    assert math.isfinite(ppl) and base < ppl < 2.0 * base, (ppl, base)


def test_joint_plan_replays_and_prints(joint_run, tmp_path):
    from moecompress.allocation.plan import plan_table
    from moecompress.api import quantize
    out, _, cfg = joint_run
    table = plan_table(out)
    assert "--" in table and "joint (optimal)" in table
    from dataclasses import replace
    again = str(tmp_path / "replay")
    quantize(TRAINED, again, replace(cfg, allocation="uniform", candidates=(2, 3, 4), bits=4), plan=out, progress=False)
    a = json.load(open(os.path.join(out, "moecompress.json")))
    b = json.load(open(os.path.join(again, "moecompress.json")))
    assert a["expert_bits"] == b["expert_bits"] and a["total_bytes"] == b["total_bytes"]
    assert json.load(open(os.path.join(again, "config.json")))["moecompress_merge"]["experts_per_layer"] == \
        json.load(open(os.path.join(out, "config.json")))["moecompress_merge"]["experts_per_layer"]


def test_report_grid_on_original_experts_marks_pruned(tmp_path):
    from moecompress.report import plots, records
    g = records.ExpertGrids([0, 1], 3, [[2.5, 3.5, 4.5], [2.5, 2.5, None]],
                            [["int2", "int3", "int4"], ["int2", "int2", None]],
                            [[10, 20, 30], [5, 6, None]], None, [[1, 1]], 4)
    m = records.to_original_experts(g, {"0": [0, -1, 1, 2], "1": [-1, 0, -1, 1]})
    assert m.num_experts == 4
    assert m.bits == [[2.5, None, 3.5, 4.5], [None, 2.5, None, 2.5]]
    assert m.labels[1] == ["pruned", "int2", "pruned", "int2"] and m.tokens[0] == [10, None, 20, 30]
    assert m.fallback == [[1, 3]]  # packed expert 1 of layer 1 is original expert 3
    merged = records.to_original_experts(g, {"0": [0, 0, 1, 2]})  # a merge: left as it is
    assert merged is g
    png = plots.bits_heatmap(m._asdict(), str(tmp_path))
    assert png and os.path.getsize(os.path.join(str(tmp_path), png)) > 1000


def test_budget_without_prune_runs_the_widths_lp_within_the_checkpoint_size(tiny_dir, tmp_path):
    """--budget SIZE alone: the widths-only LP (its own cost model) with SIZE minus everything else as budget;
    the output directory (every file but run/) stays within SIZE, metadata and tokenizer included."""
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.checkpoint import CheckpointReader
    from moecompress.passes.disk import directory_bytes
    from moecompress.passes.joint import fixed_bytes, fixed_on_disk
    model = tiny_dir("Mixtral")
    r = CheckpointReader(model)
    base = QuantizeConfig(allocation="lp", group_size=32, candidates=(2, 3, 4), cost="legacy",
                          calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    fixed, _ = fixed_bytes(r, base, 32)
    from dataclasses import replace
    # 4.4 stored bits, the experts' metadata included (0.86 bits on this tiny model): between uniform int2
    # (3.0 at g32, 3.86 with it) and int3 (4.0, 4.86)
    size = fixed_on_disk(r, base, 32) + int(4.4 * r.expert_params / 8)
    out = str(tmp_path / "b")
    summary = quantize(model, out, replace(base, budget=str(size)), progress=False)
    man = json.load(open(os.path.join(out, "moecompress.json")))
    rec = json.load(open(os.path.join(out, "run", "allocation.json")))
    assert summary["directory_bytes"] == directory_bytes(out) <= size
    assert man["total_bytes"] - fixed == rec["predicted_bytes"] > 3.0 * r.expert_params / 8
    assert abs(rec["budget_stored_bits"] - 4.4) < 8 / r.expert_params  # within one byte
    assert rec["metadata_experts_bound"] > 0
    assert "prune" not in json.dumps(rec["allocation"]["candidates"]) and "joint" not in rec
    with pytest.raises(MoeCompressError, match="smallest plan takes"):
        quantize(model, str(tmp_path / "c"), replace(base, budget=str(fixed + 100)), progress=False)
    assert not os.path.exists(tmp_path / "c")


def test_joint_budget_counts_the_whole_directory(tiny_dir, tmp_path):
    """prune, sub1 and widths under --budget: the output directory (tensors, safetensors headers, index, manifest,
    config, tokenizer; not run/) is within the budget, and the plan's bound on it is above it by under 1.5%
    (passes/disk.py), which also checks its codec field lists against what the writer stores."""
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.checkpoint import CheckpointReader
    from moecompress.passes.disk import directory_bytes
    from moecompress.passes.joint import fixed_on_disk
    model = tiny_dir("Mixtral")
    r = CheckpointReader(model)
    cfg = QuantizeConfig(allocation="lp", group_size=32, candidates=("prune", "sub1", "ternary", 2, 4),
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    size = fixed_on_disk(r, cfg, 32) + int(2.5 * r.expert_params / 8)
    from dataclasses import replace
    out = str(tmp_path / "j")
    summary = quantize(model, out, replace(cfg, budget=str(size)), progress=False)
    rec = json.load(open(os.path.join(out, "run", "allocation.json")))
    man = json.load(open(os.path.join(out, "moecompress.json")))
    on_disk = directory_bytes(out)
    assert summary["directory_bytes"] == on_disk <= size
    assert rec["predicted_total_bytes"] == man["total_bytes"]
    assert on_disk <= rec["predicted_directory_bytes"] < 1.015 * on_disk
    assert len({e["codec"] for e in man["tensors"]}) >= 2  # more than one codec's fields were bounded


def test_prune_error_units():
    """set_error: the Fisher-weighted error with F = 1 is the plain one; F = 2 doubles it; an expert nobody
    routes to and whose output is zero costs (almost) nothing to prune; contribution energy is what it says."""
    from moecompress.merge.stats import compute_layer_stats, expert_forward
    from moecompress.passes.prune_cost import contribution_energy, set_error
    torch.manual_seed(0)
    E, H, I, N = 4, 16, 32, 512
    gu, dn = torch.randn(E, 2 * I, H) / 4, torch.randn(E, H, I) / 6
    dn[3] = 0
    rw = torch.randn(E, H)
    rb = torch.tensor([0.0, 0.0, 0.0, -1e4])  # expert 3 is never chosen
    x = torch.randn(N, H)
    logits = x @ rw.T + rb
    w, idx = logits.softmax(-1).topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    st = compute_layer_stats(x, logits, idx, w, gu, dn, max_output_tokens=128, max_router_samples=N)
    a, af = set_error(st, gu, dn, rw, rb, [0], 2, fisher=torch.ones(H))
    assert a > 0 and af == pytest.approx(a, rel=1e-9)
    assert set_error(st, gu, dn, rw, rb, [0], 2, fisher=2 * torch.ones(H))[1] == pytest.approx(2 * a, rel=1e-9)
    assert math.isnan(set_error(st, gu, dn, rw, rb, [0], 2)[1])
    a3, _ = set_error(st, gu, dn, rw, rb, [3], 2)
    assert a3 < 1e-3 * a
    D = contribution_energy(st, gu, dn)
    tok, slot = torch.where(idx == 1)
    direct = float(((w[tok, slot, None] * expert_forward(x[tok], gu[1], dn[1])).double() ** 2).sum())
    assert D[1] == pytest.approx(direct, rel=1e-6) and D[3] == 0
