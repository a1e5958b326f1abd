"""Codecs: plain data plus pure functions.

A `PackedTensor` is a codec name, the logical (N, K) shape of the weight it stands for, a dict of
named tensors and a dict of JSON-able attributes. A codec is registered under a fixed name with
`encode`, `decode` and `nbytes`; decoding looks the name up in this registry, so nothing is ever
unpickled or imported by name from a file. `nbytes(shape, spec)` works from shapes alone, so the bit
allocator prices every option in real bytes (scales, zeros and dictionaries included).

Convention: weights are (N, K) = (out_features, in_features), as in `nn.Linear`; groups run along K.
"""
from __future__ import annotations

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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec(Protocol):
    name: str

    def validate(self, spec: QuantSpec) -> None: ...

    def nbytes(self, shape: tuple[int, int], spec: QuantSpec) -> int: ...

    def decode(self, packed: PackedTensor) -> torch.Tensor: ...

    def check(self, packed: PackedTensor) -> None: ...


CODECS: dict[str, Codec] = {}


def register_codec(cls):
    """Class decorator: instantiate and register a codec under `cls.name`."""
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


def decode(packed: PackedTensor) -> torch.Tensor:
    """The reference decode: (N, K) float32 weight. Kernels must match it exactly."""
    return get_codec(packed.codec).decode(packed)


def nbytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    return get_codec(spec.codec).nbytes(tuple(shape), spec)

