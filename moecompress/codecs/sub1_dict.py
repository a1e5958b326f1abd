"""Dictionary coding of ternary pair streams (the "sub1" codec's core), after QMoE.

Ternary codes t in {0, 1, 2} (1 = zero) are taken in pairs along each row into 9-ary symbols
s = 3 * t[2i] + t[2i+1] (an odd K is padded with one zero trit, so the all-zero pair is s = 4). Each
row's symbol stream is coded on its own, greedily by longest match, against a prefix-closed dictionary
of at most 2^16 variable-length entries, one codeword per match (Frantar & Alistarh 2023, "QMoE:
Practical Sub-1-Bit Compression of Trillion-Parameter Models", section 4). A codeword takes
b = ceil(log2 D) bits for a D-entry dictionary (QMoE's 16 bits at D = 2^16; a model too small to
amortise 2^16 entries gets a smaller dictionary and proportionally shorter codewords), stored as an
LSB-first bit stream, so codeword i sits at bit i * b and rows still decode in parallel.

The dictionary is a trie: entry i = (parent(i), symbol(i)), expansion(i) = expansion(parent) + symbol,
parents before children, entries 0..8 the nine single symbols (so every stream is codable). It is built
from the streams the model actually has: the D most frequent strings (counted at every position inside
rows, up to `max_len` symbols), which for a memoryless source is Tunstall's variable-to-fixed code
(Tunstall 1967: the most probable strings) and which also captures runs; D is chosen among powers of
two by the real bytes it gives, codewords plus dictionary. Parsing is vectorised over rows: one trie
step for all rows at once per symbol position.

Decode is a gather: codeword -> (length, expansion) tables, output positions from a cumsum of lengths.
Stored form of the dictionary: uint8 (D, 3) = little-endian uint16 (parent + 1, 0 for none), symbol.

The empirical order-0 entropy of the pair stream, H = -sum_s p_s log2 p_s bits per pair, is the bound
an order-0 coder cannot beat; a dictionary of runs exploits run structure and can go below it.
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import NamedTuple

import torch

from ..errors import PackedFormatError

NSYM = 9
ZERO_TRIT = 1
ZERO_PAIR = 3 * ZERO_TRIT + ZERO_TRIT  # 4
MAX_ENTRIES = 1 << 16
ENTRY_BYTES = 3


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


def trits_from_pairs(sym: torch.Tensor, K: int) -> torch.Tensor:
    """sym: (N, K2) pair symbols -> (N, K) int32 ternary codes; inverse of pair_symbols."""
    N = sym.shape[0]
    t = torch.stack((sym // 3, sym % 3), dim=-1).view(N, -1)  # (N, K2, 2) -> (N, 2*K2)
    return t[:, :K].to(torch.int32)


def pair_entropy(codes: torch.Tensor) -> float:
    """Empirical order-0 entropy of the pair-symbol stream, in bits per weight (N*K weights)."""
    N, K = codes.shape
    s = pair_symbols(codes).flatten()
    p = torch.bincount(s, minlength=NSYM).double() / s.numel()
    p = p[p > 0]
    return float(-(p * p.log2()).sum()) * s.numel() / (N * K)


# ---- the dictionary (a trie) ----------------------------------------------------------------------

class Trie(NamedTuple):
    parent: torch.Tensor  # (D,) int64, -1 for the nine single symbols
    symbol: torch.Tensor  # (D,) int64 in [0, 9)


def singles() -> Trie:
    return Trie(torch.full((NSYM,), -1, dtype=torch.int64), torch.arange(NSYM))


def to_tensor(trie: Trie) -> torch.Tensor:
    """Trie -> stored uint8 (D, 3): uint16 LE (parent + 1), symbol."""
    p1 = trie.parent + 1
    return torch.stack((p1 & 0xFF, p1 >> 8, trie.symbol), dim=1).to(torch.uint8)  # (D, 3)


def from_tensor(t: torch.Tensor) -> Trie:
    """Stored uint8 (D, 3) -> Trie, validated (raises PackedFormatError)."""
    if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] != 3 or not NSYM <= t.shape[0] <= MAX_ENTRIES:
        raise PackedFormatError(f"sub1 dictionary must be uint8 (D, 3) with 9 <= D <= 65536, found "
                                f"{tuple(t.shape)} {t.dtype}")
    t = t.to(torch.int64)
    parent = t[:, 0] + (t[:, 1] << 8) - 1
    symbol = t[:, 2]
    idx = torch.arange(t.shape[0])
    if not (torch.equal(parent[:NSYM], torch.full((NSYM,), -1)) and torch.equal(symbol[:NSYM], idx[:NSYM])):
        raise PackedFormatError("sub1 dictionary: entries 0..8 must be the nine single symbols")
    if bool((symbol >= NSYM).any()) or bool((parent[NSYM:] < 0).any()) or bool((parent >= idx).any()):
        raise PackedFormatError("sub1 dictionary: every entry needs a symbol < 9 and an earlier parent")
    return Trie(parent, symbol)


def dictionary_id(t: torch.Tensor) -> str:
    """Content hash of a stored dictionary: how PackedTensors name the one they share."""
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def child_table(trie: Trie) -> torch.Tensor:
    """(D+1, 9) int64: node ids are codeword + 1, root 0; child[n, s] = 0 where n+s is no entry."""
    D = trie.parent.numel()
    child = torch.zeros(D + 1, NSYM, dtype=torch.int64)
    child[trie.parent + 1, trie.symbol] = torch.arange(1, D + 1)
    return child


def depths(trie: Trie) -> torch.Tensor:
    """(D,) int64 expansion length of each entry (parents precede children)."""
    d = torch.ones_like(trie.parent)
    has = trie.parent >= 0
    p = trie.parent.clamp(min=0)
    for _ in range(trie.parent.numel()):
        nd = torch.where(has, d[p] + 1, 1)
        if torch.equal(nd, d):
            return d
        d = nd
    return d


def expansion_table(trie: Trie) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (table (D, Lmax) uint8 symbols, lengths (D,) int64); built level by level."""
    lengths = depths(trie)
    D, L = lengths.numel(), int(lengths.max())
    table = torch.zeros(D, L, dtype=torch.uint8)
    for level in range(1, L + 1):
        idx = (lengths == level).nonzero().squeeze(1)
        if level > 1:
            table[idx] = table[trie.parent[idx]]
        table[idx, level - 1] = trie.symbol[idx].to(torch.uint8)
    return table, lengths


