"""Triton kernels for the "int" codec: exact decode and a fused decode-matmul y = x @ W^T.

x: (M, K) activations (fp16, bf16 or fp32), W: (N, K) stored as LSB-first b-bit codes q with fp16
scales s and integer-valued zeros z per group of g along K (format: `moecompress/codecs/intq.py`).

Decode (bit-exact with the torch reference): W[n, k] = (q[n, k] - z[n, k//g]) * s[n, k//g] in fp32.

Matmul: each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in BLOCK_K steps, unpacking
codes straight from the packed bytes (a 3-bit code can straddle two bytes: both are loaded and the
code is cut out of their 16-bit concatenation). The dense W is never written anywhere. When BLOCK_K
divides g every K step lies in one group and the scale factors out of the inner product:

    sum_k x[m, k] W[n, k] = s[n, j] * (sum_k x[m, k] q[n, k] - z[n, j] * sum_k x[m, k])

so the codes q (< 256, exact in fp16 and bf16) go into a 16-bit tensor-core dot with fp32
accumulation and the products are exact; otherwise each element is decoded in fp32 first. Small
batches (M < 16) use a broadcast-multiply-reduce instead of tl.dot (GEMV). The kernel also serves
the grouped MoE launch: with GATHER, row indices and a per-block expert id select which activation
rows and which expert of a stacked (E, N, .) weight a program uses (vLLM fused_moe / MegaBlocks
style block-sparse grouping). Split-K writes partial sums to separate slices that the caller adds
(deterministic, no atomics).

Marlin (Frantar et al., 2024) and QMoE (Frantar & Alistarh, 2023) are the GPU kernels this follows
in spirit; this is the portable version, checked under TRITON_INTERPRET=1 on the CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def _decode_int_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, KB, G, group_size,
                       BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    row = q_ptr + offs_n[:, None].to(tl.int64) * KB
    # ---- unpack codes (same bit arithmetic as the matmul kernel below)
    bit = offs_k * BITS
    byte = bit // 8
    shift = bit % 8
    lo = tl.load(row + byte[None, :], mask=mask, other=0).to(tl.int32)
    if BITS == 3:  # a code may straddle two bytes: take it from their 16-bit concatenation
        hi = tl.load(row + byte[None, :] + 1, mask=mask & (byte[None, :] + 1 < KB), other=0).to(tl.int32)
        lo = lo | (hi << 8)
    code = (lo >> shift[None, :]) & ((1 << BITS) - 1)
    gidx = offs_n[:, None].to(tl.int64) * G + (offs_k // group_size)[None, :]
    s = tl.load(s_ptr + gidx, mask=mask, other=0).to(tl.float32)
    z = tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.float32)
    w = (code.to(tl.float32) - z) * s
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=mask)


def _int_matmul_kernel(x_ptr, stride_xm, rows_ptr, blk_ptr,
                       q_ptr, s_ptr, z_ptr, stride_qe, stride_se,
                       out_ptr, stride_om, stride_os, col_off,
                       M, N, K, KB, G, group_size, k_per_split,
                       BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GATHER: tl.constexpr, USE_DOT: tl.constexpr,
                       DOT_NATIVE: tl.constexpr, FACTORED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATHER:
        e = tl.load(blk_ptr + pid_m)
        if e < 0:  # a block of another group, or past the last used block
            return
        rows = tl.load(rows_ptr + offs_m, mask=offs_m < M, other=-1)
        m_mask = rows >= 0
        rows = tl.where(m_mask, rows, 0)
    else:
        e = 0
        rows = offs_m
        m_mask = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    q_row = q_ptr + e.to(tl.int64) * stride_qe + offs_n[:, None].to(tl.int64) * KB  # (BLOCK_N, 1)
    g_row = e.to(tl.int64) * stride_se + offs_n.to(tl.int64) * G  # (BLOCK_N,)
    x_row = x_ptr + rows[:, None].to(tl.int64) * stride_xm  # (BLOCK_M, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_stop
        w_mask = n_mask[:, None] & k_mask[None, :]
        # ---- codes q: (BLOCK_N, BLOCK_K) int32, LSB-first b-bit stream per row
        bit = offs_k * BITS
        byte = bit // 8
        shift = bit % 8
        lo = tl.load(q_row + byte[None, :], mask=w_mask, other=0).to(tl.int32)
        if BITS == 3:
            hi = tl.load(q_row + byte[None, :] + 1, mask=w_mask & (byte[None, :] + 1 < KB), other=0).to(tl.int32)
            lo = lo | (hi << 8)
        code = (lo >> shift[None, :]) & ((1 << BITS) - 1)
        xt = tl.load(x_row + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)  # (BLOCK_M, BLOCK_K)
        if FACTORED:
            # the whole step lies in group j: s and z are one value per output row
            j = k0 // group_size
            s = tl.load(s_ptr + g_row + j, mask=n_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + g_row + j, mask=n_mask, other=0).to(tl.float32)
            xs = tl.sum(xt.to(tl.float32), axis=1)  # (BLOCK_M,)
            if USE_DOT:
                if DOT_NATIVE:  # 16-bit x, codes < 256 are exact in 16 bits: exact products, fp32 sums
                    part = tl.dot(xt, tl.trans(code.to(xt.dtype)))
                else:
                    part = tl.dot(xt.to(tl.float32), tl.trans(code.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.sum(xt.to(tl.float32)[:, None, :] * code.to(tl.float32)[None, :, :], axis=2)
            acc += (part - xs[:, None] * z[None, :]) * s[None, :]
        else:
            gidx = g_row[:, None] + (offs_k // group_size)[None, :]
            s = tl.load(s_ptr + gidx, mask=w_mask, other=0).to(tl.float32)
            z = tl.load(z_ptr + gidx, mask=w_mask, other=0).to(tl.float32)
            w = (code.to(tl.float32) - z) * s  # exact decode, (BLOCK_N, BLOCK_K)
            if USE_DOT:
                acc = tl.dot(xt.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
            else:
                acc += tl.sum(xt.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    if GATHER:
        out_rows = offs_m  # outputs stay in padded (sorted) order
    else:
        out_rows = rows
    out = out_ptr + pid_s.to(tl.int64) * stride_os + out_rows[:, None].to(tl.int64) * stride_om + col_off + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _jit(interpret: bool):
    # triton.jit reads TRITON_INTERPRET when it wraps a function, so the kernels are wrapped lazily
    # and once per mode: importing this module never fixes the mode for the whole process.
    return triton.jit(_decode_int_kernel), triton.jit(_int_matmul_kernel)


def _kernels():
    return _jit(bool(triton.knobs.runtime.interpret))


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two dividing n, at most cap."""
    return min(n & -n, cap)


