"""Coverage statistics of a calibration set: how evenly it reaches the experts of every MoE layer.

For MoE layer l with per-expert routed-token counts n_e (e = 1..E):

    min_l = min_e n_e,  max_l = max_e n_e,  cv_l = std_e(n_e) / mean_e(n_e)   (population std)
    under_l = {e : n_e < threshold}

A perfectly balanced set has cv = 0 and min = max = mean; experts under the threshold get too few
tokens for a trustworthy Hessian (the quantize pass falls them back to round-to-nearest). The summed
gate weight per expert is reported alongside (the mass AGQ weights Hessians by).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from ..errors import MoeCompressError


def cv(counts: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation along the last dimension: std / mean (population std; 0 for all-zero)."""
    c = counts.double()
    mean = c.mean(-1)
    return torch.where(mean > 0, c.std(-1, correction=0) / mean.clamp(min=1e-12), torch.zeros_like(mean))


@dataclass(frozen=True)
class LayerCoverage:
    layer: int
    tokens: list[int]
    gate_sum: list[float]
    min: int
    max: int
    mean: float
    cv: float
    under: list[int]          # experts with fewer than `threshold` tokens


@dataclass(frozen=True)
class Coverage:
    threshold: int
    layers: list[LayerCoverage]
    windows: int = 0
    seqlen: int = 0
    sampler: str = ""

    def __post_init__(self):
        if self.threshold < 0:
            raise MoeCompressError(f"coverage threshold must be >= 0, got {self.threshold}")

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    def table(self) -> str:
        """A compact table: one row per MoE layer, then the per-expert token counts."""
        head = f"{'layer':>5} {'min':>7} {'max':>7} {'mean':>9} {'cv':>6}  {'<' + str(self.threshold):>8}  tokens per expert"
        rows = [head]
        for c in self.layers:
            under = ",".join(map(str, c.under)) if c.under else "-"
            rows.append(f"{c.layer:>5} {c.min:>7} {c.max:>7} {c.mean:>9.1f} {c.cv:>6.3f}  {under:>8}  "
                        + " ".join(str(n) for n in c.tokens))
        worst = max(self.layers, key=lambda c: c.cv, default=None)
        if worst is not None:
            rows.append(f"{self.windows} windows x {self.seqlen} tokens{' (' + self.sampler + ')' if self.sampler else ''}; "
                        f"lowest min {min(c.min for c in self.layers)}, highest cv {worst.cv:.3f} (layer {worst.layer})")
        return "\n".join(rows)


def coverage(layers: list[int], tokens: torch.Tensor, gate_sum: torch.Tensor, threshold: int = 16, *,
             windows: int = 0, seqlen: int = 0, sampler: str = "") -> Coverage:
    """tokens, gate_sum: (len(layers), E) totals over the calibration set."""
    assert tokens.shape == gate_sum.shape and tokens.shape[0] == len(layers)
    out = []
    cvs = cv(tokens)
    for j, i in enumerate(layers):
        n = tokens[j].long()
        out.append(LayerCoverage(int(i), n.tolist(), [round(float(g), 4) for g in gate_sum[j]], int(n.min()), int(n.max()),
                                 round(float(n.double().mean()), 3), round(float(cvs[j]), 5),
                                 [e for e, v in enumerate(n.tolist()) if v < threshold]))
    return Coverage(threshold, out, windows, seqlen, sampler)


def coverage_from_routing(routing, threshold: int = 16, *, seqlen: int = 0, sampler: str = "") -> Coverage:
    """Coverage of the windows of a `Routing` (per-window counts summed over windows)."""
    return coverage(routing.layers, routing.tokens.sum(0), routing.gate_sum.sum(0), threshold,
                    windows=routing.tokens.shape[0], seqlen=seqlen, sampler=sampler)


def coverage_from_records(records: list[dict], threshold: int = 16, *, windows: int = 0, seqlen: int = 0,
                          sampler: str = "") -> Coverage:
    """Coverage from the quantize pass's per-layer records ({"layer", "tokens", "gate_sum"} dicts)."""
    if not records:
        return Coverage(threshold, [], windows, seqlen, sampler)
    E = max(len(r["tokens"]) for r in records)
    pad = lambda v, fill: list(v) + [fill] * (E - len(v))  # noqa: E731 (layers with fewer experts)
    tokens = torch.tensor([pad(r["tokens"], 0) for r in records], dtype=torch.long)
    gate = torch.tensor([pad(r["gate_sum"], 0.0) for r in records], dtype=torch.float64)
    return coverage([r["layer"] for r in records], tokens, gate, threshold, windows=windows, seqlen=seqlen, sampler=sampler)
