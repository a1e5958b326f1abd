"""Export a packed checkpoint to a format other tools run.

One format so far: "compressed-tensors" (`pack-quantized`, what llm-compressor writes, transformers loads and
vLLM serves), see compressed_tensors.py. What a format cannot represent is refused with a one-line
MoeCompressError naming it, before anything is written; output goes to `.<name>.partial` and is renamed at
the end, so a refused or failed export leaves nothing behind.
"""
from __future__ import annotations

from ..errors import MoeCompressError

FORMATS = ("compressed-tensors",)


def export_checkpoint(packed: str, out: str, format: str) -> dict:
    """Write packed checkpoint `packed` in `format` into `out`; -> a summary (sizes, scheme, warnings)."""
    if format not in FORMATS:
        raise MoeCompressError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    from .compressed_tensors import export_compressed_tensors
    return export_compressed_tensors(packed, out)
