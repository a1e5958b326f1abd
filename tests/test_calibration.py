"""Expert-balanced calibration: coverage statistics, the balanced sampler, EBSS self-sampling, calib-stats."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import DOMAINS, TRAINED as MODEL
from moecompress.calibration import data, ebss, routing, samplers, stats
from moecompress.config import CalibConfig
from moecompress.errors import MoeCompressError

PROSE = os.path.join(DOMAINS, "calib_prose.txt")  # 150 kB of wikitext-2: the prose quarter of calib_mix.txt


# -- pure functions ----------------------------------------------------------------------------------
def test_cv_matches_formula():
    c = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    out = stats.cv(c)
    assert out[0].item() == pytest.approx(0.5)  # std 1, mean 2
    assert out[1].item() == 0.0 and out[2].item() == 0.0


def test_coverage_table_and_json(tmp_path):
    recs = [{"layer": 0, "tokens": [10, 30, 0, 40], "gate_sum": [5.0, 15.0, 0.0, 20.0]},
            {"layer": 2, "tokens": [20, 20, 20, 20], "gate_sum": [10.0, 10.0, 10.0, 10.0]}]
    cov = stats.coverage_from_records(recs, threshold=16, windows=4, seqlen=10, sampler="random")
    l0, l2 = cov.layers
    assert (l0.min, l0.max, l0.under) == (0, 40, [0, 2])
    assert l0.cv == pytest.approx(torch.tensor([10.0, 30, 0, 40]).std(correction=0).item() / 20, abs=1e-4)
    assert l2.cv == 0.0 and l2.under == []
    table = cov.table()
    assert "0,2" in table and "lowest min 0" in table and len(table.splitlines()) == 4
    cov.save(tmp_path / "c.json")
    back = json.loads((tmp_path / "c.json").read_text())
    assert back["layers"][0]["gate_sum"] == [5.0, 15.0, 0.0, 20.0] and back["threshold"] == 16
    with pytest.raises(MoeCompressError):
        stats.Coverage(-1, [])


@pytest.mark.parametrize("objective", ["sqrt", "entropy", "log"])
def test_balanced_select_prefers_starved_experts(objective):
    # 40 windows that all feed experts 0-1, 8 that also reach expert 2 or 3: greedy must take the latter
    common = torch.tensor([[30, 30, 0, 0]])
    rare = torch.tensor([[20, 20, 20, 0], [20, 20, 0, 20]])
    counts = torch.cat([common.repeat(40, 1), rare.repeat(4, 1)])[:, None, :]  # (48, 1, 4)
    idx = samplers.balanced_select(counts, 8, objective)
    assert sorted(idx.tolist()) == list(range(40, 48))
    tot = counts[idx].sum(0)[0]
    assert tot.min().item() == 80 and stats.cv(tot).item() < stats.cv(counts[:8].sum(0)[0]).item()
    with pytest.raises(MoeCompressError):
        samplers.balanced_select(counts, 49)


def test_blocking_bans_previous_token_and_seen_ngrams():
    seq = torch.tensor([[5, 6, 7, 5, 6], [1, 2, 3, 4, 9]])
    ban = ebss.blocked(seq, 10, 3)
    assert ban[0].nonzero().flatten().tolist() == [6, 7]     # repeat of 6, and "5 6 7" seen before
    assert ban[1].nonzero().flatten().tolist() == [9]
    assert ebss.blocked(seq, 10, 0)[0].nonzero().flatten().tolist() == [6]


def test_ebss_score_prefers_likely_and_balanced():
    even = torch.full((1, 2, 4), 5)
    skew = torch.tensor([[[20, 0, 0, 0], [20, 0, 0, 0]]])
    s_even = ebss.ebss_score(torch.tensor([10.0]), 5, even, 1.2)
    s_skew = ebss.ebss_score(torch.tensor([10.0]), 5, skew, 1.2)
    assert s_even.item() == pytest.approx(2.0)
    assert s_skew.item() == pytest.approx(2.0 + math.log(21) * 3 ** 0.5 / 4 / 1.2)  # std of log(1 + counts)
    s_cv = ebss.ebss_score(torch.tensor([10.0]), 5, skew, 1.2, measure="cv")
    assert s_cv.item() == pytest.approx(2.0 + 3 ** 0.5 / 1.2)  # std / mean
    # the log measure rewards a token for a starved expert more than cv does: min-aware
    base = torch.tensor([[[40, 40, 40, 1]]])
    for m in ("logstd", "cv"):
        up_min = ebss.ebss_score(torch.tensor([0.0]), 1, base + torch.tensor([0, 0, 0, 2]), 1.0, measure=m)
        up_mid = ebss.ebss_score(torch.tensor([0.0]), 1, base + torch.tensor([0, 0, 2, 0]), 1.0, measure=m)
        gain = (up_mid - up_min).item()
        assert gain > (0.2 if m == "logstd" else 0.0), (m, gain)
    with pytest.raises(MoeCompressError, match="measure"):
        ebss.EBSSConfig(measure="var")
    with pytest.raises(MoeCompressError):
        ebss.EBSSConfig(tau=0)


def test_set_balance_scores_what_the_other_sequences_lack():
    """balance="set": a candidate is scored by the change it makes to the whole set's sigma. Two
    candidates that are equally unbalanced on their own tie under the per-sequence term; with the
    other sequences crowding expert 0, the one feeding expert 1 wins, and n = 1 is the plain term."""
    to0 = torch.tensor([[[6, 0, 2, 2]]])
    to1 = torch.tensor([[[0, 6, 2, 2]]])
    nll = torch.tensor([3.0])
    assert ebss.ebss_score(nll, 3, to0, 1.2).item() == pytest.approx(ebss.ebss_score(nll, 3, to1, 1.2).item())
    others = torch.tensor([[[30, 2, 10, 10]]])
    s0 = ebss.ebss_score(nll, 3, to0, 1.2, others, 4)
    s1 = ebss.ebss_score(nll, 3, to1, 1.2, others, 4)
    assert s1.item() < s0.item() - 0.1
    zero = torch.zeros_like(to0)
    assert ebss.ebss_score(nll, 3, to0, 1.2, zero, 1).item() == pytest.approx(ebss.ebss_score(nll, 3, to0, 1.2).item())
    with pytest.raises(MoeCompressError, match="balance"):
        ebss.EBSSConfig(balance="global")


# -- on the trained fixture --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prose_pool():
    tok = data.load_tokenizer(MODEL)
    return data.token_pool(tok, data.parse_sources([PROSE]))


def test_routing_counts_every_routed_token(prose_pool):
    w = data.random_windows(prose_pool, 3, 32, 1)
    r = routing.route_windows(MODEL, w, batch_size=2)
    assert r.layers == [0, 1, 2, 3] and r.tokens.shape == (3, 4, 8)
    assert (r.tokens.sum(-1) == 32 * 2).all()  # top-2 routing of 32 tokens per window and layer
    assert torch.allclose(r.gate_sum.sum(-1), torch.full((3, 4), 32.0, dtype=torch.float64), atol=1e-3)  # Mixtral renormalizes


def test_balanced_beats_random_in_every_layer(prose_pool):
    calib = dict(nsamples=16, seqlen=64, seed=0)
    rnd = data.random_windows(prose_pool, 16, 64, 0)
    cov_r = stats.coverage_from_routing(routing.route_windows(MODEL, rnd, 16))
    sel = samplers.balanced(MODEL, prose_pool, calib["nsamples"], calib["seqlen"], 0, 16)
    assert sel.windows.shape == (16, 64)
    cov_b = stats.coverage_from_routing(sel.routing)
    for r, b in zip(cov_r.layers, cov_b.layers):
        assert b.min >= r.min, (r.layer, r.min, b.min)
        assert b.cv < r.cv, (r.layer, r.cv, b.cv)
    assert sum(b.min for b in cov_b.layers) > sum(r.min for r in cov_r.layers)


def test_streamed_generation_matches_full_forward_and_blocks_repeats(prose_pool):
    from transformers import AutoModelForCausalLM
    out = ebss.generate(MODEL, prose_pool, 2, 16, 0, ebss.EBSSConfig(beams=2, expand=2))
    assert out.shape == (2, 16)
    assert ((out[:, 1:] != out[:, :-1]).all())  # no immediate repeats
    for row in out.tolist():
        tri = [tuple(row[i:i + 3]) for i in range(len(row) - 2)]
        assert len(tri) == len(set(tri))
    # the cached, layer-streamed step reproduces the full model's logits
    lm = ebss.StreamedLM(MODEL, 1 << 30)
    cache = ebss.BeamCache()
    logits = []
    for p in range(8):
        h, _ = lm.step(out[:, p], p, cache)
        cache.commit(torch.arange(2))
        logits.append(lm.logits(h))
    ref = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()(out[:, :8]).logits
    assert (torch.stack(logits, 1) - ref).abs().max().item() < 1e-3


def test_candidates_read_their_own_rows_cache(prose_pool):
    """A step that feeds each cached row C candidate tokens at once (the beam search's step) gives every
    candidate the logits and routing the full model gives its row's prefix plus that one token, and
    committing a candidate continues from exactly that sequence."""
    from transformers import AutoModelForCausalLM
    ref_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    prefix = torch.cat([t for t, _ in prose_pool])[:18].view(3, 6)  # 3 rows, 6 cached tokens each
    cand = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]])  # (3, C=4)
    lm = ebss.StreamedLM(MODEL, 1 << 30)
    cache = ebss.BeamCache()
    for p in range(6):
        lm.step(prefix[:, p], p, cache)
        cache.commit(torch.arange(3))
    h, counts = lm.step(cand, 6, cache)  # (12, H), (12, L, E)
    full = torch.cat([prefix.repeat_interleave(4, 0), cand.reshape(-1, 1)], 1)  # (12, 7)
    with torch.no_grad():
        ref = ref_model(full).logits[:, -1]
    assert (lm.logits(h) - ref).abs().max().item() < 1e-3
    assert counts.sum((1, 2)).eq(len(lm.moe) * 2).all()  # each candidate: top-2 in every MoE layer
    sel = torch.tensor([2, 4, 11])  # row 0 cand 2, row 1 cand 0, row 2 cand 3
    cache.commit(sel)
    h2, _ = lm.step(torch.tensor([5, 6, 7]), 7, cache)
    nxt = torch.cat([full[sel], torch.tensor([[5], [6], [7]])], 1)
    with torch.no_grad():
        ref2 = ref_model(nxt).logits[:, -1]
    assert (lm.logits(h2) - ref2).abs().max().item() < 1e-3


def test_calib_stats_cli(tmp_path, capsys):
    from moecompress.cli import main
    j = tmp_path / "cov.json"
    rc = main(["-q", "calib-stats", MODEL, "--calib", PROSE, "--nsamples", "2", "--seqlen", "16", "--json", str(j)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokens per expert" in out and "sampler random" in out
    cov = json.loads(j.read_text())
    assert len(cov["layers"]) == 4 and all(sum(layer["tokens"]) == 2 * 16 * 2 for layer in cov["layers"])
    assert main(["calib-stats", MODEL, "--calib", PROSE, "--seqlen", "4"]) == 2  # bad input: one-line error


def test_config_rejects_unknown_sampler():
    with pytest.raises(MoeCompressError):
        CalibConfig(sampler="greedy")
    with pytest.raises(MoeCompressError, match="balance objective"):
        CalibConfig(balance_objective="minimum")


def test_ebss_flags_reach_the_generator(monkeypatch):
    """--ebss-tau / --ebss-beams (CLI) -> CalibConfig -> EBSSConfig of the generator; bad values are refused."""
    from moecompress.cli import build_parser
    seen = {}

    def fake_generate(model_path, pool, n, seqlen, seed, cfg, progress=None, device=None):
        seen["cfg"], seen["device"] = cfg, device
        return torch.zeros(n, seqlen, dtype=torch.long)
    monkeypatch.setattr(ebss, "generate", fake_generate)
    a = build_parser().parse_args(["quantize", "--sampler", "ebss", "--ebss-tau", "0.5", "--ebss-beams", "2"])
    calib = CalibConfig(sampler=a.sampler, nsamples=2, seqlen=8, ebss_tau=a.ebss_tau, ebss_beams=a.ebss_beams)
    sel = samplers.select("unused", None, calib, device=torch.device("meta"))
    assert seen["cfg"].tau == 0.5 and seen["cfg"].beams == 2 and sel.windows.shape == (2, 8)
    assert seen["device"] == torch.device("meta")  # the search runs on the run's device
    with pytest.raises(MoeCompressError, match="ebss-tau"):
        CalibConfig(ebss_tau=0)


def test_ebss_real_share_mixes_real_windows_with_generated(monkeypatch, prose_pool):
    """--ebss-real f: round(f * nsamples) random windows of the text first, the rest generated."""
    from moecompress.calibration.data import random_windows
    from moecompress.cli import build_parser
    asked = {}

    def fake_generate(model_path, pool, n, seqlen, seed, cfg, progress=None, device=None):
        asked["n"] = n
        return torch.full((n, seqlen), -1, dtype=torch.long)
    monkeypatch.setattr(ebss, "generate", fake_generate)
    a = build_parser().parse_args(["quantize", "--sampler", "ebss", "--ebss-real", "0.75"])
    calib = CalibConfig(sampler="ebss", nsamples=8, seqlen=16, seed=3, ebss_real=a.ebss_real)
    w = samplers.select("unused", prose_pool, calib).windows
    assert asked["n"] == 2 and w.shape == (8, 16)
    assert torch.equal(w[:6], random_windows(prose_pool, 6, 16, 3)) and bool((w[6:] == -1).all())
    for bad in (-0.1, 1.0):
        with pytest.raises(MoeCompressError, match="ebss-real"):
            CalibConfig(ebss_real=bad)


def test_ebss_spreads_tokens_over_the_experts(prose_pool):
    """EBSS windows reach the experts more evenly than random prose windows of the same budget (lower cv
    in every layer), and balancing the whole set beats balancing each sequence (summed cv over layers).
    Measured on this 150 kB prose pool (seed 0, 1 and 2 threads alike): cv set - random at most -0.040 in a
    layer, summed cv sequence - set 0.014 (0.159 on the 1.1 MB prose text this test used before: the pool
    only supplies each sequence's first token, and over seeds 0-5 the set - sequence gap ranges -0.31..+0.21
    here, -0.21..+0.27 on the larger text). The bound 0.005 still fails when the set objective does nothing
    (it then equals the per-sequence one exactly)."""
    rand = routing.route_windows(MODEL, data.random_windows(prose_pool, 8, 48, 0), 8)
    cv_r = [c.cv for c in stats.coverage_from_routing(rand).layers]
    cv = {}
    for bal in ("set", "sequence"):
        w = ebss.generate(MODEL, prose_pool, 8, 48, 0, ebss.EBSSConfig(balance=bal))
        cv[bal] = [c.cv for c in stats.coverage_from_routing(routing.route_windows(MODEL, w, 8)).layers]
    assert all(s < r - 0.01 for s, r in zip(cv["set"], cv_r)), (cv["set"], cv_r)
    assert sum(cv["set"]) < sum(cv["sequence"]) - 0.005, cv


@pytest.mark.parametrize("command", ["quantize", "merge", "prune", "calib-stats"])
def test_every_command_passes_the_calibration_flags_on(monkeypatch, command):
    """The calibration flags reach the function behind each command with names it accepts (a renamed or
    added flag that one command forgets fails here, not at a user's run)."""
    import inspect

    from moecompress import api, cli
    from moecompress.merge import pipeline
    seen = {}

    def checked(real, result):
        def fake(*args, **kwargs):
            seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)  # TypeError on an unknown keyword
            return result
        return fake
    cov = stats.Coverage(16, [])
    monkeypatch.setattr(pipeline, "run_merge", checked(pipeline.run_merge, {}))
    monkeypatch.setattr(api, "calibration_stats", checked(api.calibration_stats, (cov, 0.0)))
    monkeypatch.setattr(api, "quantize", checked(api.quantize, {"out": "x", "expert_bits_per_param": 4.0,
                                                               "source_bytes": 1, "packed_bytes": 1, "compression": 1.0,
                                                               "seconds": 0.0, "fallback_experts": 0}))
    argv = [command, "m", "--sampler", "ebss", "--ebss-expand", "3", "--ebss-real", "0.5", "--seed", "5",
            "--balance-objective", "entropy"]
    if command in ("merge", "prune"):
        argv += ["--out", "o", "--experts", "2"]
    assert cli.main(argv) == 0
    calib = seen["config"].calib if "config" in seen else seen["calib"]
    assert (calib.sampler, calib.ebss_expand, calib.ebss_real, calib.seed, calib.balance_objective) == \
        ("ebss", 3, 0.5, 5, "entropy"), seen


def test_balance_objectives_rank_the_starved_expert_as_documented():
    """log, sqrt, entropy: ever less weight on the least-used expert. How many of a window's 120 routings
    must reach the starved expert (the rest going to the dominant one) for it to beat a window that
    gives all 120 to a mid-sized expert?"""
    total = torch.tensor([[[1000.0, 600.0, 400.0, 20.0]]])   # (1, L=1, E=4): expert 3 starved
    mid = torch.tensor([[0.0, 0.0, 120.0, 0.0]])
    need = {}
    for obj in ("log", "sqrt", "entropy"):
        F = lambda w: float(samplers.balance_objective(total + w, obj))  # noqa: E731
        need[obj] = next(s for s in range(121) if F(torch.tensor([[120.0 - s, 0, 0, s]])) > F(mid))
    assert need["log"] < need["sqrt"] < need["entropy"] <= 60, need   # measured 4, 12, 29


def test_hessian_prior_statistics_are_the_all_token_averages():
    """prior=True: gate/up's prior is the average x x^T over every routed row (all experts, so every token
    k times: the all-token average); down's runs the expert on a fixed sample of token positions."""
    from moecompress.passes.calibrate import HessianCollector
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    routes = {0: torch.arange(0, 40), 1: torch.arange(0, 40, 2), 2: torch.arange(1, 40, 2)}  # top-2: 80 rows
    col = HessianCollector(3, 6, "x", subset=[0], prior=True)
    hcol = HessianCollector(3, 6, "h", subset=[0], prior=True, sample_every=4)
    for e, tok in routes.items():
        w = torch.rand(tok.numel(), generator=g)
        col(e, tok, x[tok], None, w)
        hcol(e, tok, x[tok], x[tok], w)
    assert torch.allclose(col.prior_hessian(1, None), x.t() @ x / 40, atol=1e-5)
    assert torch.equal(col.H[0], x.t() @ x) and 1 not in col.H       # the subset's own Hessian unchanged

    def double(e, v):
        return 2 * v, None
    kept = torch.cat([tok[(tok * 2654435761) % (1 << 32) % 4 == 0] for tok in routes.values()])
    assert 0 < kept.numel() < 80
    assert torch.allclose(hcol.prior_hessian(0, double), 4 * x[kept].t() @ x[kept] / kept.numel(), atol=1e-5)
    with pytest.raises(MoeCompressError, match="hessian-prior"):
        from moecompress.config import QuantizeConfig
        QuantizeConfig(hessian_prior=-1)


def test_hessian_prior_rescues_a_small_calibration_set(tmp_path, request):
    """16 windows of 64 tokens leave experts a few dozen to a few hundred routed tokens, fewer than the
    192/384 input widths: plain GPTQ overfits them. The prior lowers 2-bit perplexity on held-out prose and
    on C, which the calibration text lacks. Measured on this 150 kB prose pool with 1 torch thread
    51.77 -> 49.32 (prose) and 23.82 -> 21.89 (C), with 2 threads 51.64 -> 47.76 and 22.97 -> 22.45; on the
    1.1 MB prose text used before, 1 thread 51.52 -> 48.13 and 22.70 -> 19.82, 2 threads 50.49 -> 48.56 and
    24.90 -> 19.49. 2-bit GPTQ on so few tokens moves with the float summation order, so the test runs on one
    thread (as each CI worker does) and the bounds keep a margin. The experts under --min-tokens (5 here)
    are rounded to nearest without the prior and GPTQ'd with it, so the manifest lists them only without."""
    from moecompress import api
    from moecompress.config import QuantizeConfig
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    ppl, fell = {}, {}
    texts = [os.path.join(DOMAINS, f"{d}_test.txt") for d in ("prose", "c")]
    for a in (0.0, 1.0):
        out = str(tmp_path / f"p{a}")
        # the setting the numbers above were measured in: natural column order, min/max grids (under the
        # act-order + mse defaults the prior's prose gain is gone: 46.85 -> 47.05, C 21.07 -> 19.33)
        cfg = QuantizeConfig(bits=2, group_size=64, hessian_prior=a, act_order=False, grid="minmax",
                             calib=CalibConfig((PROSE,), 16, 64, seed=0))
        api.quantize(MODEL, out, cfg, progress=False)
        with open(os.path.join(out, "moecompress.json")) as f:
            fell[a] = json.load(f)["fallback_experts"]
        ppl[a] = [r["perplexity"] for r in api.evaluate(out, texts, max_tokens=4096, progress=False).values()]
    assert ppl[1.0][0] < 0.985 * ppl[0.0][0] and ppl[1.0][1] < 0.95 * ppl[0.0][1], ppl
    assert len(fell[0.0]) >= 3 and fell[1.0] == [], fell
