"""What the passes recorded: run records of a compressed directory turned into layer x expert grids.

Sources (all JSON; a missing one is reported as missing, never guessed):
    <compressed>/run/calibration.json   layers[]: tokens routed to each expert, seconds per layer
    <compressed>/run/metrics.json       total seconds of the run
    <compressed>/run/run_config.json    the run's configuration (min_tokens, calibration, source model)
    moecompress.json                    per-expert tensors (bits) and fallback experts
    run/merge_record.json (or merge.json) of the compressed directory, of --baseline, or of the model
        the compressed run was made from: per layer, groups of merged experts and dropped experts.
Grids are lists of rows (one per MoE layer) with None where an expert does not exist.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from ..errors import MoeCompressError

MERGE_RECORDS = ("merge_record.json", "merge.json")


def read_json(path: str):
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) > 256 * 1024 * 1024:
        raise MoeCompressError(f"{path} is implausibly large for a run record")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeCompressError(f"{path} is not valid JSON ({e}): re-run the pass that wrote it") from None


class ExpertGrids(NamedTuple):
    layers: list[int]                        # MoE layer indices, one row each
    num_experts: int                         # columns
    bits: list[list[float | None]]           # stored bits per parameter (scales included)
    labels: list[list[str | None]]           # codec label per expert, e.g. int3g64
    tokens: list[list[int | None]] | None    # calibration tokens routed to each expert
    share: list[list[float | None]] | None   # tokens / all routed tokens of the layer
    fallback: list[list[int]]                # [layer, expert] that fell back to round-to-nearest
    min_tokens: int | None


def expert_grids(expert_grid: dict, calibration: dict | None, manifest: dict | None, run_config: dict | None) -> ExpertGrids:
    """Layer x expert grids from the size breakdown's per-expert bytes and the calibration record."""
    cal_layers = {int(r["layer"]): r for r in (calibration or {}).get("layers", [])}
    layers = sorted({i for i, _ in expert_grid} | set(cal_layers))
    E = max([e + 1 for _, e in expert_grid] + [len(r.get("tokens", [])) for r in cal_layers.values()] + [0])
    bits = [[None] * E for _ in layers]
    labels = [[None] * E for _ in layers]
    for (i, e), cell in expert_grid.items():
        r = layers.index(i)
        bits[r][e] = round(8 * cell["bytes"] / cell["params"], 4) if cell["params"] else None
        labels[r][e] = cell["label"]
    tokens = share = None
    if cal_layers:
        tokens = [[None] * E for _ in layers]
        share = [[None] * E for _ in layers]
        for i, rec in cal_layers.items():
            t = [int(x) for x in rec.get("tokens", [])]
            total = sum(t) or 1
            r = layers.index(i)
            for e, n in enumerate(t):
                tokens[r][e] = n
                share[r][e] = round(n / total, 6)
    fallback = [[int(a), int(b)] for a, b, *_ in (manifest or {}).get("fallback_experts", [])]
    cfg = (run_config or {}).get("config", {})
    min_tokens = cfg.get("min_tokens") if isinstance(cfg, dict) else None
    return ExpertGrids(layers, E, bits, labels, tokens, share, fallback, min_tokens)


def to_original_experts(grids: ExpertGrids, expert_map: dict) -> ExpertGrids:
    """Grids of a pruned-then-packed checkpoint (quantize with the prune candidate, or a `prune` output that was
    quantized) on the ORIGINAL expert indices: expert_map {layer: [new index or -1 per original expert]}
    (config.json's "moecompress_merge"); a pruned expert's cell has bits None and label "pruned". Maps where
    experts were merged (two originals on one new index) are returned unchanged."""
    emap = {int(i): [int(k) for k in m] for i, m in expert_map.items()}
    if any(len({k for k in m if k >= 0}) != sum(k >= 0 for k in m) for m in emap.values()):
        return grids
    E = max([len(m) for m in emap.values()] + [grids.num_experts])

    def remap(grid, fill=None):
        if grid is None:
            return None
        out = []
        for i, row in zip(grids.layers, grid):
            m = emap.get(i, list(range(len(row))))
            out.append([(row[k] if 0 <= k < len(row) else None) if k >= 0 else fill for k in m] + [None] * (E - len(m)))
        return out
    labels = remap(grids.labels, "pruned")
    back = {i: {k: e for e, k in enumerate(m) if k >= 0} for i, m in emap.items()}
    fallback = [[i, back.get(i, {}).get(e, e)] for i, e in grids.fallback]
    return ExpertGrids(grids.layers, E, remap(grids.bits), labels, remap(grids.tokens), remap(grids.share),
                       fallback, grids.min_tokens)


