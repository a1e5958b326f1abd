"""The quantize pass: calibrate and quantize a checkpoint one decoder layer at a time.

For each decoder layer (sequentially: layer i+1 sees layer i's quantized output):
  1. run the calibration activations through the layer, collecting each expert's input Hessian and
     routing statistics (tokens routed, summed gate weight);
  2. quantize gate and up of every expert (batched GPTQ over experts that share a spec), put the
     dequantized weights back;
  3. run again to collect Hessians of the down projection's inputs, which now come from the quantized
     gate/up (true-sequential), and quantize down;
  4. run the quantized layer to produce the next layer's inputs; write the layer's shard.
Experts with fewer than `min_tokens` routed tokens fall back to round-to-nearest (an identity Hessian);
they are listed in a warning and in the manifest.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..codecs import PackedTensor, QuantSpec, get_codec
from ..quant.gptq import GPTQConfig, GPTQResult, gptq, rtn
from ..quant.grids import int_grid
from .calibrate import PRIOR_TOKENS, HessianCollector, expert_chunks

log = logging.getLogger("moecompress")
HESSIAN_BUDGET = 1 << 30


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


TERNARY_CODECS = ("ternary", "sub1")
DEFAULT_THRESHOLD = 0.4   # ternary dead zone |w| < t * (hi - lo) codes to 0 (when neither given nor searched)
TERNARY_PERCDAMP = 0.25   # stronger GPTQ damping for ternary: less error feedback, more zeros (~93%)


def grid_for(spec: QuantSpec):
    if spec.codec == "int":
        return int_grid(spec)  # AsymmetricGrid, or SymmetricGrid under the option ("sym", 1)
    from ..quant.ternary import TernaryGrid
    return TernaryGrid(threshold=float(spec.option("threshold", DEFAULT_THRESHOLD)),
                       fit_method=spec.option("fit", "minmax"))


class LayerEncoder:
    """Turns quantizer results into PackedTensors, holding what is shared across layers.

    Integer codes are packed at once. Ternary codes wait for the end of their layer: the first MoE layer's
    codes build the sub1 dictionary (QMoE's fixed dictionary, here fitted to the model's own statistics),
    which every later layer reuses; each tensor is then stored as "sub1" or dense "ternary", whichever is
    smaller. The dictionary is stored once, in the shard of the layer that built it (`take_shared`).
    """

    def __init__(self, num_moe_layers: int = 1, expert_params: int = 0):
        self.num_moe_layers = max(1, num_moe_layers)  # the dictionary's bytes are shared by all of them
        self.expert_params = expert_params  # every expert weight of the model: the dictionary's per-weight charge
        self.dictionary = None
        self._shared: dict[str, torch.Tensor] = {}
        self._pending: dict = {}
        self._written: set[str] = set()
        self.tally = dict.fromkeys(("weights", "zeros", "entropy_bits", "sub1_weights", "sub1_entropy_bits",
                                    "codeword_bits", "offset_bits", "sub1_tensors", "dense_tensors"), 0)

    def restore_from(self, directory: str) -> None:
        """--resume: pick the dictionary up from shards already written."""
        import glob
        import os

        from safetensors import safe_open
        for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            with safe_open(f, "pt") as t:
                for k in t.keys():
                    if k.startswith("moecompress.sub1_dictionary."):
                        self.dictionary = t.get_tensor(k)
                        self._written.add(k)
                        return

    def add(self, key, spec: QuantSpec, codes, scale, zero) -> PackedTensor | None:
        if spec.codec == "int":
            return get_codec("int").encode(codes, scale, zero, spec)
        if spec.codec == "ternary":  # dense ternary asked for: 5 trits per byte, no dictionary
            from ..codecs.ternary import encode_ternary
            return encode_ternary(codes, zero, scale, 0, None)
        self._pending[key] = (codes, zero, scale)  # ternary grids keep lo in zero and hi in scale
        return None

    def finish_layer(self) -> dict:
        from ..codecs.ternary import encode_ternary, split_shared
        if not self._pending:
            return {}
        if self.dictionary is None:
            from ..codecs.sub1_dict import build_dictionary
            self.dictionary = build_dictionary([c for c, _, _ in self._pending.values()],
                                               amortize=self.num_moe_layers)
        out = {}
        for key, (codes, lo, hi) in self._pending.items():
            pt, shared = split_shared(encode_ternary(codes, lo, hi, 0, self.dictionary))
            pt.attrs.pop("sizes", None)  # keep the manifest small: it counts in the size on disk
            self._count(codes, pt)
            for k, v in shared.items():
                self._shared.setdefault(k, v)
            out[key] = pt
        self._pending = {}
        return out

    def _count(self, codes: torch.Tensor, pt: PackedTensor) -> None:
        from ..codecs.sub1_dict import ZERO_TRIT, pair_entropy
        t, n = self.tally, codes.numel()
        ent = pair_entropy(codes) * n
        t["weights"] += n
        t["zeros"] += int((codes == ZERO_TRIT).sum())
        t["entropy_bits"] += ent
        if pt.codec == "sub1":
            t["sub1_tensors"] += 1
            t["sub1_weights"] += n
            t["sub1_entropy_bits"] += ent
            t["codeword_bits"] += 8 * pt.tensors["codewords"].numel()
            t["offset_bits"] += 8 * sum(pt.tensors[k].numel() * pt.tensors[k].element_size() for k in ("row_counts", "row_skip"))
        else:
            t["dense_tensors"] += 1

    def limits(self) -> dict | None:
        """The sub1 coder against its bound, over the ternary tensors this encoder packed (None if none):
        zero fraction, order-0 pair entropy (bits/weight), codeword bits/weight and their ratio, and the
        bits/weight with the per-row offsets (counts and skips) and the shared dictionary added."""
        t = self.tally
        if not t["weights"]:
            return None
        out = {"zero_fraction": round(t["zeros"] / t["weights"], 4),
               "pair_entropy_bpw": round(t["entropy_bits"] / t["weights"], 4),
               "sub1_tensors": t["sub1_tensors"], "dense_tensors": t["dense_tensors"]}
        if t["sub1_weights"]:
            w = t["sub1_weights"]
            dict_bits = 8 * (self.dictionary.numel() if self.dictionary is not None else 0)
            out.update({"sub1_pair_entropy_bpw": round(t["sub1_entropy_bits"] / w, 4),
                        "codeword_bpw": round(t["codeword_bits"] / w, 4),
                        "coder_over_entropy": round(t["codeword_bits"] / max(t["sub1_entropy_bits"], 1e-9), 4),
                        "with_offsets_and_dictionary_bpw": round((t["codeword_bits"] + t["offset_bits"] + dict_bits) / w, 4)})
        return out

    def sizer(self, spec: QuantSpec, rows: list[int]) -> "_Sizer | None":
        """For a sub1 spec with a bit budget (option target_bits): what a batch's result costs and may cost."""
        target = spec.option("target_bits", None)
        if spec.codec != "sub1" or target is None:
            return None
        return _Sizer(self, rows, float(target))

    def take_shared(self) -> dict[str, torch.Tensor]:
        """Shared tensors not yet stored (the dictionary, once): the caller writes them into its shard."""
        new = {k: v for k, v in self._shared.items() if k not in self._written}
        self._written |= set(new)
        return new


