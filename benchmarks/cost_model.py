"""Does the allocation's cost model predict the loss? (issue 22, must-have 0)

For a set of plans on the shared fixture (uniform 2, 3 and 4 bits; the LP at 3.0 and 3.5 stored bits per
expert parameter under the legacy cost phi^alpha w^beta eps and under the Fisher cost; random mixed plans
of the same byte budgets), compare each cost model's prediction, the sum of its cost terms over the plan,
with the plan's measured perplexity on held-out text, by Spearman's rank correlation (bar: >= 0.8).

One `moecompress quantize --allocation lp --cost fisher --bits 2.5` run measures everything: its
run/allocation.json holds eps, the routing statistics (the legacy cost is recomputed from them with the
run's alpha and beta) and the Fisher costs. Every plan is then written as a plan.json and quantized with
`--plan` on the same calibration windows (GPTQ, group 64, calib_mix.txt, seed 0), and evaluated by
`moecompress eval` on the validation split: the tails of calib_{prose,verse,c,python}.txt after character
150,000, which calib_mix.txt does not contain (benchmarks/quality.py's `--split validation`). The measured
quantity is the mean over the four domains of log perplexity (the Fisher cost predicts its growth in nats).
Spearman is printed over all plans and over the mixed plans alone (the ones at equal budgets, where the
ranking decides which plan the LP picks). Outputs are kept in WORKDIR and reused, so a rerun resumes.

    python benchmarks/cost_model.py --work /tmp/cost_model [--nsamples 32] [--max-tokens 8192] [--random 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os

import numpy as np
from common import CALIB_MIX, DOMAINS, MODEL, moecompress
from quality import validation_texts

from moecompress.allocation.fisher import VARIANTS, fisher_costs
from moecompress.allocation.guard import uniform_guard
from moecompress.allocation import (AllocationConfig, allocate, build_problem, expert_costs, overhead_bits,
                                    price_candidates, random_allocation, uniform_allocation)


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # ties share their mean rank
            m = x == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def pair_agreement(pred, meas, size) -> tuple[int, int]:
    """(pairs ordered alike, pairs) among plans of the same stored size: the comparisons the LP makes."""
    ok = n = 0
    for i in range(len(pred)):
        for j in range(i + 1, len(pred)):
            if abs(size[i] - size[j]) < 1e-3 and meas[i] != meas[j]:
                n += 1
                ok += (pred[i] - pred[j]) * (meas[i] - meas[j]) > 0
    return ok, n


class Bench:
    def __init__(self, work: str, nsamples: int, max_tokens: int, seed: int = 0):
        self.work, self.nsamples, self.max_tokens, self.seed = work, nsamples, max_tokens, seed
        os.makedirs(work, exist_ok=True)
        self.texts = validation_texts(CALIB_MIX, work)

    def quantize(self, name: str, *extra) -> str:
        out = os.path.join(self.work, name)
        if not os.path.exists(os.path.join(out, "moecompress.json")):
            moecompress("quantize", MODEL, "--out", out, "--group-size", 64, "--method", "gptq", "--calib", CALIB_MIX,
                        "--seed", self.seed, "--nsamples", self.nsamples, *extra)
        return out

    def evaluate(self, out: str) -> dict:
        js = out + ".val.json"
        if not os.path.exists(js):
            moecompress("eval", out, "--text", *self.texts.values(), "--max-tokens", self.max_tokens, "--json", js)
        res = json.load(open(js))["texts"]
        ppl = {d: res[t]["perplexity"] for d, t in self.texts.items()}
        man = json.load(open(os.path.join(out, "moecompress.json")))
        return {"perplexity": ppl, "mean_log_ppl": float(np.mean([math.log(v) for v in ppl.values()])),
                "expert_bits_per_param": man["expert_bits_per_param"]}

    def plan_run(self, alloc, fingerprint: str, moe) -> dict:
        experts = [{"layer": int(moe[l]), "expert": e, **alloc.spec(l, e).to_json()}
                   for l in range(alloc.num_layers) for e in range(len(alloc.choice[l]))]
        key = hashlib.sha256(json.dumps(experts, sort_keys=True).encode()).hexdigest()[:10]
        plan = os.path.join(self.work, f"plan-{key}.json")
        with open(plan, "w") as f:
            json.dump({"format_version": 1, "source_fingerprint": fingerprint, "experts": experts}, f)
        return self.evaluate(self.quantize(f"plan-{key}", "--plan", plan))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/cost_model")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8192, help="validation tokens per domain")
    ap.add_argument("--random", type=int, default=2, help="random mixed plans per budget")
    ap.add_argument("--seed", type=int, default=0, help="calibration windows' seed (random plans: seed + i)")
    a = ap.parse_args()
    from moecompress.checkpoint import CheckpointReader
    bench = Bench(a.work, a.nsamples, a.max_tokens, a.seed)
    reader = CheckpointReader(MODEL)
    lp = bench.quantize("lp-fisher-2.5", "--bits", 2.5, "--allocation", "lp", "--cost", "fisher")
    rec = json.load(open(os.path.join(lp, "run", "allocation.json")))
    if "fisher_variant" not in rec:  # an older run without the per-expert weights: measure again (plans are reused)
        import shutil
        shutil.rmtree(lp)
        lp = bench.quantize("lp-fisher-2.5", "--bits", 2.5, "--allocation", "lp", "--cost", "fisher")
        rec = json.load(open(os.path.join(lp, "run", "allocation.json")))
    cfg = AllocationConfig.from_json(rec["config"])
    moe = list(rec["moe_layers"])
    labels = [c.label for c in cfg.candidates]
    shapes = [tuple(reader.expert_shapes(i)[p] for p in ("gate", "up", "down")) for i in moe]
    pricing = price_candidates(cfg.candidates, shapes, len(moe), reader.layer_num_experts(moe[0]))
    eps = np.stack([np.array(rec["eps"][lab], dtype=float) for lab in labels], axis=-1)  # None -> nan
    legacy = expert_costs(eps, rec["tokens"], rec["gate_mass"], cfg.alpha, cfg.beta, cfg.importance_floor).cost
    over = overhead_bits(cfg.candidates[0], shapes[0])
    models = {"legacy": legacy}
    for v in VARIANTS:  # F of the expert's layer, or of its own routed tokens (allocation/fisher.py)
        fe = np.stack([np.array(rec["fisher_eps"][v][lab], dtype=float) for lab in labels], axis=-1)
        models[f"fisher-{v}"] = fisher_costs(fe, rec["tokens"], rec["fisher_tokens"], cfg.importance_floor).cost

    def with_budget(stored):
        return AllocationConfig(**{**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "budget_bits": stored})
    plans = []  # (name, Allocation, mixed)
    any_prob = build_problem(with_budget(64.0), legacy, pricing)
    for b in (2, 3, 4):
        plans.append((f"uniform {b}", uniform_allocation(any_prob, b), False))
    for code in (2.5, 3.0):
        stored = code + over
        for m, cost in models.items():
            prob = build_problem(with_budget(stored), cost, pricing)  # the LP as the pass runs it, guard included
            plans.append((f"lp-{m} {stored:g}", uniform_guard(prob, allocate(with_budget(stored), cost, pricing))[0],
                          True))
        prob = build_problem(with_budget(stored), legacy, pricing)
        for s in range(a.random):
            plans.append((f"random {stored:g} s{a.seed + s}", random_allocation(prob, a.seed + s), True))
    unique = {}  # identical widths from two cost models: one plan, both names
    for name, alloc, mixed in plans:
        key = alloc.choice
        unique[key] = (unique[key][0] + " = " + name, alloc, mixed) if key in unique else (name, alloc, mixed)
    rows = []
    for name, alloc, mixed in unique.values():
        ch = alloc.choice_array()
        pred = {m: float(np.take_along_axis(c, ch[..., None], axis=2).sum()) for m, c in models.items()}
        r = {"plan": name, "mixed": mixed, "predicted_bits": round(alloc.average_bits, 4),
             "widths": alloc.histogram(), "predicted": pred, **bench.plan_run(alloc, reader.fingerprint, moe)}
        rows.append(r)
        print(json.dumps(r), flush=True)
    js = os.path.join(a.work, "original.val.json")  # the unquantized model: the reference log perplexity
    if not os.path.exists(js):
        moecompress("eval", MODEL, "--text", *bench.texts.values(), "--max-tokens", a.max_tokens, "--json", js)
    got = json.load(open(js))["texts"]
    base = {"mean_log_ppl": float(np.mean([math.log(got[t]["perplexity"]) for t in bench.texts.values()]))}
    res = {"nsamples": a.nsamples, "max_tokens": a.max_tokens, "fisher_seconds": rec["fisher_seconds"],
           "sensitivity_seconds": rec["sensitivity_seconds"], "fisher_loss": rec["fisher_loss"], "rows": rows,
           "original_mean_log_ppl": base["mean_log_ppl"], "spearman": {}}
    y = [r["mean_log_ppl"] for r in rows]
    mixed = [i for i, r in enumerate(rows) if r["mixed"]]
    for m in models:
        x = [r["predicted"][m] for r in rows]
        res["spearman"][m] = {"all": spearman(x, y), "mixed": spearman([x[i] for i in mixed], [y[i] for i in mixed]),
                              "per_domain": {d: spearman(x, [math.log(r["perplexity"][d]) for r in rows])
                                             for d in DOMAINS},
                              "same_bytes_pairs": pair_agreement(x, y, [r["expert_bits_per_param"] for r in rows])}
    res["fisher_ratio"] = {m: ((np.array(y) - base["mean_log_ppl"]) / np.array([r["predicted"][m] for r in rows])).tolist()
                           for m in models if m != "legacy"}  # measured / predicted loss increase
    with open(os.path.join(a.work, "cost_model.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"\nfixture, GPTQ g64, calib_mix {a.nsamples} x 256, validation tails {a.max_tokens} tokens per domain; "
          f"fisher pass {res['fisher_seconds']:.1f} s, sensitivity pass {res['sensitivity_seconds']:.1f} s")
    print(f"{'plan':<42} {'bits':>6} " + " ".join(f"{m:>13}" for m in models) + f" {'d log ppl':>10} "
          + " ".join(f"{d:>7}" for d in DOMAINS))
    for r in rows:
        print(f"{r['plan']:<42} {r['expert_bits_per_param']:>6.3f} "
              + " ".join(f"{r['predicted'][m]:>13.5f}" for m in models)
              + f" {r['mean_log_ppl'] - base['mean_log_ppl']:>10.5f} " + " ".join(f"{r['perplexity'][d]:>7.3f}" for d in DOMAINS))
    for m, s in res["spearman"].items():
        ok, n = s["same_bytes_pairs"]
        print(f"Spearman {m}: all {len(rows)} plans {s['all']:.3f}, mixed plans only ({len(mixed)}) {s['mixed']:.3f}; "
              "per domain " + ", ".join(f"{d} {v:.3f}" for d, v in s["per_domain"].items())
              + f"; plans of equal bytes ordered as measured: {ok} of {n} pairs")
    for m, q in res["fisher_ratio"].items():
        print(f"measured / predicted loss increase ({m}): {min(q):.2f} .. {max(q):.2f} (median {np.median(q):.2f})")


if __name__ == "__main__":
    main()
