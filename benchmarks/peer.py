"""llm-compressor as the peer of the benchmarks (scale.py, quality.py): its virtual environment, the token
windows both tools calibrate on, the timed child process, and what its checkpoints store.

llm-compressor pins another transformers, so it runs in its own virtual environment (default
/work/llmc-venv, created under a lock if missing) as a child process: benchmarks/scale_peer.py, which
imports nothing from moecompress. It calibrates on the exact windows moecompress draws for the same
arguments (`moecompress.api.calibration_windows`), handed over as a safetensors file of (N, L) int64
`input_ids`. This module is imported from the benchmark scripts (this directory is on sys.path).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
PEER_VENV = "/work/llmc-venv"
# what llm-compressor's pack-quantized format stores per quantized Linear (weight_shape, 2 int64, is metadata)
CT_STORED = ("weight_packed", "weight_scale", "weight_zero_point")


def run_child(cmd: list[str], log: str, env: dict, cwd: str = ROOT, limit: float | None = None) -> dict:
    """Run cmd to completion (or until `limit` seconds, then kill it: "stopped") with stdout+stderr to `log`:
    wall seconds, exit code, its peak RSS in bytes."""
    t0 = time.perf_counter()
    stopped = False
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG if limit else 0)
            if pid:
                break
            if time.perf_counter() - t0 > limit:
                stopped = True
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(1)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - t0, "rc": p.returncode, "peak_rss_bytes": ru.ru_maxrss * 1024,
            "stopped": stopped}


def tail(log: str, n: int = 6) -> str:
    with open(log, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def ensure_peer_venv(venv: str = PEER_VENV) -> str | None:
    """The peer's python, creating the venv (under flock, shared with other users) if missing; None and a
    printed reason when it cannot be made."""
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import llmcompressor, transformers, datasets"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.path.exists(py) and subprocess.run(probe, capture_output=True, env=env, cwd="/").returncode == 0:
        return py
    print(f"creating {venv} (torch==2.13.0 + llmcompressor) ...", flush=True)
    script = (f"if ! {py} -c 'import llmcompressor' 2>/dev/null; then python3 -m venv {venv} && "
              f"{venv}/bin/pip install -q torch==2.13.0 llmcompressor; fi")
    r = subprocess.run(["flock", "/tmp/llmc-venv.lock", "bash", "-c", script], capture_output=True, text=True,
                       env=env, cwd="/")
    if r.returncode != 0 or subprocess.run(probe, capture_output=True, env=env, cwd="/").returncode != 0:
        print(f"llm-compressor skipped: could not create {venv}: {(r.stderr or r.stdout).strip()[-300:]}")
        return None
    return py


def run_peer(py: str, ckpt: str, out: str, windows_file: str, a, env: dict, limit: float | None = None,
             dense: str | None = None) -> dict:
    """llm-compressor in its own venv (nothing of this checkout on its path: PYTHONPATH dropped) at a.bits,
    a.group_size on a.device; with `dense`, also a dense fp32 copy of its result there (scale_peer.py)."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    cmd = [py, os.path.join(HERE, "scale_peer.py"), ckpt, "--out", out, "--windows", windows_file,
           "--bits", str(a.bits), "--group-size", str(a.group_size), "--device", a.device,
           "--result", out + ".json"]
    if dense:
        cmd += ["--dense", dense]
        shutil.rmtree(dense, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    r = run_child(cmd, out + ".log", env, cwd=os.path.dirname(out), limit=limit)
    r["cmd"] = " ".join(cmd)
    r["log"] = out + ".log"
    r["result"] = json.load(open(out + ".json")) if os.path.exists(out + ".json") else {}
    return r


def write_windows(ckpt: str, a, path: str) -> None:
    """moecompress's own calibration windows for a.calib (one path or a list), a.nsamples, a.seqlen, a.seed
    (its default random sampler: what `moecompress quantize` calibrates on), as int64 input_ids in a
    safetensors file."""
    from safetensors.torch import save_file
    from moecompress.api import calibration_windows
    from moecompress.config import CalibConfig
    sources = tuple(a.calib) if isinstance(a.calib, (list, tuple)) else (a.calib,)
    w = calibration_windows(ckpt, CalibConfig(sources=sources, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed))
    save_file({"input_ids": w.contiguous()}, path)


def expert_params(ckpt: str) -> int:
    """Weights of the routed and shared expert projections of an original checkpoint (what both tools
    quantize): the numel of its tensors named `...experts.<e>.<proj>.weight` or `...shared_expert(s)...weight`."""
    from safetensors import safe_open
    n = 0
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, f), "pt") as s:
                for k in s.keys():
                    if re.search(r"(\.experts\.\d+\.|\.shared_experts?\.)\w+\.weight$", k):
                        shape = s.get_slice(k).get_shape()
                        n += shape[0] * shape[1]
    return n


def ct_expert_bytes(out: str) -> int:
    """Bytes llm-compressor's compressed-tensors checkpoint stores for its quantized Linears: every
    weight_packed, weight_scale and weight_zero_point tensor on disk (weight_shape, two int64 per Linear,
    is left out as metadata)."""
    from safetensors import safe_open
    total = 0
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), "pt") as s:
                for k in s.keys():
                    if k.rsplit(".", 1)[-1] in CT_STORED:
                        sl = s.get_slice(k)
                        numel = 1
                        for d in sl.get_shape():
                            numel *= d
                        total += numel * {"I32": 4, "BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1,
                                          "I64": 8}[sl.get_dtype()]
    return total
