"""Triton kernels for the "sub1" codec: exact decode and a fused decode-matmul y = x @ W^T.

Format (`moecompress/codecs/ternary.py`, `sub1_dict.py`, `sub1_trie.py`): the rows of W (N, K), one after
another, are a stream of pair symbols s = 3 t[2i] + t[2i+1] (ceil(K/2) per row) coded as b-bit codewords (b =
ceil(log2 D) <= 16, an LSB-first bit stream: codeword i is cut out of the 3 bytes from bit i * b) against a
shared dictionary. Codeword c expands to lengths[c] symbols, table[c, 0:lengths[c]]
(`sub1_trie.expansion_table`).
Row n begins inside codeword c(n) - 1, skip[n] symbols before its end, when skip[n] > 0, else at
codeword c(n), c(n) = sum(row_counts[:n]) (skip = row_skip). W[n, k] = lo / 0 / hi[n, k // g] for t = 0 / 1 / 2.

Row starts without a per-row table: the kernel reads the stored row_counts and one int64 anchor per CHUNK
rows, the bit at which the first codeword of row c * CHUNK begins in the byte buffer it is given
(`row_anchors`). A program's rows lie inside one chunk (BLOCK_N divides CHUNK): it sums the counts of
the chunk's rows before its block (at most CHUNK / BLOCK_N - 1 vector loads) and takes an exclusive
cumsum of its own rows' counts, so row n starts at bit anchor + b * (counts before n in its chunk).

Kernel: each program owns BLOCK_N rows and walks them in lockstep, one pair symbol (two columns of W)
per step. Every row has exactly ceil(K/2) symbols, so all rows of the block are at the same column at
every step even though their codewords differ: per row a small state machine holds the current
codeword and the position inside its expansion and fetches the next codeword when the expansion ends.
The activation columns 2s and 2s+1 are therefore one broadcast load shared by all rows, and the decoded
weights go straight into a (BLOCK_M, BLOCK_N) fp32 accumulator; the dense W is never written (except
by the decode-only variant). Decoding is a selection, so it equals the reference bit for bit; the
products are fp32 multiply-adds in column order.

With GATHER the same kernel serves the grouped MoE launch (like the "int" kernel): the group's buffer
is the members' own byte streams one after another (each member starts at a byte boundary, so every
member's stored `codewords` is a view into it: resident once), the counts, skips and levels are stacked
(E_g, N[, G]), the anchors (E_g, ceil(N / CHUNK)) carry each member's base bit, and a per-block expert
id picks the expert of each block of sorted tokens.

A row cannot be split along K without extra offsets in the format (only row counts are stored), so
K is walked by one program per row block: the parallelism is N / BLOCK_N programs per token block.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moecompress.codecs import sub1_trie as st

from .intq_triton import interpreting


def _sub1_mm_kernel(x_ptr, stride_xm, rows_ptr, blk_ptr,
                    cw_ptr, cnt_ptr, anchor_ptr, skip_ptr, tab_ptr, len_ptr, lo_ptr, hi_ptr,
                    stride_re, stride_ae, stride_ge, out_ptr, stride_om, col_off,
                    M, N, K, K2, G, group_size, LMAX, NB, CW_BITS,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, GATHER: tl.constexpr,
                    DECODE_ONLY: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    g_row = e.to(tl.int64) * stride_ge + offs_n.to(tl.int64) * G  # (BLOCK_N,) first level of each row
    x_row = x_ptr + rows.to(tl.int64) * stride_xm  # (BLOCK_M,)
    # per-row decoder state: bit of the next codeword, current codeword, its length, position inside it
    n0 = pid_n * BLOCK_N
    c0 = (n0 // CHUNK) * CHUNK  # first row of this block's chunk (BLOCK_N divides CHUNK)
    cnt_row = cnt_ptr + e.to(tl.int64) * stride_re
    pre = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for r in range(c0, n0, BLOCK_N):  # codewords starting in the chunk's rows before this block
        pre += tl.load(cnt_row + r + tl.arange(0, BLOCK_N)).to(tl.int32)
    cnt = tl.load(cnt_row + offs_n, mask=n_mask, other=0).to(tl.int32)
    before = tl.sum(pre, axis=0) + tl.cumsum(cnt, 0) - cnt  # (BLOCK_N,) codewords from the chunk start to row n
    anchor = tl.load(anchor_ptr + e.to(tl.int64) * stride_ae + n0 // CHUNK)
    bit = anchor + before.to(tl.int64) * CW_BITS
    sk = tl.load(skip_ptr + e.to(tl.int64) * stride_re + offs_n, mask=n_mask, other=0).to(tl.int32)
    # a row that begins inside the previous row's last codeword starts sk symbols before that codeword's end
    has = n_mask & (sk > 0)
    bit = tl.where(has, bit - CW_BITS, bit)
    byte = bit >> 3
    b0 = tl.load(cw_ptr + byte, mask=has, other=0).to(tl.int32)
    b1 = tl.load(cw_ptr + byte + 1, mask=has & (byte + 1 < NB), other=0).to(tl.int32)
    b2 = tl.load(cw_ptr + byte + 2, mask=has & (byte + 2 < NB), other=0).to(tl.int32)
    cw = tl.where(has, ((b0 | (b1 << 8) | (b2 << 16)) >> (bit & 7).to(tl.int32)) & ((1 << CW_BITS) - 1), 0)
    length = tl.where(has, tl.load(len_ptr + cw, mask=has, other=0), 0)
    j = tl.where(has, length - sk, 0)
    bit = tl.where(has, bit + CW_BITS, bit)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, K2):
        need = j >= length
        # the next codeword: CW_BITS (<= 16) bits at `bit` of the LSB-first stream, within 3 bytes
        byte = bit >> 3
        ld = need & n_mask
        b0 = tl.load(cw_ptr + byte, mask=ld, other=0).to(tl.int32)
        b1 = tl.load(cw_ptr + byte + 1, mask=ld & (byte + 1 < NB), other=0).to(tl.int32)
        b2 = tl.load(cw_ptr + byte + 2, mask=ld & (byte + 2 < NB), other=0).to(tl.int32)
        nxt = ((b0 | (b1 << 8) | (b2 << 16)) >> (bit & 7).to(tl.int32)) & ((1 << CW_BITS) - 1)
        cw = tl.where(need, nxt, cw)
        bit = tl.where(need, bit + CW_BITS, bit)
        j = tl.where(need, 0, j)
        length = tl.load(len_ptr + cw, mask=n_mask, other=1)
        sym = tl.load(tab_ptr + cw * LMAX + j, mask=n_mask, other=4).to(tl.int32)
        j += 1
        t0 = sym // 3
        t1 = sym % 3
        k0 = 2 * s
        n1 = n_mask & ((offs_n * 0 + k0 + 1) < K)  # an odd K pads the last pair with a zero trit
        m1 = m_mask & ((offs_m * 0 + k0 + 1) < K)
        gi0 = g_row + k0 // group_size
        gi1 = g_row + (k0 + 1) // group_size
        lo0 = tl.load(lo_ptr + gi0, mask=n_mask, other=0).to(tl.float32)
        hi0 = tl.load(hi_ptr + gi0, mask=n_mask, other=0).to(tl.float32)
        lo1 = tl.load(lo_ptr + gi1, mask=n1, other=0).to(tl.float32)
        hi1 = tl.load(hi_ptr + gi1, mask=n1, other=0).to(tl.float32)
        w0 = tl.where(t0 == 0, lo0, tl.where(t0 == 2, hi0, 0.0))
        w1 = tl.where(t1 == 0, lo1, tl.where(t1 == 2, hi1, 0.0))
        if DECODE_ONLY:
            dst = out_ptr + offs_n.to(tl.int64) * K + k0
            tl.store(dst, w0, mask=n_mask)
            tl.store(dst + 1, w1, mask=n1)
        else:
            x0 = tl.load(x_row + k0, mask=m_mask, other=0).to(tl.float32)
            x1 = tl.load(x_row + k0 + 1, mask=m1, other=0).to(tl.float32)
            acc += x0[:, None] * w0[None, :] + x1[:, None] * w1[None, :]
    if not DECODE_ONLY:
        out_rows = offs_m if GATHER else rows  # grouped outputs stay in padded (sorted) order
        out = out_ptr + out_rows[:, None].to(tl.int64) * stride_om + col_off + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _jit(interpret: bool):
    return triton.jit(_sub1_mm_kernel)  # wrapped lazily, once per TRITON_INTERPRET mode


def _kernel():
    return _jit(interpreting())


def device_tables(dictionary: torch.Tensor, dictionary_id: str, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(flat expansion table uint8 (D * LMAX,), lengths int32 (D,), LMAX) on `device`, cached per device by
    the dictionary's content hash (attrs["dictionary_id"], checked against the tensor by the codec's check,
    which dispatch and prepare_experts make sure ran): the matmul is on the hot path, so the dictionary is
    neither hashed nor copied to the host per call (`sub1_trie.device_tables`)."""
    table, lengths = st.device_tables(dictionary, device, key=dictionary_id)
    return table.view(-1), lengths, table.shape[1]


