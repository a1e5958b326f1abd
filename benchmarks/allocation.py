"""Bit allocation benchmarks (issue 4).

Part 1 (solver time): a synthetic DeepSeek-V3-sized program, 58 MoE layers x 256 experts x 4
candidates (int 2/3/4/8, group 64), expert shapes H = 7168, I = 2048, priced in real bytes by the
int codec. Costs are random but shaped like measured ones: skewed routing (lognormal popularity,
multinomial top-8 counts over 64k tokens, some experts unused), gate mass = counts x a per-expert
mean gate weight, eps(b) = per-expert sensitivity x 4^-(b-2) with small noise (falls with bits).
Prints model-build + CBC time, status and the achieved stored bits per parameter. Target: < 60 s.

    python benchmarks/allocation.py            # full size
    python benchmarks/allocation.py --quick    # 8 layers x 64 experts, a few seconds

Part 2 (fixture perplexity table, `--fixture WORKDIR`): the trained fixture quantized with GPTQ at
group 64 on calib_mix.txt (seed 0) as uniform 2-bit, LP at 2.5 code bits (3.0 stored), random
allocations of the same byte budget (3 seeds), LP at 3.0 code bits (3.5 stored) and uniform 3-bit; each
evaluated on the four domain test texts (first --max-tokens tokens, windows of 256). The sensitivity pass
runs once, in `moecompress quantize --allocation lp --bits 2.5`; its measured costs (run/allocation.json)
then give the LP 3.0 and random allocations through the same solver, replayed with `--plan`, which is
what `--allocation lp --bits 3.0` would quantize (the costs do not depend on the budget). Every output
lands in WORKDIR and is reused when present, so an interrupted benchmark resumes.

    python benchmarks/allocation.py --fixture /tmp/alloc_bench [--nsamples 128] [--max-tokens 16384]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from typing import Callable, Sequence

import numpy as np
from common import CALIB_MIX, DOMAINS, MODEL, domain_texts, moecompress

from moecompress.allocation import (AllocationConfig, allocate, allocation_table, build_problem, expert_costs,
                                    expert_shapes, price_candidates, random_allocation, uniform_allocation)


def synthetic_costs(L: int, E: int, bits: Sequence[int], top_k: int = 8, tokens: int = 65536, seed: int = 0):
    """(eps (L, E, C), counts (L, E), gate_mass (L, E)) shaped like calibration measurements."""
    rng = np.random.default_rng(seed)
    pop = rng.lognormal(0.0, 1.0, (L, E))  # skewed expert popularity
    pop[rng.random((L, E)) < 0.01] = 0.0  # ~1% experts never routed on the calibration set
    p = pop / pop.sum(axis=1, keepdims=True)
    counts = np.stack([rng.multinomial(tokens * top_k, p[l]) for l in range(L)]).astype(np.float64)
    gate_mass = counts * rng.uniform(0.05, 0.25, (L, E))
    sens = rng.lognormal(0.0, 0.7, (L, E)) * rng.lognormal(0.0, 0.3, (L, 1))  # expert x layer sensitivity
    b = np.asarray(bits, dtype=np.float64)
    eps = 0.1 * sens[..., None] * 4.0 ** -(b - 2.0) * rng.lognormal(0.0, 0.1, (L, E, len(bits)))
    eps[counts == 0] = np.nan  # unmeasurable, as expert_output_error reports it
    return eps, counts, gate_mass


def solver_benchmark(L: int, E: int, H: int, I: int, bits=(2, 3, 4, 8), budget_bits: float = 3.0,
                     scope: str = "model", top_two: bool = False, seed: int = 0, mip_gap: float = 1e-4) -> dict:
    cfg = AllocationConfig(candidates=tuple(bits), budget_bits=budget_bits, budget_scope=scope,
                           top_two_each=top_two, seed=seed, mip_gap=mip_gap)
    t0 = time.perf_counter()
    pricing = price_candidates(cfg.candidates, expert_shapes(H, I), L, E)
    eps, counts, mass = synthetic_costs(L, E, bits, seed=seed)
    costs = expert_costs(eps, counts, mass, cfg.alpha, cfg.beta, cfg.importance_floor)
    t_prep = time.perf_counter() - t0
    cpu0 = _cpu()
    alloc = allocate(cfg, costs.cost, pricing)
    cpu = _cpu() - cpu0
    prob = build_problem(cfg, costs.cost, pricing)
    rnd = random_allocation(prob, seed)
    uni = [uniform_allocation(prob, b) for b in bits]
    return {"layers": L, "experts": E, "candidates": [c.label for c in cfg.candidates], "binaries": L * E * len(bits),
            "budget_bits": budget_bits, "scope": scope, "top_two_each": top_two,
            "prep_seconds": round(t_prep, 3), "solve_seconds": round(alloc.solve_seconds, 3),
            "solve_cpu_seconds": round(cpu, 3), "mip_gap": mip_gap, "status": alloc.status,
            "achieved_bits": round(alloc.average_bits, 5), "budget_bytes": alloc.budget_bytes,
            "predicted_bytes": alloc.predicted_bytes, "experts_per_width": alloc.histogram(),
            "objective_lp": alloc.objective, "objective_random": rnd.objective,
            "random_bits": round(rnd.average_bits, 5),
            "objective_uniform": {u.candidates[u.choice[0][0]].label: (round(u.average_bits, 3), u.objective)
                                  for u in uni}}, alloc


def joint_solver_benchmark(L: int, E: int, H: int, I: int, budget_bits: float = 1.8, seed: int = 0,
                           mip_gap: float = 1e-4, top_k: int = 8, n_group: int = 8, per_group: int = 2) -> dict:
    """The joint program (allocation/joint.py) at DeepSeek-V3 size: 7 candidates per expert (prune, sub1 priced at
    1.0 stored bit per weight, dense ternary, int 2/3/4/8 at group 64), grouped routers (8 groups, at least 2 kept
    per group, equal counts per group, top-8), one model-wide budget of `budget_bits` stored bits per routed-expert
    parameter. Width costs as `synthetic_costs` (sub1 and ternary as widths 1.0 and 1.3); an expert's prune cost is
    its 1-bit cost times a lognormal factor around e (dropping it costs more than sub1, by a varying amount).
    Times one CBC solve (prune costs taken as additive: the re-measure rounds of a real run re-solve the same
    program, once per round)."""
    from moecompress.allocation import build_problem
    from moecompress.allocation.joint import PRUNE, build_joint, solve_joint
    from moecompress.codecs import QuantSpec
    specs = (QuantSpec("sub1", 1, 0, (("target_bits", 1.0),)), QuantSpec("ternary", 1, 0, (("fit", "mse"), ("threshold", 0.0))),
             *(QuantSpec("int", b, 64) for b in (2, 3, 4, 8)))
    cfg = AllocationConfig(candidates=specs, budget_bits=budget_bits, mip_gap=mip_gap)
    C = len(specs)
    measured = np.full((L, E, C), np.nan)
    measured[:, :, 0] = 3 * H * I / 8  # sub1: 1.0 stored bit per weight
    t0 = time.perf_counter()
    pricing = price_candidates(cfg.candidates, expert_shapes(H, I), L, E, measured_bytes=measured)
    eps, counts, mass = synthetic_costs(L, E, [1.0, 1.3, 2, 3, 4, 8], seed=seed)
    costs = expert_costs(eps, counts, mass, cfg.alpha, cfg.beta, cfg.importance_floor)
    rng = np.random.default_rng(seed + 1)
    prune_cost = costs.cost[:, :, 0] * rng.lognormal(1.0, 0.5, (L, E))
    prob = build_joint(build_problem(cfg, costs.cost, pricing), prune_cost, top_k, n_group, per_group)
    t_prep = time.perf_counter() - t0
    cpu0 = _cpu()
    res = solve_joint(prob, None, mip_gap=mip_gap)
    cpu = _cpu() - cpu0
    labels = [c.label for c in specs] + [PRUNE]
    hist = {lab: int((res.choice == i).sum()) for i, lab in enumerate(labels)}
    kept_bytes = sum(int(pricing.bytes[l, e, res.choice[l, e]]) for l in range(L) for e in range(E)
                     if res.choice[l, e] < C)
    return {"layers": L, "experts": E, "candidates": labels, "binaries": L * E * (C + 1), "budget_bits": budget_bits,
            "prep_seconds": round(t_prep, 3), "solve_seconds": round(res.seconds, 3),
            "solve_cpu_seconds": round(cpu, 3), "status": res.status, "experts_per_choice": hist,
            "achieved_bits": round(8 * kept_bytes / int(pricing.params.sum()), 5)}


def _cpu() -> float:
    """CPU seconds of this process and its finished children (CBC runs as a child process)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def fixture_perplexity_table(quantize_and_eval: Callable[[object], dict], config: AllocationConfig, costs,
                             pricing, rows=(("lp", 2.5), ("uniform", 2), ("random", 2.5),
                                            ("lp", 3.0), ("uniform", 3)), seeds=(0, 1, 2)) -> list[dict]:
    """PART 2, to be wired by the pipeline: quantize the fixture per allocation and tabulate.

    quantize_and_eval(allocation) -> dict of metrics (e.g. {"perplexity": {domain: ppl},
    "expert_bits_per_param": b}) quantizes and evaluates the fixture with that allocation.
    rows: ("lp", budget_bits) | ("random", budget_bits) (one run per seed) | ("uniform", bits).
    budget_bits are STORED bits (scales and zeros included): at group 64 uniform int2 is 2.5 stored bits,
    so "2.5 code bits" is budget_bits = 2.5 + overhead_bits(QuantSpec("int", 2, 64), shapes) = 3.0.
    Nothing is measured here; every number comes from quantize_and_eval.
    """
    out = []
    for method, value in rows:
        if method == "uniform":
            prob = build_problem(AllocationConfig(**{**_fields(config), "budget_bits": 64.0}), costs, pricing)
            runs = [(f"uniform {value}", uniform_allocation(prob, value))]
        else:
            cfg = AllocationConfig(**{**_fields(config), "budget_bits": float(value)})
            if method == "lp":
                runs = [(f"lp {value}", allocate(cfg, costs, pricing))]
            else:
                prob = build_problem(cfg, costs, pricing)
                runs = [(f"random {value} seed {s}", random_allocation(prob, s)) for s in seeds]
        for label, alloc in runs:
            out.append({"row": label, "predicted_bits": alloc.average_bits, **quantize_and_eval(alloc)})
            print(json.dumps(out[-1]))
    return out


