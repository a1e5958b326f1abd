"""GPTQ speed, batched over experts vs a per-expert loop, and peak memory of a streamed quantize run.

    python benchmarks/quantize_speed.py                 # everything (writes a ~4.2 GB synthetic checkpoint)
    python benchmarks/quantize_speed.py --skip-rss      # only the GPTQ timings

Prints, from one run:
  - GPTQ seconds per million expert parameters, batched (one batched Cholesky and one batched column
    loop for all experts of a layer) vs a Python loop over experts, on the trained fixture's layer
    shapes (8 experts, 192 -> 384) and on a synthetic layer of 64 experts;
  - peak RSS of `moecompress quantize` (a child process) on a synthetic Mixtral-architecture checkpoint
    of at least 4 GB written by this script, as a fraction of the checkpoint's size (goal: under 40%).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from common import MODEL


def hessians(E, K, T=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(E, T, K, generator=g) @ (torch.randn(K, K, generator=g) / K ** 0.5)
    return X.transpose(1, 2) @ X


def time_gptq(W, H, bits=4, group=64, repeats=1):
    from moecompress.quant.gptq import gptq
    from moecompress.quant.grids import AsymmetricGrid
    grid = AsymmetricGrid(bits)
    t0 = time.perf_counter()
    for _ in range(repeats):
        gptq(W, H, grid, group)
    batched = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        for e in range(W.shape[0]):
            gptq(W[e:e + 1], H[e:e + 1], grid, group)
    loop = (time.perf_counter() - t0) / repeats
    return batched, loop


def gptq_table(fixture_weights: bool):
    rows = []
    # the trained fixture: gate+up stacked (8, 768, 192) and down (8, 192, 384), as the pass runs them
    if fixture_weights and os.path.isdir(MODEL):
        from moecompress.checkpoint import CheckpointReader
        r = CheckpointReader(MODEL)
        ex = r.layer_experts(0)
        shapes = [("fixture gate+up", torch.cat([ex["gate"], ex["up"]], 1)), ("fixture down", ex["down"])]
    else:
        shapes = [("fixture-shaped gate+up", torch.randn(8, 768, 192)), ("fixture-shaped down", torch.randn(8, 192, 384))]
    shapes += [("synthetic 64 experts gate+up", torch.randn(64, 512, 256)),
                ("synthetic 64 experts down", torch.randn(64, 256, 256))]
    for name, W in shapes:
        W = W.float()
        H = hessians(W.shape[0], W.shape[2])
        b, l = time_gptq(W, H)
        mparams = W.numel() / 1e6
        rows.append((name, tuple(W.shape), b / mparams, l / mparams, l / b))
        print(f"  measured {name}: batched {b:.2f} s, loop {l:.2f} s", flush=True)
    print(f"\nGPTQ, 4-bit, group 64 (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"{'layer':32s} {'W (E, N, K)':>18s} {'batched s/Mparam':>17s} {'loop s/Mparam':>14s} {'speed-up':>9s}")
    for name, shape, b, l, x in rows:
        print(f"{name:32s} {str(shape):>18s} {b:17.3f} {l:14.3f} {x:8.2f}x")
    return rows


def write_synthetic(path: str, target_gb: float, hidden=1024, inter=1408, experts=16) -> int:
    """A Mixtral-architecture checkpoint of random bf16 weights, one shard per layer, >= target_gb."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    per_layer = experts * 3 * hidden * inter * 2 + 4 * hidden * hidden * 2
    layers = max(2, int(target_gb * 1e9 // per_layer) + 1)
    vocab = 4096
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
           "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
           "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "dtype": "bfloat16"}
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(MODEL, f), path)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
    wm = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
             f"{p}.block_sparse_moe.gate.weight": rnd(experts, hidden) * 50}
        for n in ("q", "k", "v", "o"):
            t[f"{p}.self_attn.{n}_proj.weight"] = rnd(hidden, hidden)
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"], t[f"{q}.w3.weight"], t[f"{q}.w2.weight"] = rnd(inter, hidden), rnd(inter, hidden), rnd(hidden, inter)
        name = f"model-{i:05d}.safetensors"
        save_file(t, os.path.join(path, name), metadata={"format": "pt"})
        wm.update({k: name for k in t})
    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "lm_head.weight": rnd(vocab, hidden)}
    save_file(t, os.path.join(path, "model-extra.safetensors"), metadata={"format": "pt"})
    wm.update({k: "model-extra.safetensors" for k in t})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(path, "model.safetensors.index.json"), "w"))
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def rss_run(target_gb: float, workdir: str):
    src = os.path.join(workdir, "synthetic")
    t0 = time.time()
    size = write_synthetic(src, target_gb)
    print(f"\nwrote a synthetic Mixtral-architecture checkpoint: {size / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    cmd = [sys.executable, "-m", "moecompress.cli", "-q", "quantize", src, "--out", os.path.join(workdir, "packed"),
           "--bits", "4", "--group-size", "128", "--method", "gptq", "--nsamples", "4", "--seqlen", "64"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.time() - t0
    if r.returncode:
        print("quantize failed:", (r.stderr or r.stdout).strip().splitlines()[-1])
        return
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child: the quantize run
    print(f"quantize: {secs:.0f} s; peak RSS {peak / 1e9:.2f} GB = {100 * peak / size:.1f}% of the checkpoint "
          f"(goal: under 40%)")
    print(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-rss", action="store_true", help="only the GPTQ timings")
    ap.add_argument("--gb", type=float, default=4.2, help="synthetic checkpoint size in GB (default 4.2)")
    ap.add_argument("--workdir", default=None, help="where to write it (default: a temporary directory)")
    a = ap.parse_args()
    gptq_table(True)
    if not a.skip_rss:
        wd = a.workdir or tempfile.mkdtemp(prefix="moec-rss-")
        try:
            rss_run(a.gb, wd)
        finally:
            if a.workdir is None:
                shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