CHUNK = 64  # rows per anchor; every BLOCK_N (a power of 2 <= 64) divides it


def row_anchors(row_counts: torch.Tensor, cw_bits: int, base_bits: torch.Tensor | None = None) -> torch.Tensor:
    """(..., N) codewords per row -> (..., ceil(N / CHUNK)) int64 bit at which the first codeword of row
    c * CHUNK begins: base_bits (...,) (the member's first bit in a joined buffer, default 0) plus cw_bits
    times the codewords of the rows before it. On the counts' device, no host sync."""
    c = row_counts.to(torch.int64)
    before = torch.cumsum(c, -1) - c  # (..., N) exclusive
    a = before[..., ::CHUNK] * cw_bits
    return a if base_bits is None else a + base_bits.to(a.device, torch.int64).unsqueeze(-1)


CPU_BLOCK_N = 64  # rows per program under TRITON_INTERPRET (fewer, larger programs interpret faster)


def _block_n(N: int, on_gpu: bool) -> int:
    """Rows per program: 32 on CUDA, CPU_BLOCK_N interpreted (tests set it below CHUNK to run the kernel's
    chunk-prefix loop as CUDA does); fewer for a matrix of fewer rows. A power of 2 dividing CHUNK."""
    return min(32 if on_gpu else CPU_BLOCK_N, triton.next_power_of_2(N))


