"""Ternary grid for GPTQ: three levels {lo, 0, hi} per row (QMoE) or per group.

W: (E, N, g) a group of columns of E experts' weights. Each row of a group gets two fp16 levels
lo <= 0 <= hi; a weight w is coded

    code(w) = 1 (zero)                     if |w| < threshold * (hi - lo)
            = argmin_{c in {0,1,2}} |w - L_c|  otherwise,      L_0 = lo, L_1 = 0, L_2 = hi

so threshold = 0 is plain nearest rounding and a larger threshold widens the dead zone around 0,
trading accuracy for sparsity (more zeros code to fewer bits in the "sub1" codec). Codes: 0 -> lo,
1 -> 0, 2 -> hi.

Fits ("QMoE: Practical Sub-1-Bit Compression of Trillion-Parameter Models", Frantar & Alistarh 2023,
quantize experts to ternary with GPTQ on a per-row min-max grid):

    "minmax"  lo = min(w, 0), hi = max(w, 0) over the group (QMoE's 3-level asymmetric grid, its zero
              point at the middle level). Gives many zeros: about |w| < max|w| / 2 rounds to 0.
    "mse"     Lloyd iterations of a 3-level quantizer with its middle level pinned at 0: assign codes with
              the rule above, then lo, hi = the means of the weights assigned to them (the MSE-optimal
              levels for that assignment), as in ternary weight networks (Li et al. 2016). Fewer zeros,
              lower error; use the threshold to buy sparsity back.

GPTQ stores a grid's GridParams(scale, zero) as (E, N, G) tensors and passes them back unchanged, so
this grid puts hi in `scale` and lo in `zero` (both fp32, exactly representable in fp16): for a ternary
GPTQResult, result.scale is hi and result.zero is lo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoeCompressError
from .grids import GridParams

LO_CODE, ZERO_CODE, HI_CODE = 0, 1, 2
FITS = ("minmax", "mse")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to what fp16 stores, clamped to the fp16 range (levels are stored as fp16)."""
    return x.clamp(-65504.0, 65504.0).half().float()


def ternary_codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, threshold: float) -> torch.Tensor:
    """Codes in {0, 1, 2} for w against levels lo <= 0 <= hi (all broadcastable): the rule above."""
    c = torch.full(w.shape, ZERO_CODE, dtype=torch.int32, device=w.device)
    # nearest level: the decision points between 0 and hi / lo are their midpoints
    c = torch.where(w > hi / 2, HI_CODE, c)
    c = torch.where(w < lo / 2, LO_CODE, c)
    if threshold > 0:
        c = torch.where(w.abs() < threshold * (hi - lo), ZERO_CODE, c)
    return c.to(torch.int32)


def ternary_values(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Dequantize ternary codes: 0 -> lo, 1 -> 0, 2 -> hi (float32)."""
    zero = torch.zeros((), dtype=torch.float32, device=codes.device)
    return torch.where(codes == LO_CODE, lo.float(), torch.where(codes == HI_CODE, hi.float(), zero))


@dataclass(frozen=True)
class TernaryGrid:
    """Grid with levels {lo, 0, hi} per row of each group; see the module docstring.

    threshold: dead zone |w| < threshold * (hi - lo) codes to 0 (0 = nearest rounding; with the
    "minmax" fit nearest rounding already zeroes about |w| < (hi - lo) / 4, so values above ~0.25 add
    zeros). fit: "minmax" (QMoE) or "mse". iters: Lloyd iterations of the "mse" fit.
    """

    threshold: float = 0.0
    fit_method: str = "minmax"
    iters: int = 6

    def __post_init__(self):
        if not 0.0 <= self.threshold < 0.5:
            raise MoeCompressError(f"ternary threshold must be in [0, 0.5), got {self.threshold}; "
                                   "0 rounds to nearest, larger values give more zeros")
        if self.fit_method not in FITS:
            raise MoeCompressError(f"unknown ternary fit {self.fit_method!r}; choose one of {FITS}")
        if self.iters < 1:
            raise MoeCompressError(f"ternary fit iterations must be >= 1, got {self.iters}")

    def fit(self, W: torch.Tensor) -> GridParams:
        """W: (E, N, g) group of columns -> GridParams(scale=hi, zero=lo), (E, N) each."""
        W = W.float()
        lo = W.amin(-1).clamp(max=0)
        hi = W.amax(-1).clamp(min=0)
        if self.fit_method == "mse":
            for _ in range(self.iters):
                c = ternary_codes(W, lo[..., None], hi[..., None], self.threshold)  # (E, N, g)
                for code, lvl in ((LO_CODE, lo), (HI_CODE, hi)):
                    m = (c == code).float()
                    n = m.sum(-1)
                    mean = (W * m).sum(-1) / n.clamp(min=1)
                    lvl.copy_(torch.where(n > 0, mean, lvl))  # keep the old level where nothing is assigned
        return GridParams(_fp16(hi), _fp16(lo))

    def quantize(self, w: torch.Tensor, p: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """w: (E, N) one column (or any shape matching p) -> (codes int32, dequantized float32)."""
        lo, hi = p.zero, p.scale
        c = ternary_codes(w.float(), lo, hi, self.threshold)
        return c, ternary_values(c, lo, hi)


def zero_fraction(codes: torch.Tensor) -> float:
    """Fraction of ternary codes that are zero (code 1): the sparsity the sub1 coder feeds on."""
    return float((codes == ZERO_CODE).float().mean()) if codes.numel() else 0.0
