"""Least-squares refit of a merged expert's down projection on the tokens its members served.

Averaging aligned members fixes the merged expert's gate and up rows (W_g, W_u) and gives an initial
down projection D_0. What the merged expert should compute on a token x that the original router sent
to members S(x) of group G is their gate-weighted output

    y(x) = sum_{e in S(x) & G} g_e(x) f_e(x) / sum_{e in S(x) & G} g_e(x),   importance w(x) = sum g_e(x).

With a(x) = silu(W_g x) * W_u x the merged expert's hidden activation (N, I) on calibration inputs,
the down projection is linear in the output, so it has a closed form (ridge towards D_0):

    D^T = (A^T W A + lambda I)^{-1} (A^T W Y + lambda D_0^T).

This is the linear-regression step of layer-wise reconstruction (as in OBC/GPTQ's objective,
Frantar et al. 2022) applied to a merged expert; M-SMoE and HC-SMoE stop at the weighted average.
Inputs that none of the members served contribute nothing; with fewer served tokens than
`min_tokens` the average D_0 is kept.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .stats import expert_forward


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int):
    """Mixtral/Qwen-style routing: softmax over all logits, top-k, renormalised. -> (idx (N,k), w (N,k))."""
    logits = F.linear(x.float(), router_weight.float(), None if router_bias is None else router_bias.float())
    p = logits.softmax(-1)  # (N, E)
    w, idx = p.topk(top_k, dim=-1)  # (N, k)
    return idx, w / w.sum(-1, keepdim=True)


def refit_down(
    gate_up: torch.Tensor,
    down0: torch.Tensor,
    members: Sequence[int],
    member_gate_up: torch.Tensor,
    member_down: torch.Tensor,
    x: torch.Tensor,
    top_idx: torch.Tensor,
    top_w: torch.Tensor,
    *,
    ridge: float = 1e-2,
    min_tokens: int = 16,
) -> torch.Tensor:
    """New down (H, I) for merged expert (gate_up (2I, H), down0 (H, I)) of `members`, whose original
    weights are member_gate_up[e] / member_down[e]; x (N, H) calibration inputs routed by top_idx/top_w."""
    hit = torch.zeros_like(top_w)
    for e in members:
        hit = hit + torch.where(top_idx == e, top_w, torch.zeros_like(top_w))
    wt = hit.sum(-1)  # (N,) gate mass the group received
    sel = wt > 0
    if int(sel.sum()) < min_tokens:
        return down0
    xs, ws = x[sel].float(), wt[sel]
    Y = torch.zeros(xs.shape[0], down0.shape[0])
    for e in members:
        ge = torch.where(top_idx[sel] == e, top_w[sel], torch.zeros_like(top_w[sel])).sum(-1)  # (n,)
        if bool((ge > 0).any()):
            rows = ge > 0
            Y[rows] += ge[rows, None] * expert_forward(xs[rows], member_gate_up[e].float(), member_down[e].float())
    Y = Y / ws[:, None]  # (n, H) gate-weighted member output
    I = down0.shape[1]
    g, u = F.linear(xs, gate_up.float()).split(I, dim=-1)  # (n, 2I) -> 2 x (n, I)
    A = (F.silu(g) * u).double()  # (n, I)
    Aw = A * ws[:, None].double()
    G = A.T @ Aw  # (I, I)
    lam = ridge * float(G.diagonal().mean().clamp_min(1e-12))
    rhs = Aw.T @ Y.double() + lam * down0.double().T  # (I, H)
    Dt = torch.linalg.solve(G + lam * torch.eye(I, dtype=torch.float64), rhs)
    return Dt.T.to(down0.dtype)  # (H, I)
