"""Hessian-weighted refit of GPTQ's group scales (`quantize --refit T`, GPTQConfig.refit).

GPTQ chooses the integer codes q of a row column by column on a grid (scale s_g, integer zero z_g per group g)
fixed before or while it runs. Once the codes exist, the scales that make the row's output error least are a
small linear least-squares problem. Per output row w (K,), with u_k = q_k - z_{g(k)} and A[k, g] = u_k [k in g],
w_hat = A s and the output error on the calibration inputs is

    err(s) = (w - A s)^T H (w - A s),      minimised by      (A^T H A) s = A^T H w,

G unknowns per row (K / group_size), batched over experts and rows as (E, N, G, G) systems; building them costs
about one (N, K) @ (K, K) product per expert. Zeros stay the integers GPTQ used (the "int" codec stores integer
zero points, and compressed-tensors exports them as such), codes are unchanged, and each refit scale is rounded
through fp16 exactly as the codec stores it (grids._fp16_scale), so the packed format, its size and its decoding
are those of plain GPTQ: only the stored scale values differ.

H is the Hessian GPTQ itself used: dead inputs (H_jj = 0) set to 1 and relatively damped (REFIT_DAMPED; the
undamped Hessian measured the same: the demo model's 2-bit relative output error -7.11% damped, -7.10% undamped
at T = 3). The solve is ridged towards GPTQ's scale by RIDGE x the
system's diagonal (a group whose codes all sit on its zero point keeps its scale). Guard, per row: the refit
is kept only if the system factors, every rounded scale is finite and positive, and the row's H-weighted error
after fp16 rounding is lower than before; otherwise the row keeps GPTQ's scales. Those rows are counted, logged
(a warning when any), and added to REFIT_STATS, which the run records in run/metrics.json ("refit": rows
seen, rows improved over plain GPTQ, rows kept at GPTQ's scales; singular / bad_scale / no_gain: rejected
refits, counted per round).

Rounds (refit = T >= 1): round 1 refits GPTQ's scales; each further round re-runs GPTQ with the previous round's
refit grid held fixed (its error feedback then works against the refit scales) and refits again. Every
candidate (plain GPTQ, each re-run, each refit) is scored by the row's H-weighted error and each row keeps its
best, so the result is never worse than plain GPTQ on that objective (rows are independent in GPTQ).
Zeros are not refit: the continuous fit w_hat_k = s_g q_k + c_g (2G unknowns) put -c/s within 0.05 of GPTQ's
integer zero in every row of the demo model's first layer at 2 bits (0 of 27,648 zeros would change), since
GPTQ's error feedback already moves each group's offset into its codes.
Memory: W and H are kept for the rounds, so GPTQ gets plain tensors and copies them (the in-place saving of an
`Owned` handover is lost), and the refit holds W (dead inputs zeroed), W H (E, N, K each) and the damped H
(E, K, K) besides, plus working blocks of about REFIT_BYTES. Time: each round costs one GPTQ run (the first is
plain GPTQ) plus about one (N, K) @ (K, K) product per expert. GPTQResult.loss is the H-weighted error / 2.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .grids import GridParams, _fp16_scale

log = logging.getLogger("moecompress")

RIDGE = 1e-6          # relative ridge towards the current scale, x the system's diagonal
REFIT_BYTES = 64 << 20  # the normal equations are built by chunks of rows whose (E, rows, G, G) systems and
# (E, rows, K) working blocks stay around this size
REFIT_DAMPED = True   # the refit's H: the damped Hessian GPTQ factored (True) or the raw one (False)
REFIT_STATS: dict[str, int] = {}  # this process's counts since reset_stats(): see `gptq_refit`


def reset_stats() -> dict:
    """Zero REFIT_STATS (the quantize pass does at its start, and records it in run/metrics.json); -> it."""
    REFIT_STATS.clear()
    REFIT_STATS.update(rows=0, improved=0, kept=0, singular=0, bad_scale=0, no_gain=0)
    return REFIT_STATS


reset_stats()


class FixedGrid:
    """A grid whose fit returns given per-group params, in group order: GPTQ calls fit once per group, group 0
    first, on both its act-order (static) and natural-order paths; `gptq_refit` checks the result's scales."""

    def __init__(self, grid, scale: torch.Tensor, zero: torch.Tensor):
        self.grid, self.scale, self.zero = grid, scale, zero  # (E, N, G)
        self.maxq = grid.maxq
        self.calls = 0

    def fit(self, W, weight=None) -> GridParams:
        g = self.calls
        if g >= self.scale.shape[-1]:
            raise RuntimeError("FixedGrid.fit called more often than there are groups")
        self.calls += 1
        return GridParams(self.scale[..., g].clone(), self.zero[..., g].clone())

    def quantize(self, w, p):
        return self.grid.quantize(w, p)


