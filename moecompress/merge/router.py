"""Router rows for merged expert groups: tokens that chose any member should choose the merged expert.

A softmax router gives expert e the probability p_e(x) = exp(l_e(x)) / sum_j exp(l_j(x)) with
l_e(x) = w_e . x (+ b_e). A merged group G should receive the probability mass of its members,
sum_{e in G} p_e(x), which is a softmax over groups with logits

    l_G(x) = logsumexp_{e in G} l_e(x).

The router is linear, so the merged row is fitted by ridge-regularised least squares on calibration
router inputs X (N, H):  w_G = argmin_w ||X w + b_G - lse_G(X)||^2 + lambda ||w - mean_G w_e||^2
("lse", the default; the bias is fitted too when the router has one). Alternatives measured in
benchmarks/merge.py: "mean" (average of member rows), "dominant" (the representative's row, as
M-SMoE keeps it), "weighted" (usage-weighted average of member rows). A single member keeps its row
exactly under every choice. With no calibration inputs "lse" falls back to "mean".
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

ROUTER_MODES = ("lse", "mean", "dominant", "weighted")


class MergedRouter(NamedTuple):
    weight: torch.Tensor  # (K, H)
    bias: torch.Tensor | None  # (K,) or None


def merge_router(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: Sequence[Sequence[int]],
    *,
    mode: str = "lse",
    inputs: torch.Tensor | None = None,
    usage: torch.Tensor | None = None,
    ridge: float = 1e-3,
) -> MergedRouter:
    """Router weight (E, H) (+ bias (E,)) -> one row per group; groups[k][0] is the group's representative."""
    if mode not in ROUTER_MODES:
        raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {mode!r}")
    W = weight.double()
    B = bias.double() if bias is not None else None
    rows, biases = [], []
    for g in groups:
        g = list(g)
        if len(g) == 1 or mode == "dominant":
            rows.append(W[g[0]]), biases.append(B[g[0]] if B is not None else None)
            continue
        if mode == "weighted" and usage is not None and float(usage[g].sum()) > 0:
            a = usage[g].double() / usage[g].double().sum()
        else:
            a = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64)
        w0 = a @ W[g]  # (H,)
        b0 = (a @ B[g]) if B is not None else None
        if mode == "lse" and inputs is not None and inputs.shape[0] > 1:
            w0, b0 = _fit_lse(W[g], B[g] if B is not None else None, inputs.double(), w0, ridge)
        rows.append(w0), biases.append(b0)
    out_w = torch.stack(rows).to(weight.dtype)  # (K, H)
    out_b = torch.stack(biases).to(bias.dtype) if bias is not None else None
    return MergedRouter(out_w, out_b)


def _fit_lse(Wg: torch.Tensor, Bg: torch.Tensor | None, X: torch.Tensor, w0: torch.Tensor, ridge: float):
    """Least-squares row (and bias) whose logit tracks logsumexp of the members' logits on X (N, H)."""
    N, H = X.shape
    L = X @ Wg.T + (Bg if Bg is not None else 0.0)  # (N, |G|)
    y = torch.logsumexp(L, dim=1)  # (N,)
    A = torch.cat([X, torch.ones(N, 1, dtype=X.dtype)], 1) if Bg is not None else X  # (N, H[+1])
    prior = torch.cat([w0, torch.zeros(1, dtype=X.dtype)]) if Bg is not None else w0
    lam = ridge * float((A * A).sum()) / A.shape[1]  # scale-free regularisation towards the mean row
    G = A.T @ A + lam * torch.eye(A.shape[1], dtype=X.dtype)
    sol = torch.linalg.solve(G, A.T @ y + lam * prior)
    return (sol[:H], sol[H]) if Bg is not None else (sol, None)
