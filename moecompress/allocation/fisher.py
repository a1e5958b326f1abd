"""Loss-weighted allocation costs: a diagonal-Fisher estimate of how much the model's loss grows per unit of
each MoE layer's output error (`quantize --allocation lp --cost fisher`).

The legacy cost phi^alpha w^beta eps(b) (importance.py) compares layers through eps, a *relative* error of
one layer's MoE output; but layers are not equally sensitive, so the program can buy bytes where they
matter least. Here the objective is the predicted growth of the mean next-token loss (nats per token, so
also the predicted growth of log perplexity), by the second-order expansion around the original model:

    loss(y + dy) - loss(y) ~= 1/2 sum_w (g_w . dy_w)^2                      (empirical Fisher, per window w)
                           ~= 1/2 sum_t sum_i g_{t,i}^2 dy_{t,i}^2           (diagonal, same position only)
                           ~= 1/2 sum_t sum_i F_{l,i} dy_{t,i}^2,  F_{l,i} = mean_t g_{t,i}^2

with g_t = d(sum of the window's token losses) / d y_{l,t} the gradient at the output y_{l,t} of layer l's
routed experts (their gate-weighted sum, which the shared experts and the residual stream only add to), and
the mean over all N calibration tokens. The first-order term is dropped: the original model sits near a
minimum of the training loss, and quantization errors have no preferred sign. Dividing by N gives the
mean-loss change. For expert e of layer l at candidate b, with only e quantized, dy_t = g_{t,e} (f_e(x_t) -
f_{e,b}(x_t)) on the n_e tokens routed to e, estimated from the sensitivity pass's sample S_e of them:

    cost[l, e, b] = n_e / (2 N) * mean_{t in S_e} sum_i F_{l,i} (g_{t,e} (f_e(x_t) - f_{e,b}(x_t)))_i^2

Activation frequency and gate weight enter through n_e and g_{t,e} themselves (no alpha, beta), and layers
are weighed by their own F. The sum over experts is the LP's objective: a plan's predicted loss increase.
Variant "expert" replaces F_l by F_{l,e}, the mean of g_t^2 over the tokens routed to e (the experts a
token goes to see its own gradient), shrunk towards F_l as (S_e + k F_l) / (n_e + k), k = SHRINK_TOKENS, so
rarely routed experts keep their layer's weights. The sensitivity pass measures both on the same sampled
tokens; FISHER_VARIANT is the one `--cost fisher` optimises, chosen by benchmarks/cost_model.py.

`fisher_pass` computes F for every MoE layer, streaming decoder layers as the quantize pass does: a forward
sweep keeps each MoE-or-later layer's input hidden states (S, T, H) (on the run's device, as the pipeline's
activations); the head (final norm, lm_head, next-token cross-entropy summed per window) gives the gradient
at the last hidden state; then layers are rebuilt one at a time in reverse, rerun from their cached inputs
with autograd on, and backpropagated, the gradient at their input carried down and the squared gradient at
the routed experts' output summed per channel. One decoder layer's weights are in memory at a time; the
cached inputs cost (#layers from the first MoE layer) x S x T x H floats (a real-size run would keep them
on disk or recompute them from checkpoints every k layers; the fixture needs a few MB). Cost: about four
forward passes of the model over the calibration windows, printed and recorded in run/allocation.json.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MoeCompressError
from .importance import Costs

log = logging.getLogger("moecompress")


SHRINK_TOKENS = 64  # per-expert Fisher: the layer's F counts as this many routed tokens (rare experts keep it)
VARIANTS = ("layer", "expert")  # which F weighs an expert's error: its layer's, or its own routed tokens'
FISHER_VARIANT = "expert"  # what --cost fisher optimises; both are recorded. benchmarks/cost_model.py, fixture seeds
# 0, 1, 2: equal-bytes plan pairs ordered as measured 54 of 56 for either variant (legacy 42 of 56); the LP's 3.0-bit
# plans: d log ppl 0.0421 (expert) vs 0.0426 (layer) on average, a tie within noise; per expert is the closer estimate


class Fisher(NamedTuple):
    """weights: (L, H) float64 mean squared loss gradient per channel of each MoE layer's routed-expert output
    (F_{l,i} above); expert: (L, E, H) the same mean over the tokens routed to each expert, shrunk towards the
    layer's, (S_e + k F_l) / (n_e + k) with k = SHRINK_TOKENS; tokens: N, the calibration tokens it is averaged
    over; loss: their mean next-token loss (nats) under the original model; seconds: wall time of the pass."""

    weights: np.ndarray
    expert: np.ndarray
    tokens: int
    loss: float
    seconds: float

    def per_expert(self) -> np.ndarray:
        """(L, E, len(VARIANTS), H): each expert's weights of every variant, for the sensitivity pass."""
        L, E, H = self.expert.shape
        return np.stack([np.broadcast_to(self.weights[:, None], (L, E, H)), self.expert], axis=2)


