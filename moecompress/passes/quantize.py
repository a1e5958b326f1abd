"""The quantize pass over one MoE layer's experts, from the layer's MoE cache (passes/moe_cache.py).

  1. gate and up of every expert: Hessians of the cached expert inputs, batched GPTQ over units of experts
     that share a spec (passes/units.py), in memory chunks that fit the working budget; the dequantized
     weights go back into the layer;
  2. down: Hessians of its inputs recomputed per expert from the cache through the already quantized
     gate/up (true-sequential), then GPTQ the same way.
With --fp-target each projection is aimed at the unquantized model's output (quant/target.py). Experts with
fewer than `min_tokens` routed tokens fall back to round-to-nearest (an identity Hessian); they are listed
in a warning and in the manifest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..codecs import PackedTensor, QuantSpec
from ..quant.coord import coordinate_descent
from ..quant.gptq import INPLACE_BYTES, GPTQConfig, GPTQResult, Owned, gptq, rtn, tensor_of
from ..quant.grids import int_grid
from ..quant.target import move_target
from .calibrate import PRIOR_TOKENS, HessianCollector, all_token_scale, routing_stats, score_sums
from .encoder import LayerEncoder, _Sizer
from .units import gptq_units, memory_chunks, split_units

log = logging.getLogger("moecompress")


@dataclass
class LayerRecord:
    layer: int
    tokens: list[int]
    gate_sum: list[float]
    fallback: list[int]
    seconds: float
    specs: dict = field(default_factory=dict)
    ternary: list = field(default_factory=list)  # sub1 budgets: per batch of experts, the threshold chosen
    router: dict | None = None  # --router-bits: the quantized router's record (passes/router.py)
    shared: list = field(default_factory=list)  # shared experts: one record each (passes/shared.py)
    all_tokens: dict | None = None  # --all-tokens: {"lambda", "scale", "score_sum"} (passes/calibrate.py)
    rotated: bool = False  # --rotate: gate/up and down quantized in a randomized Hadamard basis (quant/hadamard.py)
    sweeps_skipped: list = field(default_factory=list)  # --sweeps: input widths K whose Hessians are too large
    fp_target: dict | None = None  # --fp-target: {"strength", "kept": [[expert, proj]] left at W} (quant/target.py)


TERNARY_CODECS = ("ternary", "sub1")
DEFAULT_THRESHOLD = 0.4   # ternary dead zone |w| < t * (hi - lo) codes to 0 (when neither given nor searched)
TERNARY_PERCDAMP = 0.25   # stronger GPTQ damping for ternary: less error feedback, more zeros (~93%)


def grid_for(spec: QuantSpec):
    if spec.codec == "int":
        return int_grid(spec)  # AsymmetricGrid, or SymmetricGrid under the option ("sym", 1)
    from ..quant.ternary import TernaryGrid
    return TernaryGrid(threshold=float(spec.option("threshold", DEFAULT_THRESHOLD)),
                       fit_method=spec.option("fit", "minmax"))


def _stack_float(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """(G, N, K) float32 from G lists of (n_i, K) weights stacked along N, each converted straight into its
    place, laid out as the transpose of a contiguous (G, K, N) tensor: GPTQ's working copy W^T, so a handed
    over W becomes it without a copy (torch.stack(torch.cat(...)).float() held two more copies for a moment)."""
    first = parts[0][0]
    Wt = torch.empty(len(parts), first.shape[1], sum(t.shape[0] for t in parts[0]), dtype=torch.float32,
                     device=first.device)
    for j, ts in enumerate(parts):
        r0 = 0
        for t in ts:
            Wt[j, :, r0:r0 + t.shape[0]].copy_(t.T)
            r0 += t.shape[0]
    return Wt.transpose(1, 2)


def _hand_over(ex, group: list[int], projs: tuple[str, ...]) -> torch.Tensor:
    """The group's weights as GPTQ's (G, N, K) float32 working copy (`_stack_float`), taken out of the layer:
    each is replaced by a shape-only meta placeholder until its dequantized weight is set, so the layer's copy
    is freed (when nothing else holds it) and a weight is not held twice while GPTQ runs."""
    W = _stack_float([[ex.weights[e][p] for p in projs] for e in group])
    for e in group:
        for p in projs:
            w = ex.weights[e][p]
            ex.set_dense(e, p, torch.empty(w.shape, dtype=w.dtype, device="meta"))
            del w
    return W


def _quantize_group(W: torch.Tensor, Hs: torch.Tensor | None, spec: QuantSpec, method: str, gcfg: GPTQConfig,
                    sizer: _Sizer | None = None):
    """-> (GPTQResult, ternary_budget.Search or None). With a sizer, the ternary threshold is searched.
    W and Hs may be `Owned` (quant/gptq.py): GPTQ then consumes them instead of copying."""
    gs = spec.group_size or W.shape[-1]  # 0: one group per row (ternary, as QMoE)
    if sizer is not None or method == "rtn" or Hs is None:  # several runs, or none that takes ownership
        W, Hs = tensor_of(W), tensor_of(Hs)
    if spec.codec in TERNARY_CODECS:  # error feedback fills the dead zone back in: damp it (measured trade-off)
        gcfg = GPTQConfig(max(gcfg.percdamp, float(spec.option("percdamp", TERNARY_PERCDAMP))), gcfg.block_size, gcfg.act_order,
                          gcfg.sweeps)

    sweeps = sweeps_for(spec, gcfg) if method != "rtn" and Hs is not None else 0
    sweeps = sweeps if sweeps_apply(W.shape[-1]) else 0  # Owned and tensors both have a shape
    if sweeps:  # coordinate descent (quant/coord.py) needs W and H after GPTQ: GPTQ copies instead of consuming
        W, Hs = tensor_of(W), tensor_of(Hs)

    def run(grid) -> GPTQResult:
        if method == "rtn" or Hs is None:
            return rtn(W, grid, gs)
        res = gptq(W, Hs, grid, gs, gcfg)
        if sweeps:
            codes, deq = coordinate_descent(W, Hs, res.codes, res.deq, res.scale, res.zero, grid, gs, sweeps,
                                            gcfg.percdamp)
            res = res._replace(codes=codes, deq=deq)
        return res
    if sizer is None:
        return run(grid_for(spec)), None
    from ..quant.ternary import TernaryGrid
    from .ternary_budget import search_threshold
    fit = spec.option("fit", "minmax")
    budget = sizer.budget(tuple(W.shape))
    s = search_threshold(lambda t: run(TernaryGrid(threshold=t, fit_method=fit)), sizer.nbytes, budget)
    return s.result, s


def sweeps_for(spec: QuantSpec, gcfg: GPTQConfig) -> int:
    """Coordinate-descent sweeps after GPTQ for weights stored as `spec`: --sweeps N on integer grids only."""
    return gcfg.sweeps if spec.codec == "int" else 0


def sweeps_apply(K: int) -> bool:
    """Coordinate descent (--sweeps) needs a copy of each (K, K) Hessian beside GPTQ's; where one is of the size
    GPTQ factors in place to save memory (quant/gptq.INPLACE_BYTES: K >= 4096) the sweeps are skipped, logged
    and recorded (LayerRecord.sweeps_skipped). By shape alone, so every device and rank does the same."""
    return K * K * 4 < INPLACE_BYTES


def layer_rotation(specs: dict, layer_idx: int, seed: int, shapes: dict[str, tuple[int, int]]) -> dict | None:
    """--rotate: layer `layer_idx`'s sign vectors {"gate_up": (H,), "down": (I,)} int8 (quant/hadamard.py), or
    None when one of its experts uses a ternary codec: ternary and sub1 codes live on the zeros a rotation would
    spread, so such a layer stays unrotated (logged; the layer record says rotated false)."""
    from ..quant.hadamard import random_signs
    if not all(s.codec == "int" for s in specs.values()):
        log.warning("layer %d: not rotated (--rotate): it has ternary/sub1 experts, whose zeros a rotation would "
                    "spread", layer_idx)
        return None
    return {"gate_up": random_signs(shapes["gate"][1], seed, layer_idx, "gate_up"),
            "down": random_signs(shapes["down"][1], seed, layer_idx, "down")}


def quantize_moe_layer(ex, cache, *, layer_idx: int, specs: dict, method: str, gcfg: GPTQConfig, affinity: bool,
                       min_tokens: int, dtype=torch.float32, encoder: LayerEncoder | None = None,
                       hessian_prior: float = 0.0, dist=None, budget: int | None = None, stats: dict | None = None,
                       all_tokens: float = 0.0, rotation: dict | None = None, fp_target: dict | None = None,
                       original=None):
    """Quantize the experts `ex` (a layer's `MoEExperts`) in place from the layer's MoE cache.

    specs: {expert: QuantSpec}. Returns ({(expert, proj): PackedTensor}, LayerRecord).
    With `dist` (several ranks) the GPTQ units are split across ranks and the results exchanged, so
    every rank ends with all experts' dequantized weights and the same packed tensors.
    hessian_prior = a > 0 (`--hessian-prior`): each expert's Hessian gets a * K tokens' worth of what it
    would see on all of the layer's tokens (K its input width), weighted like a routed token:
        H_e + a * K * cbar_e * mean_t v_t v_t^T
    so an expert routed few tokens (n_e ~ K or fewer, a rank-deficient H_e that GPTQ overfits) leans on
    the layer's typical inputs, while one routed many more than K keeps its own statistics.
    An expert routed fewer than min_tokens tokens is rounded to nearest (an identity Hessian), or with the
    prior GPTQ'd on its few tokens plus the prior like every other expert. (Measured with 16 x 64 prose
    tokens, 4 seeds, on the 5 experts under 16 tokens, prior against round-to-nearest for those experts
    alone: 3-bit a little better in all four domains, -0.03 to -0.12; 2-bit mixed, C -0.37, verse +0.33.
    So the prior replaces round-to-nearest where the user asked for it, and is not the default fallback.)
    The prior is collected once per stage, by the first memory chunk's replay of the cache.
    stats: filled with {"hessian_bytes_peak", "memory_chunks"} for the run's metrics.
    all_tokens = L > 0 (`--all-tokens`): each expert's Hessian also gets every cached token, weighted by its
    router score before top-k (passes/calibrate.py: H_e + c * sum_t s_te v_t v_t^T, c = L * routed weight /
    score mass of the layer); an expert under min_tokens with score mass is then GPTQ'd, not rounded.
    rotation (`layer_rotation`, --rotate): {"gate_up": s_x, "down": s_h} sign vectors; each stage's weights are
    quantized as W' = W R^T against H' = R H R^T (R = Hd diag(s)), the packed codes are W''s, and the dense
    weights put back for the following stages are the effective unrotated deq(W') R.
    fp_target = {expert: A} (`--fp-target`, config.fp_strength), any A > 0 (quant/target.py): the cache carries the unquantized model's inputs of the
    same tokens; each expert's GPTQ aims at W + A W D H^-1 instead of W (D the cross term of unquantized and
    actual inputs, collected beside H); the down projection's unquantized inputs come from the original gate/up,
    `original(e, proj)` (read again from the checkpoint, one memory chunk of experts at a time; None: copies
    taken before the gate/up stage). Experts rounded to nearest keep W.
    """
    from ..experts import _linear
    from ..quant.hadamard import rotate, rotate_hessian, unrotate
    t0 = time.time()
    encoder = encoder or LayerEncoder()
    E = ex.num_experts
    live = [e for e in range(E) if ex.weights[e] is not None]
    device = cache.device
    tokens_all = cache.tokens
    sample_every = max(1, tokens_all // PRIOR_TOKENS)
    tokens, gate_sum = routing_stats(cache, E)
    fallback = [e for e in live if int(tokens[e]) < min_tokens]
    record = LayerRecord(layer_idx, tokens.tolist(), [round(float(g), 6) for g in gate_sum], fallback, 0.0,
                         rotated=rotation is not None)
    need_h = method != "rtn"
    want_prior = need_h and hessian_prior > 0
    all_scale = all_token_scale(cache, tokens, gate_sum, affinity, all_tokens) if need_h and all_tokens > 0 else 0.0
    w0 = ex.weights[live[0]]
    rows = {p: w0[p].shape[0] for p in ("gate", "up", "down")}
    widths = {p: w0[p].shape[1] for p in ("gate", "up", "down")}
    units = gptq_units({e: specs[e] for e in live}, rows, widths)
    mine = split_units(units, {e: specs[e] for e in live}, dist)
    split = mine is not None
    if dist is not None and dist.active and not split:
        log.warning("layer %d: ternary/sub1 experts are not split across ranks: every rank quantizes all of them",
                    layer_idx)
    mine = units if mine is None else mine
    budget = budget if budget is not None else (1 << 62)
    stats = stats if stats is not None else {}
    packed: dict[tuple[int, str], PackedTensor] = {}
    results: dict[str, torch.Tensor] = {}  # this rank's (codes, scale, zero, deq) per (expert, proj), to exchange
    rounded: set[int] = set()  # of the fallback experts, those rounded to nearest (all of them, without the prior)
    searched: list[dict] = []

    def hidden_of(e, x, w=None):  # the down projection's input, from the expert's (quantized) gate/up, or from w
        w, b = w or ex.weights[e], ex.biases[e] if ex.biases else {}
        return ex.glu(_linear(x, w["gate"], b.get("gate")), _linear(x, w["up"], b.get("up")))
    strength = {e: (fp_target or {}).get(e, 0.0) for e in live}
    cross = cross_any = need_h and any(a > 0 for a in strength.values())
    kept = {e: {p: ex.weights[e][p].clone() for p in ("gate", "up")} for e in live} if cross and original is None else {}
    loaded: dict = {}  # --fp-target: the down stage's memory chunk's original gate/up

    def fp_hidden_of(e, x):  # --fp-target: the down projection's unquantized input, from the original gate/up
        return hidden_of(e, x, kept.get(e) or loaded[e])
    if cross:
        record.fp_target = {"strength": {specs[e].label: strength[e] for e in live}, "kept": []}
    for projs, which in ((("gate", "up"), "x"), (("down",), "h")):
        K = widths[projs[0]]
        signs = None if rotation is None else rotation["gate_up" if which == "x" else "down"].to(device)
        prior_of = None  # the first chunk's collector, which gathered the layer's prior statistics
        # --fp-target: the gate/up inputs need no correction while they are the unquantized ones (D = 0)
        cross = cross_any and not (which == "x" and cache.fp_is_self)
        for chunk in memory_chunks(mine, K, budget, cross):
            subset = [e for u in chunk for e in u]
            # GPTQ's working copies, taken from the layer (which keeps meta placeholders until the dequantized
            # weights are set): before the chunk's Hessians exist, so a weight and its copy never coexist beside
            # them (float32 layers: the copies are the weights' size); otherwise, and under --hessian-prior (whose
            # prior Hessians run the experts' own weights), group by group after them
            early = {} if want_prior or w0["gate"].dtype != torch.float32 else {
                tuple(g): _hand_over(ex, g, projs) for g in chunk}
            if cross and which == "h" and original is not None:
                loaded.clear()
                loaded.update({e: {p: original(e, p) for p in ("gate", "up")} for e in subset})
            if need_h:
                col = HessianCollector(E, K, which, subset=subset, affinity=affinity,
                                       prior=want_prior and prior_of is None, sample_every=sample_every, device=device,
                                       all_scale=all_scale, fp_h=fp_hidden_of if which == "h" else None, cross=cross)
                prior_of = prior_of or (col if col.prior else None)
                cache.replay(E, col, hidden_of if which == "h" else None, h_for=subset, only=None if col.prior else subset)
                if all_scale:  # every token, router-weighted, for this chunk's experts
                    col.collect_all(cache, hidden_of)
                stats["hessian_bytes_peak"] = max(stats.get("hessian_bytes_peak", 0), (2 if cross else 1) * len(subset) * K * K * 4)
                stats["memory_chunks"] = max(stats.get("memory_chunks", 0), len(memory_chunks(mine, K, budget, cross)))
            for group in chunk:
                spec = specs[group[0]]
                if (need_h and sweeps_for(spec, gcfg) and not sweeps_apply(K)
                        and K not in record.sweeps_skipped):
                    record.sweeps_skipped.append(K)
                    log.warning("layer %d: --sweeps skipped for inputs of width %d (a (K, K) Hessian of %.0f MiB is "
                                "factored in place; a copy for coordinate descent would double it)", layer_idx, K,
                                K * K * 4 / 2 ** 20)
                W = early.pop(tuple(group), None)
                Hs = None
                if need_h:
                    Hs = col.take(group)
                    for j, e in enumerate(group):
                        P = prior_of.prior_hessian(e, ex.expert_forward) if prior_of else None
                        if e in fallback and not col.all_mass(e) > 0 and (P is None or not P.trace() > 0):
                            Hs[j].zero_().diagonal().fill_(1.0)  # identity Hessian == round-to-nearest
                            rounded.add(e)
                        elif P is not None:
                            Hs[j] += (hessian_prior * K * col.mean_weight(e)) * P
                if W is None:
                    W = _hand_over(ex, group, projs)
                if cross:  # aim at the unquantized model's outputs (quant/target.py)
                    Ds = col.take_cross(group)
                    for j, e in enumerate(group):
                        if e in rounded:
                            Ds[j].zero_()
                    for j in move_target(W, Hs, Ds, gcfg.percdamp, strength[group[0]]):
                        record.fp_target["kept"] += [[group[j], p] for p in projs]
                        log.warning("layer %d expert %d %s: --fp-target left the target at W (damped Hessian not "
                                    "positive definite)", layer_idx, group[j], "+".join(projs))
                    del Ds
                if signs is not None:  # quantize W' = W R^T against H' = R H R^T
                    W = rotate(W.contiguous(), signs)  # in the layout it had before _stack_float
                    Hs = None if Hs is None else rotate_hessian(Hs, signs)
                nrows = [rows[p] for p in projs]
                handed = Owned(W), (None if Hs is None else Owned(Hs))
                del W, Hs  # GPTQ frees them as soon as it is done with them (at most two (K, K) in flight)
                res, search = _quantize_group(*handed, spec, method, gcfg, encoder.sizer(spec, nrows))
                del handed
                if search is not None:
                    searched.append({"experts": group, "projs": list(projs), "threshold": search.threshold,
                                     "bits": round(8 * search.nbytes / res.codes.numel(), 4), "fits": search.fits})
                for j, e in enumerate(group):
                    r0 = 0
                    for p, n in zip(projs, nrows):
                        sl = slice(r0, r0 + n)
                        r0 += n
                        # clones: a view would keep the whole batch's result alive
                        part = {f: t[j, sl].clone() for f, t in (("codes", res.codes), ("scale", res.scale),
                                                                 ("zero", res.zero))}
                        pt = encoder.add((e, p), spec, part["codes"], part["scale"], part["zero"])
                        if pt is not None:
                            packed[(e, p)] = pt
                        deq = res.deq[j, sl] if signs is None else unrotate(res.deq[j, sl], signs)  # deq(W') R
                        deq = deq.to(dtype, copy=True)
                        ex.set_dense(e, p, deq)
                        if split:
                            results.update({f"{e}.{p}.{f}": t for f, t in part.items()})
                            results[f"{e}.{p}.deq"] = deq
                        del part  # its int32 codes (as big as the weight) would stay until the next group's GPTQ
                del res
        loaded.clear()
    kept.clear()
    if split:  # every rank gets every expert's result, bit for bit
        results["rounded"] = torch.tensor(sorted(rounded), dtype=torch.int64)
        for r in range(dist.world):
            got = dist.broadcast_tensors(results if r == dist.rank else None, r)
            if r == dist.rank:
                continue
            rounded |= set(got.pop("rounded").tolist())
            for key in sorted({k.rsplit(".", 1)[0] for k in got}, key=lambda s: (int(s.split(".")[0]), s)):
                e, p = int(key.split(".")[0]), key.split(".")[1]
                packed[(e, p)] = encoder.add((e, p), specs[e], got[f"{key}.codes"].to(device),
                                             got[f"{key}.scale"].to(device), got[f"{key}.zero"].to(device))
                ex.set_dense(e, p, got[f"{key}.deq"].to(device))
    packed.update(encoder.finish_layer())
    if need_h:
        record.fallback = sorted(rounded)
    if all_scale:
        record.all_tokens = {"lambda": all_tokens, "scale": round(all_scale, 8),
                             "score_sum": [round(v, 6) for v in score_sums(cache, E)]}
    record.seconds = round(time.time() - t0, 3)
    record.specs = {e: specs[e].label for e in live}
    record.ternary = searched
    for s in searched:
        if not s["fits"]:
            log.warning("layer %d %s: even threshold %.2f gives %.3f bits per weight, over the budget; kept it",
                        layer_idx, "+".join(s["projs"]), s["threshold"], s["bits"])
    if fallback and method != "rtn":
        log.warning("layer %d: expert%s %s got fewer than %d calibration tokens (%s): quantized %s",
                    layer_idx, "s" if len(fallback) > 1 else "", ", ".join(map(str, fallback)), min_tokens,
                    ", ".join(str(record.tokens[e]) for e in fallback),
                    "by round-to-nearest" if rounded else
                    "by GPTQ on them plus " + " and ".join(n for n, on in (("the --hessian-prior", want_prior),
                                                                        ("all tokens (--all-tokens)", all_scale > 0)) if on))
    return packed, record
