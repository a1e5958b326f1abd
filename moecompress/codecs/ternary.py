"""Ternary codecs "ternary" (dense, 1.6 bits) and "sub1" (dictionary-coded, below 1 bit at high sparsity).

Both store ternary codes t in {0, 1, 2} (0 -> lo, 1 -> 0, 2 -> hi; see quant/ternary.py) of W: (N, K)
with per-row-per-group levels; group size g divides K (QuantSpec group_size 0 means g = K, one group
per row, as QMoE). Decode: W[n, k] = lo[n, k//g] if t == 0, 0 if t == 1, hi[n, k//g] if t == 2.

"ternary":
    trits   uint8 (N, ceil(K/5))  5 trits per byte, byte = sum_i t[5j+i] * 3^i (3^5 = 243 <= 256);
                                   the row is padded with zero trits (t = 1) to a multiple of 5
    lo, hi  float16 (N, K//g)

"sub1" (coding in sub1_dict.py, the dictionary in sub1_trie.py): pairs s = 3 t[2i] + t[2i+1] per row (odd K
padded with a zero trit), the rows one after another greedily longest-match coded against a shared Tunstall
dictionary:
    codewords   uint8 (ceil(M b / 8),)  the M codewords of the row-major stream, b = attrs["codeword_bits"]
                                   = ceil(log2 D) bits each, LSB-first (sub1_dict.pack_codewords)
    row_counts  uint8 / int16 / int32 (N,)   codewords that start in each row, the narrowest type that
                                   holds ceil(K/2)
    row_skip    uint8 (N,)        symbols at the start of each row that belong to a codeword started in
                                   an earlier row (< sub1_trie.MAX_LEN). Row n decodes on its own: from
                                   codeword o = sum(row_counts[:n]), or, when row_skip[n] > 0, from
                                   codeword o - 1 at position length(o - 1) - row_skip[n]
    lo, hi      float16 (N, K//g)
    dictionary  uint8 (ceil(D/8),) the shared Tunstall dictionary as a bitmap (sub1_trie.to_tensor);
                                   attrs["dictionary_id"] is its content hash. The SAME tensor is in
                                   every PackedTensor that shares it: a writer stores it once per id
                                   (e.g. under "moecompress.sub1_dictionary.<id>") and drops it from
                                   each tensor's entries; a reader attaches it back by id.
                                   `split_shared` / `attach_shared` do both halves.

`encode_ternary` picks, per tensor, whichever of "sub1" and "ternary" is smaller in real bytes (the
shared dictionary not counted, it is amortised over the model) and records both sizes in
attrs["sizes"]. `nbytes(shape, spec)` of "sub1" cannot see the data: it estimates the codewords from an
assumed fraction of zeros, spec option "zero_fraction" (default 0.9), as CODER_OVERHEAD times the iid
ternary entropy, and returns the smaller of that and the dense size (the automatic choice).
`encoded_nbytes(packed)` is exact.
"""
from __future__ import annotations

import math

import torch

from ..errors import MoeCompressError, PackedFormatError
from ..quant.ternary import ZERO_CODE
from . import PackedTensor, QuantSpec, is_checked, register_codec
from . import sub1_dict as sd
from . import sub1_trie as st

OPTIONS = {"zero_fraction": float, "threshold": float, "fit": str, "target_bits": float, "percdamp": float}
CODER_OVERHEAD = 1.15  # codeword bits / order-0 entropy, Tunstall 2^16, fixture experts at 89% zeros (benchmarks/sub1bit.py)
SHARED = ("dictionary",)


def _group(K: int, group_size: int) -> int:
    g = K if group_size == 0 else group_size
    if g <= 0 or K % g:
        raise MoeCompressError(f"group size {group_size} does not divide the input dimension {K}; "
                               f"use 0 (one group per row, QMoE) or a divisor of {K}")
    return g


def _validate(spec: QuantSpec) -> None:
    if spec.bits != 1:
        raise MoeCompressError(f"codec {spec.codec!r} stores ternary weights: set bits=1, got {spec.bits}")
    if spec.group_size < 0:
        raise MoeCompressError(f"group size must be >= 0 (0 = one group per row), got {spec.group_size}")
    for k, v in spec.options:
        if k not in OPTIONS or not isinstance(v, (OPTIONS[k], int) if OPTIONS[k] is float else OPTIONS[k]):
            raise MoeCompressError(f"codec {spec.codec!r}: bad option {k}={v!r}; known options "
                                   f"{', '.join(f'{n} ({t.__name__})' for n, t in OPTIONS.items())}")
    zf = spec.option("zero_fraction", 0.9)
    if not 0 <= zf <= 1:
        raise MoeCompressError(f"zero_fraction must be in [0, 1], got {zf}")


