"""--fp-target on the package's Qwen2-MoE (issue 21): routed and shared experts at 2 bits, the defaults (`--fp-target
auto`: on at 2 bits, shared experts included) against `--fp-target 0`, over calibration seeds, on the fixture's
test texts and on the validation split (the held-back tails of calib_<domain>.txt, as `quality.py --split
validation`). Group 64, 128 x 256 tokens of calib_mix.txt; perplexity on the first --max-tokens tokens per domain,
mean over seeds and its change against the original.

    python benchmarks/fp_target_qwen.py --json /tmp/fp_target_qwen.json       # seeds 0 1 2, ~15 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import DOMAINS, FIX, cli, evaluate, validation_texts  # noqa: E402

MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moecompress", "data", "qwen2moe-tiny")
VARIANTS = {"defaults": [], "fp-target 0": ["--fp-target", "0"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--json")
    a = ap.parse_args()
    calib = os.path.join(FIX, "text", "calib_mix.txt")
    with tempfile.TemporaryDirectory(prefix="moec-fpq-") as work:
        splits = {"test": {d: os.path.join(FIX, "text", f"{d}_test.txt") for d in DOMAINS},
                  "validation": validation_texts(calib, work)}
        base = {s: evaluate(MODEL, t, a.max_tokens, work, f"original-{s}") for s, t in splits.items()}
        cells = []
        for seed in a.seeds:
            for name, extra in VARIANTS.items():
                out = os.path.join(work, f"{name.replace(' ', '')}-s{seed}")
                cli("quantize", MODEL, "--out", out, "--bits", 2, "--group-size", 64, "--calib", calib,
                    "--nsamples", a.nsamples, "--seed", seed, *extra)
                cell = {"variant": name, "seed": seed,
                        **{s: evaluate(out, t, a.max_tokens, work, f"{name}-{s}-{seed}") for s, t in splits.items()}}
                cells.append(cell)
                print(f"{name:12s} seed {seed}: " + "; ".join(
                    f"{s} " + " ".join(f"{cell[s][d]['perplexity']:.3f}" for d in DOMAINS) for s in splits), flush=True)
    print(f"\nqwen2moe-tiny, routed and shared experts at 2 bits, g64, {a.nsamples} x 256 tokens, seeds {a.seeds}, "
          f"{a.max_tokens} tokens per domain: mean perplexity (change against the original)")
    for s in splits:
        print(f"{s:10s} original     " + "  ".join(f"{base[s][d]['perplexity']:8.3f}          " for d in DOMAINS))
        for name in VARIANTS:
            mine = [c for c in cells if c["variant"] == name]
            row = []
            for d in DOMAINS:
                m = sum(c[s][d]["perplexity"] for c in mine) / len(mine)
                row.append(f"{m:8.3f} ({100 * (m / base[s][d]['perplexity'] - 1):+.2f}%)")
            print(f"{s:10s} {name:12s} " + "  ".join(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"original": base, "cells": cells, "nsamples": a.nsamples, "max_tokens": a.max_tokens}, f, indent=1)


if __name__ == "__main__":
    main()
