"""Backend choice and per-codec dispatch for packed matmuls.

`backend(device)` is "triton" or "torch": MOECOMPRESS_KERNELS=torch|triton forces one, otherwise
Triton on CUDA tensors (when triton imports) and the torch reference on the CPU. With
TRITON_INTERPRET=1 and MOECOMPRESS_KERNELS=triton the Triton kernels run on CPU tensors (that is how
the tests check them). Codecs map to kernels through two fixed tables; a codec without a kernel falls
back to the torch reference (decode, then matmul), so new codecs (ternary, sub1) slot in by adding
one entry per table (int, ternary and sub1 all have both).

Validation is once per tensor: `_check_packed` runs the codec's check only on a PackedTensor that has
not passed it (`moecompress.codecs.ensure_checked`; the loader checks every tensor it reads), so a
call on a checked tensor does host-side shape and dtype comparisons only: no device work, no sync.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from moecompress.codecs import PackedTensor, decode as reference_decode, ensure_checked
from moecompress.errors import MoeCompressError

ENV = "MOECOMPRESS_KERNELS"
_log = logging.getLogger(__name__)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    if not triton_available():
        return False
    import triton
    return bool(triton.knobs.runtime.interpret)


def backend(device: torch.device | str | None = None) -> str:
    """"triton" or "torch" for tensors on `device` (env MOECOMPRESS_KERNELS=torch|triton forces one)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise MoeCompressError(f"{ENV}={forced!r} is not a kernel backend; set it to 'torch', 'triton' or unset it")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise MoeCompressError(f"{ENV}=triton but triton is not importable; pip install triton or set {ENV}=torch")
        return "triton"
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "triton" if on_cuda and triton_available() else "torch"


def _check_triton_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise MoeCompressError(f"Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run "
                               f"them on the CPU or {ENV}=torch to use the torch reference")


# ---- per-codec kernel tables (lazy imports: triton is only needed when a kernel runs)

def _int_linear(x, packed):
    from .intq_triton import packed_linear_int
    return packed_linear_int(x, packed)


def _int_decode(packed):
    from .intq_triton import decode_int
    return decode_int(packed)


def _ternary_linear(x, packed):
    from .ternary_triton import packed_linear_ternary
    return packed_linear_ternary(x, packed)


def _ternary_decode(packed):
    from .ternary_triton import decode_ternary
    return decode_ternary(packed)


def _sub1_linear(x, packed):
    from .sub1_triton import packed_linear_sub1
    return packed_linear_sub1(x, packed)


def _sub1_decode(packed):
    from .sub1_triton import decode_sub1
    return decode_sub1(packed)


TRITON_LINEAR = {"int": _int_linear, "ternary": _ternary_linear, "sub1": _sub1_linear}
TRITON_DECODE = {"int": _int_decode, "ternary": _ternary_decode, "sub1": _sub1_decode}


def _check_packed(packed: PackedTensor) -> None:
    """The codec's check, unless this tensor already passed it (then host metadata only)."""
    ensure_checked(packed)


def decode(packed: PackedTensor) -> torch.Tensor:
    """(N, K) float32 weight, decoded by the Triton kernel of its codec (equal bit for bit to the reference)."""
    _check_packed(packed)
    fn = TRITON_DECODE.get(packed.codec)
    if fn is None:
        raise MoeCompressError(f"no Triton decode kernel for codec {packed.codec!r}; use moecompress.codecs.decode")
    _check_triton_device(next(iter(packed.tensors.values())))
    return fn(packed)


def decode_int(packed: PackedTensor) -> torch.Tensor:
    """Triton decode of an "int" PackedTensor: (N, K) float32."""
    if packed.codec != "int":
        raise MoeCompressError(f"decode_int needs an 'int' PackedTensor, got codec {packed.codec!r}")
    return decode(packed)


def reference_linear(x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """The torch reference: x.float() @ decode(packed).T, cast back to x's dtype."""
    w = reference_decode(packed).to(x.device)
    return (x.float() @ w.T).to(x.dtype)


def packed_linear(x: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """y = x @ W^T with W packed: x (B, K) 16-bit or fp32 -> (B, N) in x's dtype."""
    _check_packed(packed)
    N, K = packed.shape
    if x.dim() != 2 or x.shape[1] != K:
        raise MoeCompressError(f"packed_linear: x must be (batch, {K}) for a ({N}, {K}) weight, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise MoeCompressError(f"packed_linear: x must be float16, bfloat16 or float32, got {x.dtype}")
    wdev = packed.device
    if wdev != x.device:
        raise MoeCompressError(f"packed_linear: x is on {x.device} but the packed weight is on {wdev}; move one of them")
    if backend(x.device) == "torch":
        return reference_linear(x, packed)
    fn = TRITON_LINEAR.get(packed.codec)
    if fn is None:
        _warn_fallback(packed.codec)
        return reference_linear(x, packed)
    _check_triton_device(x)
    if x.shape[0] == 0:
        return x.new_zeros((0, N))
    return fn(x, packed)


@functools.cache
def _warn_fallback(codec: str) -> None:
    _log.warning("no Triton kernel for codec %r yet: decoding it densely with the torch reference", codec)
