"""Quantize checkpoints with real MoE expert shapes, moecompress against llm-compressor, side by side.

    # issue #19's bar: the Qwen3-30B-A3B-shaped layer, 128 windows of 512 tokens, 4 bits, both tools
    python benchmarks/scale.py --models qwen3-30b-a3b --nsamples 128 --seqlen 512 --threads 2
    # every shape end to end, small (about 40 minutes on 2 shared cores)
    python benchmarks/scale.py --nsamples 8 --seqlen 64 --experts-cap mixtral-8x7b=2 qwen3-30b-a3b=8 deepseek-v3=8
    # the GPU row: DeepSeek-V3-shaped layer with 32 experts on CUDA, minutes per billion expert params
    python benchmarks/scale.py --gpu

For each shape this script writes a synthetic checkpoint to disk: random bf16 weights with the real
expert shapes and the real attention of Mixtral-8x7B (8 experts of 14336x4096), Qwen3-30B-A3B (128 of
768x2048, top-8) or DeepSeek-V3 (256 of 2048x7168 plus a shared expert, top-8), `--layers` decoder
layers (default 1), vocabulary 4096 with the demo model's tokenizer, and a router whose rows all have the
same norm so tokens spread over every expert. Where this machine cannot hold a whole layer (or
`--experts-cap` says so) a layer has fewer experts of the real shape, and the table says so.

Then, each as a child process timed from start to exit with its peak RSS (os.wait4's ru_maxrss):
  - `moecompress quantize CKPT --bits B --group-size G --calib CALIB --nsamples N --seqlen L --seed S`,
    whose run/metrics.json gives layer forwards per stage and the memory parts (layer weights, Hessians
    in flight, activation cache; peak device bytes on a GPU); "n/a" where a key is missing;
  - llm-compressor's GPTQ `oneshot` (benchmarks/scale_peer.py, in its own virtual environment created
    here if missing) on the same checkpoint, the same token windows (moecompress's own
    `calibration_windows` for these arguments, handed over as a safetensors file), the same bits and
    group size (asymmetric, like moecompress), the same linears (routed and shared experts: attention,
    routers and lm_head are ignored), its defaults otherwise; the whole run: load, linearize, oneshot,
    save.
Expert params count routed plus shared experts: the weights both tools quantize.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

from common import HERE  # also puts the project root on sys.path
from peer import ensure_peer_venv, run_child, run_peer, tail, write_windows

ROOT = os.path.abspath(os.path.join(HERE, ".."))
DEMO = os.path.join(ROOT, "moecompress", "data", "demo-model")
CALIB = os.path.join(ROOT, "moecompress", "data", "text", "calib_mix.txt")
VOCAB = 4096
SHARD_BYTES = 2 << 30

# the real models' configs (only what shapes the layer); `experts_key` holds the routed expert count
SHAPES = {
    "mixtral-8x7b": dict(
        family="Mixtral", experts_key="num_local_experts", real=8, default_cap=8, real_name="Mixtral-8x7B",
        config=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768)),
    "qwen3-30b-a3b": dict(
        family="Qwen3Moe", experts_key="num_experts", real=128, default_cap=128, real_name="Qwen3-30B-A3B",
        config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
                    num_key_value_heads=4, head_dim=128, num_experts_per_tok=8, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6,
                    max_position_embeddings=40960)),
    "deepseek-v3": dict(
        family="DeepseekV3", experts_key="n_routed_experts", real=256, default_cap=16, real_name="DeepSeek-V3",
        config=dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
                    num_key_value_heads=128, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=0,
                    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                    max_position_embeddings=4096)),
}
MEMORY_PARTS = ("layer_weights_bytes", "hessian_bytes_peak", "activation_cache_bytes")


# ---------------------------------------------------------------- synthetic checkpoints

def make_config(name: str, experts: int, layers: int):
    """The transformers config of shape `name` with `experts` routed experts per layer."""
    import transformers as tf
    s = SHAPES[name]
    kw = dict(s["config"], vocab_size=VOCAB, num_hidden_layers=layers, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw[s["experts_key"]] = experts
    if s["family"] == "DeepseekV3":  # the real 8 groups / 4 kept when they still hold top-8 candidates
        kw.update(n_group=8, topk_group=4) if experts % 8 == 0 and experts // 8 * 4 >= 8 else kw.update(n_group=1, topk_group=1)
    return getattr(tf, s["family"] + "Config")(**kw)


def tensor_plan(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name on disk, shape) of every tensor, in the order transformers lists them: the model is built on
    the meta device (no memory), its fused in-memory experts are written one tensor per expert as real
    checkpoints store them (moecompress's ArchSpec gives the disk names, checked by its reader)."""
    import torch
    import transformers as tf
    from moecompress.arch import PROJS, arch_for
    spec = arch_for(cfg.to_dict())
    with torch.device("meta"):
        model = getattr(tf, cfg.architectures[0])(cfg)
    out = []
    for k, v in model.state_dict().items():
        if k.endswith("experts.gate_up_proj"):
            layer = int(k.split(".")[2])
            E, two_i, H = v.shape  # (E, 2I, H)
            for e in range(E):
                for p in PROJS:
                    out.append((spec.per_expert_key(layer, e, p), (two_i // 2, H) if p != "down" else (H, two_i // 2)))
        elif k.endswith("experts.down_proj"):
            continue  # written with gate/up above
        else:
            out.append((spec.to_disk(k), tuple(v.shape)))
    return out


def fill(name: str, shape: tuple[int, ...], gen, router_norm: float):
    """Random bf16 weights (drawn on gen's device, returned on the CPU): norms 1, correction biases 0,
    router rows of one norm, the rest N(0, 0.02)."""
    import torch
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    w = torch.randn(shape, generator=gen, device=gen.device)
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # (E, H) router
        return (w / w.norm(dim=1, keepdim=True) * router_norm).to(torch.bfloat16).cpu()
    return (w * 0.02).to(torch.bfloat16).cpu()


def write_checkpoint(path: str, name: str, experts: int, layers: int, seed: int = 0, device: str = "cpu") -> None:
    """Write the synthetic checkpoint shard by shard (at most SHARD_BYTES in memory), drawing the weights
    on `device`; reuse it when the spec file says it is the same."""
    import torch
    from safetensors.torch import save_file
    want = {"shape": name, "experts": experts, "layers": layers, "seed": seed, "vocab": VOCAB, "version": 1}
    marker = os.path.join(path, "scale_spec.json")
    if os.path.exists(marker) and json.load(open(marker)) == want:
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    cfg = make_config(name, experts, layers)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    plan = tensor_plan(cfg)
    shards, cur, cur_bytes = [], {}, 0  # shards: the names in each
    gen = torch.Generator(device=device).manual_seed(seed)
    for n, (k, shape) in enumerate(plan):
        cur[k] = fill(k, shape, gen, router_norm=2.0)
        cur_bytes += cur[k].numel() * 2
        if cur_bytes >= SHARD_BYTES or n == len(plan) - 1:
            shards.append(list(cur))
            save_file(cur, os.path.join(path, f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            cur, cur_bytes = {}, 0
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        new = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.rename(os.path.join(path, f"part-{i:05d}.safetensors"), os.path.join(path, new))
        weight_map.update({k: new for k in keys})
    total = sum(2 * math.prod(shape) for _, shape in plan)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    c = json.load(open(os.path.join(path, "config.json")))  # readable by older transformers too
    c.setdefault("torch_dtype", "bfloat16")
    rope = c.get("rope_parameters") or {}
    if "rope_theta" in rope:
        c.setdefault("rope_theta", rope["rope_theta"])
    json.dump(c, open(os.path.join(path, "config.json"), "w"), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, f), path)
    json.dump(want, open(marker, "w"))


# ---------------------------------------------------------------- child processes

# a checkout that is not pip-installed (a GPU machine): calibration/ and kernels/ are found as
# moecompress.calibration and moecompress.kernels (what pyproject's package-dir does on install)
BOOTSTRAP = ("import sys; sys.path.insert(0, {root!r}); import moecompress; moecompress.__path__.append({root!r}); "
             "from moecompress.cli import main; sys.argv[0] = 'moecompress'; sys.exit(main())")


def importable_checkout() -> None:
    """Make this process import moecompress.calibration from the checkout when it is not installed."""
    import moecompress
    try:
        import moecompress.calibration  # noqa: F401
    except ImportError:
        moecompress.__path__.append(ROOT)


def default_moecompress_cmd() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "moecompress")
    if os.path.exists(exe):
        return exe
    return f"{sys.executable} -c {shlex.quote(BOOTSTRAP.format(root=ROOT))}"


def quantize_help(cmd: list[str], env: dict) -> str:
    return subprocess.run(cmd + ["quantize", "--help"], capture_output=True, text=True, env=env, cwd=ROOT).stdout


def run_ours(ckpt: str, out: str, a, env: dict, has_device: bool) -> dict:
    cmd = shlex.split(a.moecompress_cmd) + ["quantize", ckpt, "--out", out, "--bits", str(a.bits), "--group-size",
                               str(a.group_size), "--calib", a.calib, "--nsamples", str(a.nsamples),
                               "--seqlen", str(a.seqlen), "--seed", str(a.seed)]
    if has_device:
        cmd += ["--device", a.device]
    elif a.device not in ("cpu", "auto"):
        raise SystemExit(f"moecompress quantize has no --device option yet; cannot run on {a.device}")
    shutil.rmtree(out, ignore_errors=True)
    r = run_child(cmd, out + ".log", env)
    r["cmd"] = " ".join(cmd)
    r["log"] = out + ".log"
    mpath = os.path.join(out, "run", "metrics.json")
    r["metrics"] = json.load(open(mpath)) if r["rc"] == 0 and os.path.exists(mpath) else {}
    return r


# ---------------------------------------------------------------- table

def gb(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f}G"


def fmt(v, f="{:.1f}") -> str:
    return "n/a" if v is None else f.format(v)


def row(name: str, experts: int, params: int, ours: dict, peer: dict | None, device: str) -> dict:
    s = SHAPES[name]
    m = ours.get("metrics", {})
    mem = m.get("memory", {}) if isinstance(m.get("memory"), dict) else {}
    parts = [mem.get(k) for k in MEMORY_PARTS]
    psum = sum(parts) if all(p is not None for p in parts) else None
    forwards = m.get("layer_forwards_per_layer")
    r = {"shape": s["real_name"], "experts": experts, "real_experts": s["real"], "expert_params": params,
         "device": device, "ours_ok": ours["rc"] == 0, "ours_seconds": ours["seconds"],
         "ours_metrics_seconds": m.get("seconds"), "ours_s_per_b": ours["seconds"] / (params / 1e9),
         "layer_forwards": m.get("layer_forwards"), "layer_forwards_per_layer": forwards,
         "ours_peak_rss": ours["peak_rss_bytes"], "memory": {k: mem.get(k) for k in MEMORY_PARTS},
         "parts_sum": psum, "rss_ratio": ours["peak_rss_bytes"] / psum if psum else None,
         "peak_device_bytes": mem.get("peak_device_bytes"), "ours_cmd": ours["cmd"]}
    if peer is not None:
        r.update(peer_ok=peer["rc"] == 0, peer_seconds=peer["seconds"], peer_s_per_b=peer["seconds"] / (params / 1e9),
                 peer_peak_rss=peer["peak_rss_bytes"], peer_phases=peer["result"].get("phases"),
                 peer_versions=peer["result"].get("versions"), peer_cmd=peer["cmd"], peer_stopped=peer["stopped"],
                 speed_ratio=peer["seconds"] / ours["seconds"] if (peer["rc"] == 0 or peer["stopped"]) and ours["rc"] == 0
                 else None)
    return r


def print_table(rows: list[dict], gpu: bool) -> None:
    head = ("shape", "experts (of real)", "expert params", "ours s", "s/B" if not gpu else "min/B", "layer fwd/layer",
            "peak RSS (weights+hess+acts, ratio)", "peak dev", "llm-c s", "llm-c s/B", "llm-c RSS", "speed ratio")
    lines = [head]
    for r in rows:
        stages = "n/a" if r["layer_forwards_per_layer"] is None else "/".join(str(x) for x in r["layer_forwards_per_layer"])
        if r["layer_forwards"] is not None:
            stages += f" (total {r['layer_forwards']})"
        mem = r["memory"]
        rss = (f"{gb(r['ours_peak_rss'])} ({'+'.join(gb(mem[k]) if mem[k] is not None else 'n/a' for k in MEMORY_PARTS)}"
               f", {fmt(r['rss_ratio'], '{:.2f}')})")
        speed = r["ours_s_per_b"] / 60 if gpu else r["ours_s_per_b"]
        lines.append((r["shape"], f"{r['experts']} of {r['real_experts']}", f"{r['expert_params'] / 1e9:.3f}B",
                      fmt(r["ours_seconds"]) + ("" if r["ours_ok"] else " FAILED"),
                      fmt(speed, "{:.2f}"), stages, rss, gb(r["peak_device_bytes"]),
                      (">" if r.get("peer_stopped") else "") + fmt(r.get("peer_seconds"))
                      + ("" if r.get("peer_ok", True) or r.get("peer_stopped") else " FAILED"),
                      fmt(r.get("peer_s_per_b")), gb(r.get("peer_peak_rss")),
                      (">" if r.get("peer_stopped") else "") + fmt(r.get("speed_ratio"), "{:.2f}x")))
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    for n, l in enumerate(lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(l, widths)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


# ---------------------------------------------------------------- main

def parse_caps(specs: list[str] | None) -> dict:
    caps = {}
    for s in specs or []:
        k, sep, v = s.rpartition("=")
        try:
            n = int(v)
        except ValueError:
            raise SystemExit(f"--experts-cap wants N or SHAPE=N, got {s!r}") from None
        if sep and k not in SHAPES:
            raise SystemExit(f"--experts-cap: unknown shape {k!r}; choose from {', '.join(SHAPES)}")
        for name in ([k] if sep else SHAPES):
            caps[name] = n
    return caps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers per checkpoint (default 1)")
    ap.add_argument("--experts-cap", nargs="*", metavar="N|SHAPE=N",
                    help="experts per layer (of the real shape); defaults: " +
                    ", ".join(f"{k}={v['default_cap']}" for k, v in SHAPES.items()))
    ap.add_argument("--calib", default=CALIB, help="calibration text (default: moecompress's calib_mix.txt)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (passed on when quantize has --device)")
    ap.add_argument("--threads", type=int, help="torch threads of both children (default $OMP_NUM_THREADS or 1; "
                    "with --gpu all cores)")
    ap.add_argument("--moecompress-cmd", default=default_moecompress_cmd(),
                    help="how to start moecompress (default: this venv's entry point, else the checkout); e.g. "
                    "'torchrun --nproc-per-node 2 -m moecompress'")
    ap.add_argument("--skip-peer", action="store_true", help="do not run llm-compressor")
    ap.add_argument("--peer-limit", type=float, default=0, metavar="F",
                    help="stop llm-compressor after F times moecompress's seconds and report its time and the speed "
                         "ratio as lower bounds ('>'); 0: let it finish (default)")
    ap.add_argument("--peer-venv", default="/work/llmc-venv", help="llm-compressor's virtual environment")
    ap.add_argument("--workdir", default="/tmp/moecompress-scale", help="checkpoints and outputs")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs (default: delete them)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--gpu", action="store_true",
                    help="the GPU row: DeepSeek-V3 with 32 experts, --device cuda, no peer; prints minutes per B params")
    a = ap.parse_args()
    if a.gpu:
        a.models, a.device, a.skip_peer = "deepseek-v3", ("cuda" if a.device == "cpu" else a.device), True
        a.experts_cap = a.experts_cap or ["deepseek-v3=32"]
    if a.threads is None:
        a.threads = os.cpu_count() if a.gpu else int(os.environ.get("OMP_NUM_THREADS", "1"))
    importable_checkout()
    if a.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {a.device}: this machine has no CUDA device (run --gpu on a GPU machine)")
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        raise SystemExit(f"unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    caps = parse_caps(a.experts_cap)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    has_device = "--device" in quantize_help(shlex.split(a.moecompress_cmd), env)
    print(f"moecompress quantize {'has' if has_device else 'has no'} --device; threads {a.threads}; "
          f"{a.nsamples} windows of {a.seqlen} tokens (seed {a.seed}); {a.bits} bits, group {a.group_size}", flush=True)
    peer_py = None if a.skip_peer else ensure_peer_venv(a.peer_venv)
    os.makedirs(a.workdir, exist_ok=True)
    rows = []
    for name in names:
        s = SHAPES[name]
        E = min(caps.get(name, s["default_cap"]), s["real"])
        top_k = s["config"]["num_experts_per_tok"]
        if E < top_k:
            raise SystemExit(f"--experts-cap: {s['real_name']} routes each token to {top_k} experts; give it at least {top_k}")
        ckpt = os.path.join(a.workdir, f"{name}-e{E}-l{a.layers}")
        t0 = time.perf_counter()
        write_checkpoint(ckpt, name, E, a.layers, device="cuda" if a.device.startswith("cuda") else "cpu")
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        I, H = cfg["moe_intermediate_size" if "moe_intermediate_size" in cfg else "intermediate_size"], cfg["hidden_size"]
        params = a.layers * (E + cfg.get("n_shared_experts", 0)) * 3 * I * H
        print(f"\n{s['real_name']}: {E} of {s['real']} experts of {I}x{H}"
              f"{' + ' + str(cfg['n_shared_experts']) + ' shared' if cfg.get('n_shared_experts') else ''}, "
              f"{a.layers} layer(s), {params / 1e9:.3f}B expert params; checkpoint {ckpt} "
              f"({time.perf_counter() - t0:.0f}s to write or reuse)", flush=True)
        ours = run_ours(ckpt, os.path.join(a.workdir, f"{name}-ours"), a, env, has_device)
        print(f"  moecompress: {ours['seconds']:.1f}s, peak RSS {gb(ours['peak_rss_bytes'])}, rc {ours['rc']}", flush=True)
        if ours["rc"] != 0:
            print("  " + tail(ours["log"]).replace("\n", "\n  "))
        peer = None
        if peer_py:
            wf = os.path.join(a.workdir, f"{name}-windows.safetensors")
            write_windows(ckpt, a, wf)
            limit = a.peer_limit * ours["seconds"] if a.peer_limit else None
            peer = run_peer(peer_py, ckpt, os.path.join(a.workdir, f"{name}-llmc"), wf, a, env, limit)
            print(f"  llm-compressor: {peer['seconds']:.1f}s, peak RSS {gb(peer['peak_rss_bytes'])}, rc {peer['rc']}"
                  f"{', phases ' + json.dumps(peer['result'].get('phases')) if peer['result'] else ''}", flush=True)
            if peer["rc"] != 0:
                print("  " + tail(peer["log"]).replace("\n", "\n  "))
        rows.append(row(name, E, params, ours, peer, a.device))
        if not a.keep:
            for p in (ckpt, os.path.join(a.workdir, f"{name}-ours"), os.path.join(a.workdir, f"{name}-llmc")):
                shutil.rmtree(p, ignore_errors=True)
    print()
    print_table(rows, a.gpu)
    if peer_py and rows and rows[0].get("peer_versions"):
        print(f"\nllm-compressor: {json.dumps(rows[0]['peer_versions'])}")
    for r in rows:
        if r["shape"] == "Qwen3-30B-A3B" and r.get("speed_ratio") is not None:
            bar = a.nsamples == 128 and a.seqlen == 512 and a.bits == 4 and r["experts"] == r["real_experts"]
            low = "more than " if r.get("peer_stopped") else ""  # llm-compressor stopped at --peer-limit
            print(f"Qwen3-30B-A3B speed ratio {low}{r['speed_ratio']:.2f}x (bar >= 3x"
                  f"{'' if bar else '; not the bar settings: 128 x 512, 4 bits, 128 experts'})")
        if r["rss_ratio"] is not None:
            print(f"{r['shape']}: peak RSS / (weights + Hessians + activations) = {r['rss_ratio']:.2f} (bar <= 1.3)")
    if a.gpu and rows:
        print(f"minutes per billion expert params on {a.device}: {rows[0]['ours_s_per_b'] / 60:.3f} (bar <= 0.5)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
