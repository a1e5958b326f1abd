"""Per-layer calibration statistics that expert pruning and merging decide from.

One `LayerStats` per MoE layer, accumulated over calibration batches (`a + b`). With X: (T, H) the
hidden states entering the MoE block, L: (T, E) the router logits, and for each token t its top-k
experts S_t with renormalised gate weights g_{t,e}, and f_e(x) = W_down_e (silu(W_gate_e x) * W_up_e x):

    counts[e]      = #{t : e in S_t}                                    (routed tokens)
    gate_sum[e]    = sum_{t : e in S_t} g_{t,e}
    reap_sum[e]    = sum_{t : e in S_t} g_{t,e} * ||f_e(x_t)||_2         (REAP, Lasby et al. 2025)
    output_sum[e]  = sum_{t in sample} f_e(x_t)   over *all* sampled tokens (HC-SMoE, Chen et al. 2024)
    logit_gram     = L^T L : (E, E), logit_sum = sum_t L_t               (M-SMoE router-logit similarity)
    router_inputs  = up to `max_router_samples` rows of X (evenly spaced over all batches), with the
                     original router's choice for them (router_topk_index / router_topk_weight), kept
                     to refit merged router rows and the reduced layer's down projections (refit.py)

Experts that see no calibration tokens are normal: their counts are 0, and every method treats
them as "least used" (pruning) or assigns them by weight/output similarity (merging), never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerStats:
    """Calibration statistics of one MoE layer (E experts, hidden size H); add two to accumulate."""

    counts: torch.Tensor  # (E,) float64, routed (token, slot) assignments
    gate_sum: torch.Tensor  # (E,) float64
    reap_sum: torch.Tensor  # (E,) float64
    output_sum: torch.Tensor  # (E, H) float64, sum of f_e(x) over the output-sampled tokens
    output_tokens: int  # how many tokens output_sum covers
    logit_sum: torch.Tensor  # (E,) float64
    logit_gram: torch.Tensor  # (E, E) float64
    tokens: int  # calibration tokens seen
    router_inputs: torch.Tensor  # (N, H) float32 sample of X, N <= max_samples
    router_topk_index: torch.Tensor  # (N, k) long: the original router's experts for those rows
    router_topk_weight: torch.Tensor  # (N, k) float32: and their gate weights
    max_samples: int = 4096

    def __post_init__(self):
        E = self.counts.shape[0]
        assert self.output_sum.shape[0] == E and self.logit_gram.shape == (E, E)
        assert self.router_inputs.shape[0] == self.router_topk_index.shape[0] == self.router_topk_weight.shape[0]

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def frequency(self) -> torch.Tensor:
        """(E,) share of routed assignments per expert (sums to 1 when any token was seen)."""
        return self.counts / self.counts.sum().clamp_min(1.0)

    @property
    def reap(self) -> torch.Tensor:
        """(E,) REAP saliency: mean over routed tokens of gate weight x ||expert output||; 0 if unrouted."""
        return torch.where(self.counts > 0, self.reap_sum / self.counts.clamp_min(1.0), torch.zeros_like(self.reap_sum))

    @property
    def mean_output(self) -> torch.Tensor:
        """(E, H) each expert's mean output over the sampled calibration tokens (all tokens, not only routed)."""
        return self.output_sum / max(self.output_tokens, 1)

    def logit_similarity(self) -> torch.Tensor:
        """(E, E) cosine similarity of the experts' router-logit columns over the calibration tokens."""
        T = max(self.tokens, 1)
        mu = self.logit_sum / T
        cov = self.logit_gram / T - torch.outer(mu, mu)  # centred: the shared offset says nothing
        d = cov.diagonal().clamp_min(1e-12).sqrt()
        return cov / torch.outer(d, d)

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return combine([self, other])

    def summary(self) -> list[dict]:
        """Per-expert usage record (JSON-able) for the run record."""
        freq, reap = self.frequency, self.reap
        return [
            {"expert": e, "tokens": int(self.counts[e]), "frequency": round(float(freq[e]), 6),
             "gate_mass": round(float(self.gate_sum[e]), 4), "reap": round(float(reap[e]), 6)}
            for e in range(self.num_experts)
        ]