def _head(streamer, device):
    """(final norm module, lm_head weight (V, H)) of the streamed model, read from the checkpoint."""
    r = streamer.reader
    base = r.prefix.rsplit(".", 1)[0]  # "model.layers" -> "model"
    norm = streamer.model.model.norm
    key = f"{base}.norm.weight"
    if key not in r.tensors:
        raise MoeCompressError(f"--cost fisher needs the final norm {key!r}, which the checkpoint lacks; use --cost legacy")
    import copy
    norm = copy.deepcopy(norm).to_empty(device=device)
    state = {k[len(base) + len(".norm."):]: r.get(k) for k in r.tensors if k.startswith(f"{base}.norm.")}
    norm.load_state_dict(state, strict=True)
    norm = norm.to(streamer.dtype).eval()
    if "lm_head.weight" in r.tensors:
        head = r.get("lm_head.weight")
    elif getattr(streamer.config, "tie_word_embeddings", False):
        head = streamer.embed_weight
    else:
        raise MoeCompressError("--cost fisher needs lm_head.weight (or tied embeddings); use --cost legacy")
    if getattr(streamer.config, "final_logit_softcapping", None):
        raise MoeCompressError("--cost fisher does not model final logit soft-capping; use --cost legacy")
    return norm, head.to(device=device, dtype=streamer.dtype)


def window_loss(hidden: torch.Tensor, ids: torch.Tensor, norm, head: torch.Tensor) -> torch.Tensor:
    """Sum over windows and positions of the next-token negative log-likelihood. hidden: (B, T, H) last
    decoder layer's output, ids: (B, T) the windows' tokens."""
    logits = F.linear(norm(hidden), head).float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device),
                           reduction="sum")


def fisher_pass(reader, config, windows: torch.Tensor, *, progress: bool = True, device=None) -> Fisher:
    """F for every MoE layer of `reader`'s ORIGINAL model over the calibration windows (see module docstring)."""
    from ..api import _progress
    from ..distributed import Dist
    from ..layerwise import LayerStreamer, _fit_batch, find_experts
    from ..passes.pipeline import LayerRunner
    t0 = time.time()
    device = torch.device("cpu") if device is None else device
    streamer = LayerStreamer(reader, device=device)
    runner = LayerRunner(streamer, windows, config.calib, Dist(device=device), device)
    moe = list(reader.moe_layers)
    first, last = moe[0], streamer.num_layers - 1
    acts = runner.embed()
    inputs: dict[int, dict[int, torch.Tensor]] = {}
    for i in _progress(range(last + 1), desc="fisher: forward", enabled=progress):
        layer = streamer.build_layer(i)
        if i >= first:
            inputs[i] = acts
        acts = runner.forward(layer, i, acts)
        del layer
    norm, head = _head(streamer, device)
    grads, nll = {}, 0.0
    for j, h in acts.items():  # gradient of the summed token losses at the last hidden state
        h = h.detach().requires_grad_(True)
        s, e = runner.batches[j]
        loss = window_loss(h, windows[s:e], norm, head)
        loss.backward()
        nll += float(loss.detach())
        grads[j] = h.grad
    del acts, norm, head
    H = streamer.config.hidden_size
    weights = np.zeros((len(moe), H))
    per: dict[int, tuple] = {}
    for i in _progress(range(last, first - 1, -1), desc="fisher: backward", enabled=progress):
        layer = streamer.build_layer(i)
        found = find_experts(layer) if i in moe else None
        seen: list[tuple] = []
        hook = None
        if found is not None:
            E = found[1].num_experts

            def keep(_mod, args, out):
                out.retain_grad()
                seen.append((out, args[1]))  # output, top_k_index (T, k)
            hook = found[1].register_forward_hook(keep)
        sq = torch.zeros(H, dtype=torch.float64, device=device)
        sq_e = n_e = None
        try:
            for j, x in inputs.pop(i).items():
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    y = layer(x, **_fit_batch(runner.kwargs[i], x.shape[0]))
                    y = y[0] if isinstance(y, tuple) else y
                    torch.autograd.backward(y, grads[j].to(y.dtype))
                if found is not None:
                    if len(seen) != 1 or seen[0][0].grad is None:
                        raise MoeCompressError(f"layer {i}: the experts module ran {len(seen)} times in one forward; "
                                               f"--cost fisher cannot attribute its gradient (use --cost legacy)")
                    g2 = (seen[0][0].grad.double() ** 2).reshape(-1, H)  # (T, H)
                    idx = seen[0][1].reshape(g2.shape[0], -1).clamp(0, E).to(g2.device)  # (T, k); E: no expert
                    if sq_e is None:
                        sq_e = torch.zeros(E + 1, H, dtype=torch.float64, device=g2.device)
                        n_e = torch.zeros(E + 1, dtype=torch.float64, device=g2.device)
                    sq += g2.sum(0)
                    k = idx.shape[1]
                    sq_e.index_add_(0, idx.reshape(-1), g2.repeat_interleave(k, 0))
                    n_e.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64, device=g2.device))
                    seen.clear()
                grads[j] = x.grad
        finally:
            if hook is not None:
                hook.remove()
        if i in moe:
            weights[moe.index(i)] = sq.cpu().numpy()
            per[moe.index(i)] = (sq_e[:E].cpu().numpy(), n_e[:E].cpu().numpy())
        del layer
    N = int(windows.shape[0] * (windows.shape[1] - 1))  # predicted tokens: the loss's terms
    weights /= N
    expert = np.stack([(per[l][0] + SHRINK_TOKENS * weights[l]) / (per[l][1] + SHRINK_TOKENS)[:, None]
                       for l in range(len(moe))])  # (L, E, H)
    secs = time.time() - t0
    log.info("fisher pass: %.1f s, %d tokens, mean loss %.4f nats", secs, N, nll / N)
    return Fisher(weights, expert, N, nll / N, secs)


