"""Packed-weight kernels: speed on a GPU, correctness everywhere.

On a GPU, for the expert shapes of Mixtral (H 4096, I 14336), DeepSeek-V3 (7168, 2048) and
Qwen3-MoE (2048, 768), both orientations (gate/up: (I, H), down: (H, I)) and batch 1..64:
  - time of `packed_linear` (median of CUDA-event timings),
  - packed bytes read per second, and that as a fraction of the copy bandwidth measured in the same
    run (torch copy of a 1 GiB buffer; bandwidth = (read + write) bytes / time),
  - speed-up against torch's bf16 matmul on the dense weight,
and a whole MoE layer (top-2, 8 experts, uniform and mixed precision) against a bf16 reference.
Without a GPU it runs the correctness part on small shapes under TRITON_INTERPRET=1 and says that
GPU numbers are not available.

    python benchmarks/kernel_speed.py [--bits 4] [--group-size 128] [--batches 1,2,4,8,16,32,64] [--formats int4,ternary,sub1]
    python benchmarks/kernel_speed.py --short     # about a minute on a GPU: Qwen3-MoE and DeepSeek-V3 shapes,
                                                  # batches 1, 16, 64, 10 timed calls (benchmarks/gpu_check.sh)

Formats: "intB" groupwise (--group-size), dense "ternary" and dictionary-coded "sub1" (one level pair
per row, 90% zeros, dictionary built from the weight itself). GB/s counts the packed bytes a call
reads (sub1: codewords, row counts and levels; the shared dictionary is not counted).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

SHAPES = {"mixtral": (4096, 14336), "deepseek-v3": (7168, 2048), "qwen3-moe": (2048, 768)}  # (H, I)


def make_int(N, K, bits, g, seed=0, device="cpu"):
    from moecompress.codecs import PackedTensor, QuantSpec, get_codec
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int32)
    s = (torch.rand(N, K // g, generator=gen) + 0.5) * 2 / ((1 << bits) - 1) / K ** 0.5
    z = torch.randint(0, 1 << bits, (N, K // g), generator=gen).float()
    p = get_codec("int").encode(q, s, z, QuantSpec("int", bits, g))
    return PackedTensor(p.codec, p.shape, {k: v.to(device) for k, v in p.tensors.items()}, p.attrs)


def make_ternary(N, K, g, seed=0, device="cpu", codec="ternary", zero_frac=0.9):
    """Random ternary weight with `zero_frac` zeros, packed dense ("ternary") or dictionary-coded ("sub1")."""
    from moecompress.codecs import PackedTensor, get_codec
    from moecompress.codecs import sub1_dict as sd
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(N, K, generator=gen)
    t = torch.where(u < zero_frac, 1, torch.where(u < (1 + zero_frac) / 2, 0, 2))
    G = K // (g or K)
    lo, hi = -torch.rand(N, G, generator=gen) / K ** 0.5, torch.rand(N, G, generator=gen) / K ** 0.5
    if codec == "sub1":
        p = get_codec("sub1").encode(t, lo, hi, sd.build_dictionary([t], max_rows=2048), g)
    else:
        p = get_codec("ternary").encode(t, lo, hi, g)
    return PackedTensor(p.codec, p.shape, {k: v.to(device) for k, v in p.tensors.items()}, p.attrs)


def make_packed(fmt, N, K, g, seed=0, device="cpu"):
    """fmt: "int2".."int8", "ternary" or "sub1" (ternary levels per row-group g; sub1 at 90% zeros)."""
    if fmt.startswith("int"):
        return make_int(N, K, int(fmt[3:]), g, seed, device)
    return make_ternary(N, K, g, seed, device, codec=fmt)


def packed_bytes(p) -> int:
    return sum(t.numel() * t.element_size() for k, t in p.tensors.items() if k != "dictionary")


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def cuda_time(fn, iters: int) -> float:
    """Median seconds per call (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(iters: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), iters)
    return 2 * src.numel() / t


def correctness(small: bool) -> bool:
    from moecompress import kernels as mk
    from moecompress.codecs import decode
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(7, 96, 32), (33, 192, 64), (64, 128, 16)] if small else [(768, 2048, 128), (2048, 768, 128)]
    ok = True
    print(f"correctness on {dev} (backend {mk.backend(dev)}):")
    for fmt in ("int2", "int3", "int4", "int8", "ternary", "sub1"):
        for N, K, g in shapes:
            p = make_packed(fmt, N, K, g, seed=len(fmt), device=dev)
            exact = torch.equal(mk.decode(p), decode(p))
            errs = []
            for B in (1, 17):
                x = torch.randn(B, K, device=dev)
                errs.append(rel_err(mk.packed_linear(x, p), x @ decode(p).T))
            good = exact and max(errs) < 1e-5
            ok &= good
            print(f"  {fmt} g{g} ({N}x{K}): decode {'exact' if exact else 'MISMATCH'}, "
                  f"fp32 matmul max rel err {max(errs):.1e} {'ok' if good else 'FAIL'}")
    return ok