def objective_hessian(H: torch.Tensor, percdamp: float,
                      damped: bool = REFIT_DAMPED) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of H as the refit scores it, and the dead-input mask (E, K) GPTQ zeroes W on."""
    from .gptq import _prepare_hessian
    Hd = H.to(torch.float32, copy=True)
    dead = torch.diagonal(Hd, dim1=1, dim2=2) == 0
    if damped:
        dead = _prepare_hessian(Hd, percdamp)
    return Hd, dead


def row_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(w - w_hat)^T H (w - w_hat) per row: W, Q (E, N, K), H (E, K, K) -> (E, N) float64 (the product in float32,
    the sums in float64)."""
    D = (W - Q).float()
    return (torch.bmm(D, H.float()).double() * D.double()).sum(-1)


def _deq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gs: int) -> torch.Tensor:
    return (codes.float() - zero.repeat_interleave(gs, -1)) * scale.repeat_interleave(gs, -1)


def refit_scales(W: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, H: torch.Tensor,
                 gs: int, HW: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The scales (E, N, G), fp16-exact, minimising each row's (w - w_hat)^T H (w - w_hat) for fixed codes and
    zeros; rows the guard rejects keep `scale`. HW: W @ H if the caller has it. -> (scale, counts {"refit",
    "singular", "bad_scale", "no_gain"}, the change of each row's error (E, N) float64, 0 where rejected)."""
    E, N, K = W.shape
    G = K // gs
    Hf = H.float()
    HW = torch.bmm(W.float(), Hf) if HW is None else HW  # (E, N, K): H w per row (H symmetric)
    Hg = Hf.view(E, G, gs, K)
    out = scale.clone()
    change = torch.zeros(E, N, dtype=torch.float64, device=W.device)
    counts = {"refit": 0, "singular": 0, "bad_scale": 0, "no_gain": 0}
    rows = max(1, REFIT_BYTES // (4 * E * (4 * K + 3 * G * G)))
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        n = r1 - r0
        Uf = codes[:, r0:r1].float() - zero[:, r0:r1].repeat_interleave(gs, -1)  # (E, n, K)
        U = Uf.view(E, n, G, gs)
        M = torch.empty(E, n, G, G, device=W.device)  # A^T H A, one group's row of blocks at a time:
        for g in range(G):  # T = sum_a u_ga H[ga, :] (E, n, K), then M[g, h] = sum_b T[hb] u_hb (2-3x one einsum)
            T = torch.bmm(U[:, :, g], Hg[:, g])
            M[:, :, g] = (T.view(E, n, G, gs) * U).sum(-1)
        del T
        M = M.double()
        M = (M + M.transpose(-1, -2)) / 2
        b = (U * HW[:, r0:r1].view(E, n, G, gs)).sum(-1).double()  # (E, n, G): A^T H w
        s0 = scale[:, r0:r1].double()
        diag = torch.diagonal(M, dim1=-2, dim2=-1)
        ridge = RIDGE * diag + 1e-12 * diag.mean(-1, keepdim=True).clamp(min=1e-30)
        L, info = torch.linalg.cholesky_ex(M + torch.diag_embed(ridge))
        s = torch.cholesky_solve((b + ridge * s0)[..., None], L)[..., 0]
        s = _fp16_scale(s.float()).double()
        ok = info == 0
        good = ok & torch.isfinite(s).all(-1) & (s > 0).all(-1)
        s = torch.where(good[..., None], s, s0)
        d = s - s0  # err(s) - err(s0) = d^T M (s + s0) - 2 d^T b
        gain = (d[..., None, :] @ M @ (s + s0)[..., None])[..., 0, 0] - 2 * (d * b).sum(-1)
        better = good & (gain < 0)
        out[:, r0:r1] = torch.where(better[..., None], s.float(), scale[:, r0:r1])
        change[:, r0:r1] = torch.where(better, gain, torch.zeros_like(gain))
        counts["refit"] += int(better.sum())
        counts["singular"] += int((~ok).sum())
        counts["bad_scale"] += int((ok & ~good).sum())
        counts["no_gain"] += int((good & ~better & (d != 0).any(-1)).sum())
    return out, counts, change


def gptq_refit(W, H, grid, group_size: int, config):
    """GPTQ (config.refit = 0 off) followed by config.refit rounds of scale refits (module docstring).
    W, H as gptq takes them (tensors or Owned); -> GPTQResult with the best candidate per row."""
    from .gptq import GPTQResult, gptq, tensor_of
    if not hasattr(grid, "maxq") or getattr(grid, "bits", None) is None:
        log.warning("--refit applies to integer grids; %s quantized without it", type(grid).__name__)
        return gptq(W, H, grid, group_size, replace(config, refit=0))
    W, H = tensor_of(W), tensor_of(H)
    plain = replace(config, refit=0)
    Hobj, dead = objective_hessian(H, config.percdamp)
    W0 = W.float().masked_fill(dead[:, None, :], 0.0).contiguous()  # what GPTQ quantizes (dead inputs zeroed)
    res = gptq(W, H, grid, group_size, plain)
    codes, scale, zero, deq = res.codes, res.scale, res.zero, res.deq
    err = row_error(W0, deq, Hobj)
    err0, cur_err = err.clone(), err
    HW = torch.bmm(W0, Hobj)
    counts = {"refit": 0, "singular": 0, "bad_scale": 0, "no_gain": 0}
    cur_codes, cur_scale, cur_zero = codes, scale, zero
    for t in range(config.refit):
        if t:  # GPTQ again, on the last refit grid
            fixed = FixedGrid(grid, cur_scale, cur_zero)
            r = gptq(W, H, fixed, group_size, plain)
            if not (torch.equal(r.scale, cur_scale) and torch.equal(r.zero, cur_zero)):
                raise RuntimeError("GPTQ did not keep the fixed refit grid")
            cur_codes = r.codes
            cur_err = row_error(W0, r.deq, Hobj)
            codes, scale, zero, deq, err = _pick(cur_err < err, (r.codes, r.scale, r.zero, r.deq, cur_err),
                                                 (codes, scale, zero, deq, err))
        s, c, change = refit_scales(W0, cur_codes, cur_scale, cur_zero, Hobj, group_size, HW)
        for k in counts:
            counts[k] += c[k]
        cur_scale, cur_err = s, cur_err + change  # the change from the exact quadratic form: no second product
        dq = _deq(cur_codes, cur_scale, cur_zero, group_size)
        codes, scale, zero, deq, err = _pick(cur_err < err, (cur_codes, cur_scale, cur_zero, dq, cur_err),
                                             (codes, scale, zero, deq, err))
    E, N = err.shape
    kept = E * N - int((err < err0).sum())
    for k, v in (("rows", E * N), ("improved", E * N - kept), ("kept", kept), ("singular", counts["singular"]),
                 ("bad_scale", counts["bad_scale"]), ("no_gain", counts["no_gain"])):
        REFIT_STATS[k] += v
    fell = counts["singular"] + counts["bad_scale"]
    (log.warning if fell else log.debug)(
        "refit (%d round%s): %d of %d rows improved (H-weighted error %.4g -> %.4g); %d kept GPTQ's scales, "
        "%d refits rejected as singular or non-positive, %d without gain", config.refit,
        "s" if config.refit > 1 else "", E * N - kept, E * N, float(err0.sum()), float(err.sum()), kept, fell,
        counts["no_gain"])
    return GPTQResult(codes, scale.contiguous(), zero, deq, err.sum(-1).float() / 2)


def _pick(mask: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """Per row (mask (E, N)), the new candidate's tensors where mask, else the old one's."""
    out = []
    for a, b in zip(new, old):
        m = mask if a.dim() == 2 else mask[..., None]
        out.append(torch.where(m, a, b))
    return tuple(out)
