"""`MoEExperts`: a drop-in replacement for a family's fused experts module.

transformers v5 calls a MoE block's experts as `experts(hidden_states (T, H), top_k_index (T, k),
top_k_weights (T, k)) -> (T, H)`. This module computes the same thing from canonical per-expert
weights, each either a dense (out, in) tensor or a `PackedTensor` decoded on the fly, only for experts
that received tokens:

    y = sum_{j < k} w_tj * down_e( glu(gate_e(x_t), up_e(x_t)) ),  e = top_k_index[t, j]

An optional observer sees each expert's routed inputs, intermediate activations and gate weights (that
is how calibration collects Hessians and routing statistics without a second copy of the math).

A layer quantized with `--rotate` holds its experts as W' = W R^T (quant/hadamard.py) and two int8 sign
vectors, buffers `rotation_gate_up` (H,) and `rotation_down` (I,): the layer's input is rotated once
(x' = R_x x, shared by every expert's gate/up), each expert's intermediate activation per token before its
down projection (h' = R_h h). Observers still see x and h in the original basis.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .arch import PROJS
from .codecs import PackedTensor, carry_check, decode, ensure_checked


class Observer(Protocol):
    def __call__(self, expert: int, tokens: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None: ...


def make_glu(arch_glu: str, config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The gated activation of a family: glu(gate_out, up_out) -> intermediate."""
    if arch_glu == "gptoss":
        alpha, limit = float(config.swiglu_alpha), float(config.swiglu_limit)

        def gptoss_glu(g, u):
            g = g.clamp(max=limit)
            u = u.clamp(min=-limit, max=limit)
            return (u + 1) * (g * torch.sigmoid(g * alpha))
        return gptoss_glu
    from transformers.activations import ACT2FN
    act = ACT2FN[getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", "silu")]
    return lambda g, u: act(g) * u


def use_triton(x: torch.Tensor) -> bool:
    """MOECOMPRESS_KERNELS=torch|triton forces a path; by default Triton on CUDA, the torch reference on CPU."""
    from .kernels import backend  # imports no triton unless the Triton path is chosen
    return backend(x.device) == "triton"


def _linear(x: torch.Tensor, w, bias=None) -> torch.Tensor:
    if isinstance(w, PackedTensor):
        if use_triton(x):
            from .kernels import packed_linear  # lazy: the torch path never imports triton
            y = packed_linear(x, w)
        else:  # checked once (then its decode tables are found by id on its device, no host copy)
            y = F.linear(x, decode(ensure_checked(w)).to(device=x.device, dtype=x.dtype))
    else:
        y = F.linear(x, w.to(x.dtype))
    return y if bias is None else y + bias.to(y.dtype)


class PackedWeight(nn.Module):
    """One packed matrix as module state: its stored fields are persistent buffers named as in the packed
    checkpoint (`<module path>.<field>`), so `state_dict`, `save_pretrained` and transformers' loader see
    the packed tensors themselves. `.to(device)` moves them; a dtype change (`.to(dtype)`, `.half()`,
    `.bfloat16()`) never touches them: codes, scales, zeros and levels keep their stored dtypes bit for bit.
    Shared tables (sub1's dictionary) are not fields: the owner attaches them (`packed(shared)`)."""

    def __init__(self, packed: PackedTensor):
        super().__init__()
        self.codec, self.shape, self.attrs = packed.codec, tuple(packed.shape), dict(packed.attrs)
        self.fields = [k for k in packed.tensors if k not in SHARED_FIELDS]
        for k in self.fields:
            self.register_buffer(k, packed.tensors[k])

    def packed(self, shared: dict | None = None) -> PackedTensor:
        t = {k: self._buffers[k] for k in self.fields}
        if self.codec == "sub1" and shared is not None:
            t["dictionary"] = shared[self.attrs.get("dictionary_id")]
        return PackedTensor(self.codec, self.shape, t, self.attrs)

    def _apply(self, fn, recurse=True):
        return _apply_keep_dtype(self, fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.codec}{self.attrs.get('bits', '')} {list(self.shape)}"


SHARED_FIELDS = ("dictionary",)  # stored once per checkpoint, not per tensor (codecs/ternary.py)


def _apply_keep_dtype(module: nn.Module, fn, recurse=True) -> nn.Module:
    """Module._apply for packed state: each buffer follows fn's device, never its dtype, and keeps its codec
    check's mark (`carry_check`: same data, shape and dtype), so the first forward after `.to(device)` does
    not check the codecs again (a check reads the data on the host: a sync on CUDA)."""
    if recurse:
        for child in module.children():
            child._apply(fn)
    for k, t in module._buffers.items():
        if t is None:
            continue
        new = fn(t)
        if new.dtype != t.dtype:
            new = t.to(device=new.device)
        module._buffers[k] = carry_check(t, new)
    for k, p in module._parameters.items():  # dense (floating) parameters, e.g. a bias: the compute dtype
        if p is not None:
            module._parameters[k] = nn.Parameter(fn(p.data), requires_grad=False)
    return module


class MoEExperts(nn.Module):
    """weights[e] is {"gate", "up", "down"} -> Tensor | PackedTensor, or None for an expert that is gone.

    Packed weights are module state: child modules `<e>.<proj>` (`PackedWeight`) whose buffers carry the
    checkpoint's names, so the experts module at `model.layers.<i>.mlp.experts` holds
    `model.layers.<i>.mlp.experts.<e>.<proj>.<field>`. Shared sub1 dictionaries are non-persistent buffers
    `sub1_dictionary_<id>`. Dense weights (calibration) are non-persistent buffers `e<e>_<proj>`.
    `fused_biases` (GPT-OSS: gate_up_proj_bias (E, 2I) interleaved, down_proj_bias (E, H)) are persistent
    buffers under their checkpoint names, split per expert on use."""

    def __init__(self, weights: list[dict | None], glu: Callable, biases: list[dict] | None = None,
                 fused_biases: dict[str, torch.Tensor] | None = None, rotation: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.num_experts = len(weights)
        self.weights = weights
        self.biases = biases
        self.glu = glu
        self.observer: Observer | None = None
        self._register()
        for k, t in (fused_biases or {}).items():
            self.register_buffer(k, t)
        for k, t in (rotation or {}).items():  # --rotate: {"gate_up": (H,), "down": (I,)} int8 signs
            self.register_buffer(f"rotation_{k}", t)
        self._sync()

    def _register(self):
        # Packed weights become child modules (persistent, checkpoint-named); dense ones non-persistent buffers.
        for e, w in enumerate(self.weights):
            if w is None:
                continue
            for p in PROJS:
                v = w[p]
                if isinstance(v, PackedTensor):
                    if str(e) not in self._modules:
                        self.add_module(str(e), nn.Module())
                    self._modules[str(e)].add_module(p, PackedWeight(v))
                    d = v.tensors.get("dictionary")
                    if d is not None:
                        self.register_buffer(f"sub1_dictionary_{v.attrs['dictionary_id']}", d, persistent=False)
                else:
                    self.register_buffer(f"e{e}_{p}", v, persistent=False)

    def packed_modules(self):
        """(expert, proj, PackedWeight) of every packed matrix."""
        for e, w in enumerate(self.weights):
            if w is not None and str(e) in self._modules:
                for p in PROJS:
                    m = self._modules[str(e)]._modules.get(p)
                    if m is not None:
                        yield e, p, m

    def shared_tables(self) -> dict[str, torch.Tensor]:
        pre = "sub1_dictionary_"
        return {k[len(pre):]: t for k, t in self._buffers.items() if k.startswith(pre)}

    def _sync(self) -> None:
        """Point `weights` (and the per-expert biases) at the current buffers: after `.to()`, after
        transformers' loader or an offload hook replaced them."""
        shared = self.shared_tables()
        key = []
        for e, p, m in self.packed_modules():
            self.weights[e][p] = m.packed(shared)
            key.extend(id(t) for t in m._buffers.values())
        for e, w in enumerate(self.weights):
            if w is not None:
                for p in PROJS:
                    if f"e{e}_{p}" in self._buffers:
                        w[p] = self._buffers[f"e{e}_{p}"]
        gub, db = self._buffers.get("gate_up_proj_bias"), self._buffers.get("down_proj_bias")
        if gub is not None and db is not None:
            self.biases = [{"gate": gub[e, 0::2], "up": gub[e, 1::2], "down": db[e]} for e in range(self.num_experts)]
            key += [id(gub), id(db)]
        key = tuple(key)
        if key != getattr(self, "_state_key", None):
            self._state_key, self._prepared = key, None  # stacked kernel operands follow the buffers

    def _apply(self, fn, recurse=True):
        for m in self.children():
            m._apply(fn)
        for k, t in list(self._buffers.items()):
            if t is None:
                continue
            new = fn(t)
            if k.startswith("sub1_dictionary_") and new.dtype != t.dtype:
                new = t.to(device=new.device)  # a decode table, not a compute tensor
            self._buffers[k] = new
        self._sync()
        return self

    def _adopt(self, prepared) -> None:
        """Resident once: re-point the per-expert buffers at views into the prepared (stacked) tensors, so
        the originals are freed and state_dict still sees every checkpoint-named tensor. A view holds the data
        it replaces, so it keeps that tensor's codec check mark (`carry_check`)."""
        mods = {(e, p): m for e, p, m in self.packed_modules()}
        for g in prepared.stage1 + prepared.stage2:
            for e, p, views in g.views():
                m = mods[(e, p)]
                for k, v in views.items():
                    if k in m._buffers and m._buffers[k].shape == v.shape and m._buffers[k].dtype == v.dtype:
                        m._buffers[k] = carry_check(m._buffers[k], v)
        self._state_key = None
        prep = self._prepared
        self._sync()
        self._prepared = prep

    def rotation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(gate/up signs (H,), down signs (I,)) of a rotated layer, else None."""
        s_x, s_h = self._buffers.get("rotation_gate_up"), self._buffers.get("rotation_down")
        return None if s_x is None else (s_x, s_h)

    def effective_weight(self, e: int, proj: str) -> torch.Tensor:
        """Expert e's proj as the dense (out, in) matrix it applies to unrotated inputs: decode(W') R when rotated."""
        w = self.weights[e][proj]
        w = decode(ensure_checked(w)) if isinstance(w, PackedTensor) else w
        rot = self.rotation()
        if rot is None:
            return w
        from .quant.hadamard import unrotate
        return unrotate(w.float(), rot[1] if proj == "down" else rot[0]).to(w.dtype)

    def set_dense(self, e: int, proj: str, weight: torch.Tensor) -> None:
        self.weights[e][proj] = weight
        self.register_buffer(f"e{e}_{proj}", weight, persistent=False)

    def expert_forward(self, e: int, x: torch.Tensor, xr: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T_e, H) -> (intermediate (T_e, I), output (T_e, H)), before the gate weight. A rotated layer
        takes xr = R_x x when the caller has it (rotated once per layer), else rotates x here."""
        w = self.weights[e]
        b = self.biases[e] if self.biases else {}
        rot = self.rotation()
        if rot is not None:
            from .quant.hadamard import rotate
            xr = rotate(x, rot[0]) if xr is None else xr
        xi = x if rot is None else xr
        h = self.glu(_linear(xi, w["gate"], b.get("gate")), _linear(xi, w["up"], b.get("up")))
        return h, _linear(h if rot is None else rotate(h, rot[1]), w["down"], b.get("down"))

    def _packed_only(self) -> bool:
        return all(w is None or all(isinstance(w[p], PackedTensor) for p in PROJS) for w in self.weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        capture = getattr(self, "capture", None)
        if capture is not None:  # calibration records the block's input and routing (passes/moe_cache.py)
            capture(hidden_states, top_k_index, top_k_weights)
            if not capture.compute_outputs:
                return hidden_states.new_zeros(hidden_states.shape)
        self._sync()
        if self.observer is None and self._packed_only() and use_triton(hidden_states):
            from .kernels import moe_experts_forward, prepare_experts  # grouped launches per format
            if getattr(self, "_prepared", None) is None:
                self._prepared = prepare_experts(self.weights, self.biases)
                self._adopt(self._prepared)
            return moe_experts_forward(hidden_states, top_k_index, top_k_weights, self._prepared, self.glu, self.biases,
                                       self.rotation())
        T, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the (token, slot) pairs by expert
        counts = torch.bincount(flat.clamp(0, self.num_experts), minlength=self.num_experts + 1)
        # each (token, slot) pair owns one row: plain writes, then a sum over the k slots (no index_add_)
        Y = hidden_states.new_zeros(T * k, hidden_states.shape[-1])
        rot = self.rotation()
        if rot is not None:  # the layer's input, rotated once for every expert's gate/up
            from .quant.hadamard import rotate
            xr_all = rotate(hidden_states, rot[0])
        start = 0
        for e, n in enumerate(counts.tolist()[: self.num_experts]):
            if n == 0:
                continue
            sel = order[start:start + n]
            start += n
            if self.weights[e] is None:
                continue
            tok = sel // k  # (n,) token of each routed pair
            x = hidden_states[tok]
            w = top_k_weights.reshape(-1)[sel]
            h, y = self.expert_forward(e, x, None if rot is None else xr_all[tok])
            if self.observer is not None:
                self.observer(e, tok, x, h, w)
            Y[sel] = (y * w[:, None].to(y.dtype)).to(Y.dtype)
        return Y.view(T, k, -1).sum(1)


class PackedLinear(PackedWeight):
    """A Linear whose weight stays packed (decoded on the fly like an expert's): how packed shared experts
    run. Its fields are persistent buffers under the checkpoint's names (`<module path>.<field>`); the
    bias is a dense parameter that follows the compute dtype."""

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None):
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight_packed(self) -> PackedTensor:
        return self.packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(x.reshape(-1, self.in_features), self.packed(), self.bias)  # the kernels take (rows, K)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {super().extra_repr()}"
