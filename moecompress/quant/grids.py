"""Quantization grids: how a group of weights maps to codes and back.

A grid is fitted on a group of columns and then rounds one column at a time, which is all GPTQ needs
(it quantizes column by column and feeds the error forward). Batched over experts: W is (E, N, g).

    AsymmetricGrid   min-max asymmetric integer grid, 2^b levels: q = clamp(round(w/s) + z, 0, 2^b-1),
                     w_hat = (q - z) * s, with s and z rounded through fp16 exactly as they are stored.
    SymmetricGrid    symmetric integer grid (`quantize --symmetric`): the zero point is fixed at the grid's
                     midpoint m = 2^(b-1) and s = max|w| / ((2^b - 1) / 2), compressed-tensors' symmetric
                     min-max rule; q = clamp(round(w/s) + m, 0, 2^b-1), i.e. signed codes q - m in
                     [-2^(b-1), 2^(b-1) - 1], w_hat = (q - m) * s. Stored by the same "int" codec (fp16
                     scales, zeros all m) under the spec option ("sym", 1), so a serving format that keeps
                     no zero points (compressed-tensors' symmetric pack-quantized) holds it exactly.

`int_grid(spec)` picks the grid of an "int" QuantSpec; `int_options(symmetric)` is the spec option tuple.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class GridParams(NamedTuple):
    scale: torch.Tensor  # (E, N) fp32, exactly representable in fp16
    zero: torch.Tensor   # (E, N) fp32, integer-valued


class AsymmetricGrid:
    """Groupwise asymmetric round-to-nearest grid with `bits` bits (MSE-free min/max fit, as GPTQ)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.maxq = (1 << bits) - 1

    def fit(self, W: torch.Tensor) -> GridParams:
        """W: (E, N, g) group of columns -> per-row scale and zero, (E, N) each."""
        lo = W.amin(-1).clamp(max=0)
        hi = W.amax(-1).clamp(min=0)
        flat = (hi - lo) == 0
        lo = torch.where(flat, lo - 1, lo)
        hi = torch.where(flat, hi + 1, hi)
        scale = ((hi - lo) / self.maxq).half().float()  # stored as fp16: fit to what is stored
        scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)
        zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return GridParams(scale, zero)

    def quantize(self, w: torch.Tensor, p: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """w: (E, N) one column -> (codes (E, N) int, dequantized (E, N) float)."""
        return _round(w, p, self.maxq)


SYMMETRIC = ("sym", 1)  # QuantSpec option of the symmetric grid (recorded in the plan and the run's specs)


class SymmetricGrid:
    """Groupwise symmetric round-to-nearest grid with `bits` bits: zero fixed at 2^(bits-1), scale from max|w|."""

    def __init__(self, bits: int):
        self.bits = bits
        self.maxq = (1 << bits) - 1
        self.mid = 1 << (bits - 1)

    def fit(self, W: torch.Tensor) -> GridParams:
        """W: (E, N, g) group of columns -> per-row scale and (constant) zero, (E, N) each."""
        amax = W.abs().amax(-1)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # an all-zero group codes to the midpoint
        scale = (amax / (self.maxq / 2)).half().float()  # stored as fp16: fit to what is stored
        scale = torch.where(scale == 0, torch.full_like(scale, 2.0 ** -24), scale)
        return GridParams(scale, torch.full_like(scale, float(self.mid)))

    def quantize(self, w: torch.Tensor, p: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """w: (E, N) one column -> (codes (E, N) int, dequantized (E, N) float)."""
        return _round(w, p, self.maxq)


def _round(w: torch.Tensor, p: GridParams, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / p.scale) + p.zero, 0, maxq)
    return q.to(torch.int32), (q - p.zero) * p.scale


def int_options(symmetric: bool) -> tuple:
    """The QuantSpec options of an "int" spec with (symmetric=True) or without the symmetric grid."""
    return (SYMMETRIC,) if symmetric else ()


def is_symmetric(spec) -> bool:
    return spec.codec == "int" and bool(spec.option(SYMMETRIC[0], 0))


def int_grid(spec):
    """The grid of an "int" QuantSpec: SymmetricGrid under the option ("sym", 1), else AsymmetricGrid."""
    return SymmetricGrid(spec.bits) if is_symmetric(spec) else AsymmetricGrid(spec.bits)
