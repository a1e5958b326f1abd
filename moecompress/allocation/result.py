"""Allocation: the chosen candidate of every (layer, expert), its predicted size, and a table view."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..codecs import QuantSpec
from ..errors import MoeCompressError
from .config import FORMAT_VERSION

METHODS = ("lp", "uniform", "random", "plan")


@dataclass(frozen=True)
class Allocation:
    """One allocation (JSON-able; goes into plan.json).

    choice[l][e] indexes `candidates`; predicted_bytes sums the priced bytes of every expert;
    budget_bytes is the total byte budget (None for uniform); objective is sum of the chosen costs
    (nan when no costs were given); status is the solver's ("optimal", "feasible" on a time limit)
    or the method name for baselines.
    """

    candidates: tuple[QuantSpec, ...]
    choice: tuple[tuple[int, ...], ...]
    predicted_bytes: int
    expert_params: int
    budget_bytes: int | None
    objective: float
    solve_seconds: float
    status: str
    method: str
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoeCompressError(f"unknown allocation method {self.method!r}; one of {METHODS}")
        C = len(self.candidates)
        if not self.choice or any(not row for row in self.choice) or any(not 0 <= c < C for row in self.choice for c in row):
            raise MoeCompressError("allocation choices must index the candidate list; fix the plan")
        if self.format_version != FORMAT_VERSION:
            raise MoeCompressError(f"allocation format_version {self.format_version} is not supported "
                                   f"(this moecompress reads {FORMAT_VERSION}); re-create the plan")

    @property
    def num_layers(self) -> int:
        return len(self.choice)

    def spec(self, layer: int, expert: int) -> QuantSpec:
        return self.candidates[self.choice[layer][expert]]

    def choice_array(self) -> np.ndarray:
        """(L, E) int64 candidate indices."""
        return np.array(self.choice, dtype=np.int64)

    def widths(self) -> np.ndarray:
        """(L, E) nominal bits of each expert's spec."""
        bits = np.array([s.bits for s in self.candidates])
        return bits[self.choice_array()]

    @property
    def average_bits(self) -> float:
        """Predicted stored bits per expert parameter (scales and zeros included)."""
        return 8 * self.predicted_bytes / self.expert_params

    def histogram(self) -> dict[str, int]:
        counts = np.bincount(self.choice_array().ravel(), minlength=len(self.candidates))
        return {s.label: int(n) for s, n in zip(self.candidates, counts)}

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "method": self.method, "status": self.status,
                "candidates": [c.to_json() for c in self.candidates],
                "choice": [list(r) for r in self.choice],
                "widths": self.widths().tolist(),
                "predicted_bytes": self.predicted_bytes, "expert_params": self.expert_params,
                "predicted_bits_per_param": self.average_bits, "budget_bytes": self.budget_bytes,
                "objective": None if self.objective != self.objective else self.objective,
                "solve_seconds": self.solve_seconds}

    @staticmethod
    def from_json(d: dict) -> "Allocation":
        """Inverse of to_json (the derived fields widths and predicted_bits_per_param are ignored)."""
        try:
            obj = d.get("objective")
            return Allocation(tuple(QuantSpec.from_json(c) for c in d["candidates"]),
                              tuple(tuple(int(c) for c in r) for r in d["choice"]), int(d["predicted_bytes"]),
                              int(d["expert_params"]), d.get("budget_bytes"),
                              float("nan") if obj is None else float(obj), float(d.get("solve_seconds", 0.0)),
                              str(d.get("status", "plan")), str(d.get("method", "plan")),
                              int(d.get("format_version", FORMAT_VERSION)))
        except (KeyError, TypeError, ValueError) as e:
            raise MoeCompressError(f"bad allocation in plan ({type(e).__name__}: {e}); re-create the plan") from None


def allocation_table(alloc: Allocation, columns: int = 32) -> str:
    """Layer x expert table of chosen widths, `columns` experts per block, per-layer mean width at right.

    Cells show the nominal bits when those identify the candidate, else the candidate's label.
    """
    bits = [c.bits for c in alloc.candidates]
    labels = [str(b) for b in bits] if len(set(bits)) == len(bits) else [c.label for c in alloc.candidates]
    ch = alloc.choice_array()  # (L, E)
    L, E = ch.shape
    w = max(max(len(s) for s in labels), len(str(E - 1)))
    lw = max(len("layer"), len(str(L - 1)))
    mean_w = alloc.widths().mean(axis=1)
    out = []
    for s in range(0, E, columns):
        cols = range(s, min(E, s + columns))
        last = cols[-1] == E - 1
        out.append(f"{'layer':>{lw}} | " + " ".join(f"{e:>{w}}" for e in cols) + (" | mean" if last else ""))
        out.append("-" * len(out[-1]))
        for l in range(L):
            row = f"{l:>{lw}} | " + " ".join(f"{labels[ch[l, e]]:>{w}}" for e in cols)
            out.append(row + (f" | {mean_w[l]:.2f}" if last else ""))
        out.append("")
    hist = ", ".join(f"{k}: {v}" for k, v in alloc.histogram().items())
    out.append(f"{alloc.method} ({alloc.status}): {alloc.average_bits:.4f} stored bits/param, "
               f"{alloc.predicted_bytes} bytes; experts per width: {hist}")
    return "\n".join(out)
