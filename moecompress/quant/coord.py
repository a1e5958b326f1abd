"""Coordinate descent on GPTQ's codes (`quantize --sweeps N`), the grid held fixed.

GPTQ visits each column once and never revisits a rounding decision once later columns have absorbed
its error. Coordinate descent (as in QuantEase, Behdin et al., 2023) continues from GPTQ's result on the
same layer objective, per output row

    f(q) = (w - q)^T H (w - q),        H the (damped) input Hessian GPTQ used,

by exact minimisation along one coordinate at a time: with g = H (w - q), moving q_j alone to
q_j + g_j / H_jj minimises f along that coordinate, and the nearest point of column j's grid to it (its
group's scale and zero, unchanged) is the best grid value there, so f never increases. One sweep visits
every column once, in order; `sweeps` of them follow GPTQ. Batched over experts and rows like GPTQ, with
GPTQ's lazy blocks: within a block of columns only the block's part of g is updated per column, and the
block's changes reach the other columns as one batched product. Work per sweep: E N K^2 flops (that of
one GPTQ pass), memory: a copy of W and of H beside GPTQ's. Integer grids only (a ternary grid's dead
zone is not the nearest grid point). The codes change, the scales and zeros and the format do not.
"""
from __future__ import annotations

import torch

from .grids import GridParams

BLOCK = 128  # columns per lazy block


def coordinate_descent(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, deq: torch.Tensor,
                       scale: torch.Tensor, zero: torch.Tensor, grid, group_size: int, sweeps: int,
                       percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W: (E, N, K) original weights, H: (E, K, K) Hessians (undamped; damped here as GPTQ damps them),
    codes/deq: GPTQ's (E, N, K) result, scale/zero: (E, N, K // group_size). -> (codes, deq) after
    `sweeps` sweeps. Inputs are not modified. Works on transposed (E, K, N) copies, as GPTQ does, so a
    column is a contiguous row."""
    E, N, K = W.shape
    Hd = H.float().clone()
    diag = torch.diagonal(Hd, dim1=1, dim2=2)
    diag.add_((percdamp * diag.mean(-1)).clamp(min=1e-8)[:, None])  # GPTQ's relative damping; dead columns > 0
    Qt = deq.float().transpose(1, 2).contiguous()  # (E, K, N)
    Ct = codes.transpose(1, 2).contiguous()
    St = scale.float().transpose(1, 2).contiguous()  # (E, G, N)
    Zt = zero.float().transpose(1, 2).contiguous()
    Gt = torch.bmm(Hd, W.float().transpose(1, 2) - Qt)  # (E, K, N): H (w - q) per row, H symmetric
    inv = 1.0 / torch.diagonal(Hd, dim1=1, dim2=2)  # (E, K)
    for _ in range(sweeps):
        for b0 in range(0, K, BLOCK):
            b1 = min(b0 + BLOCK, K)
            Dt = torch.zeros(E, b1 - b0, N, device=W.device)
            for j in range(b0, b1):
                g = j // group_size
                q_old = Qt[:, j]
                target = q_old + Gt[:, j] * inv[:, j, None]
                q, qd = grid.quantize(target, GridParams(St[:, g], Zt[:, g]))
                delta = qd - q_old
                Qt[:, j] = qd
                Ct[:, j] = q.to(Ct.dtype)
                Dt[:, j - b0] = delta
                Gt[:, b0:b1] -= Hd[:, b0:b1, j, None] * delta[:, None, :]
            if b0 > 0:  # the block's changes reach the columns before and after it at once
                Gt[:, :b0] -= torch.bmm(Hd[:, :b0, b0:b1], Dt)
            if b1 < K:
                Gt[:, b1:] -= torch.bmm(Hd[:, b1:, b0:b1], Dt)
    return Ct.transpose(1, 2).contiguous(), Qt.transpose(1, 2).contiguous()
