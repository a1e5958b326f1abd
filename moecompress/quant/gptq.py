"""GPTQ, batched over the experts of a layer that share a shape.

W: (E, N, K) expert weights (out, in), H: (E, K, K) input Hessians, H = sum_t c_t x_t x_t^T.
GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") quantizes the columns of W one at a time and spreads each column's rounding error over
the columns not yet quantized, using the upper Cholesky factor of H^-1:

    err_j = (w_j - q(w_j)) / [H^-1]_jj,     W[:, j+1:] -= err_j [H^-1]_{j, j+1:}

with relative damping (lambda = percdamp * mean diag H), lazy block updates, optional act-order
(columns by decreasing H_jj; groups then keep their static, original-order grid) and groupwise grids.
Every step is a batched tensor op over E, so a layer's experts cost one batched Cholesky, not a Python
loop per expert. A grid object (see grids.py) decides how a group of columns is rounded, so the same
loop serves integer and ternary codes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .grids import GridParams

log = logging.getLogger("moecompress")


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    sweeps: int = 0  # coordinate-descent sweeps after GPTQ (quant/coord.py; passes/quantize.sweeps_for)
    refit: int = 0  # rounds of Hessian-weighted scale refits after GPTQ (quant/refit.py); 0: off

    def __post_init__(self):
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


class GPTQResult(NamedTuple):
    codes: torch.Tensor   # (E, N, K) int32 grid codes, original column order
    scale: torch.Tensor   # (E, N, K // g) fp32
    zero: torch.Tensor    # (E, N, K // g) fp32
    deq: torch.Tensor     # (E, N, K) float32 dequantized weight
    loss: torch.Tensor    # (E,) sum over columns of err^2 / [H^-1]_jj / 2 (GPTQ's proxy loss)


class Owned:
    """A tensor handed over to `gptq` for it to consume: it is modified in place and freed as soon as it is
    used, so a caller that kept no other reference saves a copy. gptq(W, H) without it copies both."""
    __slots__ = ("_t",)

    def __init__(self, t: torch.Tensor):
        self._t = t

    @property
    def shape(self):
        return self._t.shape

    def take(self) -> torch.Tensor:
        t, self._t = self._t, None
        assert t is not None, "an Owned tensor is consumed once"
        return t


def tensor_of(x):
    """The tensor itself, from a tensor or an `Owned` (which gives it up)."""
    return x.take() if isinstance(x, Owned) else x


def _prepare_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """In place: dead inputs (H_jj == 0) get H_jj = 1 (the caller zeroes W[:, j]); then relative damping.
    -> the dead mask (E, K)."""
    diag = torch.diagonal(H, dim1=1, dim2=2)  # (E, K) view
    dead = diag == 0
    diag[dead] = 1.0
    damp = percdamp * diag.mean(-1)  # (E,)
    diag += damp[:, None]
    return dead


# A (K, K) float32 Hessian at least this big (K >= 4096) is factored in place on the CPU (LAPACK through
# scipy) and, under act-order, permuted in place: no second (K, K) matrix. Below it, and on CUDA, torch's
# batched ops (which allocate their results) run unchanged.
INPLACE_BYTES = 64 << 20

UPDATE_BYTES = 32 << 20  # on that path, GPTQ's lazy block update is applied by row chunks of about this size

_RETRIES = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)  # extra damping, x mean diag H, tried in turn


def _in_place(H: torch.Tensor) -> bool:
    return H.device.type == "cpu" and H.dtype == torch.float32 and H.shape[-1] ** 2 * 4 >= INPLACE_BYTES


def _inverse_cholesky(h: Owned) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), consuming H. When a factorization fails, more damping
    is added (extra * mean diag H, logged) and the factorization retried.

    Large CPU Hessians (`INPLACE_BYTES`) take `_inverse_cholesky_inplace`: one expert at a time, in H's own
    storage, so U is H's storage and no other (K, K) matrix exists (at K = 14336 each is 0.82 GB). Measured with
    `benchmarks/scale.py --models mixtral-8x7b --nsamples 8 --seqlen 64 --experts-cap mixtral-8x7b=2 --threads 2
    --skip-peer`: peak RSS 4.90 G -> 4.72 G with this, the in-place permutations and byte-held codes; 4.49 G with the chunked lazy update, the adopted
    W^T and chunked bit packing (parts 3.02 G; benchmarks/README.md); 3.88 G (1.29x) with the dequantized columns
    in W^T's rows and the quantize pass handing the layer's weights over (4.51 G before, same day). Otherwise,
    batched in torch: at most two (E, K, K) matrices live at once, H and its factor L; then L alone, inverted in place; then
    H^-1 and U; H is kept until its factor exists, and rebuilt from H^-1 if U's factorization fails."""
    H = h.take()
    if _in_place(H):
        return _inverse_cholesky_inplace(H)
    mean = torch.diagonal(H, dim1=1, dim2=2).mean(-1)[:, None]  # (E, 1)
    added = 0.0
    for extra in _RETRIES:
        if extra:
            log.warning("GPTQ: a Hessian is not positive definite; retrying with extra damping %g x mean diag", extra)
            torch.diagonal(H, dim1=1, dim2=2).add_((extra - added) * mean)
            added = extra
        L, info = torch.linalg.cholesky_ex(H)
        if int(info.abs().sum()):
            del L
            continue
        del H
        Hinv = torch.cholesky_inverse(L, out=L)  # in place: L's storage now holds H^-1
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info.abs().sum()) == 0:
            return U
        del U
        H = torch.linalg.inv(Hinv)  # rare: rebuild (approximately) the damped H for the next try
        del Hinv
    raise FloatingPointError("Hessian is not positive definite even after extra damping")