def _fields(config: AllocationConfig) -> dict:
    return {k: getattr(config, k) for k in config.__dataclass_fields__}


def _load(path):
    with open(path) as f:
        return json.load(f)


class FixtureBench:
    """Quantize/evaluate the fixture once per distinct plan, outputs cached in `work`."""

    def __init__(self, work: str, nsamples: int, max_tokens: int, group_size: int = 64, seed: int = 0):
        self.work, self.nsamples, self.max_tokens, self.gs, self.seed = work, nsamples, max_tokens, group_size, seed
        self.model = MODEL
        self.texts = domain_texts()
        os.makedirs(work, exist_ok=True)

    def quantize(self, name: str, *extra) -> str:
        out = os.path.join(self.work, name)
        if not os.path.exists(os.path.join(out, "moecompress.json")):
            moecompress("quantize", self.model, "--out", out, "--group-size", self.gs, "--method", "gptq", "--calib",
                         CALIB_MIX, "--seed", self.seed,
                         "--nsamples", self.nsamples, *extra)
        return out

    def evaluate(self, out: str) -> dict:
        js = out + ".eval.json"
        if not os.path.exists(js):
            moecompress("eval", out, "--text", *self.texts, "--max-tokens", self.max_tokens, "--json", js)
        res = _load(js)["texts"]
        man = _load(os.path.join(out, "moecompress.json"))
        return {"perplexity": {d: round(res[t]["perplexity"], 4) for d, t in zip(DOMAINS, self.texts)},
                "expert_bits_per_param": man["expert_bits_per_param"], "out": out}

    def plan_run(self, alloc, fingerprint: str, moe_layers) -> dict:
        """Quantize with `alloc` replayed as a plan (an existing run with the same widths is reused)."""
        experts = [{"layer": int(moe_layers[l]), "expert": e, **alloc.spec(l, e).to_json()}
                   for l in range(alloc.num_layers) for e in range(len(alloc.choice[l]))]
        want = {f"{moe_layers[l]}.{e}": alloc.spec(l, e).label
                for l in range(alloc.num_layers) for e in range(len(alloc.choice[l]))}
        for name in sorted(os.listdir(self.work)):
            m = os.path.join(self.work, name, "moecompress.json")
            if os.path.isfile(m) and _load(m)["expert_bits"] == want:
                return self.evaluate(os.path.join(self.work, name))
        key = hashlib.sha256(json.dumps(experts, sort_keys=True).encode()).hexdigest()[:10]
        plan = os.path.join(self.work, f"plan-{key}.json")
        with open(plan, "w") as f:
            json.dump({"format_version": 1, "source_fingerprint": fingerprint, "experts": experts}, f)
        return self.evaluate(self.quantize(f"plan-{key}", "--plan", plan))


