"""`quantize --allocation lp --candidates prune,sub1,2,3,4`: pruning and bit widths under one byte budget.

Budget (one, model-wide):
  --bits B       B stored bits per routed-expert parameter of the ORIGINAL model (codes, scales, zeros,
                 dictionaries counted; a pruned expert counts 0): the routed experts get floor(B P / 8) bytes.
                 (Without `prune` among the candidates, --bits keeps its LP meaning: code bits + overhead.)
  --budget SIZE  the whole checkpoint on disk (24GB, 800MB, 1.5GiB, or bytes: every file of the output but
                 run/): the routed experts get SIZE minus everything else as it will be stored (attention,
                 norms, embeddings and routers as in the source, shared experts at their packed size, every
                 router row counted, tokenizer files) and minus a bound on the metadata (safetensors headers,
                 index, manifest, config: passes/disk.py); each kept expert also pays its own metadata.
A budget no plan can meet fails from shapes, before a weight is read, naming the smallest reachable size.

Phases: `JointAllocator(reader, config)` prices from shapes and checks feasibility; `specs(windows)` runs the
sensitivity pass (passes/allocate.py) with a `PruneMeter` (passes/prune_cost.py) hooked in, turns widths'
eps and eps_prune into costs with the same importance weights (allocation.expert_costs), and solves the
joint program with re-measured pruned sets (allocation/joint.py). `quantize_pruned` writes the output: the
pruned experts leave the model exactly as `moecompress prune` removes them (merge.pipeline.run_merge with
explicit keep sets: router rows dropped, kept experts' down projections refitted, per-layer counts in
config.json's "moecompress_merge"), into a temporary reduced checkpoint beside the output, which the
normal quantize pass then packs at the planned widths. run/plan.json keeps the plan against the ORIGINAL
checkpoint ({"codec": "prune"} entries), so `--plan out/` replays it; run/merge_record.json feeds the
report's layer x expert picture.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import torch

from ..allocation import AllocationConfig, expert_costs, price_candidates
from ..allocation.joint import PRUNE, build_joint, fmt_size, parse_size, smallest_bytes, solve_joint
from ..arch import PROJS
from ..codecs import nbytes
from ..config import resolve_group_size
from ..errors import MoeCompressError
from .allocate import Allocator, SAMPLE_TOKENS, _nan_none, _num_experts, candidate_spec, sensitivity_pass

log = logging.getLogger("moecompress")


def is_joint(config) -> bool:
    return PRUNE in config.candidates or getattr(config, "budget", None) is not None


def make_allocator(reader, config, plan=None, device=None):
    """JointAllocator where prune is a candidate; else the bit-width Allocator (which also reads plans with
    prune entries), with --budget SIZE turned into its code-bits budget: (SIZE - fixed bytes - fixed metadata)
    * 8 / P stored bits minus the scale/zero overhead, each candidate also paying its metadata bound, so the
    widths-only LP keeps its own cost model (--cost)."""
    from dataclasses import replace
    if plan or not is_joint(config):
        return Allocator(reader, config, plan, device)
    if PRUNE in config.candidates:
        return JointAllocator(reader, config, device)
    joint = JointAllocator(reader, replace(config, cost="legacy"), device)  # shapes only: the --budget checks
    overhead = Allocator(reader, replace(config, bits=8, budget=None), None, device).overhead
    code = joint.acfg.budget_bits - overhead  # float rounding moves the floored byte budget by at most one byte down
    if not 1 <= code:
        raise MoeCompressError(f"--budget {config.budget} leaves {joint.acfg.budget_bits:.4f} stored bits per expert "
                               f"parameter, below what the widths-only LP takes (1 code bit + scales); add prune to "
                               f"--candidates or raise --budget")
    meta = {c.label: joint.meta[:, k] for k, c in enumerate(joint.acfg.candidates)}  # each expert pays its entries
    alloc = Allocator(reader, replace(config, bits=min(code, 8.0), budget=None), None, device, meta=meta)
    log.info("--budget %s: %.4f stored bits per routed-expert parameter for the widths-only LP", config.budget,
             joint.acfg.budget_bits)
    return alloc


def routing_shape(config: dict) -> tuple[int, int, int]:
    """(top_k, n_group, per_group) of a model config: grouped routers (DeepSeek-V3) keep per_group per group."""
    from ..merge.counts import routing_floor
    top_k = int(config.get("num_experts_per_tok") or config.get("moe_topk") or 1)
    floor, multiple = routing_floor(config, top_k)
    return top_k, multiple, (floor // multiple if multiple > 1 else 0)


def shared_weights(reader, config, layer: int) -> list[tuple[str, object, tuple[int, int]]]:
    """(disk key, QuantSpec, shape) of each shared-expert weight of `layer` that the quantize pass packs."""
    from .shared import shared_spec
    if config.shared_bits == 0:
        return []
    arch, out = reader.arch, []
    for path in arch.shared_expert_paths:
        keys = [arch.to_disk(f"{reader.prefix}.{layer}.{path}.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
        keys = [k for k in keys if k in reader.tensors]
        if keys:
            spec = shared_spec(config, resolve_group_size(config.group_size, [reader.tensors[k].shape[1] for k in keys]))
            out += [(k, spec, tuple(reader.tensors[k].shape)) for k in keys]
    return out


def fixed_on_disk(reader, config, group_size: int) -> int:
    """What --budget takes before the routed experts: fixed_bytes plus the bound on the fixed metadata
    (passes/disk.py). A budget of fixed_on_disk + B P / 8 leaves B stored bits per routed-expert parameter,
    the experts' own metadata included."""
    from .disk import metadata_bound
    cands = [candidate_spec(c, group_size, config.grid) for c in config.candidates if c != PRUNE]
    return fixed_bytes(reader, config, group_size)[0] + metadata_bound(
        reader, config, cands, lambda i: shared_weights(reader, config, i)).fixed


