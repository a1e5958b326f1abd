"""Perplexity per domain after expert pruning / merging on the trained fixture (8 -> 6 and 8 -> 4).

    python benchmarks/merge.py [--fixture DIR] [--tokens 16384] [--nsamples 128] [--seqlen 256]
                               [--cuts 6,4] [--methods frequency,reap,average,msmoe,hcsmoe]
                               [--variants] [--json out.json]

Every row is what a user gets: `moecompress.merge.pipeline.run_merge` (the code behind `moecompress
merge/prune --experts K`) writes the reduced checkpoint from `nsamples` random windows of `seqlen`
tokens of calib_mix.txt (seed 0, layer by layer), and the written checkpoint (bf16, as on disk) is
loaded with plain transformers and evaluated in fp32 on the first `tokens` tokens of each domain's
test text, non-overlapping windows of 256 tokens. `--variants` also measures how the router treats a
merged group (merged router row: dominant / lse / mean / weighted) and the least-squares refit of the
down projections (on / off) for reap, msmoe and hcsmoe at the first cut. Without --variants, REAP is
also run without the refit ("refit=False", REAP as published) at every cut.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch

from common import DOMAINS, MODEL  # also puts the project root on sys.path
from moecompress.merge import METHODS
from moecompress.merge.pipeline import run_merge


@torch.no_grad()
def perplexity(model, ids, seqlen=256):
    n = ids.numel() // seqlen
    x = ids[: n * seqlen].view(n, seqlen)  # (n, seqlen) non-overlapping windows
    nll = 0.0
    for b in x.split(16):
        nll += model(b, labels=b).loss.item() * b.shape[0]
    return math.exp(nll / n)


def evaluate(path, tests):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return {d: perplexity(model, ids) for d, ids in tests.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=MODEL)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cuts", default="6,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    text = os.path.join(a.fixture, "..", "text")
    tok = transformers.AutoTokenizer.from_pretrained(a.fixture)
    tests = {d: torch.tensor(tok(open(os.path.join(text, f"{d}_test.txt"), encoding="utf-8").read())["input_ids"][: a.tokens])
             for d in DOMAINS}
    from moecompress.config import CalibConfig
    calib = CalibConfig((os.path.join(text, "calib_mix.txt"),), a.nsamples, a.seqlen, seed=0)
    rows = {"original": evaluate(a.fixture, tests)}
    cuts = [int(k) for k in a.cuts.split(",")]
    configs = [(K, m, {}) for K in cuts for m in a.methods.split(",")]
    if not a.variants:  # REAP as published (no refit) beside ours, at every cut
        configs += [(K, "reap", {"refit": False}) for K in cuts if "reap" in a.methods.split(",")]
    if a.variants:
        configs += [(cuts[0], m, {"router_mode": r}) for m in ("msmoe", "hcsmoe") for r in ("lse", "mean", "weighted")]
        configs += [(cuts[0], m, {"refit": False}) for m in ("reap", "msmoe", "hcsmoe")]
    E = json.load(open(os.path.join(a.fixture, "config.json")))["num_local_experts"]
    with tempfile.TemporaryDirectory() as tmp:
        for K, method, kw in configs:
            name = f"{E}->{K} {method}" + "".join(f" {k}={v}" for k, v in kw.items())
            out = os.path.join(tmp, name.replace(" ", "_").replace(">", ""))
            t0 = time.time()
            run_merge(a.fixture, out, experts=K, method=method, calib=calib, progress=False, **kw)
            rec = json.load(open(os.path.join(out, "run", "merge_record.json")))
            rows[name] = evaluate(out, tests)
            print(f"{name}: " + " ".join(f"{rows[name][d]:.2f}" for d in DOMAINS) + f" ({time.time() - t0:.0f} s) "
                  f"layer-0 groups {rec['layers'][0]['groups']}", file=sys.stderr, flush=True)
    base = rows["original"]
    print(f"\nperplexity, first {a.tokens} tokens per domain, windows of 256, fp32 eval of the written bf16 checkpoint;"
          f" run_merge on {a.nsamples}x{a.seqlen} random tokens of calib_mix.txt, seed 0\n")
    print("| model | " + " | ".join(DOMAINS) + " | mean change |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for name, r in rows.items():
        ch = sum(r[d] / base[d] - 1 for d in DOMAINS) / len(DOMAINS)
        print(f"| {name} | " + " | ".join(f"{r[d]:.2f}" for d in DOMAINS) + f" | {ch:+.1%} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
