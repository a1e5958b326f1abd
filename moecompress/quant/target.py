"""The full-precision target of `--fp-target`: aim GPTQ at what the unquantized model computes.

Layer by layer, GPTQ sees inputs x~ that the layers before it already perturbed (earlier decoder layers'
experts, and for a down projection its own quantized gate/up), while the unquantized model would have fed
it x. Plain GPTQ minimises sum_t c_t ||(Q - W) x~_t||^2: it keeps the layer's function on the inputs it
gets, with no regard for what they should have been. The objective here is the model's own output,

    sum_t c_t ||Q x~_t - W x_t||^2  =  sum_t c_t ||(Q - W*) x~_t||^2 + const,
    W* = W C H^-1,  H = sum_t c_t x~_t x~_t^T,  C = sum_t c_t x_t x~_t^T

(W* the least-squares map from the perturbed inputs to the unquantized outputs; the residual is orthogonal
to the x~, so the split is exact), i.e. plain GPTQ with the same Hessian H aimed at W* instead of W. This is
the objective of GPTAQ ("asymmetric calibration", Li et al. 2025), which folds the correction into GPTQ's
column loop; moving the target first gives the same objective with the GPTQ code unchanged. Written as
a correction of W,

    W* = W + W D H^-1,  D = C - H = sum_t c_t (x_t - x~_t) x~_t^T,

and applied with a strength A in [0, 1] (`--fp-target A`): W + A W D H_d^-1, H_d damped as GPTQ damps it
(so with unperturbed inputs D = 0 and the target is W itself, not a ridge-shrunk copy). A < 1 hedges
against fitting the calibration tokens' input noise (GPTAQ's reference code weighs its term by 1/4).
"""
from __future__ import annotations

import torch

from .gptq import _prepare_hessian


def damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """(G, K, K) -> a damped copy, as GPTQ prepares it (dead inputs H_jj = 0 get 1, then relative damping)."""
    Hd = H.clone()
    _prepare_hessian(Hd, percdamp)
    return Hd


def move_target(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, percdamp: float,
                strength: float) -> list[int]:
    """W (G, N, K) float32 += strength * W D H_d^-1 (module docstring), in place (any layout). H (G, K, K) the
    Hessians GPTQ will use, D (G, K, K) the cross terms sum_t c_t (x_t - x~_t) x~_t^T. -> the batch members
    left at W because their damped Hessian is not positive definite (the caller logs and records them)."""
    if strength == 0:
        return []
    L, info = torch.linalg.cholesky_ex(damped(H, percdamp))
    bad = (info != 0).nonzero().flatten().tolist()
    eye = torch.eye(H.shape[-1], dtype=L.dtype, device=L.device)
    for g in bad:
        L[g] = eye
    # W D H_d^-1 = (H_d^-1 D^T W^T)^T, H_d symmetric
    corr = torch.cholesky_solve(D.transpose(1, 2) @ W.transpose(1, 2), L).transpose(1, 2)  # (G, N, K)
    for g in bad:
        corr[g] = 0
    W.add_(corr, alpha=strength)
    return bad
