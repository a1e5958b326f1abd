"""Expert-balanced calibration samplers: `balanced` (selection from real text) and `ebss` (self-sampling).

`balanced`: draw a pool of `pool_factor * nsamples` random windows from the calibration text, count
which experts every window reaches (one layer-streamed routing pass, `routing.route_windows`), then
pick `nsamples` windows greedily, each time the one that most increases

    F(S) = sum_l H(N_l(S) / sum_e N_le(S)),   N_le(S) = sum_{w in S} n[w, l, e]

the entropy of the per-expert usage shares of every MoE layer (n[w, l, e]: tokens window w routes
to expert e of layer l). An extra token for an expert with share p is worth about -log p - 1, so
windows that reach starved experts win while windows feeding dominant experts lose, which lowers the
coefficient of variation and raises the minimum count. `objective="log"` uses instead the
proportional-fairness objective sum_l sum_e log(1 + N_le) (monotone submodular, greedy within 1 - 1/e
of optimal); on the fixture's prose it raises the smallest counts but lowers the cv less reliably
than entropy (the dominant experts keep growing), hence the default. The token budget is that of
`random`: nsamples windows of seqlen tokens. Weighted source mixes shape the pool; the greedy ignores
weights. Real text cannot reach an expert it never routes to (prose leaves two of the fixture's
experts at zero tokens in 65k): that is what `ebss` is for.

`ebss`: MoEQuant's expert-balanced self-sampling, in `calibration/ebss.py`. With `ebss_real = f > 0`
(`--ebss-real`), round(f * nsamples) of the windows are random windows of the calibration text and the
rest are generated, at the same token budget: generated text spreads the tokens over the experts and
reaches domains the text lacks, while the real windows keep the Hessians anchored on the text the user
calibrates for (pure self-sampling costs the fixture 1-4% perplexity on its own calibration domain).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import MoeCompressError
from .data import random_windows
from .routing import Routing, route_windows

log = logging.getLogger("moecompress")


OBJECTIVES = ("entropy", "log")


@dataclass(frozen=True)
class BalancedConfig:
    pool_factor: int = 4        # candidate windows = pool_factor * nsamples
    objective: str = "entropy"

    def __post_init__(self):
        if self.pool_factor < 1:
            raise MoeCompressError(f"balanced sampler pool_factor must be >= 1, got {self.pool_factor}")
        if self.objective not in OBJECTIVES:
            raise MoeCompressError(f"unknown balance objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")


def balance_objective(N: torch.Tensor, objective: str = "entropy") -> torch.Tensor:
    """N: (..., L, E) usage counts -> (...) F: summed per-layer entropy of shares, or sum log(1 + N)."""
    if objective == "log":
        return torch.log1p(N).sum((-1, -2))
    p = N / N.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-30).log()).sum((-1, -2))


class Selection(NamedTuple):
    windows: torch.Tensor              # (nsamples, seqlen) token ids
    routing: Routing | None            # routing counts of exactly these windows, when the sampler has them
    seconds: float


def balanced_select(counts: torch.Tensor, n: int, objective: str = "entropy") -> torch.Tensor:
    """Greedy max of F(sum_{w in S} counts[w]) over |S| = n.

    counts: (P, L, E) per-window counts -> (n,) indices into P, in selection order (ties: lowest index).
    """
    P = counts.shape[0]
    if not 1 <= n <= P:
        raise MoeCompressError(f"cannot select {n} windows from a pool of {P}")
    c = counts.double()
    total = torch.zeros(c.shape[1:], dtype=torch.float64)  # (L, E)
    taken = torch.zeros(P, dtype=torch.bool)
    order = []
    for _ in range(n):
        gain = balance_objective(total + c, objective)  # (P,): F(S + w)
        gain[taken] = -float("inf")
        j = int(torch.argmax(gain))
        order.append(j)
        taken[j] = True
        total += c[j]
    return torch.tensor(order, dtype=torch.long)


def balanced(model_path: str, pool, nsamples: int, seqlen: int, seed: int, batch_size: int = 8,
             config: BalancedConfig = BalancedConfig(), progress=None) -> Selection:
    t0 = time.time()
    cand = random_windows(pool, nsamples * config.pool_factor, seqlen, seed)  # (P, seqlen)
    r = route_windows(model_path, cand, batch_size, progress)
    idx = balanced_select(r.tokens, nsamples, config.objective)
    return Selection(cand[idx], Routing(r.layers, r.tokens[idx], r.gate_sum[idx]), time.time() - t0)


def select(model_path: str, pool, calib, *, progress=None) -> Selection:
    """Windows for `calib.sampler` ("random", "balanced" or "ebss"), with their routing where known."""
    t0 = time.time()
    if calib.sampler == "random":
        return Selection(random_windows(pool, calib.nsamples, calib.seqlen, calib.seed), None, time.time() - t0)
    if calib.sampler == "balanced":
        return balanced(model_path, pool, calib.nsamples, calib.seqlen, calib.seed, calib.batch_size, progress=progress)
    if calib.sampler == "ebss":
        from .ebss import EBSSConfig, generate
        n_real = min(calib.nsamples - 1, round(calib.nsamples * calib.ebss_real))
        ids = generate(model_path, pool, calib.nsamples - n_real, calib.seqlen, calib.seed,
                       EBSSConfig(tau=calib.ebss_tau, beams=calib.ebss_beams, expand=calib.ebss_expand), progress=progress)
        if n_real:  # (n_real, seqlen) real windows first, then the generated ones
            ids = torch.cat([random_windows(pool, n_real, calib.seqlen, calib.seed), ids])
        return Selection(ids, None, time.time() - t0)
    raise MoeCompressError(f"unknown sampler {calib.sampler!r}; choose random, balanced or ebss")


def sample(model_path: str, pool, calib) -> torch.Tensor:
    """(nsamples, seqlen) calibration windows for `calib.sampler` (the entry point of api.calibration_windows)."""
    s = select(model_path, pool, calib)
    log.info("%s sampler: %d windows x %d tokens in %.1f s", calib.sampler, *s.windows.shape, s.seconds)
    return s.windows