@functools.lru_cache(maxsize=8)
def _cached_tables(key: str, raw: bytes, D: int):
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(D, 3)
    return expansion_table(from_tensor(t))


def tables_for(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expansion tables of a stored dictionary, cached by content (decoding reuses one per model)."""
    raw = t.contiguous().numpy().tobytes()
    return _cached_tables(hashlib.sha1(raw).hexdigest(), raw, t.shape[0])


# ---- coding ---------------------------------------------------------------------------------------

class Parse(NamedTuple):
    codewords: torch.Tensor    # (M,) int64, rows in order
    row_counts: torch.Tensor   # (R,) int64 codewords per row
    extensions: torch.Tensor   # (D+1, 9) int64 how often a match of node n stopped at symbol s


def greedy_parse(child: torch.Tensor, S: torch.Tensor, count_extensions: bool = False) -> Parse:
    """Greedy longest-match parse of every row of S: (R, L) pair symbols, all rows at once.

    A prefix-closed dictionary makes "walk the trie until the next symbol has no child" the longest
    match. One trie step per column for all rows; emitted codewords land in an (R, L) buffer whose
    row-major non-negative entries are the code stream.
    """
    R, L = S.shape
    out = torch.full((R, L), -1, dtype=torch.int64)  # codeword emitted before reading column t, or at end
    node = child[0, S[:, 0]] if L else torch.zeros(R, dtype=torch.int64)
    for t in range(1, L):
        s = S[:, t]
        nxt = child[node, s]
        miss = nxt == 0
        out[:, t - 1] = torch.where(miss, node - 1, -1)
        node = torch.where(miss, child[0, s], nxt)
    if L:
        out[:, L - 1] = node - 1
    mask = out >= 0
    ext = torch.zeros(0, dtype=torch.int64)
    if count_extensions:  # a miss before column t: (node emitted, S[:, t]) -> key node_id * 9 + s
        miss = mask[:, :-1]
        keys = (out[:, :-1] + 1) * NSYM + S[:, 1:]
        ext = torch.bincount(keys[miss], minlength=child.numel()).view(child.shape)
    return Parse(out[mask], mask.sum(1), ext)


def _rows_flat(code_streams) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (seq (P,) every row's pair symbols, one row after another; left (P,) symbols left in the row)."""
    seqs, lefts = [], []
    for c in code_streams:
        S = pair_symbols(c)  # (N, K2)
        seqs.append(S.flatten())
        lefts.append(torch.arange(S.shape[1], 0, -1).repeat(S.shape[0]))
    return torch.cat(seqs), torch.cat(lefts)


def frequent_strings(code_streams, max_entries: int = MAX_ENTRIES, max_len: int = 64) -> Trie:
    """The `max_entries` most frequent symbol strings within rows (overlapping counts), as a trie.

    Counted level by level (apriori): an (l+1)-string is counted only where its l-prefix survived,
    and a level keeps only strings at least as frequent as the max_entries-th count seen so far, a
    lower bound of the final cut. Sorted by (count desc, length asc), every prefix of the order is
    prefix-closed (a prefix is never rarer than its extensions); the nine singles always come first.
    """
    seq, left = _rows_flat(code_streams)
    par, sym, cnt, dep = [singles().parent], [singles().symbol], [torch.full((NSYM,), 1 << 62)], [torch.ones(NSYM, dtype=torch.int64)]
    pos = torch.arange(seq.numel())
    cur = seq.clone()  # id of the string starting at each position in pos
    n_ids, cut = NSYM, 0
    for level in range(1, max_len):
        ok = left[pos] > level
        pos, cur = pos[ok], cur[ok]
        if pos.numel() == 0:
            break
        key = cur * NSYM + seq[pos + level]
        uniq, inv, c = torch.unique(key, return_inverse=True, return_counts=True)
        allc = torch.cat(cnt[1:] + [c])
        if allc.numel() >= max_entries - NSYM:
            cut = max(cut, int(torch.topk(allc, max_entries - NSYM).values[-1]))
        keep = c >= max(cut, 2)
        if not bool(keep.any()):
            break
        new_id = torch.full_like(uniq, -1)
        new_id[keep] = torch.arange(n_ids, n_ids + int(keep.sum()))
        n_ids += int(keep.sum())
        par.append(uniq[keep] // NSYM)
        sym.append(uniq[keep] % NSYM)
        cnt.append(c[keep])
        dep.append(torch.full((int(keep.sum()),), level + 1))
        cur = new_id[inv]
        pos, cur = pos[cur >= 0], cur[cur >= 0]
    parent, symbol, count, depth = (torch.cat(x) for x in (par, sym, cnt, dep))
    # rank by (count desc, depth asc, id asc); codeword = rank, so parents precede children
    order = torch.sort(depth, stable=True).indices  # ids are in creation order already
    order = order[torch.sort(-count[order], stable=True).indices][:max_entries]
    rank = torch.full((n_ids,), -1, dtype=torch.int64)
    rank[order] = torch.arange(order.numel())
    p = parent[order]
    return Trie(torch.where(p >= 0, rank[p.clamp(min=0)], -1), symbol[order])


def coded_bytes(trie: Trie, streams: list[torch.Tensor]) -> float:
    """Bytes of the codewords of every row of `streams` (pair symbols, grouped by row length)."""
    child = child_table(trie)
    n = sum(greedy_parse(child, S).codewords.numel() for S in streams)
    return n * codeword_bits(trie.parent.numel()) / 8


def build_dictionary(code_streams, max_entries: int = MAX_ENTRIES, max_len: int = 64,
                     sizes: tuple[int, ...] | None = None, max_rows: int = 8192,
                     amortize: float = 1.0) -> torch.Tensor:
    """Build a prefix-closed dictionary from ternary codes; returns the stored uint8 (D, 3) tensor.

    code_streams: list of (N, K) ternary code tensors (a layer's or a model's experts). The entries are
    the most frequent strings (frequent_strings); the size is the one among `sizes` (default: powers
    of 2 from 32 up to max_entries) that minimises codeword bytes (ceil(log2 D) bits each) +
    dictionary bytes / amortize on these streams, so a small model does not pay for a dictionary it
    cannot amortise. amortize: how many times the streams given stand for (e.g. the number of layers
    that share a dictionary built from the first one). Statistics come from every
    ceil(rows / max_rows)-th row, which bounds the build time on large models (the codeword bytes are
    scaled back up by that step).
    """
    code_streams = list(code_streams)
    rows = sum(c.shape[0] for c in code_streams)
    step = max(1, -(-rows // max_rows))
    code_streams = [c[::step] for c in code_streams]  # deterministic row sample: every step-th row
    trie = frequent_strings(code_streams, max_entries, max_len)
    D = trie.parent.numel()
    if sizes is None:
        sizes = tuple(1 << b for b in range(5, 17) if (1 << b) < D) + (D,)
    sizes = sorted({min(max(s, NSYM), D) for s in sizes})
    if len(sizes) > 1:
        groups = {}
        for c in code_streams:
            S = pair_symbols(c)
            groups.setdefault(S.shape[1], []).append(S)
        streams = [torch.cat(v) for v in groups.values()]  # (rows, K2) per row length
        best = min(sizes, key=lambda s: (coded_bytes(Trie(trie.parent[:s], trie.symbol[:s]), streams) * step
                                         + ENTRY_BYTES * s / amortize, s))
    else:
        best = sizes[0]
    trie = Trie(trie.parent[:best], trie.symbol[:best])
    return to_tensor(trie)


def encode_rows(codes: torch.Tensor, dictionary: torch.Tensor) -> Parse:
    """codes: (N, K) ternary -> Parse of its pair stream against the stored dictionary."""
    return greedy_parse(child_table(from_tensor(dictionary)), pair_symbols(codes))


def decode_rows(codewords: torch.Tensor, dictionary: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """codewords: (M,) -> (N, K) int32 ternary codes. Rows are concatenated: each row expands to
    exactly ceil(K/2) symbols (checked by the codec), so output positions are a global cumsum."""
    table, lengths = tables_for(dictionary)
    cw = codewords.to(torch.int64)
    lens = lengths[cw]  # (M,)
    idx = torch.repeat_interleave(torch.arange(cw.numel()), lens)  # (N*K2,) which codeword
    start = torch.cumsum(lens, 0) - lens
    within = torch.arange(idx.numel()) - start[idx]
    sym = table.view(-1)[cw[idx] * table.shape[1] + within]  # (N*K2,) uint8 pair symbols
    return trits_from_pairs(sym.view(N, -1).to(torch.int32), K)


def row_symbol_counts(codewords: torch.Tensor, row_counts: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """(N,) symbols each row's codewords expand to (for validation)."""
    _, lengths = tables_for(dictionary)
    rows = torch.repeat_interleave(torch.arange(row_counts.numel()), row_counts)
    return torch.zeros(row_counts.numel(), dtype=torch.int64).index_add_(0, rows, lengths[codewords.to(torch.int64)])


def trit_entropy(zero_frac: float) -> float:
    """Entropy in bits per weight of iid trits with P(0) = zero_frac and the rest split evenly."""
    p = [zero_frac, (1 - zero_frac) / 2, (1 - zero_frac) / 2]
    return -sum(x * math.log2(x) for x in p if x > 0)
