"""Importance and cost of each (expert, width) choice, after MC-MoE's pre-loading mixed precision.

MC-MoE (Huang et al., "Mixture Compressor for Mixture-of-Experts LLMs Gains More", ICLR 2025, Sec. 3.1)
prices giving expert e of a layer the width b as

    c(e, b) = phi_e^alpha * w_e^beta * eps_e(b)          (defaults alpha = 1, beta = 1.5)

phi_e   activation frequency: tokens routed to e (top-k counts), normalised per layer to mean 1
        (phi_e = E * n_e / sum_j n_j), so 1 is an expert used as often as the average one;
w_e     summed gate weight of e over the calibration tokens, normalised the same way (mean 1 per
        layer). Both are floored at `importance_floor` so that no expert is free to destroy;
eps_e(b) relative squared error of the MoE block output on the calibration tokens when only
        expert e is quantized at b bits. Since the other experts are untouched, the block output
        error is the error of e's gate-weighted contribution alone:
            eps = sum_t || g_t (f(x_t) - f_b(x_t)) ||^2 / sum_t || g_t f(x_t) ||^2,
        f(x) = down(act(gate x) * up x) with dense weights, f_b with weights quantized at b.
        `expert_output_error` computes it; the pipeline calls it per (expert, candidate).

Normalising per layer makes each layer's importances comparable whatever its routing temperature;
under a model-wide budget the costs of different layers are then compared through eps alone, which is
a relative error of the block output and so on one scale across layers.

Experts with no calibration tokens are normal: their eps cannot be measured (NaN from
`expert_output_error`); they get the mean eps(b) of the measured experts of their layer (or of the
model) and the floored importance, so their cost is small, finite and still falls with more bits.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MoeCompressError

log = logging.getLogger(__name__)


def expert_output_error(X: torch.Tensor, g: torch.Tensor, weights: Sequence[torch.Tensor],
                        quantize: Callable[[torch.Tensor], torch.Tensor],
                        act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
                        chunk_tokens: int = 4096) -> float:
    """Relative squared error of one expert's gate-weighted output when its weights are quantized.

    X: (T, H) MoE block input of the T tokens routed to the expert, g: (T,) their gate weights,
    weights: (gate (I, H), up (I, H), down (H, I)) dense, quantize: (N, K) weight -> (N, K) dequantized
    weight (the candidate width). Returns sum ||g (f - f_q)||^2 / sum ||g f||^2 as a float; NaN when
    T == 0 (unmeasurable: expert_costs fills it), 0.0 when the output is identically zero.
    """
    _check_expert(X, g, weights)
    if X.shape[0] == 0:
        return math.nan
    quantized = [quantize(w.float()) for w in weights]
    return contribution_error(X, g, weights, quantized, lambda a, b: act(a) * b, chunk_tokens=chunk_tokens)


def _check_expert(X, g, weights):
    if X.dim() != 2 or g.dim() != 1 or X.shape[0] != g.shape[0]:
        raise MoeCompressError(f"expected X (T, H) and g (T,), got {tuple(X.shape)} and {tuple(g.shape)}")
    Wg, Wu, Wd = weights
    I, H = Wg.shape
    if X.shape[1] != H or tuple(Wu.shape) != (I, H) or tuple(Wd.shape) != (H, I):
        raise MoeCompressError(f"expert shapes gate {tuple(Wg.shape)}, up {tuple(Wu.shape)}, down {tuple(Wd.shape)} "
                               f"do not fit hidden size {X.shape[1]}")


def contribution_error(X: torch.Tensor, g: torch.Tensor, weights: Sequence[torch.Tensor],
                       quantized: Sequence[torch.Tensor], glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       biases: Sequence[torch.Tensor | None] = (None, None, None), chunk_tokens: int = 4096) -> float:
    """eps with the quantized weights given: (gate, up, down) dense and dequantized, the family's
    glu(gate_out, up_out) -> intermediate, optional (gate, up, down) biases (GPT-OSS; never quantized).
    Same value and conventions as expert_output_error."""
    _check_expert(X, g, weights)
    if X.shape[0] == 0:
        return math.nan
    Wg, Wu, Wd = (w.float() for w in weights)
    Qg, Qu, Qd = (w.float() for w in quantized)
    bg, bu, bd = (None if b is None else b.float() for b in biases)

    def f(x, A, B, D):
        h = glu(F.linear(x, A, bg), F.linear(x, B, bu))  # (t, I)
        return F.linear(h, D, bd)  # (t, H)
    num = den = 0.0
    for s in range(0, X.shape[0], chunk_tokens):
        x = X[s:s + chunk_tokens].float()  # (t, H)
        gt = g[s:s + chunk_tokens].float().unsqueeze(1)  # (t, 1)
        y, yq = gt * f(x, Wg, Wu, Wd), gt * f(x, Qg, Qu, Qd)  # (t, H) each
        num += float(((y - yq).double() ** 2).sum())
        den += float((y.double() ** 2).sum())
    return num / den if den > 0 else 0.0


class Costs(NamedTuple):
    """cost: (L, E, C) objective coefficients; phi, w: (L, E) normalised importances (floored);
    unmeasured: (layer, expert) pairs that had no calibration tokens."""

    cost: np.ndarray
    phi: np.ndarray
    w: np.ndarray
    unmeasured: list


def _mean1(x: np.ndarray) -> np.ndarray:
    """(L, E) -> per-layer mean-1 normalisation; all-zero layers stay zero."""
    s = x.sum(axis=1, keepdims=True)
    return np.where(s > 0, x * x.shape[1] / np.where(s > 0, s, 1.0), 0.0)


def expert_costs(eps, counts, gate_mass, alpha: float = 1.0, beta: float = 1.5,
                 importance_floor: float = 1e-3) -> Costs:
    """c = phi^alpha * w^beta * eps (see module docstring).

    eps: (L, E, C) measured relative errors (NaN allowed only for experts with zero tokens),
    counts: (L, E) routed-token counts, gate_mass: (L, E) summed gate weights.
    """
    eps = np.array(eps, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    mass = np.asarray(gate_mass, dtype=np.float64)
    if eps.ndim != 3 or counts.shape != eps.shape[:2] or mass.shape != eps.shape[:2]:
        raise MoeCompressError(f"eps must be (L, E, C) and counts/gate_mass (L, E); got {eps.shape}, "
                               f"{counts.shape}, {mass.shape}")
    for name, a in (("counts", counts), ("gate_mass", mass)):
        if not np.isfinite(a).all() or (a < 0).any():
            raise MoeCompressError(f"routing statistic {name} has negative or non-finite entries; recalibrate")
    zero = counts == 0  # (L, E)
    finite = np.isfinite(eps)
    if (finite & (eps < 0)).any():
        raise MoeCompressError("measured errors eps must be >= 0")
    bad = ~finite.all(axis=2) & ~zero
    if bad.any():
        l, e = map(int, np.argwhere(bad)[0])
        raise MoeCompressError(f"no finite error measured for layer {l} expert {e} although it received "
                               f"{int(counts[l, e])} tokens; re-run the error measurement")
    if np.isposinf(eps).any():
        raise MoeCompressError("measured errors eps contain +inf; check the quantizer")
    miss = ~finite  # only on zero-token experts now
    if miss.any():
        model_mean = np.array([np.nanmean(eps[..., c]) if finite[..., c].any() else np.nan
                               for c in range(eps.shape[2])])
        if np.isnan(model_mean).any():
            raise MoeCompressError("no expert received calibration tokens; use more or longer calibration text")
        for l in range(eps.shape[0]):
            for c in range(eps.shape[2]):
                m = miss[l, :, c]
                if m.any():
                    ok = finite[l, :, c]
                    eps[l, m, c] = eps[l, ok, c].mean() if ok.any() else model_mean[c]
    unmeasured = [tuple(map(int, x)) for x in np.argwhere(zero)]
    if unmeasured:
        log.warning("%d experts got no calibration tokens and get their layer's mean error: %s",
                    len(unmeasured), ", ".join(f"L{l}E{e}" for l, e in unmeasured[:32])
                    + (" ..." if len(unmeasured) > 32 else ""))
    phi = np.maximum(_mean1(counts), importance_floor)
    w = np.maximum(_mean1(mass), importance_floor)
    cost = (phi ** alpha * w ** beta)[..., None] * eps  # (L, E) -> (L, E, 1) * (L, E, C)
    assert np.isfinite(cost).all()
    return Costs(cost, phi, w, unmeasured)