def timing(calibration: dict | None, metrics: dict | None, merge_metrics: dict | None = None) -> dict | None:
    """Seconds per pass: each layer's calibrate+quantize time, the rest of the run, an earlier merge."""
    rows = []
    for rec in (calibration or {}).get("layers", []):
        if "seconds" in rec:
            rows.append({"pass": f"calibrate + quantize layer {rec['layer']}", "seconds": float(rec["seconds"])})
    total = (metrics or {}).get("seconds")
    if total is not None and rows:
        rest = float(total) - sum(r["seconds"] for r in rows)
        rows.append({"pass": "load, check, embed, write", "seconds": round(max(rest, 0.0), 3)})
    elif total is not None:
        rows.append({"pass": "whole run", "seconds": float(total)})
    if merge_metrics and merge_metrics.get("seconds") is not None:
        rows.insert(0, {"pass": f"merge ({merge_metrics.get('method', '?')})", "seconds": float(merge_metrics["seconds"])})
    if not rows:
        return None
    return {"passes": rows, "total_seconds": round(sum(r["seconds"] for r in rows), 3)}


def find_merge_record(*dirs: str | None) -> tuple[str, dict] | None:
    """The first merge record found under <dir>/run/ of the given directories."""
    for d in dirs:
        if not d:
            continue
        for name in MERGE_RECORDS:
            p = os.path.join(d, "run", name)
            rec = read_json(p)
            if rec is not None:
                return p, rec
    return None


def merge_map(record: dict, layers: list[int], num_experts: int) -> dict:
    """Per original expert: its new index, or -1 where dropped; groups of more than one are merges.

    Returns {"state": rows of "kept" | "merged" | "pruned" | None, "target": rows of the new index,
    "layers": [...], "summary": per layer "E -> K (m merged, p pruned)"}.
    """
    by_layer = {int(r["layer"]): r for r in record.get("layers", []) if "layer" in r}
    rows = sorted(set(layers) | set(by_layer))
    E = max([num_experts] + [int(r.get("experts_before", 0)) for r in by_layer.values()])
    state = [[None] * E for _ in rows]
    target = [[None] * E for _ in rows]
    summary = {}
    for r, i in enumerate(rows):
        rec = by_layer.get(i)
        if rec is None:
            continue
        groups = [list(map(int, g)) for g in rec.get("groups", [])]
        for k, g in enumerate(groups):
            for e in g:
                state[r][e] = "kept" if len(g) == 1 else "merged"
                target[r][e] = k
        for e in rec.get("dropped", []):
            state[r][int(e)] = "pruned"
            target[r][int(e)] = -1
        n_merged = sum(len(g) - 1 for g in groups if len(g) > 1)
        summary[str(i)] = (f"{rec.get('experts_before', E)} -> {rec.get('experts_after', len(groups))} experts "
                           f"({n_merged} merged away, {len(rec.get('dropped', []))} pruned; {rec.get('method', '?')})")
    return {"layers": rows, "state": state, "target": target, "summary": summary}


def coverage(grids: ExpertGrids) -> dict | None:
    """Calibration coverage: tokens per expert, experts under min_tokens, the least-covered experts."""
    if grids.tokens is None:
        return None
    cells = [(i, e, n) for i, row in zip(grids.layers, grids.tokens) for e, n in enumerate(row) if n is not None]
    if not cells:
        return None
    thr = grids.min_tokens or 0
    under = [[i, e, n] for i, e, n in cells if n < thr]
    counts = sorted(n for *_, n in cells)
    return {
        "experts": len(cells), "min_tokens": grids.min_tokens, "under_min_tokens": under,
        "zero_tokens": [[i, e] for i, e, n in cells if n == 0],
        "min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1],
        "imbalance": round(counts[-1] / max(counts[0], 1), 2) if counts[-1] else None,
    }
