"""Quality side by side on the trained fixture (issue 21): the original, round-to-nearest, our GPTQ with its
defaults, with each option alone and all combined, and llm-compressor's GPTQ, at 4, 3 and 2 bits, on the
four domains, over calibration seeds (mean +- standard error).

    # the headline run (hours on 2 cores): every row, 4/3/2 bits, seeds 0 1 2, 32,768 tokens per domain
    python benchmarks/quality.py --json /tmp/quality.json
    # choosing defaults: the same on held-back parts of the calibration texts, never on the *_test texts
    python benchmarks/quality.py --split validation --json /tmp/quality_val.json
    # a subset: two options, one width, no peer
    python benchmarks/quality.py --options act-order grid-mse --bits 2 --rows original gptq options
    # an option with other arguments than the table's: NAME=ARGS
    python benchmarks/quality.py --options "all-tokens=--all-tokens 0.25"
    # smoke: 1 seed, 2 bits, 4,096 tokens per domain, 16 calibration windows
    python benchmarks/quality.py --smoke

Protocol (fixed): the fixture mixtral-wiki4, experts only, group 64, asymmetric grids, calibration 128
windows of 256 tokens of calib_mix.txt drawn by moecompress's random sampler with the cell's seed.
Rows (--rows): original; rtn (`--method rtn`, no calibration: one run per width, whatever --seeds);
gptq (`moecompress quantize` defaults); options: gptq plus one entry of OPTIONS each (an option whose flag
`moecompress quantize --help` does not list is skipped with a note); combined: gptq plus every option that
ran (--combined picks others); llmc: llm-compressor 0.14's GPTQModifier `oneshot` (its defaults; same bits,
group size, asymmetric, on the same token windows, `moecompress.api.calibration_windows` handed over as a
file; benchmarks/scale_peer.py in its own virtual environment, benchmarks/peer.py).

Columns: bits/param is counted from the files on disk for both tools, over the same denominator (the
original checkpoint's expert weights): ours, every stored tensor of the expert projections (codes, scales,
zeros and anything else under `.experts.`, the transformers guard placeholders left out; checked against
moecompress.json's expert_bits_per_param); llm-compressor's, its weight_packed, weight_scale and
weight_zero_point tensors (weight_shape, two int64 per Linear, is metadata). Quantize seconds: the child
process from start to exit for ours (import, load, calibrate, quantize, save); llm-compressor's phases from
import to its saved checkpoint. Perplexity: `moecompress eval` (non-overlapping windows of 256 tokens,
float32) on the first --max-tokens tokens of each domain, for every row: llm-compressor's checkpoint is
first decompressed (compressed-tensors' own decompress, float32 scales, checked against the weights it
holds in memory) into a dense checkpoint of the original layout, so both tools go through the same
evaluation code and windows. Change: per seed against the original, then mean +- standard error.

--split test (default) evaluates on the *_test texts. --split validation evaluates on the held-back tails
of calib_{prose,verse,c,python}.txt: calib_mix.txt is the first 150,000 characters of each of them joined
by blank lines (checked at run time, with a scan that no part of a tail occurs in the calibration text),
so every character from 150,000 on is never calibrated on by either tool.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

from common import CALIB_MIX, DOMAINS, FIX, MODEL, domain_texts, mean_se
from peer import PEER_VENV, ct_expert_bytes, ensure_peer_venv, expert_params, run_child, run_peer, tail, write_windows

TEXTS = dict(zip(DOMAINS, domain_texts()))
GROUP = 64
VAL_FROM = 150_000  # characters of each calib_<domain>.txt that calib_mix.txt holds
# name -> extra `moecompress quantize` arguments; the first is the flag looked up in --help
OPTIONS = {
    "act-order": ["--act-order"],
    "affinity": ["--affinity"],
    "hessian-prior": ["--hessian-prior", "1"],
    "all-tokens": ["--all-tokens", "1"],  # L = 1: the all-token terms weigh what the routed ones do
    "grid-mse": ["--grid", "mse"],
    "rotate": ["--rotate"],
    "sweeps": ["--sweeps", "4"],  # coordinate descent after GPTQ (quant/coord.py)
    "fp-target": ["--fp-target", "1"],  # GPTQ aimed at the unquantized model's outputs (quant/target.py; auto: at <= 2 bits)
    "no-fp-target": ["--fp-target", "0"],  # the defaults before --fp-target auto
}
ROWS = ("original", "rtn", "gptq", "options", "combined", "llmc")


def cli(*args):
    """Run `moecompress ARGS...` quietly; on failure exit with its last line. Also used by sub1bit.py."""
    args = [str(a) for a in args]
    r = subprocess.run([sys.executable, "-m", "moecompress.cli", "-q", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"moecompress {' '.join(args[:2])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")
    return r.stdout


def evaluate(model: str, texts: dict, max_tokens: int, work: str, name: str) -> dict:
    """{domain: {"perplexity", "tokens"}} of `moecompress eval`."""
    out = os.path.join(work, name + ".eval.json")
    cli("eval", model, "--text", *texts.values(), "--max-tokens", str(max_tokens), "--json", out)
    res = json.load(open(out))["texts"]
    return {d: {"perplexity": res[t]["perplexity"], "tokens": res[t]["tokens"]} for d, t in texts.items()}


def validation_texts(calib: str, work: str) -> dict:
    """The held-back tails of calib_<domain>.txt as files in `work`; exits when the calibration text is not
    the heads they are held back from or holds any part of a tail."""
    text = open(calib, encoding="utf-8").read()
    heads, out = [], {}
    for d in DOMAINS:
        full = open(os.path.join(FIX, "text", f"calib_{d}.txt"), encoding="utf-8").read()
        heads.append(full[:VAL_FROM])
        tail_text = full[VAL_FROM:]
        if any(tail_text[i:i + 200] in text for i in range(0, max(1, len(tail_text) - 200), 2000)):
            sys.exit(f"--split validation: {calib} holds part of calib_{d}.txt after character {VAL_FROM}")
        out[d] = os.path.join(work, f"val_{d}.txt")
        with open(out[d], "w", encoding="utf-8") as f:
            f.write(tail_text)
    if text != "\n\n".join(heads):
        print(f"note: {calib} is not calib_mix.txt's layout; the tails were checked not to occur in it")
    return out


def our_bits(out: str, params: int) -> tuple[float, float]:
    """(bits/param counted from the packed files, moecompress.json's expert_bits_per_param)."""
    from safetensors import safe_open
    man = json.load(open(os.path.join(out, "moecompress.json")))
    guard = set(man.get("guard", []))
    total = 0
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors") and f != "moecompress-guard.safetensors":
            with safe_open(os.path.join(out, f), "pt") as s:
                for k in s.keys():
                    if k not in guard and re.search(r"\.(shared_)?experts?\.", k):
                        sl = s.get_slice(k)
                        total += math.prod(sl.get_shape()) * {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4,
                                                              "I32": 4, "I16": 2, "U16": 2, "I64": 8}[sl.get_dtype()]
    return 8 * total / params, man["expert_bits_per_param"]


def run_ours(row: str, extra: list[str], bits: int, seed: int, a, texts: dict, params: int, env: dict) -> dict:
    out = os.path.join(a.workdir, re.sub(r"[^\w-]+", "_", row) + f"-b{bits}-s{seed}")
    method = ["--method", "rtn"] if row == "rtn" else []
    cmd = [sys.executable, "-m", "moecompress.cli", "-q", "quantize", MODEL, "--out", out, "--bits", str(bits),
           "--group-size", str(GROUP), *method, "--calib", a.calib, "--nsamples", str(a.nsamples),
           "--seqlen", str(a.seqlen), "--seed", str(seed), *extra]
    shutil.rmtree(out, ignore_errors=True)
    r = run_child(cmd, out + ".log", env, cwd=a.workdir)
    cell = {"row": row, "tool": "moecompress", "bits": bits, "seed": seed, "args": extra,
            "cmd": " ".join(cmd[2:]), "seconds": round(r["seconds"], 2), "ok": r["rc"] == 0}
    if r["rc"]:
        cell["error"] = tail(r["log"], 1).strip()
        return cell
    cell["bits_per_param"], cell["bits_per_param_manifest"] = our_bits(out, params)
    cell["eval"] = evaluate(out, texts, a.max_tokens, a.workdir, os.path.basename(out))
    if not a.keep:
        shutil.rmtree(out)
    return cell


def run_llmc(py: str, bits: int, seed: int, a, texts: dict, params: int, env: dict) -> dict:
    wf = os.path.join(a.workdir, f"windows-s{seed}.safetensors")  # the exact windows quantize draws
    if not os.path.exists(wf):
        write_windows(MODEL, types.SimpleNamespace(calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=seed), wf)
    out, dense = os.path.join(a.workdir, f"llmc-b{bits}-s{seed}"), os.path.join(a.workdir, f"llmc-b{bits}-s{seed}-dense")
    r = run_peer(py, MODEL, out, wf, types.SimpleNamespace(bits=bits, group_size=GROUP, device="cpu"), env, dense=dense)
    res = r["result"]
    cell = {"row": "llmc", "tool": "llm-compressor", "bits": bits, "seed": seed, "cmd": r["cmd"],
            "seconds": (res.get("phases") or {}).get("total"), "child_seconds": round(r["seconds"], 2),
            "ok": r["rc"] == 0, "phases": res.get("phases"), "versions": res.get("versions"), "dense": res.get("dense")}
    if r["rc"]:
        cell["error"] = tail(r["log"], 1).strip()
        return cell
    cell["bits_per_param"] = 8 * ct_expert_bytes(out) / params
    cell["eval"] = evaluate(dense, texts, a.max_tokens, a.workdir, os.path.basename(out))
    if not a.keep:
        shutil.rmtree(out)
        shutil.rmtree(dense)
    return cell


def parse_options(specs: list[str], help_text: str) -> tuple[dict, dict]:
    """({name: args} that quantize accepts, {name: why skipped})."""
    run, skipped = {}, {}
    for s in specs:
        name, sep, args = s.partition("=")
        if not sep and name not in OPTIONS:
            sys.exit(f"--options: unknown option {name!r}; choose from {', '.join(OPTIONS)} or give NAME=ARGS")
        argv = args.split() if sep else OPTIONS[name]
        if not argv or not argv[0].startswith("--"):
            sys.exit(f"--options {s!r}: ARGS must start with a quantize flag")
        if re.search(rf"(^|\s|\[){re.escape(argv[0])}(\s|\]|$|=)", help_text, re.M):
            run[name] = argv
        else:
            skipped[name] = f"`moecompress quantize` has no {argv[0]} yet"
    return run, skipped


def fmt_cell(vals: list[float], pcts: list[float]) -> str:
    if not vals:
        return "n/a"
    m, _ = mean_se(vals)
    pm, pse = mean_se(pcts)
    return f"{m:8.3f} ({pm:+6.2f}" + (f"±{pse:.2f}%)" if not math.isnan(pse) else "%)     ")


def print_table(res: dict) -> None:
    base = {d: res["original"][d]["perplexity"] for d in DOMAINS}
    order = ["rtn", "gptq"] + [f"gptq +{n}" for n in res["options_run"]] + ["combined", "llmc"]
    print(f"\n{res['protocol']}")
    for note in res["notes"]:
        print(f"note: {note}")
    head = f"{'row':24s} {'n':>2s} {'bits/param':>10s} {'quant s':>8s} " + " ".join(f"{d:>24s}" for d in DOMAINS)
    for bits in res["args"]["bits"]:
        print(f"\n{bits} bits, group {GROUP}, asymmetric\n{head}")
        print(f"{'original':24s} {'':>2s} {16.0:10.3f} {'':>8s} " + " ".join(f"{base[d]:8.3f}{'':16s}" for d in DOMAINS))
        for row in order:
            cells = [c for c in res["cells"] if c["row"] == row and c["bits"] == bits]
            if not cells:
                continue
            ok = [c for c in cells if c["ok"]]
            if not ok:
                print(f"{row:24s} {len(cells):2d} FAILED: {cells[0].get('error', '')[:120]}")
                continue
            bpp = mean_se([c["bits_per_param"] for c in ok])[0]
            secs = [c["seconds"] for c in ok if c["seconds"] is not None]
            line = f"{row:24s} {len(ok):2d} {bpp:10.3f} {(mean_se(secs)[0] if secs else float('nan')):8.1f} "
            line += " ".join(fmt_cell([c["eval"][d]["perplexity"] for c in ok],
                                      [100 * (c["eval"][d]["perplexity"] / base[d] - 1) for c in ok]) for d in DOMAINS)
            print(line + ("" if len(ok) == len(cells) else f"  ({len(cells) - len(ok)} failed)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds (default 0 1 2)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32768, help="tokens evaluated per domain (default 32768)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--options", nargs="+", default=list(OPTIONS), metavar="NAME|NAME=ARGS",
                    help=f"options run alone, from {', '.join(OPTIONS)}, or NAME=ARGS (default: all)")
    ap.add_argument("--combined", nargs="+", metavar="NAME",
                    help="options the combined row joins (default: every --options entry that ran, but no-*)")
    ap.add_argument("--split", choices=("test", "validation"), default="test")
    ap.add_argument("--calib", default=CALIB_MIX, help="calibration text (default: the fixture's calib_mix.txt)")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 bits, 4,096 tokens per domain, 16 windows")
    ap.add_argument("--peer-venv", default=PEER_VENV)
    ap.add_argument("--workdir", help="outputs and logs (default: a temporary directory, deleted)")
    ap.add_argument("--keep", action="store_true", help="keep every checkpoint")
    ap.add_argument("--json", help="write every raw per-seed number here (rewritten after each cell)")
    a = ap.parse_args()
    if a.smoke:
        a.seeds, a.bits, a.max_tokens, a.nsamples = [a.seeds[0]], [2], 4096, 16
    tmp = None
    if not a.workdir:
        a.workdir = tmp = tempfile.mkdtemp(prefix="moec-quality-")
    os.makedirs(a.workdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    try:
        run(a, env)
    finally:
        if tmp and not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def run(a, env: dict) -> None:
    help_text = subprocess.run([sys.executable, "-m", "moecompress.cli", "quantize", "--help"], capture_output=True,
                               text=True, cwd=a.workdir).stdout
    opts, skipped = parse_options(a.options, help_text)
    notes = [f"option {n} skipped: {why}" for n, why in skipped.items()]
    for n in notes:
        print(n, flush=True)
    # by default every option that ran except those undoing a default ("no-..."), which the others contradict
    combined = {n: opts[n] for n in (a.combined or [n for n in opts if not n.startswith("no-")]) if n in opts}
    for n in a.combined or []:
        if n not in opts:
            notes.append(f"combined: {n} left out (not run alone or skipped)")
    texts = TEXTS if a.split == "test" else validation_texts(a.calib, a.workdir)
    params = expert_params(MODEL)
    protocol = (f"fixture mixtral-wiki4 ({params:,} expert params), group {GROUP}, asymmetric; calibration "
                f"{a.nsamples} x {a.seqlen} tokens of {os.path.basename(a.calib)}, seeds {a.seeds}; {a.split} split, "
                f"first {a.max_tokens} tokens per domain, windows of 256, float32; mean ± standard error over seeds")
    res = {"args": vars(a), "protocol": protocol, "notes": notes, "texts": texts, "expert_params": params,
           "options_run": opts, "options_skipped": skipped, "combined": combined, "cells": []}

    def save():
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)

    t0 = time.time()
    res["original"] = evaluate(MODEL, texts, a.max_tokens, a.workdir, "original")
    print("original: " + ", ".join(f"{d} {v['perplexity']:.3f}" for d, v in res["original"].items()), flush=True)
    save()
    peer_py = ensure_peer_venv(a.peer_venv) if "llmc" in a.rows else None
    if "llmc" in a.rows and not peer_py:
        notes.append("llm-compressor skipped: no virtual environment")
    plan = []
    for bits in a.bits:
        if "rtn" in a.rows:
            plan.append(("rtn", [], bits, a.seeds[0]))
        for seed in a.seeds:
            if "gptq" in a.rows:
                plan.append(("gptq", [], bits, seed))
            if "options" in a.rows:
                plan += [(f"gptq +{n}", argv, bits, seed) for n, argv in opts.items()]
            if "combined" in a.rows and len(combined) > 1:
                plan.append(("combined", [x for argv in combined.values() for x in argv], bits, seed))
            if peer_py:
                plan.append(("llmc", None, bits, seed))
    for i, (row, extra, bits, seed) in enumerate(plan, 1):
        if row == "llmc":
            cell = run_llmc(peer_py, bits, seed, a, texts, params, env)
        else:
            cell = run_ours(row, extra, bits, seed, a, texts, params, env)
        res["cells"].append(cell)
        save()
        if cell["ok"]:
            ppl = ", ".join(f"{d} {v['perplexity']:.3f}" for d, v in cell["eval"].items())
            print(f"[{i}/{len(plan)} {time.time() - t0:.0f}s] {row} {bits}-bit seed {seed}: {cell['seconds']}s, "
                  f"{cell['bits_per_param']:.3f} bits/param, {ppl}", flush=True)
        else:
            print(f"[{i}/{len(plan)}] {row} {bits}-bit seed {seed}: FAILED: {cell.get('error')}", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    save()
    print_table(res)
    if a.json:
        print(f"\nraw numbers: {a.json}")


if __name__ == "__main__":
    main()
