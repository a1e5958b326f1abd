"""Neuron alignment of SwiGLU experts by Hungarian matching (permutation symmetry, Git Re-Basin).

A SwiGLU expert f(x) = W_d (silu(W_g x) * W_u x) computes the same function for any permutation P of
its I hidden units: (P W_g, P W_u, W_d P^T). Experts trained from different initialisations put
corresponding units at different indices, so averaging them unaligned mixes unrelated units. Before
merging expert b into reference a we find

    P* = argmax_P  tr(P C),   C[i, j] = <phi_a(i), phi_b(j)>

with scipy.optimize.linear_sum_assignment (the Hungarian method), where phi(i) is either the weight
feature of unit i, cat(W_g[i, :], W_u[i, :], W_d[:, i]) each block scaled to unit Frobenius norm
("weight" matching, Ainsworth et al. 2023, Git Re-Basin), or its standardised activation
silu(W_g x) * W_u x over calibration inputs x ("activation" matching, Li et al. 2024, M-SMoE /
MC-SMoE). The same permutation is applied to gate rows, up rows and down columns, so an aligned
expert computes exactly the function it computed before.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

MATCHERS = ("weight", "activation")


class Alignment(NamedTuple):
    perm: torch.Tensor  # (I,) long: aligned unit i is the expert's unit perm[i]
    score: float  # tr(P C) / I, mean cosine of matched units (1.0 for a permuted copy)


def _weight_features(gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    I = down.shape[1]
    gate, up = gate_up.float().split(I, dim=0)  # (2I, H) -> 2 x (I, H)
    blocks = [gate, up, down.float().T]  # each (I, H)
    return torch.cat([b / b.norm().clamp_min(1e-12) for b in blocks], dim=1)  # (I, 3H)


def _activation_features(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    I = down.shape[1]
    gate, up = F.linear(x.float(), gate_up.float()).split(I, dim=-1)  # (N, 2I) -> 2 x (N, I)
    a = F.silu(gate) * up  # (N, I)
    a = a - a.mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    return a.T  # (I, N): unit-norm centred activation per hidden unit


def align_expert(
    ref_gate_up: torch.Tensor,
    ref_down: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    match: str = "weight",
    inputs: torch.Tensor | None = None,
) -> Alignment:
    """Permutation of expert (gate_up (2I, H), down (H, I)) that best matches the reference's units.

    match="activation" needs `inputs` (N, H) calibration hidden states; without them (or with fewer
    than 2 rows) it falls back to weight matching.
    """
    if match not in MATCHERS:
        raise ValueError(f"match must be one of {MATCHERS}, got {match!r}")
    if match == "activation" and inputs is not None and inputs.shape[0] >= 2:
        fa = _activation_features(ref_gate_up, ref_down, inputs)
        fb = _activation_features(gate_up, down, inputs)
    else:
        fa, fb = _weight_features(ref_gate_up, ref_down), _weight_features(gate_up, down)
    fa, fb = F.normalize(fa.double(), dim=1), F.normalize(fb.double(), dim=1)
    C = fa @ fb.T  # (I, I): cosine similarity of ref unit i and unit j
    rows, cols = linear_sum_assignment(C.numpy(), maximize=True)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    score = float(C[torch.arange(C.shape[0]), perm].mean())
    return Alignment(perm, score)


def permute_expert(gate_up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a hidden-unit permutation consistently: gate rows, up rows and down columns."""
    I = down.shape[1]
    gate, up = gate_up.split(I, dim=0)  # (2I, H) -> 2 x (I, H)
    return torch.cat([gate[perm], up[perm]], dim=0), down[:, perm]