def fixed_bytes(reader, config, group_size: int) -> tuple[int, dict[int, int]]:
    """(bytes of everything but the routed experts as the packed checkpoint stores it, {layer: router bytes
    per expert row}) — the same sum the quantize pass reports as total_bytes (passes/outputs.finish_run)."""
    total = sum(reader.tensors[k].nbytes for k in reader.tensors
                if not reader.is_expert_tensor(k) or k.endswith("_bias"))
    for i in reader.moe_layers:
        for k, spec, shape in shared_weights(reader, config, i):
            total += int(nbytes(shape, spec)) - reader.tensors[k].nbytes
    rows = {}
    for i in reader.moe_layers:
        E = reader.layer_num_experts(i)
        pre = f"{reader.prefix}.{i}.{reader.arch.router_mem}."
        rows[i] = sum(reader.tensors[k].nbytes // E for k in reader.layer_keys(i)
                      if reader.arch.to_mem(k).startswith(pre) and reader.tensors[k].shape
                      and reader.tensors[k].shape[0] == E)
    return int(total), rows


class JointAllocator:
    """Shapes-first joint allocation (module docstring); `specs(windows)` -> {(layer, expert): QuantSpec | PRUNE}."""

    plan_specs = None

    def __init__(self, reader, config, device=None):
        self.reader, self.config = reader, config
        self.device = torch.device("cpu") if device is None else device
        self.record, self.allocation, self.result = None, None, None
        moe = list(reader.moe_layers)
        if not moe:
            raise MoeCompressError("the checkpoint has no MoE layers: nothing to allocate")
        shapes = {i: reader.expert_shapes(i) for i in moe}
        gs = resolve_group_size(config.group_size, [shapes[i][p][1] for i in moe for p in PROJS])
        layer_shapes = [tuple(shapes[i][p] for p in PROJS) for i in moe]
        E = _num_experts(reader)
        self.prune = PRUNE in config.candidates
        widths = [c for c in config.candidates if c != PRUNE]
        if not widths:
            raise MoeCompressError("--candidates needs at least one width besides prune, e.g. prune,2,3,4")
        cands = tuple(sorted({candidate_spec(c, gs, config.grid) for c in widths}, key=lambda q: (q.bits, q.codec)))
        self.pricing = price_candidates(cands, layer_shapes, len(moe), E)
        P = int(self.pricing.params.sum())
        self.fixed, self.router_rows = fixed_bytes(reader, config, gs)
        budget = getattr(config, "budget", None)
        self.meta_fixed, self.meta = 0, np.zeros((len(moe), len(cands)), dtype=np.int64)
        if budget is not None:  # the whole directory: metadata too (passes/disk.py)
            from .disk import metadata_bound
            self.meta_fixed, self.meta = metadata_bound(reader, config, cands, lambda i: shared_weights(reader, config, i))
        self.top_k, self.n_group, self.per_group = routing_shape(reader.config)
        stored = float(config.bits)
        self.budget_total = None
        if budget is not None:
            self.budget_total = parse_size(budget)
            stored = 8 * (self.budget_total - self.fixed - self.meta_fixed) / P
        elif not self.prune:
            raise MoeCompressError("internal: the joint allocator needs prune or --budget")
        self.acfg = AllocationConfig(candidates=cands, group_size=gs, alpha=config.alpha, beta=config.beta,
                                     budget_bits=max(stored, 1e-6), budget_scope="model", min_bits=config.min_bits,
                                     max_bits=config.max_bits, top_two_each=config.top_two, seed=config.calib.seed)
        probe = self._problem(np.zeros(self.pricing.bytes.shape), np.zeros((len(moe), E)))
        need = smallest_bytes(probe)[0]
        if need > (int(probe.base.budget[0]) if stored > 0 else -1):
            total = self.fixed + self.meta_fixed + need
            what = (f"--budget {budget}" if budget is not None else f"--bits {config.bits:g}")
            raise MoeCompressError(
                f"{what} is infeasible: the smallest plan{' (pruning to top-k per layer)' if self.prune else ''} takes "
                f"{fmt_size(total)} on disk ({total} bytes: {fmt_size(self.fixed + self.meta_fixed)} besides the routed experts, "
                f"{8 * need / P:.4f} stored bits per routed-expert parameter); use --budget "
                f"{int(np.ceil(total / 1e3))}KB or more" + ("" if budget is not None else
                                                             f", or --bits {np.ceil(8e4 * need / P) / 1e4:g} or more"))

    def _problem(self, cost, prune_cost):
        from ..allocation.problem import AllocationProblem
        from ..allocation.pricing import budget_bytes
        acfg = self.acfg
        L = self.pricing.bytes.shape[0]
        allowed = np.zeros((L, len(acfg.candidates)), dtype=bool)
        for l in range(L):  # the widths' per-layer bounds as build_problem applies them (prune is always allowed)
            lo, hi = acfg.layer_bounds(l, L)
            allowed[l] = [lo <= s.bits <= hi for s in acfg.candidates]
            if not allowed[l].any():
                raise MoeCompressError(f"layer {l}: no candidate width lies in [{lo}, {hi}] bits; "
                                       f"widen --min-bits/--max-bits")
        if acfg.top_two_each:
            raise MoeCompressError("--top-two cannot be combined with the prune candidate or --budget; "
                                   "drop one of them")
        base = AllocationProblem(acfg.candidates, np.asarray(cost, dtype=np.float64),
                                 self.pricing.bytes + self.meta[:, None, :],  # metadata: 0 without --budget
                                 self.pricing.params, allowed, None,
                                 budget_bytes(self.pricing.params, acfg.budget_bits, "model"), "model")
        if not self.prune:  # --budget without prune: every expert stays
            E = base.shape[1]
            jp = build_joint(base, prune_cost, E)
            return jp
        return build_joint(base, prune_cost, self.top_k, self.n_group, self.per_group)

    def specs(self, windows: torch.Tensor, progress: bool = True) -> dict:
        from .prune_cost import PruneMeter
        r, cfg, acfg = self.reader, self.config, self.acfg
        moe = list(r.moe_layers)
        fis = None
        if getattr(cfg, "cost", "legacy") == "fisher":  # loss-weighted costs (allocation/fisher.py), prune's too
            from ..allocation.fisher import FISHER_VARIANT, VARIANTS, fisher_costs, fisher_pass
            fis = fisher_pass(r, cfg, windows, progress=progress, device=self.device)
        meter = PruneMeter(r, self.top_k, fisher=None if fis is None else fis.weights) if self.prune else None
        sens = sensitivity_pass(r, cfg, acfg.candidates, windows, progress=progress, device=self.device, prune=meter,
                                fisher=None if fis is None else fis.per_expert())
        eps = sens["eps"]
        if meter is not None:
            eps = np.concatenate([eps, meter.eps[..., None]], axis=2)
        costs = expert_costs(eps, sens["tokens"], sens["gate_mass"], acfg.alpha, acfg.beta, acfg.importance_floor)
        C = len(acfg.candidates)
        pc = costs.cost[..., C] if meter is not None else np.zeros(costs.cost.shape[:2])
        wc = costs.cost[..., :C]
        if fis is not None:
            wc = fisher_costs(sens["fisher_eps"][..., VARIANTS.index(FISHER_VARIANT)], sens["tokens"], fis.tokens,
                              acfg.importance_floor).cost
            pc = meter.fisher_cost if meter is not None else pc
        prob = self._problem(wc, pc)
        res = solve_joint(prob, meter.ratio if meter is not None else None, mip_gap=acfg.mip_gap,
                          time_limit_s=acfg.time_limit_s, seed=acfg.seed)
        self.result = res
        labels = [c.label for c in acfg.candidates] + [PRUNE]
        pruned = {i: res.pruned(l) for l, i in enumerate(moe)}
        rows_saved = sum(self.router_rows[i] * len(p) for i, p in pruned.items())
        kept = [(l, e, int(c)) for (l, e), c in np.ndenumerate(res.choice) if c < C]
        meta = sum(int(self.meta[l, c]) for l, e, c in kept)  # the kept experts' metadata (--budget)
        tensors = res.predicted_bytes - meta
        predicted_total = self.fixed - rows_saved + tensors
        P = int(self.pricing.params.sum())
        self.record = {
            "format_version": 1, "joint": True, "config": acfg.to_json(), "moe_layers": moe,
            "candidates": labels, "budget": getattr(cfg, "budget", None), "budget_total_bytes": self.budget_total,
            "budget_stored_bits": acfg.budget_bits, "budget_bytes": int(prob.base.budget[0]),
            "fixed_bytes": self.fixed, "router_row_bytes": {str(i): b for i, b in self.router_rows.items()},
            "predicted_bytes": tensors, "predicted_total_bytes": predicted_total,
            "predicted_bits_per_param": 8 * tensors / P, "expert_params": P,
            "sensitivity_seconds": round(sens["seconds"], 3),
            "prune_cost_seconds": round(meter.seconds, 3) if meter else 0.0,
            "solve_seconds": round(res.seconds, 3), "status": res.status, "rounds": res.rounds,
            "choice": [[labels[c] for c in row] for row in res.choice.tolist()],
            "pruned": {str(i): p for i, p in pruned.items()},
            "top_k": self.top_k, "n_group": self.n_group, "per_group": self.per_group,
            "sample_tokens": SAMPLE_TOKENS, "tokens": sens["tokens"].astype(int).tolist(),
            "eps": {lab: _nan_none(eps[..., c]) for c, lab in enumerate(labels[:eps.shape[2]])},
            "cost": {lab: costs.cost[..., c].tolist() for c, lab in enumerate(labels[:eps.shape[2]])},
            "objective": res.objective, "cost_model": getattr(cfg, "cost", "legacy"),
            "objective_units": "predicted nats per token" if fis is not None else "phi^alpha w^beta eps",
        }
        if self.budget_total is not None:  # what --budget measures: every file but run/ (passes/disk.py)
            self.record.update({"metadata_fixed_bound": self.meta_fixed, "metadata_experts_bound": meta,
                                "predicted_directory_bytes": predicted_total + self.meta_fixed + meta})
        if fis is not None:
            self.record.update({"fisher_seconds": round(fis.seconds, 3), "fisher_tokens": fis.tokens,
                                "fisher_cost": {lab: wc[..., c].tolist() for c, lab in enumerate(labels[:C])}
                                | ({PRUNE: pc.tolist()} if meter is not None else {})})
        log.info("joint allocation: %d experts pruned, %.4f stored bits per routed-expert parameter, "
                 "%s predicted on disk",
                 sum(map(len, pruned.values())), 8 * tensors / P,
                 fmt_size(self.record.get("predicted_directory_bytes", predicted_total)))
        out = {}
        for l, i in enumerate(moe):
            for e in range(res.choice.shape[1]):
                c = int(res.choice[l, e])
                out[(i, e)] = PRUNE if c == C else acfg.candidates[c]
        return out


