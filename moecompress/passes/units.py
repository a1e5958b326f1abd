"""How a layer's experts are grouped for GPTQ: units (the experts one batched GPTQ call quantizes together),
memory chunks (consecutive units whose Hessians fit the working budget) and each rank's share of the units.

Units come from specs and shapes alone, so neither the machine's free memory nor the number of processes
changes which experts share a GPTQ call, and so neither changes the bytes written.
"""
from __future__ import annotations

from ..codecs import QuantSpec

GPTQ_BUDGET = 256 << 20  # working memory of one batched GPTQ call


def _unit_size(N: int, K: int) -> int:
    """Experts per batched GPTQ call of (N, K) weights: as many as fit GPTQ_BUDGET with their working set
    (~6 (N, K) float copies plus the Hessian, its factor and a copy), at least one."""
    return max(1, GPTQ_BUDGET // (6 * N * K * 4 + 3 * K * K * 4))


def gptq_units(specs: dict, rows: dict[str, int], K: dict[str, int]) -> list[list[int]]:
    """The fixed batches of experts that GPTQ quantizes together, from specs and shapes alone: experts
    of one spec in index order, cut so one batch's working set fits GPTQ_BUDGET in both stages (gate/up:
    rows 2I, width H; down: rows H, width I). Memory chunks and ranks take whole units, so neither the
    machine's free memory nor the number of processes changes which experts share a GPTQ call."""
    by_spec: dict[QuantSpec, list[int]] = {}
    for e in sorted(specs):
        by_spec.setdefault(specs[e], []).append(e)
    units = []
    for members in by_spec.values():
        n = min(_unit_size(rows["gate"] + rows["up"], K["gate"]), _unit_size(rows["down"], K["down"]))
        units += [members[i:i + n] for i in range(0, len(members), n)]
    return units


def split_units(units: list[list[int]], specs: dict, dist) -> list[list[int]] | None:
    """This rank's GPTQ units when a layer's experts are split across ranks (integer codecs under several
    ranks), else None (every rank quantizes every expert: one process, or ternary/sub1 experts, whose
    dictionary is fitted to the whole layer's codes)."""
    if dist is None or not dist.active or not all(s.codec == "int" for s in specs.values()):
        return None
    return [units[j] for j in dist.mine(len(units))]


def layer_units(specs: dict, shapes: dict[str, tuple[int, int]]) -> list[list[int]]:
    """`gptq_units` of a layer from its experts' specs and (out, in) projection shapes."""
    return gptq_units(specs, {p: s[0] for p, s in shapes.items()}, {p: s[1] for p, s in shapes.items()})


def memory_chunks(units: list[list[int]], K: int, budget: int, cross: bool = False) -> list[list[list[int]]]:
    """Consecutive units whose Hessians (plus GPTQ's working copies, ~3x; with cross, --fp-target's cross terms
    too, 4x) fit in `budget` bytes; at least one unit per chunk, so a budget smaller than one unit streams one
    unit at a time."""
    per = (4 if cross else 3) * K * K * 4
    chunks, cur, used = [], [], 0
    for u in units:
        need = per * len(u)
        if cur and used + need > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(u)
        used += need
    if cur:
        chunks.append(cur)
    return chunks
