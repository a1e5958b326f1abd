"""Perplexity per domain after expert pruning / merging on the trained fixture (8 -> 6 and 8 -> 4).

    python benchmarks/merge.py [--fixture DIR] [--tokens 16384] [--nsamples 64] [--seqlen 256]
                               [--cuts 6,4] [--variants] [--json out.json]

Calibration: `nsamples` windows of `seqlen` tokens evenly spaced over the fixture's calib_mix.txt
(four domains). Statistics are gathered on the original model (one forward, hooks on every MoE block),
each layer is reduced with moecompress.merge.reduce_layer, and the reduced model is evaluated in fp32
on the first `tokens` tokens of each domain's test text, non-overlapping windows of 256 tokens.
`--variants` also measures the design choices: router rows (lse / mean / dominant / weighted) and
neuron alignment (none / weight / activation) for msmoe and hcsmoe.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from moecompress.merge import METHODS, compute_layer_stats, reduce_layer  # noqa: E402

DOMAINS = ("prose", "verse", "c", "python")


def load(fixture):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(fixture)
    return model, tok


def windows(tok, path, n, seqlen):
    ids = torch.tensor(tok(open(path, encoding="utf-8").read())["input_ids"])
    starts = torch.linspace(0, ids.numel() - seqlen - 1, n).long()
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])  # (n, seqlen)


@torch.no_grad()
def gather_stats(model, calib):
    stats, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        moe = layer.mlp

        def hook(mod, args, i=i):
            h = args[0].reshape(-1, args[0].shape[-1])  # (B, S, H) -> (T, H)
            logits, w, idx = mod.gate(h)
            s = compute_layer_stats(h, logits, idx, w, mod.experts.gate_up_proj, mod.experts.down_proj)
            stats[i] = s if i not in stats else stats[i] + s

        handles.append(moe.register_forward_pre_hook(hook))
    for b in calib.split(16):
        model(b)
    for h in handles:
        h.remove()
    return stats


@torch.no_grad()
def reduced_model(model, stats, method, K, **kw):
    m = copy.deepcopy(model)
    top_k = model.config.num_experts_per_tok
    groups = []
    for i, layer in enumerate(m.model.layers):
        ex, gate = layer.mlp.experts, layer.mlp.gate
        r = reduce_layer(method, ex.gate_up_proj.data, ex.down_proj.data, gate.weight.data, None, stats[i], K,
                         top_k=top_k, **kw)
        ex.gate_up_proj = torch.nn.Parameter(r.gate_up)
        ex.down_proj = torch.nn.Parameter(r.down)
        ex.num_experts = gate.num_experts = r.num_experts
        gate.weight = torch.nn.Parameter(r.router_weight)
        groups.append([list(g) for g in r.groups])
    return m, groups


@torch.no_grad()
def perplexity(model, ids, seqlen=256):
    n = ids.numel() // seqlen
    x = ids[: n * seqlen].view(n, seqlen)
    nll = 0.0
    for b in x.split(16):
        out = model(b, labels=b)
        nll += out.loss.item() * b.shape[0]
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=os.path.join(ROOT, "..", "shared", "fixtures", "mixtral-wiki4"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--cuts", default="6,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    text = os.path.join(a.fixture, "..", "text")
    model, tok = load(a.fixture)
    calib = windows(tok, os.path.join(text, "calib_mix.txt"), a.nsamples, a.seqlen)
    tests = {d: torch.tensor(tok(open(os.path.join(text, f"{d}_test.txt"), encoding="utf-8").read())["input_ids"][: a.tokens])
             for d in DOMAINS}
    t0 = time.time()
    stats = gather_stats(model, calib)
    print(f"stats on {calib.numel()} calibration tokens in {time.time() - t0:.1f}s", file=sys.stderr)
    rows = {"original": {d: perplexity(model, tests[d]) for d in DOMAINS}}
    configs = [(m, {}) for m in a.methods.split(",")]
    if a.variants:
        configs += [(m, {"align": al}) for m in ("msmoe", "hcsmoe") for al in (None, "weight", "activation")]
        configs += [(m, {"router_mode": r}) for m in ("msmoe", "hcsmoe") for r in ("mean", "dominant", "weighted")]
        configs += [(m, {"refit": False}) for m in ("msmoe", "hcsmoe")]
    E = model.config.num_local_experts
    for K in [int(k) for k in a.cuts.split(",")]:
        for method, kw in configs:
            name = f"{E}->{K} {method}" + "".join(f" {k}={v}" for k, v in kw.items())
            m, groups = reduced_model(model, stats, method, K, **kw)
            rows[name] = {d: perplexity(m, tests[d]) for d in DOMAINS}
            print(name, " ".join(f"{rows[name][d]:.2f}" for d in DOMAINS), groups, file=sys.stderr)
    base = rows["original"]
    print(f"\nperplexity, first {a.tokens} tokens per domain, windows of 256, fp32; calibration "
          f"{a.nsamples}x{a.seqlen} tokens of calib_mix.txt\n")
    print("| model | " + " | ".join(DOMAINS) + " | mean change |")
    print("|---|" + "---|" * (len(DOMAINS) + 1))
    for name, r in rows.items():
        ch = sum(r[d] / base[d] - 1 for d in DOMAINS) / len(DOMAINS)
        print(f"| {name} | " + " | ".join(f"{r[d]:.2f}" for d in DOMAINS) + f" | {ch:+.1%} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
