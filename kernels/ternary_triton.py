"""Triton kernels for the dense "ternary" codec: exact decode and a fused decode-matmul y = x @ W^T.

Format (`moecompress/codecs/ternary.py`): trits uint8 (N, ceil(K/5)), byte = sum_i t[5j+i] 3^i, and fp16
levels lo, hi (N, K//g). W[n, k] = lo[n, k//g] if t == 0, 0 if t == 1, hi[n, k//g] if t == 2: decoding
is a selection, so the kernel equals the reference bit for bit. Trit k of a row is
(byte[k // 5] // 3^(k % 5)) % 3.

Matmul: when BLOCK_K divides g (one group per K step) the levels factor out:

    sum_k x[m, k] W[n, k] = lo[n, j] * sum_{t=0} x[m, k] + hi[n, j] * sum_{t=2} x[m, k]

two dots with 0/1 indicator matrices (exact in 16 bits) and fp32 accumulation; otherwise each weight
is decoded in fp32 first. Batch < 16 uses broadcast-multiply-reduce instead of tl.dot. With GATHER the kernel serves the grouped
MoE launch (stacked (E, N, .) weights, a per-block expert id), as the "int" kernel does.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .intq_triton import LaunchConfig, interpreting


def _ternary_mm_kernel(x_ptr, stride_xm, rows_ptr, blk_ptr, t_ptr, lo_ptr, hi_ptr, stride_te, stride_ge,
                       out_ptr, stride_om, col_off,
                       M, N, K, KB, G, group_size,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_DOT: tl.constexpr, DOT_NATIVE: tl.constexpr, FACTORED: tl.constexpr,
                       DECODE_ONLY: tl.constexpr, GATHER: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # DECODE_ONLY: K tiles
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATHER:  # grouped MoE launch: the block's expert and the x row of every padded row
        e = tl.load(blk_ptr + pid_m)
        if e < 0:
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
    t_row = t_ptr + e.to(tl.int64) * stride_te + offs_n[:, None].to(tl.int64) * KB
    g_row = e.to(tl.int64) * stride_ge + offs_n.to(tl.int64) * G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * BLOCK_K if DECODE_ONLY else 0
    k_hi = tl.minimum(k_lo + BLOCK_K, K) if DECODE_ONLY else K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        byte = tl.load(t_row + (offs_k // 5)[None, :], mask=w_mask, other=0).to(tl.int32)
        d = offs_k % 5
        p3 = tl.where(d == 0, 1, tl.where(d == 1, 3, tl.where(d == 2, 9, tl.where(d == 3, 27, 81))))
        trit = (byte // p3[None, :]) % 3  # (BLOCK_N, BLOCK_K); masked entries decode to 0 -> lo, x = 0 there
        if DECODE_ONLY or not FACTORED:
            gidx = g_row[:, None] + (offs_k // group_size)[None, :]
            lo = tl.load(lo_ptr + gidx, mask=w_mask, other=0).to(tl.float32)
            hi = tl.load(hi_ptr + gidx, mask=w_mask, other=0).to(tl.float32)
            w = tl.where(trit == 0, lo, tl.where(trit == 2, hi, 0.0))
            if DECODE_ONLY:
                tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=w_mask)
            else:
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                             mask=m_mask[:, None] & k_mask[None, :], other=0).to(tl.float32)
                if USE_DOT:
                    acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
                else:
                    acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
        else:
            j = k0 // group_size
            lo = tl.load(lo_ptr + g_row + j, mask=n_mask, other=0).to(tl.float32)
            hi = tl.load(hi_ptr + g_row + j, mask=n_mask, other=0).to(tl.float32)
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0)
            if USE_DOT:
                if DOT_NATIVE:
                    s_lo = tl.dot(xt, tl.trans((trit == 0).to(xt.dtype)))
                    s_hi = tl.dot(xt, tl.trans((trit == 2).to(xt.dtype)))
                else:
                    xf = xt.to(tl.float32)
                    s_lo = tl.dot(xf, tl.trans((trit == 0).to(tl.float32)), input_precision="ieee")
                    s_hi = tl.dot(xf, tl.trans((trit == 2).to(tl.float32)), input_precision="ieee")
            else:
                xf = xt.to(tl.float32)[:, None, :]
                s_lo = tl.sum(tl.where((trit == 0)[None, :, :], xf, 0.0), axis=2)
                s_hi = tl.sum(tl.where((trit == 2)[None, :, :], xf, 0.0), axis=2)
            acc += s_lo * lo[None, :] + s_hi * hi[None, :]
    if not DECODE_ONLY:
        out_rows = offs_m if GATHER else rows  # grouped outputs stay in padded (sorted) order
        out = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + col_off + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _jit(interpret: bool):
    return triton.jit(_ternary_mm_kernel)  # wrapped lazily, once per TRITON_INTERPRET mode


def _kernel():
    return _jit(interpreting())


def _tensors(packed):
    t = packed.tensors
    return t["trits"].contiguous(), t["lo"].contiguous(), t["hi"].contiguous()


def decode_ternary(packed) -> torch.Tensor:
    """(N, K) float32 weight of a "ternary" PackedTensor, decoded by the Triton kernel."""
    N, K = packed.shape
    trits, lo, hi = _tensors(packed)
    out = torch.empty((N, K), dtype=torch.float32, device=trits.device)
    BN, BK = 32, 64
    _kernel()[(1, triton.cdiv(N, BN), triton.cdiv(K, BK))](
        out, 0, trits, trits, trits, lo, hi, 0, 0, out, 0, 0, 0, N, K, trits.shape[1], lo.shape[1],
        packed.attrs["group_size"], BLOCK_M=1, BLOCK_N=BN, BLOCK_K=BK, USE_DOT=False, DOT_NATIVE=False,
        FACTORED=False, DECODE_ONLY=True, GATHER=False)
    return out


def ternary_matmul(x: torch.Tensor, trits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, N: int, K: int,
                   group_size: int, out: torch.Tensor | None = None, col_off: int = 0,
                   rows: torch.Tensor | None = None, block_expert: torch.Tensor | None = None,
                   block_m: int | None = None) -> torch.Tensor:
    """Launch the fused decode-matmul.

    Plain: x (M, K), trits (N, KB), lo/hi (N, G) -> out (M, N) in x's dtype. Grouped (rows and
    block_expert given, as `int_matmul`): trits (E, N, KB) and lo/hi (E, N, G) stacked; out (P, >= col_off + N).
    """
    gather = rows is not None
    M = rows.shape[0] if gather else x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # the "int" kernel's tile heuristic; this kernel has no split-K, so SPLIT_K is not used
    cfg = LaunchConfig.pick(M, N, K, group_size, x.dtype, x.is_cuda, block_m if gather else None)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    stride_te = trits.stride(0) if trits.dim() == 3 else 0
    stride_ge = lo.stride(0) if lo.dim() == 3 else 0
    _kernel()[(triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N), 1)](
        x, x.stride(0), rows if gather else trits, block_expert if gather else trits, trits, lo, hi,
        stride_te, stride_ge, out, out.stride(0), col_off, M, N, K, trits.shape[-1], lo.shape[-1], group_size,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, USE_DOT=cfg.USE_DOT, DOT_NATIVE=cfg.DOT_NATIVE,
        FACTORED=cfg.FACTORED, DECODE_ONLY=False, GATHER=gather)
    return out


def packed_linear_ternary(x: torch.Tensor, packed) -> torch.Tensor:
    """x (M, K) @ W^T for a "ternary" PackedTensor, output (M, N) in x's dtype."""
    N, K = packed.shape
    trits, lo, hi = _tensors(packed)
    return ternary_matmul(x, trits, lo, hi, N, K, packed.attrs["group_size"])
