"""Pricing: every allocation candidate in real bytes, and the byte budget.

An expert has three projections, each an (N, K) = (out_features, in_features) matrix: gate (I, H),
up (I, H), down (H, I). A candidate's price for an expert is the sum of `codecs.nbytes(shape, spec)`
over the three shapes: packed codes, scales, zeros and dictionaries, exactly what the packer stores.
Codecs whose size depends on the data (sub-1-bit) take a measured size per (layer, expert, candidate)
instead (`measured_bytes`, NaN where nbytes applies).

Budget: budget_bits * P / 8 bytes, floored, with P the expert parameter count of the whole model
("model" scope) or of each layer ("layer" scope).
"""
from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple, Sequence

import numpy as np

from ..codecs import QuantSpec, nbytes
from ..errors import MoeCompressError

Shape = tuple[int, int]


def expert_shapes(hidden_size: int, intermediate_size: int) -> tuple[Shape, Shape, Shape]:
    """The (N, K) shapes of one expert's gate, up and down projections."""
    H, I = int(hidden_size), int(intermediate_size)
    if H <= 0 or I <= 0:
        raise MoeCompressError(f"expert sizes must be positive, got hidden {H}, intermediate {I}")
    return (I, H), (I, H), (H, I)


class Pricing(NamedTuple):
    """bytes: (L, E, C) int64 stored bytes of expert e of layer l at candidate c; params: (L, E) int64."""

    bytes: np.ndarray
    params: np.ndarray


def _per_layer_shapes(shapes, num_layers: int) -> list[tuple[Shape, ...]]:
    if not shapes:
        raise MoeCompressError("no expert shapes given; pass expert_shapes(hidden, intermediate)")
    if isinstance(shapes[0][0], (int, np.integer)):  # one expert layout for every layer
        return [tuple(tuple(map(int, s)) for s in shapes)] * num_layers
    if len(shapes) != num_layers:
        raise MoeCompressError(f"got expert shapes for {len(shapes)} layers but {num_layers} MoE layers")
    return [tuple(tuple(map(int, s)) for s in layer) for layer in shapes]


def _price(shapes: Sequence[Shape], spec: QuantSpec) -> int:
    try:
        return sum(int(nbytes(s, spec)) for s in shapes)
    except MoeCompressError:
        raise
    except Exception as e:  # data-dependent codecs cannot be priced from shapes alone
        raise MoeCompressError(f"codec {spec.codec!r} cannot be priced from shapes ({e}); "
                               f"pass measured_bytes for {spec.label}") from None


def price_candidates(candidates: Sequence[QuantSpec], shapes, num_layers: int, num_experts: int,
                     measured_bytes=None) -> Pricing:
    """Price every (layer, expert, candidate) in bytes.

    shapes: one tuple of (N, K) projection shapes for every expert (see expert_shapes), or a list
    with one such tuple per layer. measured_bytes: optional (L, E, C) array of measured sizes, NaN
    where the candidate is priced by its codec's nbytes.
    """
    L, E, C = int(num_layers), int(num_experts), len(candidates)
    if L <= 0 or E <= 0:
        raise MoeCompressError(f"need at least one MoE layer and one expert, got {L} layers x {E} experts")
    per_layer = _per_layer_shapes(shapes, L)
    override = None
    if measured_bytes is not None:
        override = np.asarray(measured_bytes, dtype=np.float64)
        if override.shape != (L, E, C):
            raise MoeCompressError(f"measured_bytes has shape {override.shape}, expected {(L, E, C)}")
        bad = ~np.isnan(override) & ~(override > 0)
        if bad.any() or np.isinf(override).any():
            raise MoeCompressError("measured_bytes must be positive finite sizes (NaN: price with nbytes)")
    out = np.zeros((L, E, C), dtype=np.int64)
    params = np.zeros((L, E), dtype=np.int64)
    cache: dict[tuple, int] = {}
    for l, layer_shapes in enumerate(per_layer):
        params[l, :] = sum(n * k for n, k in layer_shapes)
        for c, spec in enumerate(candidates):
            need = override is None or np.isnan(override[l, :, c]).any()
            if need:
                key = (layer_shapes, spec)
                if key not in cache:
                    cache[key] = _price(layer_shapes, spec)
                out[l, :, c] = cache[key]
            if override is not None:
                m = ~np.isnan(override[l, :, c])
                out[l, m, c] = np.ceil(override[l, m, c]).astype(np.int64)
    return Pricing(out, params)


def budget_bytes(params: np.ndarray, budget_bits: float, scope: str) -> np.ndarray:
    """(1,) model budget or (L,) per-layer budgets in bytes: floor(budget_bits * P / 8)."""
    b = Fraction(repr(float(budget_bits)))  # the decimal the user typed, exactly
    totals = [int(params.sum())] if scope == "model" else [int(p) for p in params.sum(axis=1)]
    return np.array([int(b * P / 8) for P in totals], dtype=np.int64)  # int() floors positive Fractions


def stored_bits(spec: QuantSpec, shapes: Sequence[Shape]) -> float:
    """Average stored bits per parameter of one expert at `spec` (e.g. int2 g64 -> 2.5: fp16 scale+zero per 64)."""
    return 8 * _price(shapes, spec) / sum(n * k for n, k in shapes)


def overhead_bits(spec: QuantSpec, shapes: Sequence[Shape]) -> float:
    """Stored bits per parameter beyond the nominal width (int2 g64 -> 0.5). A front end that reads
    --bits B as code bits, like uniform's --bits 2, budgets B + overhead_bits of its group size."""
    return stored_bits(spec, shapes) - spec.bits
