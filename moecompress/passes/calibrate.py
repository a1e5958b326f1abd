"""Per-expert Hessians and routing statistics, collected through `MoEExperts.observer`.

For expert e with routed inputs x_t (gate/up) or intermediate activations h_t (down):
    H_e = sum_t c_t v_t v_t^T,   c_t = 1, or the token's gate weight with affinity (MoEQuant's AGQ)
Only experts in `subset` accumulate (so a layer's Hessians can be built a chunk of experts at a time).

With `prior=True` the collector also gathers what every expert of the layer would see on all tokens,
the prior of `--hessian-prior`: for gate/up the average x x^T over all routed rows (each token counts
once per routed expert, so this is the all-token average), for down a sample of about `PRIOR_TOKENS`
tokens' inputs, through which `prior_hessian` runs the expert to average its h h^T.

Router-weighted all-token Hessians (`--all-tokens L`, `all_scale` > 0): every calibration token t feeds
every expert e, weighted by the router's score s_te for e before top-k selection (softmax of the logits,
DeepSeek-V3's sigmoid + correction bias; passes/moe_cache.py), and the expert's Hessian becomes
    H_e = H_routed_e + c * A_e,   A_e = sum_t s_te v_t v_t^T,   c = L * R / S
with v_t = x_t for gate/up and h_e(x_t) from the expert's quantized gate/up for down (all tokens, so E
expert forwards over the whole cache: opt-in). R = sum_e sum_{t routed to e} c_t is the layer's total
routed weight (tokens x k, or the summed gate weights with affinity) and S = sum_e sum_t s_te its total
score mass (the token count under softmax). The normalization is layer-wide, not per expert: at L = 1
the all-token terms of the layer weigh as much, in total, as its routed terms, and each expert's share
follows its router scores, so an expert routed no token still gets c * A_e (a real, full-rank Hessian)
while one the router favours keeps a Hessian dominated by the tokens it is actually sent. A per-expert
ratio (n_e / S_e) would give a never-routed expert nothing. GPTQ is invariant to a Hessian's scale, so
only the blend matters. MoEQuant's affinity weighting is the routed term with --affinity;
calibrate-all-experts (llm-compressor) is the all-token term with uniform scores, here weighted by
the router instead.
Measured on the demo model (g64, 32 x 256 tokens of calib_mix.txt, seeds 0-2; validation: 8,192 tokens
of each fixture calib_<domain>.txt past the 150,000 characters calib_mix.txt holds; mean over the four
domains of the perplexity increase, paired by seed against routed-only): 2-bit L = 0.3 / 1 / 3 / 10:
-0.95 / -1.96 / -2.26 / -2.06 points (every seed lower), --hessian-prior 1: -1.15, --affinity alone +0.52,
--affinity with L = 1: -1.41; 3-bit: every option within 0.1 point of routed-only (seed spread ~0.2).
"""
from __future__ import annotations

import torch

from ..errors import MoeCompressError

PRIOR_TOKENS = 1024  # tokens sampled per collector for the down projections' prior


