"""Dictionary coding of ternary pair streams (the "sub1" codec's core), after QMoE.

Ternary codes t in {0, 1, 2} (1 = zero) are taken in pairs along each row into 9-ary symbols
s = 3 * t[2i] + t[2i+1] (an odd K is padded with one zero trit, so the all-zero pair is s = 4). The
rows of a matrix, one after another, form one symbol stream, coded greedily by longest match against
a dictionary of at most 2^16 variable-length strings, one codeword per match (Frantar & Alistarh 2023,
"QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models", section 4). A codeword takes
b = ceil(log2 D) bits for a D-codeword dictionary (QMoE's 16 bits at D = 2^16; a model too small to
amortise 2^16 gets fewer, shorter codewords), stored as an LSB-first bit stream, codeword i at bit i * b.

Rows still decode in parallel: per row the codec stores how many codewords start in it (row_counts)
and how many of its first symbols still belong to a codeword that started in an earlier row
(row_skip, < MAX_LEN): row n's decoder starts inside codeword sum(row_counts[:n]) - 1 at that offset,
or at codeword sum(row_counts[:n]) when the skip is 0. Coding across row ends instead of restarting
every row saves the part-used last codeword of each row (2-5% of the codewords on the fixture, whose
rows are 96-192 pairs long).

The dictionary itself (Tunstall's trie, its one-bit-per-node storage and the tables built from it)
is in sub1_trie.py.

Parsing (encode) is vectorised over rows (one trie step per column for all rows at once) and runs on
the host; rows that start inside the previous row's last codeword are walked again from that trie node
(parse_rows). Decode is a gather on the codewords' device: codeword -> (length, expansion) tables,
each symbol's codeword found by a searchsorted in the cumulative lengths (no host sync).

The empirical order-0 entropy of the pair stream, H = -sum_s p_s log2 p_s bits per pair, is the bound
an order-0 coder cannot beat (benchmarks/sub1bit.py reports the codeword bits against it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..errors import PackedFormatError
from .sub1_trie import (MAX_ENTRIES, MAX_LEN, NSYM, Trie, Walker, device_tables, leaves, tables_for, to_tensor,
                        tunstall_sizes, walker, walker_for)

ZERO_TRIT = 1
ZERO_PAIR = 3 * ZERO_TRIT + ZERO_TRIT  # 4
SAMPLE_SYMBOLS = 1 << 22  # build_dictionary judges sizes on at most about this many pair symbols


# ---- codeword streams ------------------------------------------------------------------------------

def codeword_bits(D: int) -> int:
    """Bits per codeword of a D-entry dictionary: ceil(log2 D)."""
    return max(1, (D - 1).bit_length())


def pack_codewords(cw: torch.Tensor, bits: int) -> torch.Tensor:
    """(M,) codewords < 2^bits -> (ceil(M * bits / 8),) uint8, LSB-first: codeword i at bit i * bits."""
    from .intq import pack_bits
    return pack_bits(cw.to(torch.int64).view(1, -1), bits).view(-1)


def unpack_codewords(stream: torch.Tensor, M: int, bits: int) -> torch.Tensor:
    """Inverse of pack_codewords: (M,) int64."""
    from .intq import unpack_bits
    return unpack_bits(stream.view(1, -1), bits, M).view(-1).to(torch.int64)


# ---- pair streams ---------------------------------------------------------------------------------

def pair_symbols(codes: torch.Tensor) -> torch.Tensor:
    """codes: (N, K) ternary codes in {0,1,2} -> (N, ceil(K/2)) int64 pair symbols in [0, 9)."""
    N, K = codes.shape
    c = codes.to(torch.int64)
    if K % 2:
        c = torch.nn.functional.pad(c, (0, 1), value=ZERO_TRIT)  # (N, K) -> (N, K+1)
    c = c.view(N, -1, 2)  # (N, K2, 2)
    return 3 * c[..., 0] + c[..., 1]


def pair_entropy(codes: torch.Tensor) -> float:
    """Empirical order-0 entropy of the pair-symbol stream, in bits per weight (N*K weights)."""
    N, K = codes.shape
    s = pair_symbols(codes).flatten()
    p = torch.bincount(s, minlength=NSYM).double() / s.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) * s.numel() / (N * K)


# ---- coding ---------------------------------------------------------------------------------------

class Parse(NamedTuple):
    codewords: torch.Tensor    # (M,) int64, in stream order
    row_counts: torch.Tensor   # (R,) int64 codewords that start in each row
    row_skip: torch.Tensor     # (R,) int64 symbols at a row's start covered by a codeword from an earlier row


def _walk(flat: torch.Tensor, is_leaf: torch.Tensor, S: torch.Tensor, start: torch.Tensor):
    """Walk every row of S (R, L) down the trie at once, one column per step, from node ids `start` (R,)
    (id = node + 1, root 0); a leaf emits its id and the walk restarts at the root.
    -> (emitted (R, L) id at the column where a codeword ends, -1 elsewhere; the ids where the rows end)."""
    R, L = S.shape
    out = torch.full((R, L), -1, dtype=torch.int64)
    node = start.clone()
    for t in range(L):
        node = flat[node * NSYM + S[:, t]]
        leaf = is_leaf[node]
        out[:, t] = torch.where(leaf, node, -1)
        node = torch.where(leaf, 0, node)
    return out, node


def parse_rows(w: Walker, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy parse of the rows of S (R, L), one after another as one stream -> (codewords (M,), start
    positions (M,) in the stream).

    Vectorised over rows: every row is first walked from the root; a row whose previous row ends inside
    a codeword (at an inner node) is walked again from that node, until no row's start changes. Parses
    from different start nodes merge after a few codewords, so this settles in 2-3 rounds (row r is
    right after round r + 1 at worst). At the end of the stream the walk goes on with zero pairs.
    """
    R, L = S.shape
    start = torch.zeros(R, dtype=torch.int64)
    out, end = _walk(w.flat, w.is_leaf, S, start)
    while R:
        want = torch.cat([start[:1], end[:-1]])  # row r starts where row r - 1 ended
        redo = (want != start).nonzero().flatten()
        if redo.numel() == 0:
            break
        start = want
        out[redo], end[redo] = _walk(w.flat, w.is_leaf, S[redo], start[redo])
    ids = out[out >= 0]  # row-major: stream order
    if R and int(end[-1]):  # the stream ends inside a codeword: complete it with zero pairs
        node = int(end[-1])
        while not bool(w.is_leaf[node]):
            node = int(w.flat[node * NSYM + ZERO_PAIR])
        ids = torch.cat([ids, torch.tensor([node])])
    cw = w.cw_of[ids]
    lens = w.lengths[cw]
    return cw, torch.cumsum(lens, 0) - lens


