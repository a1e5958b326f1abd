"""Codecs: plain data plus pure functions.

A `PackedTensor` is a codec name, the logical (N, K) shape of the weight it stands for, a dict of
named tensors and a dict of JSON-able attributes. A codec is registered under a fixed name with
`encode`, `decode` and `nbytes`; decoding looks the name up in this registry, so nothing is ever
unpickled or imported by name from a file. `nbytes(shape, spec)` works from shapes alone, so the bit
allocator prices every option in real bytes (scales, zeros and dictionaries included).

Convention: weights are (N, K) = (out_features, in_features), as in `nn.Linear`; groups run along K.

Devices: every `decode` runs in torch ops on the packed tensors' own device (CPU, CUDA, or "meta" for
shapes alone), with no host synchronisation; tables a codec needs (sub1's expansion table) are built
once from the stored bytes and cached per device. `encode` takes tensors on any device.

Checked once: `Codec.check` validates a PackedTensor against its claimed shape and attributes (data
included: offsets, codeword indices), which can cost a host sync. A successful check records the
tensor's metadata signature in `packed.checked` and, with one token shared by the siblings, on each of
its stored tensors (`register_codec` wraps every codec's `check` so). `ensure_checked` re-runs the
check only when the signature changed (tensors swapped for others of another shape or dtype,
attributes edited) or the tensors do not carry one check's marks: the loader checks at load, and
kernels trust what it checked, also through a new PackedTensor made over the same tensors (module
state rebuilds them). `PackedTensor.to` keeps a tensor checked (so does `carry_check` for a tensor moved
on its own); casting its scales does not.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import MoeCompressError, PackedFormatError


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is stored: codec name, bit width, group size and codec options.

    bits is the nominal width (2, 3, 4, 8 for "int"; 1 for the ternary codecs, whose real size comes
    from nbytes). group_size runs along the input dimension K and must divide it.
    """

    codec: str = "int"
    bits: int = 4
    group_size: int = 64
    options: tuple = ()  # codec-specific (key, value) pairs, hashable and JSON-able

    def __post_init__(self):
        if self.codec not in CODECS:
            _load_builtin_codecs()
        if self.codec not in CODECS:
            raise MoeCompressError(f"unknown codec {self.codec!r}; known: {', '.join(sorted(CODECS))}")
        CODECS[self.codec].validate(self)

    def option(self, key, default=None):
        return dict(self.options).get(key, default)

    def to_json(self) -> dict:
        return {"codec": self.codec, "bits": self.bits, "group_size": self.group_size, "options": dict(self.options)}

    @staticmethod
    def from_json(d: dict) -> "QuantSpec":
        return QuantSpec(d["codec"], int(d["bits"]), int(d["group_size"]), tuple(sorted(d.get("options", {}).items())))

    @property
    def label(self) -> str:
        if self.codec in ("sub1", "ternary"):  # always one trit per weight: the name says it
            return self.codec + (f"g{self.group_size}" if self.group_size else "")
        return f"{self.codec}{self.bits}" + (f"g{self.group_size}" if self.group_size else "")


@dataclass
class PackedTensor:
    """A weight in packed form: codec name, logical (N, K) shape, named tensors, attributes."""

    codec: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    attrs: dict = field(default_factory=dict)
    checked: tuple | None = field(default=None, repr=False, compare=False)  # signature() when check() passed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device, non_blocking: bool = False) -> "PackedTensor":
        """A copy with every tensor on `device` (dtypes kept); a checked tensor stays checked."""
        return PackedTensor(self.codec, self.shape, {k: carry_check(t, t.to(device, non_blocking=non_blocking))
                                                     for k, t in self.tensors.items()}, dict(self.attrs), self.checked)


class Codec(Protocol):
    name: str

    def validate(self, spec: QuantSpec) -> None: ...

    def nbytes(self, shape: tuple[int, int], spec: QuantSpec) -> int: ...

    def decode(self, packed: PackedTensor) -> torch.Tensor: ...

    def check(self, packed: PackedTensor) -> None: ...


CODECS: dict[str, Codec] = {}


def signature(packed: PackedTensor) -> tuple:
    """What a check depends on besides the data: codec, shape, attributes, every tensor's name, shape and
    dtype (host metadata only: no device work). The device is left out: moving keeps the data."""
    return (packed.codec, tuple(packed.shape), repr(sorted(packed.attrs.items())),
            tuple(sorted((k, tuple(t.shape), t.dtype) for k, t in packed.tensors.items())))


MARK = "_moecompress_checked"  # tensor attribute: (signature, token) of the check that passed on it
SHARED_FIELDS = ("dictionary",)  # shared by many PackedTensors (tied to each by its content id in check)


def is_checked(packed: PackedTensor) -> bool:
    """True when `check` passed on this PackedTensor, or on one made of the very same tensors, and nothing
    it depends on changed since (host metadata only)."""
    sig = signature(packed)
    if packed.checked is not None and packed.checked == sig:
        return True
    marks = [getattr(t, MARK, None) for k, t in packed.tensors.items() if k not in SHARED_FIELDS]
    if not marks or marks[0] is None or marks[0][0] != sig or any(m != marks[0] for m in marks):
        return False
    packed.checked = sig
    return True


def mark_checked(packed: PackedTensor) -> None:
    """Record that `packed` passed its codec's check (on it and on its tensors, one token for all)."""
    sig = signature(packed)
    packed.checked = sig
    mark = (sig, object())
    for k, t in packed.tensors.items():
        if k not in SHARED_FIELDS:
            setattr(t, MARK, mark)


def carry_check(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst = src moved (same data, shape and dtype): dst keeps src's check mark. For module state that
    moves each stored tensor on its own (Module._apply); PackedTensor.to does it for all of them."""
    mark = getattr(src, MARK, None)
    if mark is not None and dst is not src and dst.dtype == src.dtype and dst.shape == src.shape:
        setattr(dst, MARK, mark)
    return dst


def _marking(check):
    @functools.wraps(check)
    def checked(self, packed: PackedTensor) -> None:
        packed.checked = None
        check(self, packed)
        mark_checked(packed)
    return checked


def register_codec(cls):
    """Class decorator: instantiate and register a codec under `cls.name`; its `check` marks what passed."""
    cls.check = _marking(cls.check)
    CODECS[cls.name] = cls()
    return cls


def _load_builtin_codecs():
    # Imported lazily (no work at import); each module registers itself.
    from . import intq  # noqa: F401
    try:
        from . import ternary  # noqa: F401
    except ImportError:
        pass


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        _load_builtin_codecs()
    if name not in CODECS:
        raise PackedFormatError(f"unknown codec {name!r} (known: {', '.join(sorted(CODECS))})")
    return CODECS[name]


def ensure_checked(packed: PackedTensor) -> PackedTensor:
    """Run the codec's check unless it already passed on this tensor (see the module docstring)."""
    if not isinstance(packed, PackedTensor):
        raise MoeCompressError(f"expected a PackedTensor, got {type(packed).__name__}; pack the weight with a codec first")
    if not is_checked(packed):
        get_codec(packed.codec).check(packed)
        mark_checked(packed)  # also for a codec registered without register_codec
    return packed


def decode(packed: PackedTensor) -> torch.Tensor:
    """The reference decode: (N, K) float32 weight. Kernels must match it exactly."""
    return get_codec(packed.codec).decode(packed)


def nbytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    return get_codec(spec.codec).nbytes(tuple(shape), spec)