class HessianCollector:
    def __init__(self, num_experts: int, dim: int, which: str, subset=None, affinity: bool = False,
                 prior: bool = False, sample_every: int = 1, device=None, all_scale: float = 0.0, fp_h=None,
                 cross: bool = False):
        assert which in ("x", "h")
        self.device = device = torch.device("cpu") if device is None else device
        self.which, self.affinity, self.dim = which, affinity, dim
        self.subset = set(range(num_experts)) if subset is None else set(subset)
        self.H = {e: torch.zeros(dim, dim, dtype=torch.float32, device=device) for e in sorted(self.subset)}
        self.tokens = torch.zeros(num_experts, dtype=torch.long)
        self.gate_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.prior, self.sample_every = prior, max(1, int(sample_every))
        self.pool = torch.zeros(dim, dim, dtype=torch.float32, device=device) if prior and which == "x" else None
        self.pool_rows = 0
        self.sample: list[torch.Tensor] = []  # which == "h": sampled routed inputs x
        self._sample_x: torch.Tensor | None = None  # their concatenation, built once after the pass
        self.all_scale = float(all_scale)  # c of the module docstring; 0: routed tokens only
        self.score_sum = torch.zeros(num_experts, dtype=torch.float64)  # sum_t s_te over the all-token pass
        # --fp-target (quant/target.py): D_e = sum_t c_t (u_t - v_t) v_t^T, u_t the unquantized model's input (x, or
        # fp_h(e, x) from the expert's original gate/up), v_t the one the expert gets
        self.wants_fp = cross
        self.fp_h = fp_h
        self.D = {e: torch.zeros(dim, dim, dtype=torch.float32, device=device) for e in sorted(self.subset)} if cross else {}

    def collect_all(self, cache, compute_h=None) -> None:
        """Add c * A_e to the subset's Hessians from the whole MoE cache (its router scores), after the routed
        replay (so no second (K, K) per expert); compute_h(e, x) gives the down projection's input."""
        assert self.all_scale > 0
        cache.replay_all(sorted(self.H), self.add_all, compute_h if self.which == "h" else None)

    def add_all(self, e: int, v: torch.Tensor, s: torch.Tensor) -> None:
        self.score_sum[e] += float(s.double().sum())
        u = v.float() * s.float().clamp(min=0).sqrt()[:, None]
        self.H[e].addmm_(u.t(), u, alpha=self.all_scale)

    def all_mass(self, e: int) -> float:
        """sum_t s_te: the router mass behind expert e's all-token term (0 without one)."""
        return float(self.score_sum[e]) if self.all_scale else 0.0

    def __call__(self, e: int, tok: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                 xf: torch.Tensor | None = None) -> None:
        self.tokens[e] += tok.numel()
        self.gate_sum[e] += float(w.double().sum())
        if self.prior:
            if self.pool is not None:
                v = x.float()
                self.pool.addmm_(v.t(), v)
                self.pool_rows += v.shape[0]
            else:  # a fixed pseudo-random set of token positions, the same whichever expert they went to
                keep = (tok.long() * 2654435761) % (1 << 32) % self.sample_every == 0
                if bool(keep.any()):
                    self.sample.append(x[keep].detach().clone())
        if e not in self.subset:
            return
        v = (x if self.which == "x" else h).float()
        if self.wants_fp:
            u = (xf if self.which == "x" else self.fp_h(e, xf)).float()
        if self.affinity:
            c = w.float().clamp(min=0).sqrt()[:, None]
            v = v * c  # c_t x x^T = (sqrt(c_t) x)(sqrt(c_t) x)^T
            if self.wants_fp:
                u = u * c
        self.H[e].addmm_(v.t(), v)
        if self.wants_fp:
            self.D[e].addmm_((u - v).t(), v)

    def stacked(self, experts: list[int]) -> torch.Tensor:
        return torch.stack([self.H[e] for e in experts])

    def take(self, experts: list[int]) -> torch.Tensor:
        """(G, K, K): the experts' Hessians, handed over (the collector keeps no copy; one expert: no copy)."""
        return _hand_over(self.H, experts)

    def take_cross(self, experts: list[int]) -> torch.Tensor:
        """(G, K, K): the experts' --fp-target cross terms D_e, handed over like `take`."""
        return _hand_over(self.D, experts)

    def mean_weight(self, e: int) -> float:
        """A routed token's average Hessian weight for expert e: its mean gate weight with affinity, else 1."""
        n = int(self.tokens[e])
        return float(self.gate_sum[e]) / n if self.affinity and n else 1.0

    def prior_hessian(self, e: int, expert_forward) -> torch.Tensor:
        """(dim, dim): the average v v^T expert e would see over all tokens (per token, unweighted).
        expert_forward(e, x) -> (h, y) runs the expert (for the down projection's h)."""
        assert self.prior
        if self.pool is not None:
            return self.pool / max(self.pool_rows, 1)
        if not self.sample:
            return torch.zeros(self.dim, self.dim, device=self.device)
        if self._sample_x is None:
            self._sample_x = torch.cat(self.sample)
        with torch.no_grad():
            h = expert_forward(e, self._sample_x)[0].float()
        return h.t() @ h / h.shape[0]


def _hand_over(store: dict, experts: list[int]) -> torch.Tensor:
    """Pop the experts' (K, K) matrices from `store` as one (G, K, K) tensor (one expert: a view, no copy)."""
    if len(experts) == 1:
        return store.pop(experts[0])[None]
    out = torch.stack([store[e] for e in experts])
    for e in experts:
        del store[e]
    return out


def all_token_scale(cache, tokens: torch.Tensor, gate_sum: torch.Tensor, affinity: bool, lam: float) -> float:
    """c = L * R / S of the module docstring: R the layer's routed weight (routing statistics of the whole
    cache), S its router score mass, summed chunk by chunk in window order (the same on every rank)."""
    R = float(gate_sum.sum()) if affinity else float(tokens.sum())
    S = 0.0
    for c in cache.chunks:
        if c.s is None:
            raise MoeCompressError("the MoE cache holds no router scores: it was captured without --all-tokens")
        S += float(c.s.double().sum())
    if not (S > 0 and R > 0):
        raise MoeCompressError(f"--all-tokens: the layer's router scores sum to {S:g} and its routed weight to {R:g}; "
                               "nothing to weight the all-token Hessians by")
    return lam * R / S


def expert_chunks(experts: list[int], dim: int, budget_bytes: int) -> list[list[int]]:
    """Split experts so one chunk's Hessians (plus GPTQ's working copies, ~3x) fit in budget_bytes."""
    per = 3 * dim * dim * 4
    n = max(1, budget_bytes // per)
    return [experts[i:i + n] for i in range(0, len(experts), n)]


def score_sums(cache, E: int) -> list[float]:
    """Each expert's router score mass sum_t s_te over the cache (--all-tokens), for the layer record."""
    out = torch.zeros(E, dtype=torch.float64)
    for c in cache.chunks:
        out += c.s.double().sum(0).cpu()
    return out.tolist()


def routing_stats(cache, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens routed to each expert and their summed gate weight, summed chunk by chunk in window order."""
    tokens = torch.zeros(E, dtype=torch.long)
    gate_sum = torch.zeros(E, dtype=torch.float64)
    for c in cache.chunks:
        flat = c.idx.reshape(-1).to(cache.device)
        w = c.w.reshape(-1).to(cache.device)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp(0, E), minlength=E + 1)[:E].tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                tokens[e] += n
                gate_sum[e] += float(w[order[start:start + n]].double().sum())
                start += n
    return tokens, gate_sum
