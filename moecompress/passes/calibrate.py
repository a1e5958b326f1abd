"""Per-expert Hessians and routing statistics, collected through `MoEExperts.observer`.

For expert e with routed inputs x_t (gate/up) or intermediate activations h_t (down):
    H_e = sum_t c_t v_t v_t^T,   c_t = 1, or the token's gate weight with affinity (MoEQuant's AGQ)
Only experts in `subset` accumulate (so a layer's Hessians can be built a chunk of experts at a time).
"""
from __future__ import annotations

import torch


class HessianCollector:
    def __init__(self, num_experts: int, dim: int, which: str, subset=None, affinity: bool = False):
        assert which in ("x", "h")
        self.which, self.affinity, self.dim = which, affinity, dim
        self.subset = set(range(num_experts)) if subset is None else set(subset)
        self.H = {e: torch.zeros(dim, dim, dtype=torch.float32) for e in sorted(self.subset)}
        self.tokens = torch.zeros(num_experts, dtype=torch.long)
        self.gate_sum = torch.zeros(num_experts, dtype=torch.float64)

    def __call__(self, e: int, tok: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        self.tokens[e] += tok.numel()
        self.gate_sum[e] += float(w.double().sum())
        if e not in self.subset:
            return
        v = (x if self.which == "x" else h).float()
        if self.affinity:
            v = v * w.float().clamp(min=0).sqrt()[:, None]  # c_t x x^T = (sqrt(c_t) x)(sqrt(c_t) x)^T
        self.H[e].addmm_(v.t(), v)

    def stacked(self, experts: list[int]) -> torch.Tensor:
        return torch.stack([self.H[e] for e in experts])


def expert_chunks(experts: list[int], dim: int, budget_bytes: int) -> list[list[int]]:
    """Split experts so one chunk's Hessians (plus GPTQ's working copies, ~3x) fit in budget_bytes."""
    per = 3 * dim * dim * 4
    n = max(1, budget_bytes // per)
    return [experts[i:i + n] for i in range(0, len(experts), n)]
