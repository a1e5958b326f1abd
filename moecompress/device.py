"""Where the work runs (`--device auto|cpu|cuda|cuda:N`) and how much working memory it may use.

Budgets come from the free memory of the device (CUDA: `torch.cuda.mem_get_info`) and of the host
(`MemAvailable` in /proc/meminfo), never from fixed constants, so a run adapts to the machine. What a
budget decides (how many experts' Hessians are in flight at once, whether calibration activations stay
on the device or spill to pinned host memory) never changes the bytes written: see passes/pipeline.py.

`MOECOMPRESS_WORKSPACE` (bytes, e.g. 2e9) caps every budget: for tests and for sharing a machine.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from .errors import MoeCompressError

log = logging.getLogger("moecompress")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
WORKSPACE_FRACTION = 0.6  # share of free memory a run plans to use for working sets


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """A `--device` value -> torch.device. auto: CUDA when available (the process's local rank's GPU under
    torchrun), else the CPU. Asking for CUDA where there is none is a one-line error."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", (local_rank or 0) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise MoeCompressError(f"--device {spec!r}: choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise MoeCompressError(f"--device {spec}: CUDA is not available ({why}); use --device cpu or auto")
    n = torch.cuda.device_count()
    if m.group(1) is not None:
        idx = int(m.group(1))
        if idx >= n:
            raise MoeCompressError(f"--device {spec}: this machine has {n} CUDA device{'s' if n != 1 else ''} (0-{n - 1})")
        return torch.device("cuda", idx)
    return torch.device("cuda", (local_rank or 0) % n)


def host_available_bytes() -> int:
    """MemAvailable of the host (Linux), else a conservative 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def _cap() -> int | None:
    v = os.environ.get("MOECOMPRESS_WORKSPACE")
    if not v:
        return None
    try:
        return max(1, int(float(v)))
    except ValueError:
        raise MoeCompressError(f"MOECOMPRESS_WORKSPACE={v!r}: give a number of bytes, e.g. 2e9") from None


def free_bytes(device: torch.device) -> int:
    """Free memory of `device` now (the host's for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def workspace_bytes(device: torch.device) -> int:
    """The working-memory budget of the next step on `device`: a share of its free memory (capped by
    MOECOMPRESS_WORKSPACE)."""
    budget = int(WORKSPACE_FRACTION * free_bytes(device))
    cap = _cap()
    return min(budget, cap) if cap is not None else budget


class Placer:
    """Puts activations on `device` while `budget` bytes last, then in pinned host memory (CUDA), from
    which each micro-batch is copied to the device when used. `spilled` counts the bytes sent to the host."""

    def __init__(self, device: torch.device, budget: int):
        self.device, self.left, self.spilled = device, budget, 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        if self.device.type != "cuda" or n <= self.left:
            self.left -= n
            return t.to(self.device)
        if not self.spilled:
            log.warning("activations exceed the free memory of %s: the rest are kept in pinned host memory", self.device)
        self.spilled += n
        return t.to("cpu").pin_memory()


def peak_rss_bytes() -> int:
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def peak_device_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def tensor_nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
