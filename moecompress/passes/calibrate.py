"""Per-expert Hessians and routing statistics, collected through `MoEExperts.observer`.

For expert e with routed inputs x_t (gate/up) or intermediate activations h_t (down):
    H_e = sum_t c_t v_t v_t^T,   c_t = 1, or the token's gate weight with affinity (MoEQuant's AGQ)
Only experts in `subset` accumulate (so a layer's Hessians can be built a chunk of experts at a time).

With `prior=True` the collector also gathers what every expert of the layer would see on all tokens,
the prior of `--hessian-prior`: for gate/up the average x x^T over all routed rows (each token counts
once per routed expert, so this is the all-token average), for down a sample of about `PRIOR_TOKENS`
tokens' inputs, through which `prior_hessian` runs the expert to average its h h^T.
"""
from __future__ import annotations

import torch

PRIOR_TOKENS = 1024  # tokens sampled per collector for the down projections' prior


class HessianCollector:
    def __init__(self, num_experts: int, dim: int, which: str, subset=None, affinity: bool = False,
                 prior: bool = False, sample_every: int = 1, device=None):
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

    def __call__(self, e: int, tok: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
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
        if self.affinity:
            v = v * w.float().clamp(min=0).sqrt()[:, None]  # c_t x x^T = (sqrt(c_t) x)(sqrt(c_t) x)^T
        self.H[e].addmm_(v.t(), v)

    def stacked(self, experts: list[int]) -> torch.Tensor:
        return torch.stack([self.H[e] for e in experts])

    def take(self, experts: list[int]) -> torch.Tensor:
        """(G, K, K): the experts' Hessians, handed over (the collector keeps no copy; one expert: no copy)."""
        if len(experts) == 1:
            return self.H.pop(experts[0])[None]
        out = torch.stack([self.H[e] for e in experts])
        for e in experts:
            del self.H[e]
        return out

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


def expert_chunks(experts: list[int], dim: int, budget_bytes: int) -> list[list[int]]:
    """Split experts so one chunk's Hessians (plus GPTQ's working copies, ~3x) fit in budget_bytes."""
    per = 3 * dim * dim * 4
    n = max(1, budget_bytes // per)
    return [experts[i:i + n] for i in range(0, len(experts), n)]
