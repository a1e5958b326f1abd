"""Perplexity of GPTQ and round-to-nearest on every domain text of the trained fixture (issue: foundation).

    python benchmarks/quality.py [--nsamples 128] [--max-tokens 32768] [--bits 4 3 2]

Quantizes the fixture's experts with `moecompress quantize` (group 64, mixed-domain calibration text,
seed 0) by GPTQ and by round-to-nearest, evaluates the original and every packed model on the four test
texts (non-overlapping windows of 256 tokens, fp32), and prints one table: perplexity and change against
the original, plus the packed `expert_bits_per_param`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import CALIB_MIX, DOMAINS, MODEL, domain_texts

TEXTS = dict(zip(DOMAINS, domain_texts()))


def cli(*args):
    """Run `moecompress ARGS...` quietly; on failure exit with its last line. Also used by sub1bit.py."""
    args = [str(a) for a in args]
    r = subprocess.run([sys.executable, "-m", "moecompress.cli", "-q", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"moecompress {' '.join(args[:2])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    return r.stdout


def evaluate(model, max_tokens, work, name):
    out = os.path.join(work, name + ".json")
    cli("eval", model, "--text", *TEXTS.values(), "--max-tokens", str(max_tokens), "--json", out)
    res = json.load(open(out))["texts"]
    return {d: res[t]["perplexity"] for d, t in TEXTS.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=["gptq", "rtn"])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moec-quality-") as work:
        rows = {"original": (16.0, evaluate(MODEL, a.max_tokens, work, "fp"))}
        for b in a.bits:
            for m in a.methods:
                out = os.path.join(work, f"{m}{b}")
                cli("quantize", MODEL, "--out", out, "--bits", str(b), "--group-size", "64", "--method", m,
                    "--calib", CALIB_MIX, "--nsamples", str(a.nsamples), "--seed", "0")
                bits = json.load(open(os.path.join(out, "moecompress.json")))["expert_bits_per_param"]
                rows[f"{m} {b}-bit"] = (bits, evaluate(out, a.max_tokens, work, f"{m}{b}"))
                print(f"done: {m} {b}-bit", flush=True)
    base = rows["original"][1]
    print(f"\nfixture mixtral-wiki4, group 64, calibration calib_mix ({a.nsamples} x 256 tokens, seed 0), "
          f"eval: first {a.max_tokens} tokens, windows of 256")
    print(f"{'model':14s} {'bits/param':>10s} " + " ".join(f"{d:>18s}" for d in TEXTS))
    for name, (bits, p) in rows.items():
        cells = " ".join(f"{p[d]:9.3f} ({100 * (p[d] / base[d] - 1):+5.1f}%)" for d in TEXTS)
        print(f"{name:14s} {bits:10.3f} {cells}")


if __name__ == "__main__":
    main()
