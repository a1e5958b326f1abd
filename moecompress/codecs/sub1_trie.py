"""The sub1 codec's dictionary: Tunstall's trie over 9-ary pair symbols, stored as one bit per node.

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

Devices: the trie is built and walked on the host (the tables come from a sequential walk of a few KB
of bits); `device_tables` builds the decode tables once per dictionary and keeps a copy on each device
that decodes with it (at most MAX_CACHED entries), so decoding on CUDA never copies to or from the host.
"""
from __future__ import annotations

import functools
import hashlib
import heapq
from collections import OrderedDict
from typing import NamedTuple

import torch

from ..errors import PackedFormatError

NSYM = 9  # pair symbols s = 3 t[2i] + t[2i+1] (sub1_dict.py)
MAX_ENTRIES = 1 << 16
MAX_LEN = 255  # longest entry, in pair symbols (row_skip is below it: uint8); reached only above ~97% zeros


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
    """Stored bitmap (any device) -> Trie on the host, validated (raises PackedFormatError)."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() == 0:
        raise PackedFormatError(f"sub1 dictionary must be a 1-D uint8 bitmap, found {tuple(t.shape)} {t.dtype}")
    t = t.detach().cpu()
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
    return NSYM + (NSYM - 1) * int(_expanded_of(t.detach().cpu()).numel())


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def dictionary_id(t: torch.Tensor) -> str:
    """Content hash of a stored dictionary (any device: a host copy): how PackedTensors name the one they share."""
    return hashlib.sha1(_bytes(t)).hexdigest()[:16]


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
    raw = _bytes(t)
    return _cached(kind, hashlib.sha1(raw).hexdigest(), raw)


def tables_for(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host codeword expansion tables of a stored dictionary (table (D, Lmax) uint8, lengths (D,) int64),
    cached by content (decoding reuses one per model)."""
    return _for("tables", t)


MAX_CACHED = 16  # (dictionary, device) pairs whose decode tables are kept
_DEVICE_TABLES: OrderedDict = OrderedDict()


def device_tables(t: torch.Tensor, device=None, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode tables of dictionary t on `device` (default: t's): (table (D, Lmax) uint8, lengths (D,) int32).

    Cached per (key, device). key names the dictionary's content: pass attrs["dictionary_id"] only for a
    checked tensor (the codec's check ties the id to the bytes); without it the bytes are hashed, which
    copies them to the host. So a decode of a checked tensor on CUDA finds its tables there, and the
    first one per device builds them (on the host) and copies them over once."""
    device = torch.device(device) if device is not None else t.device
    if key is None:
        key = "sha1:" + hashlib.sha1(_bytes(t)).hexdigest()
    ck = (key, str(device))
    got = _DEVICE_TABLES.get(ck)
    if got is None:
        table, lengths = tables_for(t)
        got = (table.to(device), lengths.to(torch.int32).to(device))
        _DEVICE_TABLES[ck] = got
        while len(_DEVICE_TABLES) > MAX_CACHED:
            _DEVICE_TABLES.popitem(last=False)
    else:
        _DEVICE_TABLES.move_to_end(ck)
    return got


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
