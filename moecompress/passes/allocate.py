"""The allocation pass: per-expert bit widths for `quantize --allocation lp`, or a replayed `--plan`.

Two phases, so that every user error surfaces before a weight is read:

1. `Allocator(reader, config, plan)` works from shapes alone. A plan is checked against the checkpoint
   (fingerprint, every expert covered, codec and group size fit every projection). For LP, every
   candidate is priced in real bytes by its codec's nbytes and the budget is checked for feasibility.
   `--bits B` is the average number of CODE bits per expert weight, as in uniform `--bits 2`, which
   stores int2 codes plus an fp16 scale and zero per group (2.5 stored bits at group 64). The byte
   budget is therefore (B + overhead) * P / 8 with overhead = the int codec's scale/zero bits per
   weight at the chosen group size (0.5 at group 64): `--bits 2.5 --group-size 64` -> 3.0 stored bits.
2. `Allocator.specs(windows)` (LP only) runs the sensitivity pass and solves the program:
   the model is streamed layer by layer with its ORIGINAL weights on the calibration windows. In each
   MoE layer one forward pass collects, per expert, the routed-token count n_e, the summed gate weight
   w_e, the input Hessians of gate/up (x) and down (h = glu(gate x, up x), from the original weights),
   and a uniform random sample of at most `sample_tokens` routed inputs X_e with their gate weights
   g_e (priority sampling: the smallest of i.i.d. uniform keys, seeded per layer). Then, for each
   candidate width b, all experts are quantized with GPTQ as the quantize pass does (batched, gate+up
   stacked, then down; identity Hessian below `min_tokens` tokens) and
       eps_e(b) = sum_t ||g_t (f_e(x_t) - f_e,b(x_t))||^2 / sum_t ||g_t f_e(x_t)||^2   over X_e,
   the error of the MoE block output when only expert e is quantized (allocation.contribution_error).
   Costs c = phi^alpha w^beta eps(b) (allocation.expert_costs, `--cost legacy`) go to the 0/1 program
   (allocation.lp). The default `--cost fisher` first runs allocation.fisher.fisher_pass (the loss's squared
   gradient at each MoE layer's output, streamed in reverse) and weighs each expert's output error by it on
   the same sampled tokens: the cost is the predicted growth of the mean token loss (allocation/fisher.py).
   A feasible uniform plan that predicts less replaces the solved plan (allocation/guard.py).
   The candidate "sub1" (ternary experts dictionary-coded to SUB1_BITS bits per weight, everything
   counted; `--candidates sub1,2,3`) is priced at that budget and, as in the quantize pass, its dead-zone
   threshold is searched per batch until the codes fit; here the bytes of a candidate threshold are
   estimated from the codes' pair entropy (passes.quantize.EstimateSizer: no dictionary exists yet).
   Cost of the pass: one forward per layer plus one GPTQ of every expert per candidate, on top of the
   quantization itself; the run records it in run/allocation.json.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..allocation import (AllocationConfig, Allocation, allocate, build_problem, expert_costs, overhead_bits,
                          price_candidates)
from ..allocation.fisher import weighted_output_error
from ..allocation.importance import contribution_error
from ..allocation.plan import read_plan, validate_plan
from ..arch import PROJS
from ..codecs import QuantSpec
from ..config import QuantizeConfig, resolve_group_size
from ..device import workspace_bytes
from ..errors import MoeCompressError
from .calibrate import HessianCollector, expert_chunks
from .encoder import EstimateSizer
from .quantize import _quantize_group

log = logging.getLogger("moecompress")
SAMPLE_TOKENS = 1024
SUB1_BITS = 1.0  # the "sub1" candidate: stored bits per weight, codewords, counts, levels and dictionary counted


def candidate_spec(c, group_size: int, grid: str = "minmax") -> QuantSpec:
    """--candidates entry -> QuantSpec: an int width b -> int b-bit codes at the group size on `grid`'s fit
    (--grid); "sub1" -> ternary codes dictionary-coded within SUB1_BITS bits per weight (threshold searched
    per batch); "ternary" -> dense ternary codes (1.6 bits per weight plus per-row levels, as --method ternary)."""
    if c == "sub1":
        return QuantSpec("sub1", 1, 0, (("target_bits", SUB1_BITS),))
    if c == "ternary":  # as quantize --method ternary --bits 1.6: least-error levels, no extra dead zone
        return QuantSpec("ternary", 1, 0, (("fit", "mse"), ("threshold", 0.0)))
    from ..quant.grids import int_options
    return QuantSpec("int", int(c), group_size, int_options(False, grid))


class LayerSensitivity:
    """Observer of one MoE layer: counts, gate mass, a capped seeded sample of routed inputs, and (for
    experts in `subset`) the Hessians of gate/up inputs x and of down inputs h."""

    def __init__(self, E: int, H: int, I: int, subset, affinity: bool, cap: int, seed: int, hessians: bool = True,
                 device=None):
        self.hx = HessianCollector(E, H, "x", subset=subset if hessians else [], affinity=affinity, device=device)
        self.hh = HessianCollector(E, I, "h", subset=subset if hessians else [], affinity=affinity, device=device)
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)  # CPU: the same keys on every device
        self.X = [torch.zeros(0, H, device=device) for _ in range(E)]
        self.g = [torch.zeros(0, device=device) for _ in range(E)]
        self.key = [torch.zeros(0) for _ in range(E)]

    def __call__(self, e, tok, x, h, w):
        self.hx(e, tok, x, h, w)
        self.hh(e, tok, x, h, w)
        keys = torch.cat([self.key[e], torch.rand(x.shape[0], generator=self.gen)])  # (n_kept + n,)
        X, g = torch.cat([self.X[e], x.float()]), torch.cat([self.g[e], w.float()])
        if keys.numel() > self.cap:
            keep = torch.topk(keys, self.cap, largest=False).indices.sort().values
            keys, X, g = keys[keep], X[keep.to(X.device)], g[keep.to(g.device)]
        self.key[e], self.X[e], self.g[e] = keys, X, g

    @property
    def tokens(self):
        return self.hx.tokens

    @property
    def gate_sum(self):
        return self.hx.gate_sum


def layer_eps(ex, obs: LayerSensitivity, chunk: list[int], candidates, method: str, gcfg, fallback: set,
              eps: np.ndarray, rotation: dict | None = None, fisher: tuple | None = None) -> None:
    """eps[e, c] for experts in `chunk` of one materialized layer (experts module `ex`), every candidate.
    rotation (--rotate: the layer's signs, passes.quantize.layer_rotation): integer candidates are quantized in
    the rotated basis as the quantize pass does, and measured through their effective weights deq(W') R.
    (A layer that ends up with a sub1 expert stays unrotated: its integer experts were measured rotated.)"""
    from ..quant.hadamard import rotate, rotate_hessian, unrotate
    H = ex.weights[0]["gate"].shape[1]
    I = ex.weights[0]["gate"].shape[0]
    Wgu = torch.stack([torch.cat([ex.weights[e]["gate"], ex.weights[e]["up"]]) for e in chunk]).float()  # (G, 2I, H)
    Wd = torch.stack([ex.weights[e]["down"] for e in chunk]).float()  # (G, H, I)
    Hx = Hh = None
    if method != "rtn":
        Hx, Hh = obs.hx.stacked(chunk), obs.hh.stacked(chunk)  # (G, H, H), (G, I, I)
        for j, e in enumerate(chunk):  # too few tokens: identity Hessian == round-to-nearest
            if e in fallback:
                Hx[j], Hh[j] = torch.eye(H, device=Hx.device), torch.eye(I, device=Hh.device)
    for c, spec in enumerate(candidates):
        budgeted = spec.option("target_bits", None) is not None  # sub1: search the threshold that fits
        if rotation is not None and spec.codec == "int":
            sx, sh = rotation["gate_up"].to(Wgu.device), rotation["down"].to(Wd.device)
            gu = unrotate(_quantize_group(rotate(Wgu, sx), None if Hx is None else rotate_hessian(Hx, sx), spec, method,
                                          gcfg)[0].deq, sx)
            dn = unrotate(_quantize_group(rotate(Wd, sh), None if Hh is None else rotate_hessian(Hh, sh), spec, method,
                                          gcfg)[0].deq, sh)
        else:
            gu = _quantize_group(Wgu, Hx, spec, method, gcfg, EstimateSizer(spec, [I, I]) if budgeted else None)[0].deq
            dn = _quantize_group(Wd, Hh, spec, method, gcfg, EstimateSizer(spec, [H]) if budgeted else None)[0].deq
        for j, e in enumerate(chunk):
            b = ex.biases[e] if ex.biases else {}
            dense = (ex.weights[e]["gate"], ex.weights[e]["up"], ex.weights[e]["down"])
            quant = (gu[j, :I], gu[j, I:], dn[j])  # (2I, H) -> (I, H), (I, H)
            eps[e, c] = contribution_error(obs.X[e], obs.g[e], dense, quant, ex.glu,
                                           tuple(b.get(p) for p in PROJS))
            if fisher is not None:  # --cost fisher: (F (E, K, H), out (E, C, K)) -> allocation/fisher.py
                fisher[1][e, c] = weighted_output_error(obs.X[e], obs.g[e], dense, quant, ex.glu,
                                                        tuple(b.get(p) for p in PROJS), fisher[0][e])


def sensitivity_pass(reader, config: QuantizeConfig, candidates, windows: torch.Tensor, *,
                     sample_tokens: int = SAMPLE_TOKENS, progress: bool = True, device=None, fisher=None,
                     prune=None) -> dict:
    """Stream the original model on `device`; returns {"tokens", "gate_mass": (L, E), "eps": (L, E, C), "seconds"}.
    Each MoE layer runs twice (the MoE cache, then its output for the next layer); expert chunks replay
    the cache (passes/moe_cache.py)."""
    from ..api import _progress
    from ..distributed import Dist
    from ..layerwise import LayerStreamer, find_experts
    from ..quant.gptq import GPTQConfig
    from .pipeline import LayerRunner
    from ..quant.hadamard import random_signs
    t0 = time.time()
    device = torch.device("cpu") if device is None else device
    streamer = LayerStreamer(reader, device=device)
    runner = LayerRunner(streamer, windows, config.calib, Dist(device=device), device)  # every rank runs it whole
    gcfg = GPTQConfig(config.percdamp, config.block_size, config.act_order, sweeps=config.sweeps, refit=config.refit)
    moe = list(reader.moe_layers)
    L, E, C = len(moe), reader.layer_num_experts(moe[0]), len(candidates)
    tokens, mass = np.zeros((L, E)), np.zeros((L, E))
    eps = np.full((L, E, C), np.nan)
    feps = None if fisher is None else np.full((L, E, C, fisher.shape[2]), np.nan)  # (L, E, K, H) -> (L, E, C, K)
    acts = runner.embed()
    last = moe[-1]
    for i in _progress(range(last + 1), desc="allocation: sensitivity", enabled=progress):
        layer = streamer.build_layer(i)
        if i in moe:
            l = moe.index(i)
            _, ex = find_experts(layer)
            H, I = ex.weights[0]["gate"].shape[1], ex.weights[0]["gate"].shape[0]
            need_h = config.method != "rtn"
            chunks = expert_chunks(list(range(E)), H + I, workspace_bytes(device)) if need_h else [list(range(E))]
            cache = runner.capture(layer, i, acts)

            def hidden_of(e, x):  # the down projection's input from the original gate/up
                return ex.expert_forward(e, x)[0]
            for n, chunk in enumerate(chunks):
                # same seed for every chunk: the sample is the same whichever chunk collects it
                obs = LayerSensitivity(E, H, I, chunk, config.affinity, sample_tokens,
                                       config.calib.seed * 1_000_003 + i, need_h, device)
                cache.replay(E, obs, hidden_of if need_h else None, h_for=chunk)
                if n == 0:
                    tokens[l], mass[l] = obs.tokens.numpy(), obs.gate_sum.numpy()
                fallback = {e for e in chunk if tokens[l, e] < config.min_tokens}
                rotation = None
                if config.rotate:  # the signs the quantize pass will use (passes.quantize.layer_rotation)
                    rotation = {st: random_signs(K, config.calib.seed, i, st) for st, K in (("gate_up", H), ("down", I))}
                layer_eps(ex, obs, chunk, candidates, config.method, gcfg, fallback, eps[l], rotation,
                          None if fisher is None else (torch.as_tensor(fisher[l]), feps[l]))
                del obs
            if prune is not None:  # the prune candidate's cost on the same layer (passes/prune_cost.PruneMeter)
                prune.observe(i, layer, cache, ex)
            del cache
        if i < last:
            acts = runner.forward(layer, i, acts)
        del layer
    return {"tokens": tokens, "gate_mass": mass, "eps": eps, "fisher_eps": feps, "seconds": time.time() - t0}


def _num_experts(reader) -> int:
    counts = {reader.layer_num_experts(i) for i in reader.moe_layers}
    if len(counts) != 1:
        raise MoeCompressError(f"LP allocation needs the same number of experts in every MoE layer, got "
                               f"{sorted(counts)}; use --allocation uniform or a --plan")
    return counts.pop()


class Allocator:
    """Shapes-first allocation: construct (checks everything from shapes), then `specs(windows)`."""

    def __init__(self, reader, config: QuantizeConfig, plan: str | None = None, device=None, meta=None):
        """meta: {candidate label: (L,) bytes} each kept expert also pays (--budget: its metadata bound,
        passes/disk.py), priced into the program beside the tensor bytes."""
        self.reader, self.config, self.plan_path = reader, config, plan
        self.meta = None
        self.device = torch.device("cpu") if device is None else device  # where the sensitivity pass runs
        self.record: dict | None = None
        self.allocation: Allocation | None = None
        moe = list(reader.moe_layers)
        if not moe:
            raise MoeCompressError("the checkpoint has no MoE layers: nothing to allocate")
        shapes = {i: reader.expert_shapes(i) for i in moe}
        if plan:
            experts = {i: reader.layer_num_experts(i) for i in moe}
            self.plan_specs = validate_plan(read_plan(plan), reader.fingerprint, experts, shapes)
            return
        self.plan_specs = None
        widths = [shapes[i][p][1] for i in moe for p in PROJS]
        gs = resolve_group_size(config.group_size, widths)
        layer_shapes = [tuple(shapes[i][p] for p in PROJS) for i in moe]
        E = _num_experts(reader)
        # B code bits + the int codec's scale/zero overhead at this group size (the same for every width)
        ref = QuantSpec("int", 2, gs)
        P = sum(n * k for ls in layer_shapes for n, k in ls)
        self.overhead = sum(overhead_bits(ref, ls) * sum(n * k for n, k in ls) for ls in layer_shapes) / P
        self.acfg = AllocationConfig(
            candidates=tuple(sorted({candidate_spec(c, gs, config.grid) for c in config.candidates}, key=lambda q: (q.bits, q.codec))),
            group_size=gs, alpha=config.alpha,
            beta=config.beta, budget_bits=float(config.bits) + self.overhead, budget_scope=config.budget_scope,
            min_bits=config.min_bits, max_bits=config.max_bits, top_two_each=config.top_two, seed=config.calib.seed)
        self.pricing = price_candidates(self.acfg.candidates, layer_shapes, len(moe), E)
        if meta is not None:
            self.meta = np.stack([np.asarray(meta[c.label], dtype=np.int64) for c in self.acfg.candidates], axis=1)
            self.pricing = self.pricing._replace(bytes=self.pricing.bytes + self.meta[:, None, :])
        try:  # feasibility from shapes, before any weight is read
            build_problem(self.acfg, np.zeros(self.pricing.bytes.shape), self.pricing)
        except MoeCompressError as e:
            raise MoeCompressError(_in_code_bits(str(e), self.overhead, config.bits)) from None

    def specs(self, windows: torch.Tensor, progress: bool = True) -> dict:
        """{(layer, expert): QuantSpec} for every expert of every MoE layer."""
        if self.plan_specs is not None:
            return dict(self.plan_specs)
        r, cfg, acfg = self.reader, self.config, self.acfg
        moe = list(r.moe_layers)
        fis = None
        if cfg.cost == "fisher":  # loss-weighted costs (allocation/fisher.py): one backward sweep first
            from ..allocation.fisher import FISHER_VARIANT, VARIANTS, fisher_costs, fisher_pass
            fis = fisher_pass(r, cfg, windows, progress=progress, device=self.device)
        sens = sensitivity_pass(r, cfg, acfg.candidates, windows, progress=progress, device=self.device,
                                fisher=None if fis is None else fis.per_expert())
        costs = expert_costs(sens["eps"], sens["tokens"], sens["gate_mass"], acfg.alpha, acfg.beta,
                             acfg.importance_floor)
        legacy = costs
        if fis is not None:
            costs = fisher_costs(sens["fisher_eps"][..., VARIANTS.index(FISHER_VARIANT)], sens["tokens"], fis.tokens,
                                 acfg.importance_floor)
        from ..allocation.guard import uniform_guard
        alloc, guard = uniform_guard(build_problem(acfg, costs.cost, self.pricing), allocate(acfg, costs.cost, self.pricing))
        self.allocation = alloc
        labels = [c.label for c in acfg.candidates]
        self.record = {
            "format_version": 1, "config": acfg.to_json(), "moe_layers": moe,
            "code_bits": float(cfg.bits), "overhead_bits": self.overhead, "budget_stored_bits": acfg.budget_bits,
            "sensitivity_seconds": round(sens["seconds"], 3), "solve_seconds": round(alloc.solve_seconds, 3),
            "status": alloc.status, "predicted_bytes": alloc.predicted_bytes, "budget_bytes": alloc.budget_bytes,
            "predicted_bits_per_param": alloc.average_bits, "widths": alloc.widths().tolist(),
            "sample_tokens": SAMPLE_TOKENS, "tokens": sens["tokens"].astype(int).tolist(),
            "gate_mass": np.round(sens["gate_mass"], 6).tolist(), "phi": costs.phi.tolist(), "w": costs.w.tolist(),
            "eps": {lab: _nan_none(sens["eps"][..., c]) for c, lab in enumerate(labels)},
            "cost": {lab: costs.cost[..., c].tolist() for c, lab in enumerate(labels)},
            "unmeasured": costs.unmeasured, "allocation": alloc.to_json(),
            "cost_model": cfg.cost, "uniform_guard": guard,
        }
        if self.meta is not None:  # the program priced metadata too: the record's bytes are the tensors'
            meta = int(sum(self.meta[l, c] for (l, e), c in np.ndenumerate(alloc.choice)))
            P = int(self.pricing.params.sum())
            self.record.update({"metadata_experts_bound": meta, "predicted_bytes": alloc.predicted_bytes - meta,
                                "predicted_bits_per_param": 8 * (alloc.predicted_bytes - meta) / P})
        if fis is not None:  # the legacy costs stay recorded next to the Fisher ones (benchmarks/cost_model.py)
            self.record.update({
                "fisher_seconds": round(fis.seconds, 3), "fisher_tokens": fis.tokens, "fisher_loss": fis.loss,
                "fisher_weights": fis.weights.tolist(), "fisher_variant": FISHER_VARIANT,
                "fisher_eps": {v: {lab: _nan_none(sens["fisher_eps"][..., c, k]) for c, lab in enumerate(labels)}
                               for k, v in enumerate(VARIANTS)},
                "cost_legacy": {lab: legacy.cost[..., c].tolist() for c, lab in enumerate(labels)}})
        log.info("allocation: sensitivity %.1f s, solve %.2f s (%s), %.4f stored bits/param predicted",
                 sens["seconds"], alloc.solve_seconds, alloc.status, alloc.average_bits)
        return {(i, e): alloc.spec(l, e) for l, i in enumerate(moe) for e in range(len(alloc.choice[l]))}


def _nan_none(a: np.ndarray) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]


def _in_code_bits(msg: str, overhead: float, bits: float) -> str:
    """Restate the core's infeasibility message (stored bits) in --bits terms (code bits)."""
    import re
    m = re.search(r"needs ([0-9.]+) bits", msg)
    if not m:
        return msg
    need = float(m.group(1)) - overhead
    return (f"--bits {bits:g} is infeasible: the narrowest allowed allocation needs {need:.4f} code bits per expert "
            f"weight ({float(m.group(1)):.4f} stored, scales and zeros included); use --bits "
            f"{np.ceil(need * 1e4) / 1e4:g} or more, or allow narrower --candidates / --min-bits")


def allocation_specs(reader, config: QuantizeConfig, plan: str | None = None, windows: torch.Tensor | None = None,
                     progress: bool = False) -> dict:
    """One call: {(layer, expert): QuantSpec} from a plan or the LP (windows: the calibration windows;
    None: drawn from config.calib as quantize does)."""
    alloc = Allocator(reader, config, plan)
    if windows is None and alloc.plan_specs is None:
        from ..api import calibration_windows
        windows = calibration_windows(reader.path, config.calib)
    return alloc.specs(windows, progress)
