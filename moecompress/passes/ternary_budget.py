"""Sub-1-bit budgets: the densest ternary code of a group of experts that fits a bits-per-weight budget.

The size of a "sub1" tensor depends on its data: the more zeros, the longer the dictionary matches and
the fewer codewords. The dead-zone threshold t of the ternary grid (quant/ternary.py) sets the fraction
of zeros, and with it both the error (lower t: fewer zeros, less error) and the bytes. With a budget of
B bits per weight (`moecompress quantize --method ternary --bits B`, B < 1.6), each batch of experts is
quantized by GPTQ at thresholds chosen by bisection on [T_MIN, T_MAX] and the smallest threshold whose
real encoded bytes fit the budget is kept:

    bytes(t) + MANIFEST_BYTES * tensors  <=  numel * (B - dictionary bits per weight) / 8 * (1 - MARGIN)

bytes(t) encodes every tensor of the batch with the model's dictionary (in the first MoE layer, before
that dictionary exists, with a dictionary built from the candidate codes themselves), so codewords, row
counts, levels and the choice between "sub1" and dense "ternary" are all counted; the shared
dictionary and the manifest entries are charged per weight and per tensor. The size is close to
monotone in t, not exactly (GPTQ's error feedback moves codes): bisection keeps the best threshold it
saw that fits. Cost: 1 + STEPS GPTQ runs per batch instead of one.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

log = logging.getLogger(__name__)

T_MIN, T_MAX = 0.2, 0.49  # below ~0.25 the min-max grid's nearest rounding already decides most codes
STEPS = 6                 # bisection steps: threshold resolution (T_MAX - T_MIN) / 2^6 ~ 0.005
MANIFEST_BYTES = 320      # one tensor's entry in the compact manifest (name, shape, attrs), rounded up
MARGIN = 0.005            # the first layer's final dictionary differs a little from the search's


class Search(NamedTuple):
    result: object   # the quantizer's result at `threshold`
    threshold: float
    nbytes: int
    fits: bool


def budget_bytes(numel: int, tensors: int, target_bits: float, dict_bits: float) -> float:
    """Bytes a batch of `tensors` tensors with `numel` weights may take under `target_bits` per weight."""
    return numel * (target_bits - dict_bits) / 8 * (1 - MARGIN) - MANIFEST_BYTES * tensors


def search_threshold(quantize: Callable[[float], object], nbytes: Callable[[object], int],
                     budget: float) -> Search:
    """Smallest threshold in [T_MIN, T_MAX] (to STEPS bisection steps) whose result fits `budget` bytes.

    quantize(t) -> result; nbytes(result) -> encoded bytes. If even T_MAX does not fit, its result is
    returned with fits=False (the caller warns: the budget is below what ternary codes reach here).
    """
    res = quantize(T_MAX)
    best = Search(res, T_MAX, nbytes(res), False)
    if best.nbytes > budget:
        return best
    best = best._replace(fits=True)
    lo, hi = T_MIN, T_MAX
    for _ in range(STEPS):
        mid = round((lo + hi) / 2, 6)
        res = quantize(mid)
        n = nbytes(res)
        if n <= budget:
            best, hi = Search(res, mid, n, True), mid
        else:
            lo = mid
    return best