class _Sizer:
    """Real encoded bytes of a batch's ternary result (see passes/ternary_budget.py) and its budget."""

    def __init__(self, encoder: "LayerEncoder | None", rows: list[int], target_bits: float):
        self.encoder, self.rows, self.target = encoder, rows, target_bits

    def budget(self, shape: tuple[int, int, int]) -> float:
        from .ternary_budget import budget_bytes
        G, N, K = shape  # (experts, rows of the batch's projections, K)
        return budget_bytes(G * N * K, G * len(self.rows), self.target, 0.0)

    def tensors(self, res):
        """(codes, lo, hi) of every packed tensor of the batch: each expert's rows split by projection."""
        for j in range(res.codes.shape[0]):
            r0 = 0
            for n in self.rows:
                yield res.codes[j, r0:r0 + n], res.zero[j, r0:r0 + n], res.scale[j, r0:r0 + n]
                r0 += n

    def nbytes(self, res) -> int:
        from ..codecs.sub1_dict import build_dictionary
        from ..codecs.ternary import encode_ternary, encoded_nbytes
        G, N, K = res.codes.shape  # (experts, rows of the batch's projections, K)
        d = self.encoder.dictionary
        if d is None:  # first MoE layer, no dictionary yet: one from this candidate's codes (a row sample:
            # the final dictionary is built from the whole layer at its end, see finish_layer)
            d = build_dictionary(list(res.codes), amortize=self.encoder.num_moe_layers, max_rows=2048)
        total = sum(encoded_nbytes(encode_ternary(c, lo, hi, 0, d)) for c, lo, hi in self.tensors(res))
        if self.encoder.expert_params:
            total += d.numel() * G * N * K / self.encoder.expert_params  # the dictionary's share
        return int(total)


