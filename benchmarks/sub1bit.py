"""Sub-1-bit experts on the fixture: zero fraction, entropy bound, achieved bits, decode throughput.

Reads the fixture's expert weights directly (safetensors), ternarizes them per row with RTN on the
TernaryGrid at a few thresholds, builds one dictionary for the whole model, packs every expert matrix
with encode_ternary (automatic sub1 / dense choice) and prints, per threshold:

    zero fraction, order-0 pair entropy (bits/weight), codeword bits/weight, coder / entropy,
    total bits/weight (codewords + row counts + fp16 lo/hi + the dictionary once), sub1 share,
    CPU reference decode throughput in MB of packed data per second, and an exactness check.

    python benchmarks/sub1bit.py [--thresholds 0.3 0.35] [--model DIR]

With --pipeline WORKDIR it measures the real thing instead: `moecompress quantize --method ternary` at
--bits 1 (sub1 under a 1-bit budget, everything counted) and --bits 1.6 (dense ternary), GPTQ 2-bit
(group 64), the LP allocation with sub1 among its candidates (`--allocation lp --candidates sub1,2,3`
at --bits 1.5 and 2, i.e. 2.0 and 2.5 stored bits per weight) and the original, all calibrated on
calib_mix (128 x 256, seed 0); perplexity on the four
domain texts; greedy generations of a few prompts side by side; and, on the packed sub1 model's own
codes: zero fraction, order-0 pair entropy, codeword bits and their ratio, bits per weight on disk
(files counted as the acceptance check counts them) and the CPU decode throughput. Outputs in WORKDIR
are reused when present.

    python benchmarks/sub1bit.py --pipeline /tmp/sub1_bench [--max-tokens 16384] [--new-tokens 24]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from safetensors import safe_open

from moecompress.codecs import decode
from moecompress.codecs import sub1_dict as sd
from moecompress.codecs.ternary import encode_ternary, encoded_nbytes, get_codes
from moecompress.quant.gptq import rtn
from moecompress.quant.ternary import TernaryGrid, zero_fraction
from common import CALIB_MIX, DOMAINS, MODEL  # benchmarks/ is on sys.path when this runs as a script
from quality import TEXTS, cli


def load_experts(model_dir: str) -> dict:
    """-> {(layer, proj): (E, N, K) float32} for Mixtral block_sparse_moe experts."""
    out = {}
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        keys = [k for k in f.keys() if ".block_sparse_moe.experts." in k]
        layers = sorted({int(k.split(".")[2]) for k in keys})
        experts = sorted({int(k.split(".")[5]) for k in keys})
        for i in layers:
            for p in ("w1", "w2", "w3"):
                out[(i, p)] = torch.stack([f.get_tensor(f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight").float()
                                           for e in experts])  # E x (N, K) -> (E, N, K)
    return out


def run(W: dict, threshold: float, repeats: int = 3) -> dict:
    res = [rtn(w, TernaryGrid(threshold=threshold), w.shape[2]) for w in W.values()]
    mats = [(r.codes[e], r.zero[e], r.scale[e]) for r in res for e in range(r.codes.shape[0])]  # (codes, lo, hi)
    codes = [m[0] for m in mats]
    nw = sum(c.numel() for c in codes)
    t0 = time.perf_counter()
    d = sd.build_dictionary(codes)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = [encode_ternary(c, lo, hi, 0, d) for c, lo, hi in mats]
    t_enc = time.perf_counter() - t0
    exact = all(torch.equal(get_codes(p), c) and torch.equal(decode(p), r)
                for p, c, r in zip(packed, codes, [r.deq[e] for r in res for e in range(r.deq.shape[0])]))
    decode(packed[0])  # warm the dictionary's expansion-table cache
    t0 = time.perf_counter()
    for _ in range(repeats):
        for p in packed:
            decode(p)
    t_dec = (time.perf_counter() - t0) / repeats
    nbytes = sum(encoded_nbytes(p) for p in packed)
    cw_bits = sum(8 * p.tensors["codewords"].numel() for p in packed if p.codec == "sub1")
    sub1_w = sum(p.shape[0] * p.shape[1] for p in packed if p.codec == "sub1")
    ent = sum(sd.pair_entropy(c) * c.numel() for c in codes) / nw
    return {
        "threshold": threshold, "zero_fraction": sum(zero_fraction(c) * c.numel() for c in codes) / nw,
        "entropy_bpw": ent, "codeword_bpw": cw_bits / max(sub1_w, 1),
        "coder_over_entropy": (cw_bits / max(sub1_w, 1)) / ent,
        "total_bpw": (nbytes + d.numel()) * 8 / nw, "dict_entries": d.shape[0], "dict_bpw": d.numel() * 8 / nw,
        "sub1_share": sum(p.codec == "sub1" for p in packed) / len(packed),
        "decode_MBps": nbytes / 1e6 / t_dec, "build_s": t_build, "encode_s": t_enc, "exact": exact,
    }


def disk_bits(packed: str, original: str) -> float:
    """Bits per expert parameter from the files: all tensor bytes of `packed` + its manifest - the original's
    non-expert tensor bytes, over the original's expert parameters (what the acceptance check counts)."""
    size = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

    def walk(d):  # (name, numel, bytes) from the safetensors headers, no tensor read
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as t:
                    for k in t.keys():
                        x = t.get_slice(k)
                        n = math.prod(x.get_shape())
                        yield k, n, n * size[x.get_dtype()]
    total = sum(b for _, _, b in walk(packed)) + os.path.getsize(os.path.join(packed, "moecompress.json"))
    nonexp = sum(b for k, _, b in walk(original) if ".experts." not in k)
    params = sum(n for k, n, _ in walk(original) if ".experts." in k)
    return (total - nonexp) * 8 / params


