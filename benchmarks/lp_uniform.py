"""LP over bit widths against uniform widths (issue 22, first bar), several models, several seeds.

For each model (`--models`: the shared fixture `mixtral-wiki4` and the package's trained Qwen2-MoE with shared
experts `qwen2moe-tiny`) and each calibration seed (`--seeds`, default 0 1 2), four `moecompress quantize` runs with
GPTQ at group 64 and the current defaults otherwise, shared experts kept dense (`--shared-bits 0`) in every run:

    uniform 2      --bits 2                       2.5 stored bits per routed-expert parameter
    lp 3.0         --bits 2.5 --allocation lp     3.0 stored bits (the program's default cost, candidates 2/3/4/8)
    uniform 3      --bits 3                       3.5 stored bits
    lp 3.5         --bits 3.0 --allocation lp     3.5 stored bits

each evaluated by `moecompress eval` on the first `--max-tokens` tokens of the four held-out `*_test` texts (windows
of 256). Calibration: calib_mix.txt, `--nsamples` windows of 256 tokens drawn with the seed.

The bars, per domain on the mean over seeds of log perplexity (decided before the runs): lp 3.0 below the line
between uniform 2 (2.5 b) and uniform 3 (3.5 b), i.e. below the mean of their log perplexities; lp 3.5 no worse
than uniform 3. Per-seed outcomes are printed too. Every output stays in WORKDIR and is reused, so a rerun resumes.

    python benchmarks/lp_uniform.py --work /tmp/lp_uniform [--models mixtral-wiki4 qwen2moe-tiny] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import math
import os

from common import CALIB_MIX, DOMAINS, HERE, MODEL, domain_texts, moecompress

MODELS = {"mixtral-wiki4": MODEL, "qwen2moe-tiny": os.path.join(HERE, "..", "moecompress", "data", "qwen2moe-tiny")}
RUNS = (("uniform 2", 2.5, ("--bits", 2)), ("lp 3.0", 3.0, ("--bits", 2.5, "--allocation", "lp")),
        ("uniform 3", 3.5, ("--bits", 3)), ("lp 3.5", 3.5, ("--bits", 3.0, "--allocation", "lp")))


def run_one(work: str, model: str, seed: int, label: str, extra, nsamples: int, max_tokens: int) -> dict:
    out = os.path.join(work, f"{label.replace(' ', '')}-s{seed}")
    rec = out + ".json"
    if os.path.exists(rec):
        with open(rec) as f:
            return json.load(f)
    secs = None
    if not os.path.exists(os.path.join(out, "moecompress.json")):
        secs = moecompress("quantize", model, "--out", out, "--group-size", 64, "--method", "gptq", "--calib",
                           CALIB_MIX, "--seed", seed, "--nsamples", nsamples, "--shared-bits", 0, *extra)
    js = out + ".eval.json"
    moecompress("eval", out, "--text", *domain_texts(), "--max-tokens", max_tokens, "--json", js)
    with open(js) as f:
        res = json.load(f)["texts"]
    with open(os.path.join(out, "moecompress.json")) as f:
        man = json.load(f)
    r = {"row": label, "seed": seed, "quantize_seconds": secs, "expert_bits_per_param": man["expert_bits_per_param"],
         "perplexity": {d: res[t]["perplexity"] for d, t in zip(DOMAINS, domain_texts())}}
    with open(rec, "w") as f:
        json.dump(r, f)
    return r


def verdict(rows: list[dict], seeds) -> dict:
    """Per domain: mean over seeds of log perplexity per row; the two bars; per-seed outcomes."""
    lp = {(r["row"], r["seed"]): {d: math.log(v) for d, v in r["perplexity"].items()} for r in rows}
    out = {}
    for d in DOMAINS:
        mean = {name: sum(lp[(name, s)][d] for s in seeds) / len(seeds) for name, _, _ in RUNS}
        line = (mean["uniform 2"] + mean["uniform 3"]) / 2
        per_seed_1 = [lp[("lp 3.0", s)][d] < (lp[("uniform 2", s)][d] + lp[("uniform 3", s)][d]) / 2 for s in seeds]
        per_seed_2 = [lp[("lp 3.5", s)][d] <= lp[("uniform 3", s)][d] for s in seeds]
        out[d] = {"mean_log_ppl": mean, "line_3.0": line, "lp3.0_below_line": mean["lp 3.0"] < line,
                  "lp3.5_no_worse_than_u3": mean["lp 3.5"] <= mean["uniform 3"],
                  "per_seed_lp3.0_below_line": per_seed_1, "per_seed_lp3.5_le_u3": per_seed_2}
    return out


def print_model(name: str, rows: list[dict], seeds, v: dict) -> None:
    print(f"\n{name}: perplexity, mean over seeds {list(seeds)} (exp of mean log ppl)")
    print(f"{'row':<10} {'stored b':>8} " + " ".join(f"{d:>9}" for d in DOMAINS) + "  quantize s (mean)")
    for label, stored, _ in RUNS:
        rs = [r for r in rows if r["row"] == label]
        secs = [r["quantize_seconds"] for r in rs if r["quantize_seconds"] is not None]
        print(f"{label:<10} {rs[0]['expert_bits_per_param']:>8.3f} " +
              " ".join(f"{math.exp(v[d]['mean_log_ppl'][label]):>9.3f}" for d in DOMAINS) +
              (f"  {sum(secs) / len(secs):.0f}" if secs else ""))
    print(f"{'line 3.0':<10} {3.0:>8.3f} " + " ".join(f"{math.exp(v[d]['line_3.0']):>9.3f}" for d in DOMAINS))
    for key, text in (("lp3.0_below_line", "lp 3.0 below the uniform 2-3 line"),
                      ("lp3.5_no_worse_than_u3", "lp 3.5 no worse than uniform 3")):
        per = "per_seed_lp3.0_below_line" if key.startswith("lp3.0") else "per_seed_lp3.5_le_u3"
        print(f"{text}: " + ", ".join(f"{d} {'yes' if v[d][key] else 'NO'} (seeds {sum(v[d][per])}/{len(seeds)})"
                                        for d in DOMAINS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/lp_uniform")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = {"nsamples": a.nsamples, "max_tokens": a.max_tokens, "seeds": a.seeds, "models": {}}
    for name in a.models:
        work = os.path.join(a.work, name)
        os.makedirs(work, exist_ok=True)
        rows = [run_one(work, MODELS[name], s, label, extra, a.nsamples, a.max_tokens)
                for s in a.seeds for label, _, extra in RUNS]
        v = verdict(rows, a.seeds)
        result["models"][name] = {"rows": rows, "verdict": v}
        print_model(name, rows, a.seeds, v)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