def _lapack(fn, a, **kw):
    """One in-place LAPACK call on the F-ordered view `a`; -> info."""
    out, info = fn(a, **kw)
    if not np.shares_memory(out, a):  # f2py copies an array it cannot use as is: never silently work on a copy
        raise RuntimeError(f"LAPACK {fn.__name__} did not work in place")
    return int(info)


def _inverse_cholesky_inplace(H: torch.Tensor) -> torch.Tensor:
    """`_inverse_cholesky` for a contiguous CPU float32 (E, K, K) H, in its own storage, expert by expert.
    The F-ordered view a = H[e]^T (the same memory) is factored by LAPACK with uplo = L: spotrf (a = L L^T),
    spotri (L -> H^-1), spotrf again (H^-1 = L2 L2^T), each reading and writing only a's lower triangle, i.e.
    H[e]'s upper one; so H[e] ends as U = L2^T in its upper triangle and its strict lower triangle still holds
    the damped H, which (with the diagonal, kept aside: K floats) restores H for a retry with more damping.
    The strict lower triangle is zeroed at the end. Retries are per expert."""
    from scipy.linalg import lapack
    H = H.contiguous()
    E, K, _ = H.shape
    for e in range(E):
        He = H[e]
        a = He.numpy().T  # (K, K) F-contiguous view of He's storage
        diag = He.diagonal().clone()  # the damped diagonal: the one part of H that spotrf(lower) overwrites
        mean = float(diag.mean())
        for extra in _RETRIES:
            if extra:
                log.warning("GPTQ: a Hessian is not positive definite; retrying with extra damping %g x mean diag",
                            extra)
                _restore_upper(He, diag + extra * mean)
            if _lapack(lapack.spotrf, a, lower=1, clean=0, overwrite_a=1):
                continue
            if _lapack(lapack.spotri, a, lower=1, overwrite_c=1):
                continue
            if _lapack(lapack.spotrf, a, lower=1, clean=0, overwrite_a=1) == 0:
                break
        else:
            raise FloatingPointError("Hessian is not positive definite even after extra damping")
        He.triu_()
    return H


def _restore_upper(He: torch.Tensor, diag: torch.Tensor, block: int = 512) -> None:
    """He (K, K): upper triangle := the transposed strict lower one, diagonal := diag; in place, by row blocks
    (one (block, block) temporary)."""
    K = He.shape[0]
    for i0 in range(0, K, block):
        i1 = min(i0 + block, K)
        He[i0:i1, i1:] = He[i1:, i0:i1].T
        D = He[i0:i1, i0:i1]
        low = D.tril(-1)
        D.copy_(low + low.T)
    He.diagonal().copy_(diag)


def _permute_inplace(H: torch.Tensor, perm: torch.Tensor, block: int = 512) -> None:
    """H[e] := H[e][perm[e]][:, perm[e]] in place for each expert: the columns of a block of rows at a time
    (one (block, K) temporary), then the rows along the permutation's cycles (one row)."""
    E, K, _ = H.shape
    for e in range(E):
        He, p = H[e], perm[e]
        for i0 in range(0, K, block):
            He[i0:i0 + block] = He[i0:i0 + block].index_select(1, p)
        _permute_rows(He, p)


