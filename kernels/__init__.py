"""Triton decode kernels (installed as moecompress.kernels).

Public API (nothing here imports triton; kernels load on first use):

    backend(device) -> "triton" | "torch"         MOECOMPRESS_KERNELS=torch|triton forces one
    packed_linear(x (B, K), packed) -> (B, N)     y = x @ W^T without a dense W (x's dtype)
    decode(packed), decode_int(packed) -> (N, K)  Triton decode, bit-exact with codecs.decode
    prepare_experts(experts, biases) -> PreparedExperts     group by format and stack, once per layer
    moe_experts_forward(hidden, top_k_index, top_k_weights, experts, glu, biases, rotation) -> (T, H)
    moe_reference(...)                            the torch reference of the same

Kernels accelerate the codecs' torch reference, they never define it; tests run them on the CPU under
TRITON_INTERPRET=1 (and compile every variant for sm_90 without a GPU), and on CUDA in tests/test_cuda.py.
A PackedTensor is validated by its codec once (`moecompress.codecs.ensure_checked`); with prepared
experts the MoE forward on the Triton path does not synchronise with the host.
"""
from __future__ import annotations

import sys


def _hand_over() -> None:
    """Imported as a top-level `kernels` (the checkout on sys.path: `python -m pytest`, a script or REPL in
    the project root), this folder would shadow Hugging Face's `kernels` package, which transformers
    (5.25 on) requires and imports from its activations module: every model load would fail with
    "cannot import name 'CUDAProperties' from 'kernels'". So load the installed package from the path
    without the checkout and leave it in sys.modules, which the import statement then returns. Without
    an installed `kernels` nothing happens (transformers only imports it when it is installed)."""
    import importlib.machinery
    import importlib.util
    import os
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    # Only the entries that name the checkout's root itself find this folder. Entries below it must stay:
    # a virtual environment in the checkout (.venv, as CI makes it) has its site-packages there.
    def is_root(p: str) -> bool:
        return os.path.realpath(p or os.curdir) == root
    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if not is_root(p)])
    if spec is None or spec.loader is None:
        return
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _hand_over()


def backend(device=None) -> str:
    from .dispatch import backend as _backend
    return _backend(device)


def packed_linear(x, packed):
    from .dispatch import packed_linear as _fn
    return _fn(x, packed)


def decode(packed):
    from .dispatch import decode as _fn
    return _fn(packed)


def decode_int(packed):
    from .dispatch import decode_int as _fn
    return _fn(packed)


def prepare_experts(experts, biases=None):
    from .moe import prepare_experts as _fn
    return _fn(experts, biases)


def moe_experts_forward(hidden, top_k_index, top_k_weights, experts, glu=None, biases=None, rotation=None):
    from .moe import moe_experts_forward as _fn
    return _fn(hidden, top_k_index, top_k_weights, experts, glu, biases, rotation)


def moe_reference(hidden, top_k_index, top_k_weights, experts, glu=None, biases=None, rotation=None):
    from .moe import moe_reference as _fn
    return _fn(hidden, top_k_index, top_k_weights, experts, glu, biases, rotation)


__all__ = ["backend", "packed_linear", "decode", "decode_int", "prepare_experts", "moe_experts_forward",
           "moe_reference"]
