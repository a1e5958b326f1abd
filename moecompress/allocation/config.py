"""AllocationConfig: the options of the per-expert bit allocation (persisted in plan.json)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..codecs import QuantSpec
from ..errors import MoeCompressError

BUDGET_SCOPES = ("model", "layer")
FORMAT_VERSION = 1


def _as_spec(c, group_size: int) -> QuantSpec:
    if isinstance(c, QuantSpec):
        return c
    if isinstance(c, bool) or not isinstance(c, int):
        raise MoeCompressError(f"bad allocation candidate {c!r}; give a bit width (2, 3, 4, 8) or a QuantSpec")
    return QuantSpec("int", c, group_size)


def _bounds(v, name: str):
    """None, a number (every layer) or a tuple with one number-or-None per layer."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if not math.isfinite(v) or v <= 0:
            raise MoeCompressError(f"{name} must be a positive number of bits, got {v!r}")
        return v
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0):
                raise MoeCompressError(f"{name} entries must be positive numbers or None, got {x!r}")
            out.append(x)
        return tuple(out)
    raise MoeCompressError(f"{name} must be a number, a per-layer list or None, got {v!r}")


@dataclass(frozen=True)
class AllocationConfig:
    """Options of the LP bit allocation (MC-MoE's pre-loading mixed-precision quantization).

    candidates    the widths an expert may get: QuantSpecs, or ints meaning QuantSpec("int", b, group_size).
    alpha, beta   exponents of activation frequency and gate weight in the cost (MC-MoE: 1 and 1.5).
    budget_bits   average stored bits per expert parameter (codes, scales, zeros: every byte nbytes counts).
    budget_scope  "model": one byte budget over all experts of all layers; "layer": one per layer.
    min_bits, max_bits
                  bounds on the nominal width (QuantSpec.bits) of every expert of a layer: a number for
                  all layers or a tuple with one number-or-None per layer. Candidates outside are excluded.
    top_two_each  MC-MoE's rule: every layer has at least one expert at each of its two widest allowed
                  candidates (widest = most bytes).
    importance_floor
                  lower bound on the mean-1 normalised frequency and gate weight, so that experts without
                  calibration tokens keep a small, finite, width-dependent cost.
    mip_gap       relative optimality gap at which CBC may stop. 1e-4 is Gurobi's default (MC-MoE's
                  solver): at DeepSeek-V3 size the optimum is found at the root but proving it exactly
                  (mip_gap=0) can take minutes, as the tiny LP gap is closed one symmetric expert at a time.
    time_limit_s  CBC wall-clock limit; on expiry the best integer solution found is returned.
    seed          CBC random seed (the solve is single-threaded and deterministic).
    """

    candidates: tuple = (2, 3, 4)
    group_size: int = 64
    alpha: float = 1.0
    beta: float = 1.5
    budget_bits: float = 2.5
    budget_scope: str = "model"
    min_bits: object = None
    max_bits: object = None
    top_two_each: bool = False
    importance_floor: float = 1e-3
    mip_gap: float = 1e-4
    time_limit_s: float = 300.0
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise MoeCompressError(f"group size must be a positive integer, got {self.group_size!r}")
        cands = self.candidates
        if isinstance(cands, (int, QuantSpec)):
            cands = (cands,)
        if not isinstance(cands, (list, tuple)) or not cands:
            raise MoeCompressError("allocation needs at least one candidate width, e.g. candidates=(2, 3, 4)")
        specs = tuple(_as_spec(c, self.group_size) for c in cands)
        if len(set(specs)) != len(specs):
            raise MoeCompressError(f"duplicate allocation candidates: {[s.label for s in specs]}; list each once")
        object.__setattr__(self, "candidates", specs)
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MoeCompressError(f"{name} must be a finite number >= 0, got {v!r}")
        b = self.budget_bits
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise MoeCompressError(f"budget bits must be a positive number of bits per parameter, got {b!r}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise MoeCompressError(f"budget scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        lo, hi = _bounds(self.min_bits, "min_bits"), _bounds(self.max_bits, "max_bits")
        object.__setattr__(self, "min_bits", lo)
        object.__setattr__(self, "max_bits", hi)
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
            raise MoeCompressError(f"min_bits {lo} is above max_bits {hi}; swap them")
        if not isinstance(self.top_two_each, bool):
            raise MoeCompressError(f"top_two_each must be True or False, got {self.top_two_each!r}")
        if not isinstance(self.importance_floor, (int, float)) or not 0 < self.importance_floor <= 1:
            raise MoeCompressError(f"importance_floor must be in (0, 1], got {self.importance_floor!r}")
        if not isinstance(self.mip_gap, (int, float)) or not 0 <= self.mip_gap < 1:
            raise MoeCompressError(f"mip_gap must be in [0, 1), got {self.mip_gap!r}")
        if not isinstance(self.time_limit_s, (int, float)) or not self.time_limit_s > 0:
            raise MoeCompressError(f"time_limit_s must be positive, got {self.time_limit_s!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MoeCompressError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.format_version != FORMAT_VERSION:
            raise MoeCompressError(f"allocation config format_version {self.format_version} is not supported "
                                   f"(this moecompress reads version {FORMAT_VERSION}); re-create the plan")

    def layer_bounds(self, layer: int, num_layers: int) -> tuple[float, float]:
        """(min, max) nominal bits allowed in `layer`; +-inf where unbounded."""
        out = []
        for v, name, inf in ((self.min_bits, "min_bits", -math.inf), (self.max_bits, "max_bits", math.inf)):
            if isinstance(v, tuple):
                if len(v) != num_layers:
                    raise MoeCompressError(f"{name} lists {len(v)} layers but the model has {num_layers} MoE "
                                           f"layers; give one value (or None) per MoE layer")
                v = v[layer]
            out.append(inf if v is None else float(v))
        if out[0] > out[1]:
            raise MoeCompressError(f"layer {layer}: min_bits {out[0]} is above max_bits {out[1]}; fix the bounds")
        return out[0], out[1]

    def to_json(self) -> dict:
        return {"candidates": [c.to_json() for c in self.candidates], "group_size": self.group_size,
                "alpha": self.alpha, "beta": self.beta, "budget_bits": self.budget_bits,
                "budget_scope": self.budget_scope,
                "min_bits": list(self.min_bits) if isinstance(self.min_bits, tuple) else self.min_bits,
                "max_bits": list(self.max_bits) if isinstance(self.max_bits, tuple) else self.max_bits,
                "top_two_each": self.top_two_each, "importance_floor": self.importance_floor,
                "mip_gap": self.mip_gap, "time_limit_s": self.time_limit_s, "seed": self.seed,
                "format_version": self.format_version}

    @staticmethod
    def from_json(d: dict) -> "AllocationConfig":
        d = dict(d)
        d["candidates"] = tuple(QuantSpec.from_json(c) for c in d["candidates"])
        for k in ("min_bits", "max_bits"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        try:
            return AllocationConfig(**d)
        except TypeError as e:
            raise MoeCompressError(f"bad allocation config in plan: {e}; re-create the plan") from None