def bench_linear(args, bw: float) -> None:
    from moecompress import kernels as mk
    from moecompress.codecs import decode
    print("\n| format | model | proj | N x K | batch | packed ms | packed GB/s | % copy bw | bf16 ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt in args.formats:
        for name, (H, I) in args.shapes.items():
            for proj, (N, K) in (("gate/up", (I, H)), ("down", (H, I))):
                p = make_packed(fmt, N, K, args.group_size if fmt.startswith("int") else 0, device="cuda")
                w = decode(p).to(torch.bfloat16)
                nbytes = packed_bytes(p)
                for B in args.batches:
                    x = torch.randn(B, K, device="cuda", dtype=torch.bfloat16)
                    t_p = cuda_time(lambda: mk.packed_linear(x, p), args.iters)
                    t_d = cuda_time(lambda: x @ w.T, args.iters)
                    gbs = nbytes / t_p
                    print(f"| {fmt} | {name} | {proj} | {N}x{K} | {B} | {t_p * 1e3:.3f} | {gbs / 1e9:.0f} | "
                          f"{100 * gbs / bw:.0f}% | {t_d * 1e3:.3f} | {t_d / t_p:.2f}x |", flush=True)
                w = None  # free the dense copy before the next shape's


def bench_moe(args) -> None:
    from moecompress import kernels as mk
    from moecompress.codecs import decode
    E, k = 8, 2
    print("\n| model | layer | tokens | packed ms | bf16 ms | speed-up | max rel err vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, (H, I) in args.shapes.items():
        for label, bits in (("int4", [args.bits] * E), ("mixed 2/3/4/8", [2, 3, 4, 8] * (E // 4))):
            base = {b: (make_int(I, H, b, args.group_size, 1), make_int(I, H, b, args.group_size, 2),
                        make_int(H, I, b, args.group_size, 3)) for b in set(bits)}
            experts = []
            for b in bits:  # distinct device buffers per expert, so nothing is served from L2 by reuse
                experts.append({n: pt.to("cuda") for n, pt in zip(("gate", "up", "down"), base[b])})
            px = mk.prepare_experts(experts)
            dense = [{n: decode(ex[n]).to(torch.bfloat16) for n in ex} for ex in experts]
            for T in (1, 16, 64):
                x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
                w, idx = torch.topk(torch.randn(T, E, device="cuda").softmax(-1), k)
                w = w.to(torch.bfloat16)

                def ref():
                    out = torch.zeros(T, H, device="cuda", dtype=torch.float32)
                    for e in range(E):
                        tok, slot = torch.nonzero(idx == e, as_tuple=True)
                        h = x[tok]
                        y = (torch.nn.functional.silu(h @ dense[e]["gate"].T) * (h @ dense[e]["up"].T)) @ dense[e]["down"].T
                        out.index_add_(0, tok, y.float() * w[tok, slot, None].float())
                    return out.to(x.dtype)
                t_p = cuda_time(lambda: mk.moe_experts_forward(x, idx, w, px), args.iters)
                t_d = cuda_time(ref, args.iters)
                err = rel_err(mk.moe_experts_forward(x, idx, w, px), ref())
                print(f"| {name} | {label} | {T} | {t_p * 1e3:.3f} | {t_d * 1e3:.3f} | {t_d / t_p:.2f}x | {err:.1e} |")
            experts = px = dense = None  # free the device buffers before the next model's
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--formats", type=lambda s: s.split(","), default=["int4", "ternary", "sub1"],
                    help="packed formats for the linear table (int2..int8, ternary, sub1; default int4,ternary,sub1)")
    ap.add_argument("--short", action="store_true",
                    help="a quick table: Qwen3-MoE and DeepSeek-V3 shapes, batches 1,16,64, 10 timed calls")
    args = ap.parse_args(argv)
    args.shapes = SHAPES
    if args.short:
        args.shapes = {k: SHAPES[k] for k in ("qwen3-moe", "deepseek-v3")}
        args.batches, args.iters = [1, 16, 64], min(args.iters, 10)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first wrapped
        os.environ["MOECOMPRESS_KERNELS"] = "triton"
        ok = correctness(small=True)
        print("\nGPU numbers are not available: no CUDA device on this machine "
              "(correctness checked under TRITON_INTERPRET=1 only).")
        return 0 if ok else 1
    ok = correctness(small=args.short)
    bw = copy_bandwidth(args.iters)
    print(f"\ndevice: {torch.cuda.get_device_name()}; copy bandwidth (read + write) {bw / 1e9:.0f} GB/s; "
          f"int{args.bits} g{args.group_size}, activations bf16")
    bench_linear(args, bw)
    bench_moe(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