def joint_table(record: dict) -> str:
    """Layer x expert picture of a joint plan: each cell the width label, or `--` where pruned."""
    ch, moe = record["choice"], record["moe_layers"]
    g = "g" + str(record["config"]["group_size"])
    short = {lab: ("--" if lab == PRUNE else lab.replace("int", "").replace(g, "")) for row in ch for lab in row}
    w = max(2, max(len(v) for v in short.values()), len(str(len(ch[0]) - 1)))
    out = ["layer | " + " ".join(f"{e:>{w}}" for e in range(len(ch[0]))) + " | kept"]
    out.append("-" * len(out[0]))
    for i, row in zip(moe, ch):
        out.append(f"{i:>5} | " + " ".join(f"{short[v]:>{w}}" for v in row) + f" | {sum(v != PRUNE for v in row)}")
    hist = {}
    for row in ch:
        for v in row:
            hist[v] = hist.get(v, 0) + 1
    out.append(f"joint ({record['status']}): {record['predicted_bits_per_param']:.4f} stored bits per routed-expert "
               f"parameter, {fmt_size(record.get('predicted_directory_bytes', record['predicted_total_bytes']))} on disk "
               f"predicted; experts per choice: "
               + ", ".join(f"{k}: {v}" for k, v in sorted(hist.items())) + " (-- = pruned)")
    return "\n".join(out)