def combine(parts: list["LayerStats"]) -> "LayerStats":
    """Sum of per-batch statistics; the row samples are concatenated once and thinned evenly to
    max_samples, so every batch keeps its share (pairwise thinning would favour the last batches)."""
    first = parts[0]
    keep = max(p.max_samples for p in parts)
    X = torch.cat([p.router_inputs for p in parts])  # (sum N, H)
    idx = torch.cat([p.router_topk_index for p in parts])  # (sum N, k)
    w = torch.cat([p.router_topk_weight for p in parts])  # (sum N, k)
    if X.shape[0] > keep:
        pick = torch.linspace(0, X.shape[0] - 1, keep).round().long()
        X, idx, w = X[pick], idx[pick], w[pick]
    total = lambda name: sum((getattr(p, name) for p in parts[1:]), getattr(first, name))
    return LayerStats(
        counts=total("counts"), gate_sum=total("gate_sum"), reap_sum=total("reap_sum"),
        output_sum=total("output_sum"), output_tokens=total("output_tokens"),
        logit_sum=total("logit_sum"), logit_gram=total("logit_gram"), tokens=total("tokens"),
        router_inputs=X, router_topk_index=idx, router_topk_weight=w, max_samples=keep,
    )


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x (T, H), gate_up (2I, H) [gate rows first], down (H, I) -> (T, H)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (T, 2I) -> 2 x (T, I)
    return F.linear(F.silu(gate) * up, down)


def compute_layer_stats(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    max_output_tokens: int = 2048,
    max_router_samples: int = 8192,
) -> LayerStats:
    """Statistics of one batch entering a MoE block.

    hidden (T, H), router_logits (T, E), top_k_index / top_k_weights (T, k) as the router returns them,
    gate_up (E, 2I, H), down (E, H, I). Every expert is also run on up to `max_output_tokens` evenly
    spaced tokens for its mean output (HC-SMoE's clustering feature), whether the router chose it or not.
    """
    X = hidden.reshape(-1, hidden.shape[-1]).float()  # (..., H) -> (T, H)
    E = gate_up.shape[0]
    L = router_logits.reshape(X.shape[0], E).double()  # (T, E)
    T = L.shape[0]
    k = top_k_index.shape[-1]
    idx = top_k_index.reshape(T, k)  # (T, k)
    w = top_k_weights.reshape(T, k).double()  # (T, k)
    counts = torch.zeros(E, dtype=torch.float64)
    gate_sum = torch.zeros(E, dtype=torch.float64)
    reap_sum = torch.zeros(E, dtype=torch.float64)
    out_pick = torch.linspace(0, T - 1, min(T, max_output_tokens)).round().long() if T else torch.zeros(0, dtype=torch.long)
    output_sum = torch.zeros(E, X.shape[1], dtype=torch.float64)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        counts[e] = tok.numel()
        gu, dn = gate_up[e].float(), down[e].float()
        if tok.numel():
            g = w[tok, slot]
            norms = expert_forward(X[tok], gu, dn).double().norm(dim=-1)
            gate_sum[e] = g.sum()
            reap_sum[e] = (g * norms).sum()
        if out_pick.numel():
            output_sum[e] = expert_forward(X[out_pick], gu, dn).double().sum(0)
    r_pick = torch.linspace(0, T - 1, min(T, max_router_samples)).round().long() if T else out_pick
    return LayerStats(
        counts=counts, gate_sum=gate_sum, reap_sum=reap_sum,
        output_sum=output_sum, output_tokens=int(out_pick.numel()),
        logit_sum=L.sum(0), logit_gram=L.T @ L, tokens=T,
        router_inputs=X[r_pick].clone(), router_topk_index=idx[r_pick].clone(),
        router_topk_weight=w[r_pick].float(), max_samples=max_router_samples,
    )
