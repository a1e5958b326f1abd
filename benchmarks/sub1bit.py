"""Sub-1-bit experts on the fixture: zero fraction, entropy bound, achieved bits, decode throughput.

Reads the fixture's expert weights directly (safetensors), ternarizes them per row with RTN on the
TernaryGrid at a few thresholds, builds one dictionary for the whole model, packs every expert matrix
with encode_ternary (automatic sub1 / dense choice) and prints, per threshold:

    zero fraction, order-0 pair entropy (bits/weight), codeword bits/weight, coder / entropy,
    total bits/weight (codewords + row counts + fp16 lo/hi + the dictionary once), sub1 share,
    CPU reference decode throughput in MB of packed data per second, and an exactness check.

    python benchmarks/sub1bit.py [--thresholds 0.3 0.35] [--model DIR]
"""
from __future__ import annotations

import argparse
import time

import torch
from safetensors import safe_open

from moecompress.codecs import decode
from moecompress.codecs import sub1_dict as sd
from moecompress.codecs.ternary import encode_ternary, encoded_nbytes, get_codes
from moecompress.quant.gptq import rtn
from moecompress.quant.ternary import TernaryGrid, zero_fraction


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/shared/fixtures/mixtral-wiki4")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.35])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    W = load_experts(args.model)
    print(f"{sum(w.numel() for w in W.values())} expert weights, {len(W)} (layer, proj) stacks, "
          f"torch threads {torch.get_num_threads()}")
    for t in args.thresholds:
        r = run(W, t)
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