def quantize_pruned(reader, out: str, config, specs: dict, windows: torch.Tensor, *, plan, allocator, progress: bool,
                    dist, device) -> dict:
    """Prune (with the prune pass's refit) into a temporary reduced checkpoint, pack it at the planned widths,
    and record the plan against the original checkpoint (module docstring)."""
    from ..api import run_fingerprints
    from ..checkpoint import CheckpointReader
    from ..merge.pipeline import run_merge
    from .pipeline import quantize_checkpoint
    if dist.world > 1:
        raise MoeCompressError("a plan that prunes experts runs in one process; drop torchrun")
    keep = {i: [e for e in range(reader.layer_num_experts(i)) if specs[(i, e)] != PRUNE] for i in reader.moe_layers}
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.pruned")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        run_merge(reader.path, tmp, keep=keep, method="reap", calib=config.calib, progress=progress, device=str(device))
        reduced = CheckpointReader(tmp)
        new = {(i, k): specs[(i, e)] for i, ks in keep.items() for k, e in enumerate(ks)}
        summary = quantize_checkpoint(reduced, out, config, new, windows,
                                      fingerprints=run_fingerprints(reduced, config, new, windows, plan),
                                      allocator=allocator, resume=False, progress=progress, dist=dist, device=device)
        run = os.path.join(out, "run")
        pruned_entry = {"codec": PRUNE, "bits": 0, "group_size": 0, "options": {}}
        entries = [{"layer": i, "expert": e, **(pruned_entry if s == PRUNE else s.to_json())}
                   for (i, e), s in sorted(specs.items())]
        _replace_json(os.path.join(run, "plan.json"), {"format_version": 1, "source_fingerprint": reader.fingerprint,
                                                       "experts": entries})
        with open(os.path.join(run, "run_config.json")) as f:
            rc = json.load(f)
        rc.update({"model": reader.path, "pruned_checkpoint_fingerprint": reduced.fingerprint,
                   "kept_experts": {str(i): k for i, k in keep.items()}})
        _replace_json(os.path.join(run, "run_config.json"), rc)
        shutil.copy2(os.path.join(tmp, "run", "merge_record.json"), os.path.join(run, "merge_record.json"))
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    summary["pruned_experts"] = sum(reader.layer_num_experts(i) - len(k) for i, k in keep.items())
    # bits per routed-expert parameter of the ORIGINAL model (pruned experts at 0), the --bits of a joint run;
    # the manifest's expert_bits_per_param counts the kept experts' parameters only
    summary["kept_expert_bits_per_param"] = summary["expert_bits_per_param"]
    with open(os.path.join(out, "moecompress.json")) as f:
        expert_bytes = json.load(f)["expert_bytes"]
    summary["expert_bits_per_param"] = round(8 * expert_bytes / reader.expert_params, 4)
    rec = getattr(allocator, "record", None) or {}
    if "predicted_total_bytes" in rec:
        summary["predicted_total_bytes"] = rec["predicted_total_bytes"]
    if "predicted_directory_bytes" in rec:
        summary["predicted_directory_bytes"] = rec["predicted_directory_bytes"]
    return summary


def _replace_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
