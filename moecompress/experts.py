"""`MoEExperts`: a drop-in replacement for a family's fused experts module.

transformers v5 calls a MoE block's experts as `experts(hidden_states (T, H), top_k_index (T, k),
top_k_weights (T, k)) -> (T, H)`. This module computes the same thing from canonical per-expert
weights, each either a dense (out, in) tensor or a `PackedTensor` decoded on the fly, only for experts
that received tokens:

    y = sum_{j < k} w_tj * down_e( glu(gate_e(x_t), up_e(x_t)) ),  e = top_k_index[t, j]

An optional observer sees each expert's routed inputs, intermediate activations and gate weights (that
is how calibration collects Hessians and routing statistics without a second copy of the math).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .arch import PROJS
from .codecs import PackedTensor, decode


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
        else:
            y = F.linear(x, decode(w).to(device=x.device, dtype=x.dtype))
    else:
        y = F.linear(x, w.to(x.dtype))
    return y if bias is None else y + bias.to(y.dtype)


class MoEExperts(nn.Module):
    """weights[e] is {"gate", "up", "down"} -> Tensor | PackedTensor, or None for an expert that is gone."""

    def __init__(self, weights: list[dict | None], glu: Callable, biases: list[dict] | None = None):
        super().__init__()
        self.num_experts = len(weights)
        self.weights = weights
        self.biases = biases
        self.glu = glu
        self.observer: Observer | None = None
        self._register()

    def _register(self):
        # Register every tensor as a non-persistent buffer so .to(device) moves packed data too.
        for e, w in enumerate(self.weights):
            if w is None:
                continue
            for p in PROJS:
                v = w[p]
                if isinstance(v, PackedTensor):
                    for k, t in v.tensors.items():
                        self.register_buffer(f"e{e}_{p}_{k}", t, persistent=False)
                else:
                    self.register_buffer(f"e{e}_{p}", v, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._prepared = None  # stacked kernel operands follow the buffers
        for e, w in enumerate(self.weights):  # re-point the dicts at the moved buffers
            if w is None:
                continue
            for p in PROJS:
                v = w[p]
                if isinstance(v, PackedTensor):
                    v.tensors = {k: getattr(self, f"e{e}_{p}_{k}") for k in v.tensors}
                else:
                    w[p] = getattr(self, f"e{e}_{p}")
        return self

    def set_dense(self, e: int, proj: str, weight: torch.Tensor) -> None:
        self.weights[e][proj] = weight
        self.register_buffer(f"e{e}_{proj}", weight, persistent=False)

    def expert_forward(self, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (T_e, H) -> (intermediate (T_e, I), output (T_e, H)), before the gate weight."""
        w = self.weights[e]
        b = self.biases[e] if self.biases else {}
        h = self.glu(_linear(x, w["gate"], b.get("gate")), _linear(x, w["up"], b.get("up")))
        return h, _linear(h, w["down"], b.get("down"))

    def _packed_only(self) -> bool:
        return all(w is None or all(isinstance(w[p], PackedTensor) for p in PROJS) for w in self.weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.observer is None and self._packed_only() and use_triton(hidden_states):
            from .kernels import moe_experts_forward, prepare_experts  # grouped launches per format
            if getattr(self, "_prepared", None) is None:
                self._prepared = prepare_experts(self.weights, self.biases)
            return moe_experts_forward(hidden_states, top_k_index, top_k_weights, self._prepared, self.glu, self.biases)
        T, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # group the (token, slot) pairs by expert
        counts = torch.bincount(flat.clamp(0, self.num_experts), minlength=self.num_experts + 1)
        # each (token, slot) pair owns one row: plain writes, then a sum over the k slots (no index_add_)
        Y = hidden_states.new_zeros(T * k, hidden_states.shape[-1])
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
            h, y = self.expert_forward(e, x)
            if self.observer is not None:
                self.observer(e, tok, x, h, w)
            Y[sel] = (y * w[:, None].to(y.dtype)).to(Y.dtype)
        return Y.view(T, k, -1).sum(1)


class PackedLinear(nn.Module):
    """A Linear whose weight stays packed (a `PackedTensor`, decoded on the fly like an expert's): how
    `moecompress.load` runs quantized shared experts."""

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_packed = weight
        for k, t in weight.tensors.items():
            self.register_buffer(f"w_{k}", t, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.weight_packed.tensors = {k: getattr(self, f"w_{k}") for k in self.weight_packed.tensors}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _linear(x.reshape(-1, self.in_features), self.weight_packed, self.bias)  # the kernels take (rows, K)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        codec = f"{self.weight_packed.codec}{self.weight_packed.attrs.get('bits', '')}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {codec}"