def codec_stats(packed_dir: str, repeats: int = 3) -> dict:
    """Zero fraction, entropy bound, codeword bits and decode speed of a packed sub1 model's experts."""
    import moecompress
    m = moecompress.load(packed_dir)
    pts = [pt for layer in m.model.layers for ex in layer.mlp.experts.weights for pt in ex.values()]
    codes = [get_codes(p) for p in pts]
    nw = sum(c.numel() for c in codes)
    sub1 = [(p, c) for p, c in zip(pts, codes) if p.codec == "sub1"]
    cw_bits = sum(int(p.tensors["row_counts"].long().sum()) * p.attrs["codeword_bits"] for p, _ in sub1)
    sub1_w = sum(c.numel() for _, c in sub1)
    ent_sub1 = sum(sd.pair_entropy(c) * c.numel() for _, c in sub1) / max(sub1_w, 1)
    nbytes = sum(encoded_nbytes(p) for p in pts)
    decode(pts[0])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for p in pts:
            decode(p)
    t_dec = (time.perf_counter() - t0) / repeats
    return {"zero_fraction": sum(zero_fraction(c) * c.numel() for c in codes) / nw,
            "pair_entropy_bpw": ent_sub1, "codeword_bpw": cw_bits / max(sub1_w, 1),
            "coder_over_entropy": cw_bits / max(sub1_w, 1) / ent_sub1,
            "codeword_bits": sorted({p.attrs["codeword_bits"] for p, _ in sub1}),
            "sub1_tensors": f"{len(sub1)}/{len(pts)}", "decode_MBps": nbytes / 1e6 / t_dec}


def pipeline(work: str, max_tokens: int, new_tokens: int) -> None:
    from moecompress.report.accuracy import generations, pick_prompts
    os.makedirs(work, exist_ok=True)
    model = MODEL
    texts = list(TEXTS.values())
    lp = ("--method", "gptq", "--allocation", "lp", "--candidates", "sub1,2,3", "--group-size", 64)
    runs = {"sub1 --bits 1": ("sub1", ("--method", "ternary", "--bits", 1)),
            "dense ternary --bits 1.6": ("dense16", ("--method", "ternary", "--bits", 1.6)),
            "gptq 2-bit g64": ("gptq", ("--method", "gptq", "--bits", 2, "--group-size", 64)),
            "lp sub1,2,3 --bits 1.5": ("lp15", (*lp, "--bits", 1.5)),
            "lp sub1,2,3 --bits 2": ("lp20", (*lp, "--bits", 2))}
    outs, slug = {"original": model}, {"original": "original"}
    for name, (d, args) in runs.items():
        out = os.path.join(work, d)
        slug[name] = d
        if not os.path.exists(os.path.join(out, "moecompress.json")):
            t0 = time.time()
            cli("quantize", model, "--out", out, *args, "--calib", CALIB_MIX,
                 "--seed", 0)
            print(f"quantized {name} in {time.time() - t0:.0f} s", flush=True)
        outs[name] = out
    rows = {}
    for name, out in outs.items():
        js = os.path.join(work, slug[name] + ".eval.json")
        if not os.path.exists(js):
            cli("eval", out, "--text", *texts, "--max-tokens", max_tokens, "--json", js)
        res = json.load(open(js))["texts"]
        bits = 16.0 if out == model else disk_bits(out, model)
        rows[name] = (bits, [res[t]["perplexity"] for t in texts])
    print(f"\nfixture mixtral-wiki4, calib_mix 128 x 256 seed 0, eval first {max_tokens} tokens per text, windows of 256")
    print("| model | expert bits/param (files) | " + " | ".join(DOMAINS) + " |")
    print("|---|---|" + "---|" * len(DOMAINS))
    for name, (bits, ppl) in rows.items():
        print(f"| {name} | {bits:.3f} | " + " | ".join(f"{p:.2f}" for p in ppl) + " |")
    st = codec_stats(outs["sub1 --bits 1"])
    print("\nsub1 codes: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in st.items()))
    prompts = pick_prompts(texts, 4)
    print(f"\ngreedy generations ({new_tokens} new tokens):")
    for name in ("sub1 --bits 1", "dense ternary --bits 1.6"):
        for g in generations(model, outs[name], prompts, new_tokens):
            print(f"- [{g['text']}] prompt {g['prompt']!r}\n    original: {g['baseline']!r}\n    {name}: {g['compressed']!r} "
                  f"(diverges at token {g['diverges_at']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", metavar="WORKDIR", default=None, help="quantize, evaluate and generate (see above)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.35])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.pipeline:
        return pipeline(args.pipeline, args.max_tokens, args.new_tokens)
    W = load_experts(args.model)
    print(f"{sum(w.numel() for w in W.values())} expert weights, {len(W)} (layer, proj) stacks, "
          f"torch threads {torch.get_num_threads()}")
    for t in args.thresholds:
        r = run(W, t)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
