"""Expert-balanced calibration on the trained fixture: samplers x AGQ x bit width, per evaluation domain.

Calibrates on prose only (the issue's setting), quantizes the experts with GPTQ at each bit width with
windows from each sampler (random / balanced / ebss), with affinity-guided Hessians off and on, over
several seeds, and evaluates perplexity on the four domains' test texts. Prints, per bit width and
domain, mean +- std over seeds for every sampler x affinity cell, the coverage (min tokens per expert,
cv) of each sampler's windows, and the seconds each sampler took.

The windows of a (sampler, seed) are selected once and reused for every bit width and affinity
setting (api.calibration_windows is swapped for a lookup in this process), so sampler time is counted
once. Full run (hours on 2 CPU cores):

    python benchmarks/calibration.py --json /tmp/calib_bench.json
A sampler spec `ebss@F` is EBSS with a share F of real windows (`--ebss-real F`); `balanced:entropy` is
the balanced sampler with that objective (`--balance-objective`; plain `balanced` uses the default).
`--previous JSON...` adds the cells (sampler, affinity, seed) of earlier runs with the same settings that this run lacks,
so one grid can be split over processes, e.g. on 2 cores:

    python benchmarks/calibration.py --samplers ebss --seeds 0 1 --json /tmp/c_a.json &
    python benchmarks/calibration.py --samplers random balanced --json /tmp/c_b.json &&
    python benchmarks/calibration.py --samplers ebss --seeds 2 --previous /tmp/c_b.json --json /tmp/c_c.json; wait
    python benchmarks/calibration.py --samplers --previous /tmp/c_a.json /tmp/c_c.json   # the table only

Reduced run (what fits in a short session):

    python benchmarks/calibration.py --seeds 0 --nsamples 32 --max-tokens 8192 --bits 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from common import DOMAINS, add_fixture_args, domain_texts, mean_se, quantize_and_evaluate


def paired_table(results: dict, bits: int, cells, seeds_of) -> None:
    """Each cell minus random windows without affinity on the same seed: mean +- standard error of the
    per-seed differences (negative = lower perplexity than the baseline). Seeds share the quantization's
    other randomness, so pairing removes most of the seed-to-seed spread the plain table shows."""
    base = f"w{bits}/random/off/"
    if not any(k.startswith(base) for k in results):
        return
    print(f"{bits}-bit, paired against random (same seed): mean difference +- standard error (seeds)")
    for d in DOMAINS:
        row = []
        for sm, aff in cells:
            diffs = [results[f"w{bits}/{sm}/{aff}/{s}"][d] - results[base + str(s)][d] for s in seeds_of[sm]
                     if f"w{bits}/{sm}/{aff}/{s}" in results and base + str(s) in results]
            if (sm, aff) == ("random", "off") or not diffs:
                row.append("-")
                continue
            m, se = mean_se(diffs)
            row.append(f"{m:+7.3f} +-{se:5.3f} ({len(diffs)})")
        print(f"{d:<8}" + "".join(f"{c:>24}" for c in row))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--samplers", nargs="*", default=["random", "balanced", "ebss"])
    ap.add_argument("--bits", nargs="+", type=int, default=[3, 2])
    ap.add_argument("--affinity", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32768, help="evaluation tokens per domain")
    ap.add_argument("--hessian-prior", type=float, default=0.0, help="quantize --hessian-prior (default 0: off)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--previous", nargs="+", default=[],
                    help="JSONs of earlier runs with the same settings: the cells this run lacks join the table")
    a = ap.parse_args(argv)

    from moecompress import api
    from moecompress.calibration import data, samplers
    from moecompress.calibration.routing import route_windows
    from moecompress.calibration.stats import coverage_from_routing
    from moecompress.config import CalibConfig, QuantizeConfig

    tok = data.load_tokenizer(a.model)
    pool = data.token_pool(tok, data.parse_sources([a.calib]))
    windows, sampler_s, coverage = {}, {}, {}
    def calib_of(spec, seed):  # "ebss@0.5": half the windows real; "balanced:entropy": that objective
        sm, _, real = spec.partition("@")
        sm, _, objective = sm.partition(":")
        return CalibConfig((a.calib,), a.nsamples, a.seqlen, seed, sm, ebss_real=float(real or 0),
                           balance_objective=objective or CalibConfig.balance_objective)

    for sm in a.samplers:
        for seed in a.seeds:
            calib = calib_of(sm, seed)
            sel = samplers.select(a.model, pool, calib)
            windows[(sm, seed)] = sel.windows
            sampler_s.setdefault(sm, {})[str(seed)] = sel.seconds
            r = sel.routing or route_windows(a.model, sel.windows, 16)
            cov = coverage_from_routing(r)
            coverage.setdefault(sm, {})[str(seed)] = {"min": [c.min for c in cov.layers], "cv": [c.cv for c in cov.layers],
                                                     "tokens": [c.tokens for c in cov.layers]}
            print(f"[{sm} seed {seed}] {sel.seconds:.1f} s; min/layer {[c.min for c in cov.layers]}, "
                  f"cv/layer {[round(c.cv, 3) for c in cov.layers]}", flush=True)

    real = api.calibration_windows
    key = lambda c: (c.sampler, c.ebss_real, c.balance_objective)  # noqa: E731
    spec_of = {key(calib_of(sm, 0)): sm for sm in a.samplers}
    api.calibration_windows = lambda model, calib: windows[(spec_of[key(calib)], calib.seed)]
    results = {"original": {d: r["perplexity"] for d, r in
                            zip(DOMAINS, api.evaluate(a.model, domain_texts(), max_tokens=a.max_tokens,
                                                      progress=False).values())}}
    work = tempfile.mkdtemp(prefix="calib-bench-")
    try:
        for bits in a.bits:
            for sm in a.samplers:
                for aff in a.affinity:
                    for seed in a.seeds:
                        out = os.path.join(work, f"w{bits}-{sm}-{aff}-{seed}")
                        cfg = QuantizeConfig(bits=bits, group_size=a.group_size, method="gptq", affinity=aff == "on",
                                             hessian_prior=a.hessian_prior, calib=calib_of(sm, seed))
                        t0 = time.time()
                        ppl = dict(zip(DOMAINS, quantize_and_evaluate(a.model, cfg, out, a.max_tokens)))
                        results[f"w{bits}/{sm}/{aff}/{seed}"] = ppl
                        print(f"[w{bits} {sm} affinity {aff} seed {seed}] {time.time() - t0:.0f} s "
                              + " ".join(f"{d} {v:.3f}" for d, v in ppl.items()), flush=True)
    finally:
        api.calibration_windows = real
        shutil.rmtree(work, ignore_errors=True)

    for path in a.previous:
        with open(path) as f:
            prev = json.load(f)
        for k in ("nsamples", "seqlen", "group_size", "max_tokens", "model", "calib", "hessian_prior"):
            v = prev["args"].get(k, 0.0 if k == "hessian_prior" else None)
            if v != getattr(a, k):
                raise SystemExit(f"--previous {path}: {k} differs ({v} vs {getattr(a, k)})")
        for k, v in prev["perplexity"].items():
            results.setdefault(k, v)
        for sm, per_seed in prev["sampler_seconds"].items():
            for seed, v in per_seed.items():
                sampler_s.setdefault(sm, {}).setdefault(seed, v)
                coverage.setdefault(sm, {}).setdefault(seed, prev["coverage"][sm][seed])
        print(f"(cells this run lacks taken from {path}; original re-measured here)")
    a.samplers = list(sampler_s)
    seeds_of = {sm: sorted(int(s) for s in sampler_s[sm]) for sm in a.samplers}
    print(f"\nprose-only calibration, {a.nsamples} x {a.seqlen} tokens, GPTQ group {a.group_size}, "
          f"{f'--hessian-prior {a.hessian_prior:g}, ' if a.hessian_prior else ''}"
          f"seeds {seeds_of}, eval {a.max_tokens} tokens/domain; perplexity mean +- std over seeds")
    print("original: " + "  ".join(f"{d} {v:.3f}" for d, v in results["original"].items()))
    cells = [(sm, aff) for sm in a.samplers for aff in a.affinity]
    for bits in a.bits:
        print(f"\n{bits}-bit   " + "".join(f"{sm + ('+agq' if aff == 'on' else ''):>24}" for sm, aff in cells))
        for d in DOMAINS:
            row = []
            for sm, aff in cells:
                v = [results[f"w{bits}/{sm}/{aff}/{s}"][d] for s in seeds_of[sm] if f"w{bits}/{sm}/{aff}/{s}" in results]
                if not v:
                    row.append("-")
                    continue
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                row.append(f"{statistics.mean(v):>10.3f} +-{sd:5.3f}")
            print(f"{d:<8}" + "".join(f"{c:>24}" for c in row))
        print("seeds   " + "".join(f"{sum(f'w{bits}/{sm}/{aff}/{s}' in results for s in seeds_of[sm]):>24}"
                                    for sm, aff in cells))
        paired_table(results, bits, cells, seeds_of)
    print("\nsampler          seed  seconds   min tokens/expert per layer   cv per layer")
    for sm in a.samplers:
        for seed in seeds_of[sm]:
            c = coverage[sm][str(seed)]
            print(f"{sm:<16} {seed:>4} {sampler_s[sm][str(seed)]:>8.1f}   {str(c['min']):>28}   "
                  f"{[round(x, 3) for x in c['cv']]}")
    if "random" in coverage:  # paired by seed: does each sampler raise the minimum and lower the cv, per layer?
        print("\nagainst random windows of the same seed, per layer: min raised (+), equal (=), lowered (-); "
              "cv lowered (+) or not (-); 'live min' = the min over the experts that real text reaches (those the "
              "random windows of some seed reach): sampler / random")
        reach = {}
        for per_seed in [coverage["random"]]:
            for c in per_seed.values():
                for l, toks in enumerate(c.get("tokens") or []):
                    reach.setdefault(l, set()).update(e for e, n in enumerate(toks) if n > 0)
        for sm in a.samplers:
            if sm == "random":
                continue
            for seed in seeds_of[sm]:
                r, c = coverage["random"].get(str(seed)), coverage[sm][str(seed)]
                if r is None:
                    continue
                mins = "".join("+" if x > y else "=" if x == y else "-" for x, y in zip(c["min"], r["min"]))
                cvs = "".join("+" if x < y else "-" for x, y in zip(c["cv"], r["cv"]))
                line = f"{sm:<16} {seed:>4}  min {mins}  cv {cvs}"
                if c.get("tokens") and r.get("tokens"):
                    live = [(min(t[e] for e in reach[l]), min(rt[e] for e in reach[l]))
                            for l, (t, rt) in enumerate(zip(c["tokens"], r["tokens"]))]
                    line += "  live min " + " ".join(f"{x}/{y}" for x, y in live)
                print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "perplexity": results, "sampler_seconds": sampler_s, "coverage": coverage}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