def decode_int(packed) -> torch.Tensor:
    """(N, K) float32 weight of an "int" PackedTensor, decoded by a Triton kernel."""
    N, K = packed.shape
    bits, g = packed.attrs["bits"], packed.attrs["group_size"]
    q, s, z = (packed.tensors[k].contiguous() for k in ("qweight", "scales", "zeros"))
    out = torch.empty((N, K), dtype=torch.float32, device=q.device)
    BLOCK_N, BLOCK_K = 32, 64
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _kernels()[0][grid](q, s, z, out, N, K, q.shape[1], s.shape[1], g, BITS=bits, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes for one launch (a plain heuristic; the GPU benchmark is where to tune it)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    USE_DOT: bool
    DOT_NATIVE: bool
    FACTORED: bool
    SPLIT_K: int
    k_per_split: int

    @staticmethod
    def pick(M: int, N: int, K: int, group_size: int, x_dtype: torch.dtype, on_gpu: bool,
             block_m: int | None = None) -> "LaunchConfig":
        if block_m is None:  # plain launch: the block covers the batch (up to 16 or 64 rows)
            block_m = triton.next_power_of_2(max(M, 1)) if M <= 8 else max(16, min(64, triton.next_power_of_2(M)))
        use_dot = block_m >= 16
        bk = _pow2_divisor(group_size, 128 if on_gpu else 64)  # divides g by construction
        factored = bk >= (16 if use_dot else 1)
        block_k = bk if factored else 32
        # the interpreter pays per program: few, large tiles there
        block_n = (32 if use_dot else 16) if on_gpu else min(64, triton.next_power_of_2(N))
        native = x_dtype == torch.float16 or (x_dtype == torch.bfloat16 and not interpreting())
        split = 1
        if on_gpu:  # split K when the (M, N) grid alone cannot fill the GPU (GEMV on a tall-K matrix)
            tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
            while tiles * split < 256 and K // (split * 2) >= 8 * block_k:
                split *= 2
        k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
        return LaunchConfig(block_m, block_n, block_k, use_dot, native, factored, split, k_per_split)


def int_matmul(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, N: int, K: int, bits: int,
               group_size: int, out: torch.Tensor | None = None, col_off: int = 0,
               rows: torch.Tensor | None = None, block_expert: torch.Tensor | None = None,
               block_m: int | None = None, config: LaunchConfig | None = None) -> torch.Tensor:
    """Launch the fused decode-matmul.

    Plain: x (M, K), q (N, KB), s and z (N, G) -> out (M, N) in x's dtype. Grouped (rows and
    block_expert given): q, s, z are stacked (E, N, .); rows (P,) int32 gives the x row of every
    padded output row (-1 = padding), block_expert (P // block_m,) int32 the local expert of every
    block (-1 = skip); out is (P, >= col_off + N) and its columns [col_off, col_off + N) are written.
    config overrides the tile heuristic (tests use it to run the GPU tiles under the interpreter).
    """
    gather = rows is not None
    M = rows.shape[0] if gather else x.shape[0]
    cfg = config or LaunchConfig.pick(M, N, K, group_size, x.dtype, x.is_cuda, block_m if gather else None)
    if gather and cfg.BLOCK_M != block_m:
        raise ValueError(f"config.BLOCK_M={cfg.BLOCK_M} must equal the routing block size {block_m}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    stride_qe = q.stride(0) if q.dim() == 3 else 0
    stride_se = s.stride(0) if s.dim() == 3 else 0
    KB, G = q.shape[-1], s.shape[-1]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if cfg.SPLIT_K > 1:  # partial sums per K slice, added below in a fixed order (deterministic)
        part = torch.zeros((cfg.SPLIT_K, M, N), dtype=torch.float32, device=x.device)
        dst, stride_om, stride_os, off = part, N, M * N, 0
    else:
        dst, stride_om, stride_os, off = out, out.stride(0), 0, col_off
    dummy = q  # unused pointer arguments when not gathering
    grid = (triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N), cfg.SPLIT_K)
    _kernels()[1][grid](
        x, x.stride(0), rows if gather else dummy, block_expert if gather else dummy,
        q, s, z, stride_qe, stride_se, dst, stride_om, stride_os, off,
        M, N, K, KB, G, group_size, cfg.k_per_split,
        BITS=bits, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GATHER=gather,
        USE_DOT=cfg.USE_DOT, DOT_NATIVE=cfg.DOT_NATIVE, FACTORED=cfg.FACTORED)
    if cfg.SPLIT_K > 1:
        if gather:  # rows of blocks this launch skipped (other groups, padding) keep out's values
            used = (block_expert >= 0).view(-1, 1).expand(-1, cfg.BLOCK_M).reshape(-1)  # (nblocks,) -> (P,)
            keep = (used & (rows >= 0)).unsqueeze(1)  # (P, 1)
            out[:, col_off:col_off + N] = torch.where(keep, part.sum(0).to(out.dtype), out[:, col_off:col_off + N])
        else:
            out[:, col_off:col_off + N] = part.sum(0).to(out.dtype)
    return out


def packed_linear_int(x: torch.Tensor, packed) -> torch.Tensor:
    """x (M, K) @ W^T for an "int" PackedTensor, output (M, N) in x's dtype."""
    N, K = packed.shape
    t = packed.tensors
    return int_matmul(x, t["qweight"].contiguous(), t["scales"].contiguous(), t["zeros"].contiguous(),
                      N, K, packed.attrs["bits"], packed.attrs["group_size"])