def sub1_matmul(x: torch.Tensor, cw: torch.Tensor, counts: torch.Tensor, anchors: torch.Tensor, skips: torch.Tensor,
                dictionary: torch.Tensor, dictionary_id: str, lo: torch.Tensor, hi: torch.Tensor, N: int, K: int,
                group_size: int, cw_bits: int, out: torch.Tensor | None = None, col_off: int = 0,
                rows: torch.Tensor | None = None, block_expert: torch.Tensor | None = None,
                block_m: int | None = None) -> torch.Tensor:
    """Launch the fused decode-matmul.

    Plain: x (M, K), cw uint8 codeword stream of cw_bits-bit codewords, counts (N,) row_counts, anchors
    (ceil(N / CHUNK),) int64 (`row_anchors`), skips (N,) uint8 row_skip, dictionary bitmap with its id,
    lo/hi (N, G) -> out (M, N) in x's dtype. Grouped (rows and block_expert given, as `int_matmul`): cw is
    the members' streams one after another, counts / skips (E, N), anchors (E, ceil(N / CHUNK)) with each
    member's base bit, lo/hi (E, N, G); out (P, >= col_off + N).
    """
    gather = rows is not None
    M = rows.shape[0] if gather else x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    table, lengths, lmax = device_tables(dictionary, dictionary_id, x.device)
    if gather:
        bm = block_m
    else:
        bm = triton.next_power_of_2(max(M, 1)) if M <= 16 else 64
    bn = _block_n(N, x.is_cuda)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    G = lo.shape[-1]
    stride_re = N if counts.dim() == 2 else 0
    stride_ae = anchors.shape[-1] if anchors.dim() == 2 else 0
    stride_ge = N * G if lo.dim() == 3 else 0
    dummy = cw
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _kernel()[grid](x, x.stride(0), rows if gather else dummy, block_expert if gather else dummy,
                    cw, counts, anchors, skips, table, lengths, lo, hi, stride_re, stride_ae, stride_ge,
                    out, out.stride(0), col_off, M, N, K, (K + 1) // 2, G, group_size, lmax, cw.numel(), cw_bits,
                    BLOCK_M=bm, BLOCK_N=bn, CHUNK=CHUNK, GATHER=gather, DECODE_ONLY=False)
    return out


def _parts(packed):
    t = packed.tensors
    counts = t["row_counts"].contiguous()
    return (t["codewords"].contiguous(), counts, row_anchors(counts, packed.attrs["codeword_bits"]),
            t["row_skip"].contiguous(), t["dictionary"], t["lo"].contiguous(), t["hi"].contiguous())


def decode_sub1(packed) -> torch.Tensor:
    """(N, K) float32 weight of a "sub1" PackedTensor, decoded by the Triton kernel."""
    N, K = packed.shape
    cw, counts, anchors, skips, dictionary, lo, hi = _parts(packed)
    table, lengths, lmax = device_tables(dictionary, packed.attrs["dictionary_id"], cw.device)
    out = torch.empty((N, K), dtype=torch.float32, device=cw.device)
    bn = _block_n(N, cw.is_cuda)
    _kernel()[(1, triton.cdiv(N, bn))](out, 0, cw, cw, cw, counts, anchors, skips, table, lengths, lo, hi, 0, 0, 0,
                                       out, 0, 0, 0, N, K, (K + 1) // 2, lo.shape[1], packed.attrs["group_size"], lmax,
                                       cw.numel(), packed.attrs["codeword_bits"], BLOCK_M=1, BLOCK_N=bn, CHUNK=CHUNK,
                                       GATHER=False, DECODE_ONLY=True)
    return out


def packed_linear_sub1(x: torch.Tensor, packed) -> torch.Tensor:
    """x (M, K) @ W^T for a "sub1" PackedTensor, output (M, N) in x's dtype."""
    N, K = packed.shape
    cw, counts, anchors, skips, dictionary, lo, hi = _parts(packed)
    return sub1_matmul(x, cw, counts, anchors, skips, dictionary, packed.attrs["dictionary_id"], lo, hi, N, K,
                       packed.attrs["group_size"], packed.attrs["codeword_bits"])