def run_fixture(work: str, nsamples: int, max_tokens: int, seeds=(0, 1, 2)) -> dict:
    from moecompress.allocation import overhead_bits
    from moecompress.checkpoint import CheckpointReader
    bench = FixtureBench(work, nsamples, max_tokens)
    reader = CheckpointReader(bench.model)
    bench.quantize("u2", "--bits", 2)  # a uniform run from the CLI itself
    lp = bench.quantize("lp2.5", "--bits", 2.5, "--allocation", "lp")
    rec = _load(os.path.join(lp, "run", "allocation.json"))
    cfg = AllocationConfig.from_json(rec["config"])
    moe = list(rec["moe_layers"])
    shapes = [tuple(reader.expert_shapes(i)[p] for p in ("gate", "up", "down")) for i in moe]
    pricing = price_candidates(cfg.candidates, shapes, len(moe), reader.layer_num_experts(moe[0]))
    cost = np.stack([np.array(rec["cost"][c.label]) for c in cfg.candidates], axis=-1)  # (L, E, C)
    over = overhead_bits(cfg.candidates[0], shapes[0])
    # most telling rows first (each quantize takes minutes on a shared machine); rows land in rows.jsonl
    order = [((("lp", 2.5 + over), ("uniform", 2)), ()), ((("random", 2.5 + over),), seeds[:1]),
             ((("uniform", 3), ("lp", 3.0 + over)), ()), ((("random", 2.5 + over),), seeds[1:])]
    table = []
    open(os.path.join(work, "rows.jsonl"), "w").close()
    for rows, sd in order:
        got = fixture_perplexity_table(lambda a: bench.plan_run(a, reader.fingerprint, moe), cfg, cost, pricing,
                                       rows=rows, seeds=sd)
        table += got
        with open(os.path.join(work, "rows.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in got)
    # the LP 2.5 row re-solved from the recorded costs reuses the CLI run only if it chose the same widths
    same = table[0]["out"] == lp
    return {"rows": table, "sensitivity_seconds": rec["sensitivity_seconds"], "solve_seconds": rec["solve_seconds"],
            "status": rec["status"], "lp_cli_run_reproduced": same, "nsamples": nsamples,
            "max_tokens": max_tokens, "overhead_bits": over}


def print_fixture(res: dict) -> None:
    print(f"fixture (GPTQ g64, calib_mix {res['nsamples']} windows x 256, eval first {res['max_tokens']} tokens):")
    print(f"{'row':<22} {'bits/param':>10} " + " ".join(f"{d:>8}" for d in DOMAINS))
    for r in res["rows"]:
        print(f"{r['row']:<22} {r['expert_bits_per_param']:>10.4f} " +
              " ".join(f"{r['perplexity'][d]:>8.3f}" for d in DOMAINS))
    rows = {r["row"]: r for r in res["rows"]}  # lp/random labels carry STORED bits (code bits + overhead)
    lp = [r for k, r in rows.items() if k.startswith("lp ")]
    rnd = [r for k, r in rows.items() if k.startswith("random")]
    u2, u3 = rows["uniform 2"], rows["uniform 3"]
    lp25, lp30 = lp[0], lp[-1]  # 2.5 and 3.0 code bits
    ok1 = all(lp25["perplexity"][d] < min([u2["perplexity"][d]] + [r["perplexity"][d] for r in rnd]) for d in DOMAINS)
    ok2 = all(lp30["perplexity"][d] <= u3["perplexity"][d] for d in DOMAINS)
    print(f"LP 2.5 beats uniform 2 and every random seed on every domain: {ok1}; "
          f"LP 3.0 no worse than uniform 3 on every domain: {ok2}")
    print(f"sensitivity pass {res['sensitivity_seconds']:.1f} s, solver {res['solve_seconds']:.2f} s ({res['status']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 layers x 64 experts instead of 58 x 256")
    ap.add_argument("--bits", type=float, default=3.0, help="budget, stored bits per expert parameter")
    ap.add_argument("--scope", choices=("model", "layer"), default="model")
    ap.add_argument("--top-two", action="store_true", help="MC-MoE's top-two rule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gap", type=float, default=1e-4, help="CBC relative gap (0: prove optimality)")
    ap.add_argument("--table", action="store_true", help="print the layer x expert table")
    ap.add_argument("--joint", action="store_true",
                    help="part 1 for the joint program: prune, sub1, ternary, int 2/3/4/8, grouped routers (use --bits 1.8)")
    ap.add_argument("--fixture", metavar="WORKDIR", default=None,
                    help="part 2: the fixture perplexity table, outputs kept in WORKDIR (minutes per quantize)")
    ap.add_argument("--nsamples", type=int, default=128, help="part 2: calibration windows (default 128)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="part 2: tokens evaluated per text (default 16384)")
    a = ap.parse_args()
    if a.fixture:
        res = run_fixture(a.fixture, a.nsamples, a.max_tokens)
        with open(os.path.join(a.fixture, "allocation_fixture.json"), "w") as f:
            json.dump(res, f, indent=1)
        print_fixture(res)
        return
    L, E = (8, 64) if a.quick else (58, 256)
    if a.joint:
        res = joint_solver_benchmark(L, E, 7168, 2048, budget_bits=a.bits, seed=a.seed, mip_gap=a.gap)
        print(json.dumps(res, indent=1))
        print(f"joint solver: {L}x{E}x{len(res['candidates'])} = {res['binaries']} binaries, {res['solve_seconds']:.2f} s wall, "
              f"{res['solve_cpu_seconds']:.2f} s CPU, status {res['status']}, achieved {res['achieved_bits']:.4f} of "
              f"{a.bits} stored bits/param")
        return
    res, alloc = solver_benchmark(L, E, 7168, 2048, budget_bits=a.bits, scope=a.scope, top_two=a.top_two,
                                  seed=a.seed, mip_gap=a.gap)
    if a.table:
        print(allocation_table(alloc))
    print(json.dumps(res, indent=1))
    print(f"solver: {L}x{E}x4 = {res['binaries']} binaries, {res['solve_seconds']:.2f} s wall, "
          f"{res['solve_cpu_seconds']:.2f} s CPU (target < 60 s), "
          f"status {res['status']}, achieved {res['achieved_bits']:.4f} of {a.bits} stored bits/param")
    print("part 2 (fixture perplexity table): python benchmarks/allocation.py --fixture WORKDIR")


if __name__ == "__main__":
    main()
