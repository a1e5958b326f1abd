"""Groupwise asymmetric integer codec "int": 2, 3, 4 or 8 bits, fp16 scales and zeros.

Format (for W: (N, K), bits b, group size g dividing K):
    qweight  uint8 (N, ceil(K*b/8))   codes packed LSB-first: code k of a row occupies bits
                                       [k*b, k*b+b) of the row's little-endian bit stream
                                       (bit j of the row is bit j%8 of byte j//8)
    scales   float16 (N, K//g)
    zeros    float16 (N, K//g)        integer-valued zero points, stored as fp16
    decode:  W[n, k] = (q[n, k] - zeros[n, k//g]) * scales[n, k//g], computed in float32.
"""
from __future__ import annotations

import math

import torch

from ..errors import MoeCompressError, PackedFormatError
from . import PackedTensor, QuantSpec, register_codec

INT_BITS = (2, 3, 4, 8)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: (N, K) integer codes in [0, 2^bits) -> (N, ceil(K*bits/8)) uint8, LSB-first bit stream. Packed by
    chunks of rows so the int64 temporaries stay near 32 MiB (whole, at 14336 x 4096 they were ~1.4 GB)."""
    N, K = q.shape
    rows = max(1, (32 << 20) // (8 * max(K, 1) * bits))
    if N <= rows:
        return _pack_rows(q, bits)
    return torch.cat([_pack_rows(q[r:r + rows], bits) for r in range(0, N, rows)])


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    N, K = q.shape
    q = q.to(torch.int64)
    if 8 % bits == 0:  # whole codes per byte: no code straddles a byte
        per = 8 // bits
        pad = (-K) % per
        q = torch.nn.functional.pad(q, (0, pad)).view(N, -1, per)  # (N, K) -> (N, K/per, per)
        shifts = torch.arange(per, dtype=torch.int64, device=q.device) * bits
        return (q << shifts).sum(-1).to(torch.uint8)
    # General case (3 bits): expand to bits, then regroup into bytes.
    b = (q.unsqueeze(-1) >> torch.arange(bits, device=q.device)) & 1  # (N, K, bits)
    b = b.reshape(N, K * bits)
    pad = (-(K * bits)) % 8
    b = torch.nn.functional.pad(b, (0, pad)).view(N, -1, 8)  # (N, nbytes, 8)
    return (b << torch.arange(8, device=q.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """(N, ceil(K*bits/8)) uint8 -> (N, K) int32 codes; inverse of pack_bits."""
    N = packed.shape[0]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=p.device) * bits
        q = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (N, nbytes, per)
        return q.reshape(N, -1)[:, :K]
    b = (p.unsqueeze(-1) >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1  # (N, nbytes, 8)
    b = b.reshape(N, -1)[:, : K * bits].view(N, K, bits)
    return (b << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1).to(torch.int32)


def check_group(K: int, group_size: int) -> None:
    if group_size <= 0 or K % group_size:
        raise MoeCompressError(f"group size {group_size} does not divide the input dimension {K}; "
                               f"pick a divisor of {K} (e.g. {math.gcd(K, 128)})")


@register_codec
class IntCodec:
    name = "int"

    def validate(self, spec: QuantSpec) -> None:
        if spec.bits not in INT_BITS:
            raise MoeCompressError(f"unsupported bit width {spec.bits} for integer quantization; choose one of {INT_BITS}")
        if spec.group_size <= 0:
            raise MoeCompressError(f"group size must be positive, got {spec.group_size}")

    def nbytes(self, shape, spec: QuantSpec) -> int:
        N, K = shape
        check_group(K, spec.group_size)
        return N * math.ceil(K * spec.bits / 8) + 2 * 2 * N * (K // spec.group_size)

    def encode(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> PackedTensor:
        """q: (N, K) integer codes, scales/zeros: (N, K//g). Returns the packed form."""
        N, K = q.shape
        check_group(K, spec.group_size)
        assert scales.shape == (N, K // spec.group_size), (scales.shape, N, K, spec.group_size)
        assert int(q.min()) >= 0 and int(q.max()) < (1 << spec.bits)
        return PackedTensor("int", (N, K), {
            "qweight": pack_bits(q, spec.bits),
            "scales": scales.to(torch.float16).contiguous(),
            "zeros": zeros.to(torch.float16).contiguous(),
        }, {"bits": spec.bits, "group_size": spec.group_size})

    def codes(self, packed: PackedTensor) -> torch.Tensor:
        return unpack_bits(packed.tensors["qweight"], packed.attrs["bits"], packed.shape[1])

    def decode(self, packed: PackedTensor) -> torch.Tensor:
        N, K = packed.shape
        g = packed.attrs["group_size"]
        q = self.codes(packed).float().view(N, K // g, g)  # (N, K) -> (N, groups, g)
        s = packed.tensors["scales"].float().unsqueeze(-1)
        z = packed.tensors["zeros"].float().unsqueeze(-1)
        return ((q - z) * s).view(N, K)

    def check(self, packed: PackedTensor) -> None:
        """Validate tensor shapes and dtypes against the claimed shape and attributes."""
        N, K = packed.shape
        bits, g = packed.attrs.get("bits"), packed.attrs.get("group_size")
        if bits not in INT_BITS or not isinstance(g, int) or g <= 0 or K % g:
            raise PackedFormatError(f"int codec: bad attributes bits={bits!r} group_size={g!r} for shape {packed.shape}")
        want = {"qweight": ((N, math.ceil(K * bits / 8)), torch.uint8),
                "scales": ((N, K // g), torch.float16), "zeros": ((N, K // g), torch.float16)}
        for k, (shape, dtype) in want.items():
            t = packed.tensors.get(k)
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise PackedFormatError(f"int codec: tensor {k!r} should be {shape} {dtype}, found {got}")