def weighted_output_error(X: torch.Tensor, g: torch.Tensor, dense, quant, glu, biases, weight: torch.Tensor,
                          chunk_tokens: int = 4096):
    """mean_t sum_i weight_i (g_t (f(x_t) - f_q(x_t)))_i^2 over the sampled routed tokens X (T, H) with gate
    weights g (T,); dense / quant: (gate, up, down) weights; glu(gate_out, up_out); biases (gate, up, down) or
    None each (they cancel in the difference except through the glu); NaN when T == 0. weight (H,) -> a float;
    (K, H) -> (K,) array, one value per row of weights."""
    if X.shape[0] == 0:
        return float("nan") if weight.dim() == 1 else np.full(weight.shape[0], np.nan)
    Wg, Wu, Wd = (w.float() for w in dense)
    Qg, Qu, Qd = (w.float() for w in quant)
    bg, bu, bd = (None if b is None else b.float() for b in biases)
    w = weight.to(device=X.device, dtype=torch.float64)

    def f(x, A, B, D):
        return F.linear(glu(F.linear(x, A, bg), F.linear(x, B, bu)), D, bd)
    num = torch.zeros(w.shape[:-1], dtype=torch.float64, device=X.device)
    for s in range(0, X.shape[0], chunk_tokens):
        x = X[s:s + chunk_tokens].float()
        gt = g[s:s + chunk_tokens].float().unsqueeze(1)
        d = (gt * (f(x, Wg, Wu, Wd) - f(x, Qg, Qu, Qd))).double()  # (t, H)
        num += (d ** 2).sum(0) @ w.T if w.dim() == 2 else (d ** 2 * w).sum()
    return float(num) / X.shape[0] if w.dim() == 1 else num.cpu().numpy() / X.shape[0]


def fisher_costs(mean_err, counts, tokens: int, importance_floor: float = 1e-3) -> Costs:
    """Objective coefficients (L, E, C) in predicted nats per token: n_e / (2 N) * mean_err.

    mean_err: (L, E, C) weighted_output_error per (layer, expert, candidate) (NaN for experts without tokens);
    counts: (L, E) routed tokens n_e; tokens: N. Experts with no calibration tokens would be free to destroy;
    they get importance_floor x their layer's mean cost of each candidate (logged), so their cost stays small,
    finite and falls with more bits. phi and w of the returned Costs are the routed-token shares (mean 1)."""
    err = np.array(mean_err, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if err.ndim != 3 or n.shape != err.shape[:2]:
        raise MoeCompressError(f"fisher errors must be (L, E, C) and counts (L, E); got {err.shape}, {n.shape}")
    if not tokens > 0:
        raise MoeCompressError("the Fisher pass saw no calibration tokens; use more calibration text")
    zero = n == 0
    if (~np.isfinite(err) & ~zero[..., None]).any():
        l, e = map(int, np.argwhere((~np.isfinite(err)).any(axis=2) & ~zero)[0])
        raise MoeCompressError(f"no finite Fisher error for layer {l} expert {e} although it received "
                               f"{int(n[l, e])} tokens; re-run the sensitivity pass")
    cost = n[..., None] / (2.0 * tokens) * np.where(np.isfinite(err), err, 0.0)
    if (cost < 0).any():
        raise MoeCompressError("Fisher-weighted errors must be >= 0")
    unmeasured = [tuple(map(int, x)) for x in np.argwhere(zero)]
    if unmeasured:
        for l in range(cost.shape[0]):
            ok = ~zero[l]
            fill = cost[l, ok].mean(axis=0) if ok.any() else cost[~zero].mean(axis=0)
            cost[l, zero[l]] = importance_floor * fill
        log.warning("%d experts got no calibration tokens; their Fisher cost is %g x their layer's mean: %s",
                    len(unmeasured), importance_floor, ", ".join(f"L{l}E{e}" for l, e in unmeasured[:32]))
    share = np.where(n.sum(1, keepdims=True) > 0, n * n.shape[1] / np.maximum(n.sum(1, keepdims=True), 1), 0.0)
    assert np.isfinite(cost).all()
    return Costs(cost, share, share, unmeasured)