def _permute_rows(M: torch.Tensor, p: torch.Tensor) -> None:
    """M := M[p] in place, M: (K, ...), following the permutation's cycles with one row kept aside."""
    pl = p.tolist()
    seen = [False] * len(pl)
    for start in range(len(pl)):  # new row i is old row p[i]: i <- p[i] <- p[p[i]] ... <- start
        if seen[start] or pl[start] == start:
            continue
        keep = M[start].clone()
        i = start
        while True:
            seen[i] = True
            j = pl[i]
            if j == start:
                M[i] = keep
                break
            M[i] = M[j]
            i = j


def gptq(W, H, grid, group_size: int, config: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """Quantize W: (E, N, K) against Hessians H: (E, K, K) with `grid`, groups of `group_size` along K.
    W and H may be handed over as `Owned` (consumed, no copies kept); plain tensors are left untouched."""
    if config.refit:  # quant/refit.py: GPTQ, then scale refits
        from .refit import gptq_refit
        return gptq_refit(W, H, grid, group_size, config)
    own_w, own_h = isinstance(W, Owned), isinstance(H, Owned)
    W, H = tensor_of(W), tensor_of(H)
    E, N, K = W.shape
    assert K % group_size == 0, (K, group_size)
    G = K // group_size
    H = H.to(torch.float32, copy=not own_h)
    big = _in_place(H)  # large CPU Hessians: in place, and codes held in uint8 while the loop runs
    dead = _prepare_hessian(H, config.percdamp)
    # Work on W^T: (E, K, N), so a column of W is a contiguous row and the rank-1 updates stream memory.
    # A copy, unless W was handed over already laid out as W^T (a transposed view of an (E, K, N) tensor,
    # as passes/quantize.py builds it): then its storage becomes Wt, and W and Wt never coexist.
    Wt = W.float().transpose(1, 2)  # (E, N, K) -> (E, K, N)
    Wt = Wt.contiguous() if own_w else Wt.clone(memory_format=torch.contiguous_format)
    del W  # the caller's W, if it was handed over, is freed here
    Wt.masked_fill_(dead[:, :, None], 0.0)
    del dead

    if config.act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=-1, descending=True, stable=True)  # (E, K)
        # static groups: grids fitted on the original columns before any error feedback
        static = [grid.fit(Wt[:, g * group_size:(g + 1) * group_size].transpose(1, 2)) for g in range(G)]
        static_scale = torch.stack([p.scale for p in static])  # (G, E, N)
        static_zero = torch.stack([p.zero for p in static])
        del static
        if big:  # the same values, moved within Wt and H
            for e in range(E):
                _permute_rows(Wt[e], perm[e])
            _permute_inplace(H, perm)
        else:
            Wt = torch.gather(Wt, 1, perm[:, :, None].expand(E, K, N))
            for e in range(E):  # in place, one (K, K) temporary at a time
                H[e] = H[e].index_select(0, perm[e])
                H[e] = H[e].index_select(1, perm[e])
    h = Owned(H)
    del H
    U = _inverse_cholesky(h)  # (E, K, K) upper; H is gone

    dev = Wt.device  # every work tensor where W is (the run's device)
    scale = torch.zeros(E, N, G, device=dev)
    zero = torch.zeros(E, N, G, device=dev)
    # The dequantized columns of a finished block go into Wt's own rows i1:i2, which nothing reads again
    # (the block works on its clone W1, the lazy update touches rows i2: only): no second (E, N, K) float
    # tensor while U exists. Q, in (E, N, K) and original column order, is laid out after U is freed.
    narrow = big and getattr(grid, "maxq", 1 << 8) < (1 << 8)  # integer codes 0..maxq fit a byte
    codes = torch.zeros(E, N, K, dtype=torch.uint8 if narrow else torch.int32, device=dev)
    loss = torch.zeros(E, device=dev)
    # blocks hold whole groups so each group's grid is fitted on error-updated columns
    B = max(config.block_size // group_size, 1) * group_size
    params: GridParams | None = None
    ar = torch.arange(E, device=dev)
    rows = max(1, UPDATE_BYTES // (4 * E * N))  # rows of Wt per chunk of the large path's lazy update
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = Wt[:, i1:i2].clone()  # (E, b, N)
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros(W1.shape, dtype=codes.dtype, device=dev)
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            w = W1[:, i]  # (E, N): column j of W
            d = U1[:, i, i]  # (E,)
            if config.act_order:
                orig = perm[:, j]  # (E,) original column index per expert
                g = orig // group_size
                p = GridParams(static_scale[g, ar], static_zero[g, ar])  # (E, N) each
            else:
                if j % group_size == 0:
                    params = grid.fit(W1[:, i:i + group_size].transpose(1, 2))  # (E, g, N) -> (E, N, g)
                    scale[:, :, j // group_size] = params.scale
                    zero[:, :, j // group_size] = params.zero
                p = params
            q, wq = grid.quantize(w, p)
            Q1[:, i] = wq
            C1[:, i] = q
            err = (w - wq) / d[:, None]  # (E, N)
            loss += ((w - wq) ** 2 / d[:, None] ** 2).sum(-1) / 2
            W1[:, i:] -= U1[:, i, i:, None] * err[:, None, :]  # (E, b-i, N)
            Err1[:, i] = err
        if big:  # the lazy update by row chunks: its (E, K - i2, N) product never exists whole
            for r0 in range(i2, K, rows):
                r1 = min(r0 + rows, K)
                Wt[:, r0:r1] -= torch.bmm(U[:, i1:i2, r0:r1].transpose(1, 2), Err1)
        else:
            Wt[:, i2:] -= torch.bmm(U[:, i1:i2, i2:].transpose(1, 2), Err1)  # (E, K-i2, b) @ (E, b, N)
        Wt[:, i1:i2] = Q1
        if config.act_order:  # columns i1:i2 of the permuted order go back to their original places
            codes.scatter_(2, perm[:, None, i1:i2].expand(E, N, i2 - i1), C1.transpose(1, 2))
        else:
            codes[:, :, i1:i2] = C1.transpose(1, 2)
    del U, U1, d, W1, Q1, C1, Err1  # U1 and d are views of U: U's storage goes with the last of them
    if config.act_order:  # Wt's row i holds original column perm[:, i]
        Q = torch.empty(E, N, K, device=dev).scatter_(2, perm[:, None, :].expand(E, N, K), Wt.transpose(1, 2))
    else:
        Q = Wt.transpose(1, 2).contiguous()
    del Wt
    codes = codes.to(torch.int32)  # GPTQResult's dtype (no copy when it is already)

    if config.act_order:
        scale = static_scale.permute(1, 2, 0).contiguous()  # (G, E, N) -> (E, N, G)
        zero = static_zero.permute(1, 2, 0).contiguous()
    return GPTQResult(codes, scale, zero, Q, loss)


def rtn(W: torch.Tensor, grid, group_size: int) -> GPTQResult:
    """Round-to-nearest on the same grid: the naive baseline. W: (E, N, K)."""
    E, N, K = W.shape
    G = K // group_size
    Wg = W.float().reshape(E, N, G, group_size)  # (E, N, K) -> (E, N, G, g)
    p = grid.fit(Wg.permute(0, 2, 1, 3).reshape(E * G, N, group_size))  # one grid per (expert, group)
    scale = p.scale.view(E, G, N).permute(0, 2, 1)  # (E*G, N) -> (E, N, G)
    zero = p.zero.view(E, G, N).permute(0, 2, 1)
    s = scale.repeat_interleave(group_size, dim=2)  # (E, N, K)
    z = zero.repeat_interleave(group_size, dim=2)
    q, deq = grid.quantize(W.float().reshape(E, N * K), GridParams(s.reshape(E, N * K), z.reshape(E, N * K)))
    return GPTQResult(q.view(E, N, K), scale.contiguous(), zero.contiguous(), deq.view(E, N, K), torch.zeros(E, device=W.device))


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T), dW = W - Q: the output error on the inputs behind H relative to the
    output's own energy (W, Q: (N, K) float32; H: (K, K))."""
    dW = (W - Q).double()
    H = H.double()
    W = W.double()
    return float(torch.einsum("nk,kl,nl->", dW, H, dW) / torch.einsum("nk,kl,nl->", W, H, W).clamp(min=1e-30))
