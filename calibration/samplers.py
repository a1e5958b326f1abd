"""Expert-balanced calibration samplers: `balanced` (selection from real text) and `ebss` (self-sampling).

`balanced`: draw a pool of `pool_factor * nsamples` random windows from the calibration text, count
which experts every window reaches (one layer-streamed routing pass, `routing.route_windows`), then
pick `nsamples` windows greedily, each time the one that most increases

    F(S) = sum_l sum_e sqrt(p_le(S)),   p_le(S) = N_le(S) / sum_e' N_le'(S),   N_le(S) = sum_{w in S} n[w, l, e]

(n[w, l, e]: tokens window w routes to expert e of layer l; every window adds the same number of
routings to each layer). An extra token for an expert with usage share p is worth about 1/sqrt(p)
minus a common term, so windows that reach starved experts win and windows feeding dominant experts
lose. It is one of the family sum_e p^a / (a (1 - a)) (up to a constant), which runs from the sum of
log shares (a -> 0: proportional fairness, a token worth ~1/p, `objective="log"`, there over
log(1 + N)) through a = 1/2 (sqrt, the default) to the Shannon entropy of the shares (a -> 1: a token
worth ~ -log p, `"entropy"`); `--balance-objective` chooses. Measured on the fixture's prose
(128 x 256 tokens, a pool of 512 windows; perplexity by benchmarks/calibration.py):
- coverage, seeds 0-7, per layer against random windows of the same seed: all three lower the
  coefficient of variation in every layer and seed; the minimum over the experts real text reaches is
  raised in all 32 layer-seeds by log and sqrt, in 28 by entropy (layer 0 lost twice). Layer 1's least
  used live expert: random 9-24 routings, entropy 11-20, sqrt 21-41, log 41-58;
- 2-bit GPTQ with --affinity, seeds 0-2, C perplexity (random windows 23.56 / 24.68 / 23.35): entropy
  22.67 / 23.44 / 22.97, sqrt 22.69 / 23.38 / 23.06, log 22.96 / 25.38 / 23.91: log's windows are the
  most balanced and the least typical, and calibrate worse.
The token budget is that of `random`: nsamples windows of seqlen tokens. Weighted source mixes shape
the pool; the greedy ignores weights. Real text cannot reach an expert it never routes to (the
fixture's prose routes no token to expert 6 of layers 1 and 2): that is what `ebss` is for.

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

from ..config import BALANCE_OBJECTIVES, CalibConfig
from ..errors import MoeCompressError
from .data import random_windows
from .routing import Routing, route_windows

log = logging.getLogger("moecompress")


DEFAULT_OBJECTIVE = CalibConfig.balance_objective  # one default for the CLI, the API and these functions


@dataclass(frozen=True)
class BalancedConfig:
    pool_factor: int = 4        # candidate windows = pool_factor * nsamples
    objective: str = DEFAULT_OBJECTIVE

    def __post_init__(self):
        if self.pool_factor < 1:
            raise MoeCompressError(f"balanced sampler pool_factor must be >= 1, got {self.pool_factor}")
        if self.objective not in BALANCE_OBJECTIVES:
            raise MoeCompressError(f"unknown balance objective {self.objective!r}; "
                                   f"choose one of {', '.join(BALANCE_OBJECTIVES)}")


def balance_objective(N: torch.Tensor, objective: str = DEFAULT_OBJECTIVE) -> torch.Tensor:
    """N: (..., L, E) usage counts -> (...) F summed over layers: sum_e sqrt(share), the entropy of the
    shares, or sum_e log(1 + N)."""
    if objective == "log":
        return torch.log1p(N).sum((-1, -2))
    p = N / N.sum(-1, keepdim=True).clamp(min=1e-12)
    if objective == "sqrt":
        return p.sqrt().sum((-1, -2))
    return -(p * p.clamp(min=1e-30).log()).sum((-1, -2))


class Selection(NamedTuple):
    windows: torch.Tensor              # (nsamples, seqlen) token ids
    routing: Routing | None            # routing counts of exactly these windows, when the sampler has them
    seconds: float


def balanced_select(counts: torch.Tensor, n: int, objective: str = DEFAULT_OBJECTIVE) -> torch.Tensor:
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
             config: BalancedConfig = BalancedConfig(), progress=None, device="cpu") -> Selection:
    t0 = time.time()
    cand = random_windows(pool, nsamples * config.pool_factor, seqlen, seed)  # (P, seqlen)
    r = route_windows(model_path, cand, batch_size, progress, device=device)
    idx = balanced_select(r.tokens, nsamples, config.objective)
    return Selection(cand[idx], Routing(r.layers, r.tokens[idx], r.gate_sum[idx]), time.time() - t0)


def select(model_path: str, pool, calib, *, progress=None, device="cpu") -> Selection:
    """Windows for `calib.sampler` ("random", "balanced" or "ebss"), with their routing where known; the
    model runs on `device`."""
    t0 = time.time()
    if calib.sampler == "random":
        return Selection(random_windows(pool, calib.nsamples, calib.seqlen, calib.seed), None, time.time() - t0)
    if calib.sampler == "balanced":
        return balanced(model_path, pool, calib.nsamples, calib.seqlen, calib.seed, calib.batch_size,
                        BalancedConfig(objective=calib.balance_objective), progress=progress, device=device)
    if calib.sampler == "ebss":
        from .ebss import EBSSConfig, generate
        n_real = min(calib.nsamples - 1, round(calib.nsamples * calib.ebss_real))
        ids = generate(model_path, pool, calib.nsamples - n_real, calib.seqlen, calib.seed,
                       EBSSConfig(tau=calib.ebss_tau, beams=calib.ebss_beams, expand=calib.ebss_expand), progress=progress,
                       device=device)
        if n_real:  # (n_real, seqlen) real windows first, then the generated ones
            ids = torch.cat([random_windows(pool, n_real, calib.seqlen, calib.seed), ids])
        return Selection(ids, None, time.time() - t0)
    raise MoeCompressError(f"unknown sampler {calib.sampler!r}; choose random, balanced or ebss")


def sample(model_path: str, pool, calib, device="cpu") -> torch.Tensor:
    """(nsamples, seqlen) calibration windows for `calib.sampler` (the entry point of api.calibration_windows)."""
    s = select(model_path, pool, calib, device=device)
    log.info("%s sampler: %d windows x %d tokens in %.1f s", calib.sampler, *s.windows.shape, s.seconds)
    return s.windows
