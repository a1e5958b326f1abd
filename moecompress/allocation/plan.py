"""plan.json: read, validate against a checkpoint's shapes, and show as a layer x expert table.

A run writes `run/plan.json`:

    {"format_version": 1, "source_fingerprint": "<CheckpointReader.fingerprint>",
     "experts": [{"layer": i, "expert": e, "codec": "int", "bits": 3, "group_size": 64, "options": {}}, ...]}

`--plan plan.json` replays (an edited copy of) it. Everything is checked from shapes before a weight is
read: the fingerprint against the source checkpoint, that every expert of every MoE layer is listed
exactly once (and nothing else), that each codec exists and the group size divides every projection's
input dimension (nbytes validates that).
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..codecs import QuantSpec, nbytes
from ..errors import MoeCompressError
from .result import Allocation, allocation_table

PLAN_FORMAT_VERSION = 1


def read_plan(path: str) -> dict:
    """The JSON of a plan file, a run directory (run/plan.json) or a packed directory."""
    for cand in (path, os.path.join(path, "plan.json"), os.path.join(path, "run", "plan.json")):
        if os.path.isfile(cand):
            try:
                with open(cand) as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise MoeCompressError(f"cannot read plan {cand}: {e}; give a plan.json written by a run") from None
            if not isinstance(d, dict) or not isinstance(d.get("experts"), list):
                raise MoeCompressError(f"{cand} is not a plan (no 'experts' list); give a run's run/plan.json")
            d["_path"] = cand
            return d
    raise MoeCompressError(f"no plan at {path}: give a plan.json or a packed directory with run/plan.json")


def plan_entries(plan: dict) -> dict:
    """{(layer, expert): QuantSpec} of a plan dict; raises on malformed or duplicated entries."""
    v = plan.get("format_version", PLAN_FORMAT_VERSION)
    if v != PLAN_FORMAT_VERSION:
        raise MoeCompressError(f"plan format_version {v} is not supported (this moecompress reads "
                               f"{PLAN_FORMAT_VERSION}); re-create the plan with this version")
    out = {}
    for n, d in enumerate(plan["experts"]):
        try:
            key = (int(d["layer"]), int(d["expert"]))
            spec = "prune" if d.get("codec") == "prune" else QuantSpec.from_json(d)  # prune: joint plans (passes/joint.py)
        except MoeCompressError as e:
            raise MoeCompressError(f"plan entry {n} (layer {d.get('layer')} expert {d.get('expert')}): {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MoeCompressError(f"plan entry {n} is malformed ({type(e).__name__}: {e}); each entry needs "
                                   f"layer, expert, codec, bits, group_size (and options)") from None
        if key in out:
            raise MoeCompressError(f"plan lists layer {key[0]} expert {key[1]} twice; keep one entry per expert")
        out[key] = spec
    return out


def validate_plan(plan: dict, fingerprint: str, experts: dict, shapes: dict) -> dict:
    """Check a plan against a checkpoint and return {(layer, expert): QuantSpec}.

    experts: {moe layer: number of experts}; shapes: {moe layer: {proj: (N, K)}}.
    """
    fp = plan.get("source_fingerprint")
    if fp != fingerprint:
        raise MoeCompressError(f"plan {plan.get('_path', '')} was made for checkpoint {fp}, not this one "
                               f"({fingerprint}); make the plan from this checkpoint (or fix source_fingerprint "
                               f"if you are sure the weights are the same)")
    specs = plan_entries(plan)
    want = {(l, e) for l, n in experts.items() for e in range(n)}
    missing, extra = sorted(want - set(specs)), sorted(set(specs) - want)
    if missing:
        raise MoeCompressError(f"plan does not cover {len(missing)} experts (first: layer {missing[0][0]} expert "
                               f"{missing[0][1]}); list every expert of every MoE layer")
    if extra:
        raise MoeCompressError(f"plan lists {len(extra)} experts the checkpoint does not have (first: layer "
                               f"{extra[0][0]} expert {extra[0][1]}); remove them")
    seen = set()
    for (l, e), spec in sorted(specs.items()):
        if (l, spec) in seen or spec == "prune":
            continue
        seen.add((l, spec))
        for p, shape in shapes[l].items():
            try:
                nbytes(shape, spec)  # validates the codec, bits and group size against the shape
            except MoeCompressError as err:
                raise MoeCompressError(f"plan layer {l} expert {e} ({spec.label}), {p} {shape}: {err}") from None
            except Exception as err:
                raise MoeCompressError(f"plan layer {l} expert {e}: {spec.label} cannot store {p} {shape} "
                                       f"({err}); fix its codec, bits or group_size") from None
    return specs


def plan_allocation(specs: dict, layer_bytes=None) -> Allocation:
    """An Allocation (method "plan") of {(layer, expert): spec}; layer_bytes(l, spec) -> bytes of one
    expert (None: sizes unknown, reported as 0)."""
    layers = sorted({l for l, _ in specs})
    cands = tuple(sorted(set(specs.values()), key=lambda s: (s.bits, s.codec, s.group_size, s.options)))
    E = max(e for _, e in specs) + 1
    choice = tuple(tuple(cands.index(specs[(l, e)]) for e in range(E) if (l, e) in specs) for l in layers)
    total = sum(layer_bytes(l, s) for (l, _), s in specs.items()) if layer_bytes else 0
    return Allocation(cands, choice, int(total), 1, None, float("nan"), 0.0, "plan", "plan")


def plan_table(path: str) -> str:
    """Layer x expert table of a plan file or a run/packed directory; uses run/allocation.json when present
    (predicted sizes, solver status), else the plan's widths alone."""
    plan = read_plan(path)
    alloc_file = os.path.join(os.path.dirname(plan["_path"]), "allocation.json")
    if os.path.isfile(alloc_file):
        with open(alloc_file) as f:
            rec = json.load(f)
        if rec.get("joint"):  # pruning and widths together (passes/joint.py)
            from ..passes.joint import joint_table
            return joint_table(rec)
        return allocation_table(Allocation.from_json(rec["allocation"]))
    specs = plan_entries(plan)
    if "prune" in specs.values():  # a joint plan without its run record: widths and "--" (pruned) per cell
        layers, E = sorted({l for l, _ in specs}), max(e for _, e in specs) + 1
        lab = {k: ("--" if s == "prune" else s.label) for k, s in specs.items()}
        w = max(len(v) for v in lab.values())
        rows = [f"{l:>5} | " + " ".join(f"{lab.get((l, e), ''):>{w}}" for e in range(E)) for l in layers]
        n = sum(s == "prune" for s in specs.values())
        return "\n".join([f"layer | " + " ".join(f"{e:>{w}}" for e in range(E))] + rows
                         + [f"plan: {n} experts pruned (--), {len(specs) - n} kept"])
    return plan_table_of(specs)


def plan_table_of(specs: dict) -> str:
    alloc = plan_allocation(specs)
    lines = allocation_table(alloc).splitlines()[:-1]
    hist = ", ".join(f"{k}: {v}" for k, v in alloc.histogram().items())
    bits = np.array([s.bits for s in specs.values()], dtype=np.float64)
    return "\n".join(lines + [f"plan: mean nominal width {bits.mean():.3f} bits; experts per width: {hist}"])