def _check_levels(packed: PackedTensor, name: str) -> int:
    N, K = packed.shape
    g = packed.attrs.get("group_size")
    if not isinstance(g, int) or g <= 0 or K % g:
        raise PackedFormatError(f"{name} codec: bad group_size {g!r} for shape {packed.shape}")
    for k in ("lo", "hi"):
        t = packed.tensors.get(k)
        if t is None or tuple(t.shape) != (N, K // g) or t.dtype != torch.float16:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise PackedFormatError(f"{name} codec: tensor {k!r} should be {(N, K // g)} float16, found {got}")
    return g


def _values(codes: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """W[n, k] = levels[n, k // g, code]: one gather from a (N, G, 3) table of (lo, 0, hi)."""
    N, K = packed.shape
    g = packed.attrs["group_size"]
    lo, hi = packed.tensors["lo"].float(), packed.tensors["hi"].float()  # (N, G)
    levels = torch.stack((lo, torch.zeros_like(lo), hi), dim=-1)  # (N, G, 3)
    c = codes.view(N, K // g, g).to(torch.int64)  # (N, K) -> (N, G, g)
    return torch.gather(levels, 2, c).view(N, K)


# ---- dense: 5 trits per byte ----------------------------------------------------------------------

_POW3: dict[str, torch.Tensor] = {}


def pow3(device) -> torch.Tensor:
    """(5,) int32 [1, 3, 9, 27, 81] on `device`, made once per device."""
    key = str(device)
    if key not in _POW3:
        _POW3[key] = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32).to(device)
    return _POW3[key]


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """t: (N, K) in {0,1,2} -> (N, ceil(K/5)) uint8, 5 trits per byte, little-endian base 3 (t's device)."""
    N, K = t.shape
    t = torch.nn.functional.pad(t.to(torch.int32), (0, (-K) % 5), value=ZERO_CODE).view(N, -1, 5)  # (N, K/5, 5)
    return (t * pow3(t.device)).sum(-1).to(torch.uint8)


def unpack_trits(b: torch.Tensor, K: int) -> torch.Tensor:
    """(N, ceil(K/5)) uint8 -> (N, K) int32 trits on b's device; inverse of pack_trits."""
    N = b.shape[0]
    t = (b.to(torch.int32).unsqueeze(-1) // pow3(b.device)) % 3  # (N, K/5, 5)
    return t.view(N, -1)[:, :K]


@register_codec
class TernaryCodec:
    name = "ternary"

    def validate(self, spec: QuantSpec) -> None:
        _validate(spec)

    def nbytes(self, shape, spec: QuantSpec) -> int:
        N, K = shape
        g = _group(K, spec.group_size)
        return N * math.ceil(K / 5) + 2 * 2 * N * (K // g)

    def encode(self, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int = 0) -> PackedTensor:
        """codes: (N, K) in {0,1,2}; lo, hi: (N, K//g) levels. group_size 0 = one group per row."""
        N, K = codes.shape
        g = _group(K, group_size)
        _check_inputs(codes, lo, hi, g)
        return PackedTensor("ternary", (N, K), {
            "trits": pack_trits(codes),
            "lo": lo.to(torch.float16).contiguous(),
            "hi": hi.to(torch.float16).contiguous(),
        }, {"group_size": g})

    def codes(self, packed: PackedTensor) -> torch.Tensor:
        return unpack_trits(packed.tensors["trits"], packed.shape[1])

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        return _values(self.codes(packed), packed)

    def check(self, packed: PackedTensor) -> None:
        N, K = packed.shape
        _check_levels(packed, "ternary")
        t = packed.tensors.get("trits")
        if t is None or tuple(t.shape) != (N, math.ceil(K / 5)) or t.dtype != torch.uint8:
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise PackedFormatError(f"ternary codec: tensor 'trits' should be {(N, math.ceil(K / 5))} uint8, found {got}")
        if bool((t >= 243).any()):
            raise PackedFormatError("ternary codec: a byte of 'trits' is >= 243, not 5 base-3 digits")


def _check_inputs(codes, lo, hi, g):
    N, K = codes.shape
    assert lo.shape == hi.shape == (N, K // g), (lo.shape, hi.shape, N, K, g)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2):
        raise MoeCompressError("ternary codes must be in {0, 1, 2} (0 -> lo, 1 -> 0, 2 -> hi)")


# ---- sub1: dictionary-coded pairs -----------------------------------------------------------------

def count_dtype(K: int) -> torch.dtype:
    """Narrowest dtype for per-row codeword counts: a row has at most ceil(K/2) codewords."""
    k2 = (K + 1) // 2
    return torch.uint8 if k2 <= 255 else torch.int16 if k2 <= 32767 else torch.int32


@register_codec
class Sub1Codec:
    name = "sub1"

    def validate(self, spec: QuantSpec) -> None:
        _validate(spec)

    def nbytes(self, shape, spec: QuantSpec) -> int:
        """Estimate (the data is unknown): the budget if spec option target_bits is set, else codewords at
        CODER_OVERHEAD x the iid ternary entropy of spec option zero_fraction (default 0.9), plus counts
        and levels; capped by the dense size because encode_ternary falls back to it. The shared
        dictionary is not included."""
        N, K = shape
        g = _group(K, spec.group_size)
        if spec.option("target_bits", None) is not None:  # a budget the quantizer fits (passes/ternary_budget.py)
            return min(math.ceil(N * K * float(spec.option("target_bits")) / 8), TernaryCodec().nbytes(shape, spec))
        bits = N * K * sd.trit_entropy(spec.option("zero_fraction", 0.9)) * CODER_OVERHEAD
        est = 2 * math.ceil(bits / 16) + N * (count_dtype(K).itemsize + 1) + 2 * 2 * N * (K // g)
        return min(est, TernaryCodec().nbytes(shape, spec))

    def encode(self, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, dictionary: torch.Tensor,
               group_size: int = 0) -> PackedTensor:
        """codes: (N, K) in {0,1,2}; lo, hi: (N, K//g); dictionary: the stored bitmap. Any device: the
        parse runs on the host, the result lies on codes' device."""
        N, K = codes.shape
        g = _group(K, group_size)
        _check_inputs(codes, lo, hi, g)
        parse = sd.encode_rows(codes, dictionary)
        bits = sd.codeword_bits(st.num_codewords(dictionary))
        dev = codes.device
        return PackedTensor("sub1", (N, K), {
            "codewords": sd.pack_codewords(parse.codewords, bits).to(dev),
            "row_counts": parse.row_counts.to(count_dtype(K)).to(dev),
            "row_skip": parse.row_skip.to(torch.uint8).to(dev),
            "lo": lo.to(device=dev, dtype=torch.float16).contiguous(),
            "hi": hi.to(device=dev, dtype=torch.float16).contiguous(),
            "dictionary": dictionary.to(dev),
        }, {"group_size": g, "dictionary_id": st.dictionary_id(dictionary), "codeword_bits": bits})

    @staticmethod
    def codewords(packed: PackedTensor) -> torch.Tensor:
        """(M,) int64 codeword indices, in stream order (M = sum(row_counts): a host sync off the CPU)."""
        M = int(packed.tensors["row_counts"].to(torch.int64).sum())
        return sd.unpack_codewords(packed.tensors["codewords"], M, packed.attrs["codeword_bits"])

    def codes(self, packed: PackedTensor) -> torch.Tensor:
        """(N, K) int32 codes on the packed tensors' device, without a host sync: every whole codeword the
        stream's bytes hold is unpacked (the last byte may hold a zero codeword past the real ones, which
        decode_rows never reaches); a checked tensor's decode tables are found by its dictionary id."""
        N, K = packed.shape
        stream, bits = packed.tensors["codewords"], packed.attrs["codeword_bits"]
        if stream.device.type == "meta":  # shapes only: the dictionary's bits are not there to build tables
            return torch.empty((N, K), dtype=torch.int32, device="meta")
        cw = sd.unpack_codewords(stream, stream.numel() * 8 // bits, bits)
        key = packed.attrs["dictionary_id"] if is_checked(packed) else None
        return sd.decode_rows(cw, packed.tensors["dictionary"], N, K, key=key)

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        return _values(self.codes(packed), packed)

    def check(self, packed: PackedTensor) -> None:
        """Layout checks on host copies of the codeword stream, counts, skips and dictionary (once, at load)."""
        N, K = packed.shape
        _check_levels(packed, "sub1")
        d = packed.tensors.get("dictionary")
        if d is None:
            raise PackedFormatError("sub1 codec: the shared 'dictionary' tensor is missing (attach_shared it)")
        d = d.detach().cpu()
        D = st.leaves(st.from_tensor(d)).numel()
        if packed.attrs.get("dictionary_id") != st.dictionary_id(d):
            raise PackedFormatError("sub1 codec: the attached dictionary does not match attrs['dictionary_id']")
        bits = packed.attrs.get("codeword_bits")
        if bits != sd.codeword_bits(D):
            raise PackedFormatError(f"sub1 codec: codeword_bits {bits!r} should be {sd.codeword_bits(D)} "
                                    f"for a {D}-entry dictionary")
        stream, rc, skip = (None if packed.tensors.get(k) is None else packed.tensors[k].detach().cpu()
                            for k in ("codewords", "row_counts", "row_skip"))
        if rc is None or tuple(rc.shape) != (N,) or rc.dtype != count_dtype(K):
            raise PackedFormatError(f"sub1 codec: tensor 'row_counts' should be ({N},) {count_dtype(K)}")
        if skip is None or tuple(skip.shape) != (N,) or skip.dtype != torch.uint8:
            raise PackedFormatError(f"sub1 codec: tensor 'row_skip' should be ({N},) uint8")
        rc = rc.to(torch.int64)
        M = int(rc.sum())
        if bool((rc < 0).any()) or M > N * ((K + 1) // 2):
            raise PackedFormatError(f"sub1 codec: row_counts are negative or sum past {N * ((K + 1) // 2)}")
        if stream is None or stream.dtype != torch.uint8 or tuple(stream.shape) != (math.ceil(M * bits / 8),):
            got = None if stream is None else (tuple(stream.shape), stream.dtype)
            raise PackedFormatError(f"sub1 codec: tensor 'codewords' should be ({math.ceil(M * bits / 8)},) uint8 "
                                    f"for {M} codewords of {bits} bits, found {got}")
        cw = sd.unpack_codewords(stream, M, bits)
        if cw.numel() and int(cw.max()) >= D:
            raise PackedFormatError(f"sub1 codec: codeword {int(cw.max())} is outside the {D}-entry dictionary")
        total, counts, skips = sd.stream_layout(cw, d, N, K)
        if counts is None:
            raise PackedFormatError(f"sub1 codec: the codewords expand to {total} pair symbols, not "
                                    f"{N} rows x {(K + 1) // 2}")
        if not (torch.equal(counts, rc) and torch.equal(skips, skip.to(torch.int64))):
            raise PackedFormatError("sub1 codec: row_counts / row_skip do not match where the codewords start")


# ---- choice, sizes, sharing -----------------------------------------------------------------------

def encoded_nbytes(packed: PackedTensor, count_shared: bool = False) -> int:
    """Exact bytes of a packed ternary tensor; the shared dictionary only if count_shared."""
    return sum(t.numel() * t.element_size() for k, t in packed.tensors.items() if count_shared or k not in SHARED)


def encode_ternary(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_size: int = 0,
                   dictionary: torch.Tensor | None = None) -> PackedTensor:
    """Pack ternary codes as "sub1" or "ternary", whichever is smaller (dictionary not counted).

    Without a dictionary the result is dense "ternary". attrs["sizes"] records both sizes in bytes.
    """
    dense = TernaryCodec().encode(codes, lo, hi, group_size)
    if dictionary is None:
        return dense
    sub1 = Sub1Codec().encode(codes, lo, hi, dictionary, group_size)
    sizes = {"sub1": encoded_nbytes(sub1), "ternary": encoded_nbytes(dense)}
    best = sub1 if sizes["sub1"] < sizes["ternary"] else dense
    best.attrs["sizes"] = sizes
    return best


def split_shared(packed: PackedTensor) -> tuple[PackedTensor, dict[str, torch.Tensor]]:
    """Writer half: -> (packed without shared tensors, {"moecompress.sub1_dictionary.<id>": tensor})."""
    if "dictionary" not in packed.tensors:
        return packed, {}
    rest = {k: v for k, v in packed.tensors.items() if k not in SHARED}
    key = f"moecompress.sub1_dictionary.{packed.attrs['dictionary_id']}"
    return PackedTensor(packed.codec, packed.shape, rest, dict(packed.attrs)), {key: packed.tensors["dictionary"]}


def attach_shared(packed: PackedTensor, shared: dict[str, torch.Tensor]) -> PackedTensor:
    """Reader half: put the shared dictionary named by attrs["dictionary_id"] back into a sub1 tensor."""
    if packed.codec != "sub1":
        return packed
    key = f"moecompress.sub1_dictionary.{packed.attrs.get('dictionary_id')}"
    if key not in shared:
        raise PackedFormatError(f"sub1 tensor refers to dictionary {key!r}, which the checkpoint does not hold")
    return PackedTensor(packed.codec, packed.shape, {**packed.tensors, "dictionary": shared[key]}, dict(packed.attrs))


def get_codes(packed: PackedTensor) -> torch.Tensor:
    """(N, K) int32 ternary codes of a "ternary" or "sub1" tensor (what the quantizer produced)."""
    return {"ternary": TernaryCodec, "sub1": Sub1Codec}[packed.codec]().codes(packed)
