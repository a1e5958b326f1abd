"""Quantization grids: how a group of weights maps to codes and back.

A grid is fitted on a group of columns and then rounds one column at a time, which is all GPTQ needs
(it quantizes column by column and feeds the error forward). Batched over experts: W is (E, N, g).

    AsymmetricGrid   min-max asymmetric integer grid, 2^b levels: q = clamp(round(w/s) + z, 0, 2^b-1),
                     w_hat = (q - z) * s, with s and z rounded through fp16 exactly as they are stored.
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
        q = torch.clamp(torch.round(w / p.scale) + p.zero, 0, self.maxq)
        return q.to(torch.int32), (q - p.zero) * p.scale
