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

The dictionary is Tunstall's variable-to-fixed code (Tunstall 1967) for the order-0 pair statistics
the model actually has: a trie that starts as the nine single symbols and repeatedly expands its most
probable leaf (probability = product of its symbols' frequencies) into all nine one-symbol extensions,
while the leaves (9 + 8k after k expansions) stay within D and strings within MAX_LEN symbols. The
codewords are the leaves. Because every inner node has all nine children, the greedy longest match is
the unique walk from the root down to a leaf; only the stream's very end can stop at an inner node,
and there the walk goes on with zero pairs (padding that the decoder drops, as it knows N * ceil(K/2)).
For a memoryless source Tunstall's tree maximises the expected match length among such codes. Leaves
only, rather than QMoE's prefix-closed set in which every prefix is a codeword too, spends no codewords
on strings a complete trie never emits: 1.3% fewer codeword bits on the fixture. The result: 1.096x the
order-0 entropy on the fixture's experts (89% zeros, 2^15 codewords), 1.06x-1.14x on iid streams at
80-95% zeros with 2^16 (tests/test_ternary.py).

Nodes are numbered breadth first: 0..8 are the single symbols, and the children of the j-th expanded
node are 9 + 9j .. 9 + 9j + 8 (one per symbol); codeword c is the c-th leaf in that order. So the whole
dictionary is one bit per node, "is this node expanded": a uint8 bitmap of ceil(9 (k + 1) / 8) bytes,
LSB-first (8 KB at 2^16 codewords, against 196 KB for 2^16 explicit (parent, symbol) entries).

Parsing is vectorised over rows (one trie step per column for all rows at once); rows that start
inside the previous row's last codeword are walked again from that trie node (parse_rows). Decode is a gather: codeword -> (length, expansion) tables, output positions from a
cumsum of lengths.

The empirical order-0 entropy of the pair stream, H = -sum_s p_s log2 p_s bits per pair, is the bound
an order-0 coder cannot beat (benchmarks/sub1bit.py reports the codeword bits against it).
"""
from __future__ import annotations

import functools
import hashlib
import heapq
import math
from typing import NamedTuple

import torch

from ..errors import PackedFormatError

NSYM = 9
ZERO_TRIT = 1
ZERO_PAIR = 3 * ZERO_TRIT + ZERO_TRIT  # 4
MAX_ENTRIES = 1 << 16
SAMPLE_SYMBOLS = 1 << 22  # build_dictionary judges sizes on at most about this many pair symbols
MAX_LEN = 255  # longest entry, in pair symbols (row_skip is below it: uint8); reached only above ~97% zeros


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


# ---- the dictionary (a complete trie; its leaves are the codewords) ---------------------------------

class Trie(NamedTuple):
    parent: torch.Tensor  # (T,) int64 node -> parent node, -1 for the nine single symbols
    symbol: torch.Tensor  # (T,) int64 in [0, 9)


def trie_from_expanded(expanded: torch.Tensor) -> Trie:
    """expanded: (k,) increasing ids of the expanded nodes (breadth-first numbering) -> the trie;
    the children of the j-th expanded node are 9 + 9j + s, s = 0..8."""
    k = expanded.numel()
    parent = torch.cat([torch.full((NSYM,), -1, dtype=torch.int64), expanded.to(torch.int64).repeat_interleave(NSYM)])
    return Trie(parent, torch.arange(NSYM * (k + 1)) % NSYM)


def expanded_nodes(trie: Trie) -> torch.Tensor:
    return trie.parent[NSYM::NSYM]  # (k,) the parent of every ninth node from 9 on


def leaves(trie: Trie) -> torch.Tensor:
    """(D,) node ids of the leaves in breadth-first order: codeword c is node leaves(trie)[c]."""
    inner = torch.zeros(trie.parent.numel(), dtype=torch.bool)
    inner[expanded_nodes(trie)] = True
    return (~inner).nonzero().flatten()


def to_tensor(trie: Trie) -> torch.Tensor:
    """Complete trie (breadth-first numbered) -> stored uint8 bitmap (ceil(T/8),): bit i = node i is expanded."""
    T = trie.parent.numel()
    bits = torch.zeros(-(-T // 8) * 8, dtype=torch.uint8)
    bits[expanded_nodes(trie)] = 1
    return (bits.view(-1, 8).to(torch.int32) << torch.arange(8)).sum(1).to(torch.uint8)


def _expanded_of(t: torch.Tensor) -> torch.Tensor:
    return (((t.to(torch.int32)[:, None] >> torch.arange(8)) & 1).flatten()).nonzero().flatten()


def from_tensor(t: torch.Tensor) -> Trie:
    """Stored bitmap -> Trie, validated (raises PackedFormatError)."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() == 0:
        raise PackedFormatError(f"sub1 dictionary must be a 1-D uint8 bitmap, found {tuple(t.shape)} {t.dtype}")
    expanded = _expanded_of(t)
    k = expanded.numel()
    T, D = NSYM * (k + 1), NSYM + (NSYM - 1) * k
    if D > MAX_ENTRIES or t.numel() != -(-T // 8) or bool((expanded >= T).any()):
        raise PackedFormatError(f"sub1 dictionary: {k} expanded nodes make {D} codewords in {T} nodes, which "
                                f"{'exceeds 65536 codewords' if D > MAX_ENTRIES else f'do not fit the {t.numel()}-byte bitmap'}")
    if bool((expanded >= NSYM + NSYM * torch.arange(k)).any()):  # breadth first: a node precedes its children
        raise PackedFormatError("sub1 dictionary: an expanded node comes after its own children")
    trie = trie_from_expanded(expanded)
    if int(depths(trie).max()) > MAX_LEN:
        raise PackedFormatError(f"sub1 dictionary: an entry is longer than {MAX_LEN} symbols")
    return trie


def num_codewords(t: torch.Tensor) -> int:
    """Codewords D of a stored dictionary: its leaves, 9 + 8 * (expanded nodes)."""
    return NSYM + (NSYM - 1) * int(_expanded_of(t).numel())


def dictionary_id(t: torch.Tensor) -> str:
    """Content hash of a stored dictionary: how PackedTensors name the one they share."""
    return hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def child_table(trie: Trie) -> torch.Tensor:
    """(T+1, 9) int64: ids are node + 1, root 0; child[n, s] = 0 below a leaf (all nine or none)."""
    T = trie.parent.numel()
    child = torch.zeros(T + 1, NSYM, dtype=torch.int64)
    child[trie.parent + 1, trie.symbol] = torch.arange(1, T + 1)
    return child


def depths(trie: Trie) -> torch.Tensor:
    """(T,) int64 expansion length of each node (parents precede children)."""
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
    """-> (table (D, Lmax) uint8 symbols, lengths (D,) int64) of the codewords; built level by level."""
    lengths = depths(trie)
    T, L = lengths.numel(), int(lengths.max())
    table = torch.zeros(T, L, dtype=torch.uint8)
    for level in range(1, L + 1):
        idx = (lengths == level).nonzero().squeeze(1)
        if level > 1:
            table[idx] = table[trie.parent[idx]]
        table[idx, level - 1] = trie.symbol[idx].to(torch.uint8)
    leaf = leaves(trie)
    return table[leaf].contiguous(), lengths[leaf]


class Walker(NamedTuple):
    """What the parse needs of a trie (ids are node + 1, root 0)."""
    flat: torch.Tensor     # (9 (T+1),) child_table flattened: child[n, s] = flat[9 n + s]
    is_leaf: torch.Tensor  # (T+1,) bool, False for the root
    cw_of: torch.Tensor    # (T+1,) codeword of a leaf id, -1 elsewhere
    lengths: torch.Tensor  # (D,) symbols each codeword expands to


def walker(trie: Trie) -> Walker:
    child = child_table(trie)
    is_leaf = child[:, 0] == 0
    is_leaf[0] = False
    leaf = leaves(trie)
    cw_of = torch.full((trie.parent.numel() + 1,), -1, dtype=torch.int64)
    cw_of[leaf + 1] = torch.arange(leaf.numel())
    return Walker(child.view(-1), is_leaf, cw_of, depths(trie)[leaf])


@functools.lru_cache(maxsize=8)
def _cached(kind: str, key: str, raw: bytes):
    trie = from_tensor(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return expansion_table(trie) if kind == "tables" else walker(trie)


def _for(kind: str, t: torch.Tensor):
    raw = t.contiguous().numpy().tobytes()
    return _cached(kind, hashlib.sha1(raw).hexdigest(), raw)


def tables_for(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codeword expansion tables of a stored dictionary, cached by content (decoding reuses one per model)."""
    return _for("tables", t)


def walker_for(t: torch.Tensor) -> Walker:
    """The parse tables of a stored dictionary, cached by content (every tensor of a model is coded
    against one dictionary, and the sub1 budget search encodes each several times)."""
    return _for("walker", t)


def tunstall(counts: torch.Tensor, max_codewords: int = MAX_ENTRIES, max_len: int = MAX_LEN) -> Trie:
    """Tunstall's trie for symbol counts (9,): expand the most probable leaf while the leaves (9 + 8k
    after k expansions) stay within max_codewords.

    Probabilities are add-half smoothed frequencies (a symbol never seen is still codable, and rare);
    ties go to the node created first, so the result is deterministic. Leaves at max_len symbols are
    not expanded. Returned breadth-first numbered (see the module docstring).
    """
    return tunstall_sizes(counts, (max_codewords,), max_len)[max_codewords]


def tunstall_sizes(counts: torch.Tensor, sizes, max_len: int = MAX_LEN) -> dict[int, Trie]:
    """{size: tunstall(counts, size, max_len)} from one run: a smaller Tunstall trie is a prefix of the
    larger one's expansion order."""
    if not all(NSYM <= m <= MAX_ENTRIES for m in sizes) or not 1 <= max_len <= MAX_LEN:
        raise ValueError(f"tunstall: sizes in [9, 65536] and max_len in [1, {MAX_LEN}], got {sizes}, {max_len}")
    c = [float(x) + 0.5 for x in counts.tolist()]
    p = [x / sum(c) for x in c]
    heap = [(-p[s], s, 1) for s in range(NSYM)]  # (-probability, creation id, depth)
    heapq.heapify(heap)
    n, order = NSYM, []  # order: creation ids of the expanded nodes; node i's children are first_child[i]..+8
    first_child = {}
    while NSYM + (NSYM - 1) * (len(order) + 1) <= max(sizes) and heap:
        q, i, d = heapq.heappop(heap)
        if d >= max_len:
            continue
        order.append(i)
        first_child[i] = n
        for s in range(NSYM):
            heapq.heappush(heap, (q * p[s], n + s, d + 1))
        n += NSYM
    out = {}
    for m in sizes:
        k = min(len(order), (m - NSYM) // (NSYM - 1))
        chosen = set(order[:k])
        # renumber breadth first: visit nodes level by level, the children of expanded ones in symbol order
        bfs, j, expanded = list(range(NSYM)), 0, []
        while j < len(bfs):
            if bfs[j] in chosen:
                expanded.append(j)  # the node at BFS position j is expanded
                bfs.extend(range(first_child[bfs[j]], first_child[bfs[j]] + NSYM))
            j += 1
        out[m] = trie_from_expanded(torch.tensor(expanded, dtype=torch.int64))
    return out


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
    """codes: (N, K) ternary -> Parse of its row-major pair stream against the stored dictionary."""
    S = pair_symbols(codes)  # (N, K2)
    cw, starts = parse_rows(walker_for(dictionary), S)
    return Parse(cw, *row_layout(starts, *S.shape))


def coded_codewords(trie: Trie, streams: list[torch.Tensor]) -> int:
    """Codewords needed for every (R, L) pair-symbol matrix of `streams`, its rows as one stream."""
    w = walker(trie)
    return sum(parse_rows(w, S)[0].numel() for S in streams)


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
    code_streams = list(code_streams)
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


PAIR_TRITS = torch.tensor([[s // 3, s % 3] for s in range(NSYM)], dtype=torch.int32)  # (9, 2)


def decode_rows(codewords: torch.Tensor, dictionary: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """codewords: (M,) -> (N, K) int32 ternary codes. Every codeword's expansion is gathered as a row of
    the (D, Lmax) table, the first lengths[c] symbols of each kept in order (a mask), and the stream is
    cut at N * ceil(K/2) symbols (the last codeword may be padded; the codec checks the layout)."""
    table, lengths = tables_for(dictionary)
    cw = codewords.to(torch.int64)
    mask = torch.arange(table.shape[1]) < lengths[cw][:, None]  # (M, Lmax)
    sym = table[cw][mask][:N * ((K + 1) // 2)]  # (N*K2,) pair symbols in stream order
    return PAIR_TRITS[sym.to(torch.int64)].view(N, -1)[:, :K].contiguous()


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
