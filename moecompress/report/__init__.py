"""`moecompress report`: a compressed checkpoint and its original side by side.

build.py assembles report.json from sizes.py (bytes by component from the safetensors headers and the
manifest), accuracy.py (perplexity through `api.evaluate`, greedy generations, optional lm-eval) and
records.py (the run records: calibration, timing, merge); plots.py draws the PNGs (matplotlib, Agg)
and html.py writes report.md and a self-contained report.html. Nothing is imported until used.
"""
from __future__ import annotations


def build_report(*args, **kwargs):
    from .build import build_report as _build
    return _build(*args, **kwargs)


__all__ = ["build_report"]
