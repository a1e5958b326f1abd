"""The prune candidate's cost: the MoE block's output error without an expert, after the prune pass's refit.

In each MoE layer of the sensitivity pass (passes/allocate.py) `PruneMeter.observe` keeps the prune
pass's own statistics of the layer (merge/pipeline._layer_stats: a sample of at most `max_tokens` block
inputs x with the family router's top-k experts and gate weights) and measures, for every expert e,

    A(P)  = sum_{x in sample} || Y(x) - Y_P(x) ||^2,     P = {e}
    Y     = sum_{j in S(x)} g_j(x) f_j(x)             the original block output
    Y_P   = the block with the experts of P removed, its router rows dropped (top-k over the rest,
            renormalised as the family does) and the kept experts' down projections refitted by least
            squares exactly as `moecompress prune` does (merge.reduction.merge_groups, ridge PRUNE_RIDGE)
    D_e   = sum_{x in sample: e in S(x)} || g_e(x) f_e(x) ||^2     e's contribution energy

and eps_prune(e) = A({e}) / D_e. The bit-width candidates' eps(b) is the block output error of quantizing
e alone relative to the same contribution energy (allocation/importance.py), so both are errors of the
block output in units of e's contribution, and the pass multiplies both by the same importance weights:
the costs are comparable. An expert with no routed token in the sample gets its layer's mean eps_prune
(and the floored importance, as for the widths).

With `--cost fisher` (allocation/fisher.py) the meter also gets each layer's F_l (H,) and the prune cost is
on that scale: 1/2 mean_{x in sample} sum_i F_{l,i} (Y(x) - Y_P(x))_i^2, the predicted growth of the mean
token loss, as fisher_costs gives the widths (there n_e / (2N) times the mean over e's routed tokens, that is
the same 1/2 mean over all tokens of the same weighted error).

`ratio(l, P)` re-measures a whole pruned set for the joint solver's rounds (allocation/joint.py):
A(P) / sum_{e in P} A({e}). It re-reads the layer's experts and router from the checkpoint (the meter
keeps only the token samples, at most L x max_tokens x H floats).
Cost: per layer, E refits of E - 1 experts (each an (I, I) solve per kept expert and sweep).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..merge.prune import PRUNE_RIDGE
from ..merge.reduction import merge_groups
from ..merge.refit import moe_output, route

log = logging.getLogger("moecompress")
MAX_TOKENS = 2048


def _router_tensors(reader, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    pre = f"{reader.prefix}.{i}.{reader.arch.router_mem}."
    found = {reader.arch.to_mem(k)[len(pre):]: k for k in reader.layer_keys(i) if reader.arch.to_mem(k).startswith(pre)}
    w = reader.get(found["weight"]).float()
    return w, (reader.get(found["bias"]).float() if "bias" in found else None)


def set_error(st, gu, dn, rw, rb, pruned, top_k: int, y: torch.Tensor | None = None,
              fisher: torch.Tensor | None = None) -> tuple[float, float]:
    """(A(P), A_F(P)) of module docstring on the sample of LayerStats `st` (gu (E, 2I, H), dn (E, H, I), router
    rw (E, H)); y: the original block output on the sample (computed when None); fisher (H,): F_l (NaN without)."""
    E = gu.shape[0]
    x, idx, w = st.router_inputs.float(), st.router_topk_index, st.router_topk_weight.float()
    if x.shape[0] == 0:
        return 0.0, 0.0
    keep = [(e,) for e in range(E) if e not in set(pruned)]
    red = merge_groups(gu, dn, rw, rb, keep, method="reap", stats=st, router_mode="dominant", refit=True,
                       top_k=top_k, ridge=PRUNE_RIDGE)
    renorm = bool(torch.allclose(w.sum(-1), torch.ones(w.shape[0]), atol=1e-3))
    y = moe_output(x, gu, dn, idx, w) if y is None else y
    i2, w2 = route(x, red.router_weight, red.router_bias, min(top_k, red.num_experts), renorm)
    y2 = moe_output(x, red.gate_up, red.down, i2, w2)
    d2 = (y - y2).double() ** 2  # (N, H)
    return float(d2.sum()), (float((d2 * fisher.double()).sum()) if fisher is not None else float("nan"))


def contribution_energy(st, gu, dn) -> np.ndarray:
    """(E,) D_e of the module docstring."""
    from ..merge.stats import expert_forward
    E = gu.shape[0]
    x, idx, w = st.router_inputs.float(), st.router_topk_index, st.router_topk_weight.float()
    out = np.zeros(E)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        if tok.numel():
            y = w[tok, slot, None] * expert_forward(x[tok], gu[e].float(), dn[e].float())
            out[e] = float((y.double() ** 2).sum())
    return out


class PruneMeter:
    """Collects eps_prune (L, E) during the sensitivity pass and re-measures pruned sets afterwards."""

    def __init__(self, reader, top_k: int, max_tokens: int = MAX_TOKENS, fisher: np.ndarray | None = None):
        self.reader, self.top_k, self.max_tokens = reader, int(top_k), int(max_tokens)
        self.fisher = None if fisher is None else torch.as_tensor(np.asarray(fisher), dtype=torch.float64)  # (L, H)
        self.moe = list(reader.moe_layers)
        E = reader.layer_num_experts(self.moe[0])
        self.stats: dict[int, object] = {}
        self.single = np.zeros((len(self.moe), E))  # A({e})
        self.energy = np.zeros((len(self.moe), E))  # D_e
        self.eps = np.full((len(self.moe), E), np.nan)
        self.single_f = np.full((len(self.moe), E), np.nan)  # A_F({e})
        self.fisher_cost = np.full((len(self.moe), E), np.nan)  # --cost fisher: predicted nats per token
        self.seconds = 0.0

    def _weights(self, i: int, ex=None):
        if ex is not None:
            gu = torch.stack([torch.cat([w["gate"], w["up"]]) for w in ex.weights]).float()
            dn = torch.stack([w["down"] for w in ex.weights]).float()
        else:
            st = self.reader.layer_experts(i, torch.float32)
            gu, dn = torch.cat([st["gate"], st["up"]], dim=1), st["down"]
        return gu.cpu(), dn.cpu(), *_router_tensors(self.reader, i)

    def observe(self, i: int, layer, cache, ex) -> None:
        """Sensitivity-pass hook for MoE layer i (its materialized layer, MoE cache and experts module)."""
        import time
        from ..merge.pipeline import _layer_stats, _router
        t0 = time.time()
        l = self.moe.index(i)
        st = _layer_stats(cache, _router(layer, self.reader.arch), ex, self.max_tokens)
        st = st.__class__(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.__dict__.items()})
        self.stats[l] = st
        gu, dn, rw, rb = self._weights(i, ex)
        self.energy[l] = contribution_energy(st, gu, dn)
        y = moe_output(st.router_inputs.float(), gu, dn, st.router_topk_index, st.router_topk_weight.float())
        fw = None if self.fisher is None else self.fisher[l]
        for e in range(gu.shape[0]):
            self.single[l, e], self.single_f[l, e] = set_error(st, gu, dn, rw, rb, [e], self.top_k, y, fw)
        if fw is not None:  # 1/2 mean_t sum_i F_i dy_i^2 over the layer's sampled tokens (allocation/fisher.py's units)
            self.fisher_cost[l] = 0.5 * self.single_f[l] / max(1, st.router_inputs.shape[0])
        ok = self.energy[l] > 0
        self.eps[l, ok] = self.single[l, ok] / self.energy[l, ok]
        if (~ok).any():
            self.eps[l, ~ok] = self.eps[l, ok].mean() if ok.any() else 1.0
        self.seconds += time.time() - t0
        log.info("prune cost, layer %d: eps_prune %s", i, np.round(self.eps[l], 4).tolist())

    def ratio(self, l: int, pruned: list[int]) -> float:
        """A(P) / sum_{e in P} A({e}) for MoE layer index l (0..L-1)."""
        import time
        t0 = time.time()
        gu, dn, rw, rb = self._weights(self.moe[l])
        joint, joint_f = set_error(self.stats[l], gu, dn, rw, rb, pruned, self.top_k, None,
                                   None if self.fisher is None else self.fisher[l])
        alone = float(self.single[l, pruned].sum())
        if self.fisher is not None:  # the Fisher-weighted errors when those are the costs
            joint, alone = joint_f, float(self.single_f[l, pruned].sum())
        self.seconds += time.time() - t0
        r = joint / alone if alone > 0 else 1.0
        log.info("prune cost, layer %d: pruning %s together costs %.3fx the sum of single prunes",
                 self.moe[l], pruned, r)
        return r
