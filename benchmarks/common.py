"""What the fixture benchmarks share: the shared fixture's paths and four evaluation domains, the
--model/--calib arguments, one quantize -> evaluate step, and the paired-difference statistic.

The scripts run as `python benchmarks/NAME.py`, so this directory is on sys.path and `import common`
finds this module; it puts the project root on sys.path too, for running from a checkout.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "..", "shared", "fixtures")
MODEL = os.path.join(FIX, "mixtral-wiki4")
CALIB_PROSE = os.path.join(FIX, "text", "calib_prose.txt")
CALIB_MIX = os.path.join(FIX, "text", "calib_mix.txt")
DOMAINS = ("prose", "verse", "c", "python")
sys.path.insert(0, os.path.join(HERE, ".."))


def moecompress(*args) -> float:
    """Run `moecompress -q ARGS...` as a child process (the interpreter running the benchmark), echoing the
    command; a failure raises CalledProcessError. -> wall seconds."""
    import subprocess
    import time
    args = [str(a) for a in args]
    print("+ moecompress " + " ".join(args), flush=True)
    t = time.time()
    subprocess.run([sys.executable, "-m", "moecompress.cli", "-q", *args], check=True)
    return time.time() - t


def domain_texts() -> list[str]:
    """The four domains' test texts, in DOMAINS order."""
    return [os.path.join(FIX, "text", f"{d}_test.txt") for d in DOMAINS]


def add_fixture_args(ap, calib: bool = True) -> None:
    """--model (default: the trained fixture) and, with calib, --calib (default: its prose text)."""
    ap.add_argument("--model", default=MODEL)
    if calib:
        ap.add_argument("--calib", default=CALIB_PROSE)


def quantize_and_evaluate(model: str, config, out: str, max_tokens: int) -> list[float]:
    """Quantize `model` with QuantizeConfig `config` into `out`, evaluate it on the four domains' test
    texts (max_tokens each), delete `out`; -> perplexities in DOMAINS order."""
    from moecompress import api
    api.quantize(model, out, config, progress=False)
    try:
        ev = api.evaluate(out, domain_texts(), max_tokens=max_tokens, progress=False)
    finally:
        shutil.rmtree(out)
    return [r["perplexity"] for r in ev.values()]


def mean_se(d: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan for a single value)."""
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