class EstimateSizer(_Sizer):
    """_Sizer's estimate for when no dictionary exists yet (the allocation's sensitivity pass): a tensor's
    sub1 bytes are its order-0 pair entropy x CODER_OVERHEAD in codewords, plus row counts, skips and
    fp16 levels, capped by the dense ternary size (the codec falls back to it)."""

    def __init__(self, spec: QuantSpec, rows: list[int]):
        super().__init__(None, rows, float(spec.option("target_bits")))

    def nbytes(self, res) -> int:
        import math
        from ..codecs.sub1_dict import pair_entropy
        from ..codecs.ternary import CODER_OVERHEAD, count_dtype
        K = res.codes.shape[2]
        total = 0.0
        for c, _, _ in self.tensors(res):
            n = c.shape[0]
            sub1 = pair_entropy(c) * c.numel() * CODER_OVERHEAD / 8 + n * (count_dtype(K).itemsize + 1)
            total += min(sub1, n * math.ceil(K / 5)) + 4 * n  # + fp16 lo, hi per row
        return int(total)


GPTQ_BUDGET = 256 << 20  # working memory of one batched GPTQ call


def _sub_batches(experts: list[int], N: int, K: int) -> list[list[int]]:
    """Experts per batched GPTQ call: all of them unless their working set (~6 (N, K) float copies plus
    Hessian, its factor and a copy) passes GPTQ_BUDGET; large layers then run in a few batches."""
    per = 6 * N * K * 4 + 3 * K * K * 4
    n = max(1, GPTQ_BUDGET // per)
    return [experts[i:i + n] for i in range(0, len(experts), n)]


def _quantize_group(W: torch.Tensor, Hs: torch.Tensor | None, spec: QuantSpec, method: str, gcfg: GPTQConfig,
                    sizer: _Sizer | None = None):
    """-> (GPTQResult, ternary_budget.Search or None). With a sizer, the ternary threshold is searched."""
    gs = spec.group_size or W.shape[-1]  # 0: one group per row (ternary, as QMoE)
    if spec.codec in TERNARY_CODECS:  # error feedback fills the dead zone back in: damp it (measured trade-off)
        gcfg = GPTQConfig(max(gcfg.percdamp, float(spec.option("percdamp", TERNARY_PERCDAMP))), gcfg.block_size, gcfg.act_order)

    def run(grid) -> GPTQResult:
        if method == "rtn" or Hs is None:
            return rtn(W, grid, gs)
        return gptq(W, Hs, grid, gs, gcfg)
    if sizer is None:
        return run(grid_for(spec)), None
    from ..quant.ternary import TernaryGrid
    from .ternary_budget import search_threshold
    fit = spec.option("fit", "minmax")
    budget = sizer.budget(tuple(W.shape))
    s = search_threshold(lambda t: run(TernaryGrid(threshold=t, fit_method=fit)), sizer.nbytes, budget)
    return s.result, s


def quantize_moe_layer(streamer, layer, hidden, kwargs, *, layer_idx: int, specs: dict, method: str,
                       gcfg: GPTQConfig, affinity: bool, min_tokens: int, batch_size: int,
                       encoder: LayerEncoder | None = None, hessian_prior: float = 0.0):
    """Quantize the experts of one materialized MoE layer in place.

    specs: {expert: QuantSpec}. Returns ({(expert, proj): PackedTensor}, LayerRecord).
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
    The prior is collected once per stage, by the first chunk's pass.
    """
    from ..layerwise import find_experts
    t0 = time.time()
    _, ex = find_experts(layer)
    encoder = encoder or LayerEncoder()
    E = ex.num_experts
    experts = list(range(E))
    tokens = hidden.shape[0] * hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    sample_every = max(1, tokens // PRIOR_TOKENS)
    packed: dict[tuple[int, str], PackedTensor] = {}
    record = None
    fallback: list[int] = []  # under min_tokens
    rounded: set[int] = set()  # of those, the experts rounded to nearest (all of them, without the prior)
    searched: list[dict] = []
    need_h = method != "rtn"
    want_prior = need_h and hessian_prior > 0
    for stage, projs, which in ((0, ("gate", "up"), "x"), (1, ("down",), "h")):
        K = ex.weights[0][projs[0]].shape[1]
        chunks = expert_chunks(experts, K, HESSIAN_BUDGET) if need_h else [experts]
        prior_of = None  # the first chunk's collector, which gathered the layer's prior statistics
        for chunk in chunks:
            col = HessianCollector(E, K, which, subset=chunk if need_h else [], affinity=affinity,
                                   prior=want_prior and prior_of is None, sample_every=sample_every)
            prior_of = prior_of or (col if col.prior else None)
            if need_h or record is None:  # round-to-nearest needs one pass, for the statistics
                ex.observer = col
                streamer.run_layer(layer, hidden, kwargs, batch_size)
                ex.observer = None
            if record is None:
                fallback = [e for e in experts if int(col.tokens[e]) < min_tokens]
                record = LayerRecord(layer_idx, col.tokens.tolist(), [round(float(g), 6) for g in col.gate_sum], fallback, 0.0)
            # batch experts that share a spec (and so a grid and group size)
            by_spec: dict[QuantSpec, list[int]] = {}
            for e in chunk:
                by_spec.setdefault(specs[e], []).append(e)
            for spec, members in by_spec.items():
                rows = [ex.weights[members[0]][p].shape[0] for p in projs]
                for group in _sub_batches(members, sum(rows), K):
                    W = torch.stack([torch.cat([ex.weights[e][p] for p in projs]) for e in group]).float()  # (G, N, K)
                    Hs = None
                    if need_h:
                        Hs = col.stacked(group)
                        for j, e in enumerate(group):
                            P = prior_of.prior_hessian(e, ex.expert_forward) if prior_of else None
                            if e in fallback and (P is None or not P.trace() > 0):
                                Hs[j] = torch.eye(K)  # identity Hessian == round-to-nearest
                                rounded.add(e)
                            elif P is not None:
                                Hs[j] += (hessian_prior * K * col.mean_weight(e)) * P
                    res, search = _quantize_group(W, Hs, spec, method, gcfg, encoder.sizer(spec, rows))
                    del W, Hs
                    if search is not None:
                        numel = res.codes.numel()
                        searched.append({"experts": group, "projs": list(projs), "threshold": search.threshold,
                                         "bits": round(8 * search.nbytes / numel, 4), "fits": search.fits})
                    for j, e in enumerate(group):
                        r0 = 0
                        for p, n in zip(projs, rows):
                            sl = slice(r0, r0 + n)
                            r0 += n
                            # clones: a view would keep the whole batch's result alive
                            pt = encoder.add((e, p), spec, res.codes[j, sl].clone(), res.scale[j, sl].clone(),
                                             res.zero[j, sl].clone())
                            if pt is not None:
                                packed[(e, p)] = pt
                            ex.set_dense(e, p, res.deq[j, sl].to(streamer.dtype, copy=True))
                    del res
    packed.update(encoder.finish_layer())
    if need_h:
        record.fallback = sorted(rounded)
    record.seconds = round(time.time() - t0, 3)
    record.specs = {e: specs[e].label for e in experts}
    record.ternary = searched
    for s in searched:
        if not s["fits"]:
            log.warning("layer %d %s: even threshold %.2f gives %.3f bits per weight, over the budget; kept it",
                        layer_idx, "+".join(s["projs"]), s["threshold"], s["bits"])
    if fallback and method != "rtn":
        log.warning("layer %d: expert%s %s got fewer than %d calibration tokens (%s): quantized %s",
                    layer_idx, "s" if len(fallback) > 1 else "", ", ".join(map(str, fallback)), min_tokens,
                    ", ".join(str(record.tokens[e]) for e in fallback),
                    "by round-to-nearest" if rounded else "by GPTQ on them plus the --hessian-prior")
    return packed, record