def row_layout(starts: torch.Tensor, R: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codeword start positions (M,) in a stream of R rows of L symbols -> (row_counts (R,), row_skip (R,))."""
    counts = torch.bincount(starts // max(L, 1), minlength=R)[:R]
    first = torch.cumsum(counts, 0) - counts  # (R,) first codeword starting in each row
    nxt = torch.cat([starts, torch.tensor([R * L])])[first]  # its start (stream end if none)
    return counts, nxt - torch.arange(R) * L


def encode_rows(codes: torch.Tensor, dictionary: torch.Tensor) -> Parse:
    """codes: (N, K) ternary on any device -> Parse (host tensors) of its row-major pair stream against the
    stored dictionary. The greedy parse is sequential along a row: it runs on the host."""
    S = pair_symbols(codes.detach().cpu())  # (N, K2)
    cw, starts = parse_rows(walker_for(dictionary), S)
    return Parse(cw, *row_layout(starts, *S.shape))


def coded_codewords(trie: Trie, streams: list[torch.Tensor]) -> int:
    """Codewords needed for every (R, L) pair-symbol matrix of `streams`, its rows as one stream."""
    w = walker(trie)
    return sum(parse_rows(w, S.cpu())[0].numel() for S in streams)


def symbol_counts(code_streams) -> torch.Tensor:
    """(9,) int64 pair-symbol counts over ternary code matrices."""
    return sum(torch.bincount(pair_symbols(c).flatten(), minlength=NSYM) for c in code_streams)


def build_dictionary(code_streams, max_entries: int = MAX_ENTRIES, max_len: int = MAX_LEN,
                     sizes: tuple[int, ...] | None = None, max_rows: int = 8192,
                     amortize: float = 1.0) -> torch.Tensor:
    """Build a Tunstall dictionary for ternary codes; returns the stored uint8 bitmap.

    code_streams: list of (N, K) ternary code tensors (a layer's or a model's experts). The number of
    codewords is one of `sizes` (default: powers of 2 from 32 up to max_entries; a size s allows the
    largest 9 + 8k <= s) that minimises codeword bytes (ceil(log2 D) bits each) + dictionary bytes /
    amortize on these streams. amortize: how many times the streams given stand for (e.g. the number
    of layers that share a dictionary built from the first one). The size is judged on every step-th
    row (rows of one width as one stream; step keeps the sample within max_rows rows and SAMPLE_SYMBOLS
    symbols), largest size first, stopping once the cost rises: the build time stays bounded on large
    models.
    """
    code_streams = [c.detach().cpu() for c in code_streams]  # the trie is built and walked on the host
    counts = symbol_counts(code_streams)
    rows = sum(c.shape[0] for c in code_streams)
    symbols = sum(c.shape[0] * ((c.shape[1] + 1) // 2) for c in code_streams)
    step = max(1, -(-rows // max_rows), -(-symbols // SAMPLE_SYMBOLS))
    if sizes is None:
        sizes = tuple(1 << b for b in range(5, 17) if (1 << b) < max_entries) + (max_entries,)
    sizes = sorted({min(max(s, NSYM), MAX_ENTRIES) for s in sizes})
    tries = tunstall_sizes(counts, sizes, max_len)
    if len(sizes) == 1:
        return to_tensor(tries[sizes[0]])
    groups = {}
    for c in code_streams:  # matrices of one width share a parse call: their rows as one stream
        S = pair_symbols(c[::step])
        groups.setdefault(S.shape[1], []).append(S)
    streams = [torch.cat(v) for v in groups.values()]

    def cost(s):
        D, T = leaves(tries[s]).numel(), tries[s].parent.numel()
        return coded_codewords(tries[s], streams) * step * codeword_bits(D) / 8 + (-(-T // 8)) / amortize

    best, best_cost = None, float("inf")
    for s in sorted(sizes, reverse=True):  # the cost is convex in log D: stop once it rises again
        c = cost(s)
        if c > best_cost:
            break
        best, best_cost = s, c
    return to_tensor(tries[best])


def decode_rows(codewords: torch.Tensor, dictionary: torch.Tensor, N: int, K: int,
                key: str | None = None) -> torch.Tensor:
    """codewords: (M,) -> (N, K) int32 ternary codes, on the codewords' device, with no host sync.

    Pair symbol p of the row-major stream (p < N * ceil(K/2)) lies in the codeword whose expansion ends
    first after p: a searchsorted of p in the cumulative lengths, then a gather from the (D, Lmax)
    expansion table at p's offset in that codeword. Codewords past the stream's end (padding, or extra
    zero codewords read from a stream's last byte) and any index past the dictionary are clamped: for a
    checked tensor they change nothing. key: the dictionary's checked id (sub1_trie.device_tables)."""
    table, lengths = device_tables(dictionary, codewords.device, key)  # (D, Lmax) uint8, (D,) int32
    D, L = table.shape
    M, P = codewords.numel(), N * ((K + 1) // 2)
    if M == 0:
        raise PackedFormatError(f"sub1 codec: no codewords for {N} rows of {K} weights")
    cw = codewords.to(torch.int64).clamp(0, D - 1)
    ends = torch.cumsum(lengths[cw].to(torch.int64), 0)  # (M,) stream position after each codeword
    pos = torch.arange(P, dtype=torch.int64, device=cw.device)
    i = torch.searchsorted(ends, pos, right=True).clamp_(max=M - 1)  # (P,) codeword holding each symbol
    off = (pos - ends[i] + lengths[cw[i]]).clamp_(0, L - 1)  # (P,) position inside that codeword
    sym = table[cw[i], off].to(torch.int32)  # (P,) pair symbols s = 3 t0 + t1
    trits = torch.stack((sym // 3, sym % 3), dim=-1)  # (P, 2)
    return trits.view(N, -1)[:, :K].contiguous()  # (N, 2 ceil(K/2)) -> (N, K)


def stream_layout(codewords: torch.Tensor, dictionary: torch.Tensor, N: int, K: int):
    """-> (symbols the codewords expand to, row_counts (N,), row_skip (N,)) they imply; counts and skips
    are None unless the expansion covers the N rows of ceil(K/2) symbols, the last codeword starting
    inside them (validation)."""
    _, lengths = tables_for(dictionary)
    lens = lengths[codewords.to(torch.int64)]
    starts = torch.cumsum(lens, 0) - lens
    total, need = int(lens.sum()), N * ((K + 1) // 2)
    if total < need or (starts.numel() and int(starts[-1]) >= need):
        return total, None, None
    return (total, *row_layout(starts, N, (K + 1) // 2))


def trit_entropy(zero_frac: float) -> float:
    """Entropy in bits per weight of iid trits with P(0) = zero_frac and the rest split evenly."""
    p = [zero_frac, (1 - zero_frac) / 2, (1 - zero_frac) / 2]
    return -sum(x * math.log2(x) for x in p if x > 0)
