"""Randomized Hadamard rotations of the experts' input dimension (incoherence processing).

W: (N, K) a projection, x: (K,) its input, s: (K,) random signs, Hd: (K, K) an orthonormal Hadamard matrix.
With R = Hd diag(s) (orthogonal),

    W x = (W R^T)(R x)

so the projection is quantized as W' = W R^T (GPTQ against the rotated Hessian H' = R H R^T) and decoded as
y = deq(W') (R x). The rotation spreads a few large weights (and activation outliers) over all of K before
rounding, which is where low-bit grids lose most (QuIP#, Tseng et al. 2024; QuaRot, Ashkboos et al. 2024).

Hd for any even K: block-diagonal, I_{K/b} (x) H_b, with b = K & -K the largest power of two dividing K and
H_b the Sylvester (Walsh-Hadamard, natural order) matrix scaled by 1/sqrt(b), so Hd is symmetric and
Hd^2 = I. Examples: 192 = 3 x 64 (b = 64), 384 = 3 x 128, 1408 = 11 x 128, 14336 = 7 x 2048, 4096 = one
block. Every block at least as wide as a quantization group of 64 mixes all of that group's columns, which
is what a per-group grid needs. Applied by the fast Walsh-Hadamard transform: log2(b) butterfly stages,
O(K log b) per vector, batched over any leading dimensions, never a (K, K) matrix.

The signs are data, stored in the packed checkpoint (int8, +-1): a seed would not reproduce them across
torch versions or devices. They are drawn once per (run seed, layer, stage) by a CPU torch.Generator seeded
from a hash of those three, so a run is reproducible from its options.
"""
from __future__ import annotations

import hashlib
import math

import torch

STAGES = ("gate_up", "down")  # one sign vector per MoE layer for each: gate/up share x, down takes h


def block_size(K: int) -> int:
    """The Hadamard block of width K: the largest power of two dividing K (1 for odd K: signs only)."""
    if K < 1:
        raise ValueError(f"width must be positive, got {K}")
    return K & -K


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Hd x along the last dimension (block-diagonal orthonormal Walsh-Hadamard, see the module docstring).

    x: (..., K) floating -> (..., K) same dtype. Butterfly i pairs elements j and j + 2^i within blocks of 2^(i+1)."""
    K = x.shape[-1]
    b = block_size(K)
    lead = x.shape[:-1]
    y = x.reshape(-1, K // b, b)  # (..., K) -> (M, K/b, b)
    h = 1
    while h < b:
        y = y.view(y.shape[0], K // b, b // (2 * h), 2, h)  # (M, K/b, b/2h, 2, h)
        a, c = y[:, :, :, 0], y[:, :, :, 1]
        y = torch.stack((a + c, a - c), dim=3)
        h *= 2
    return (y.reshape(*lead, K) * (1.0 / math.sqrt(b))).to(x.dtype)


def hadamard_matrix(K: int, dtype=torch.float64) -> torch.Tensor:
    """Hd as a dense (K, K) matrix (tests and small checks only)."""
    return fwht(torch.eye(K, dtype=dtype))  # rows of Hd^T = Hd (symmetric)


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R x = Hd (s * x) along the last dimension; computed in float32 (float64 stays), returned in x's dtype.
    Also W R^T for a weight W (N, K): each row w -> R w."""
    s = signs.to(device=x.device, dtype=_compute(x).dtype)
    return fwht(_compute(x) * s).to(x.dtype)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R^T y = s * (Hd y) along the last dimension: the inverse of `rotate`. Also W' R for W' (N, K): the
    effective unrotated weight of a rotated one."""
    s = signs.to(device=y.device, dtype=_compute(y).dtype)
    return (fwht(_compute(y)) * s).to(y.dtype)


def rotate_hessian(H: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R H R^T for symmetric H: (..., K, K) (a batch of Hessians), in H's dtype."""
    A = rotate(H, signs)  # H R^T: every row h -> R h
    return rotate(A.transpose(-1, -2), signs).transpose(-1, -2).contiguous()  # R (H R^T)


def _seed(seed: int, layer: int, stage: str) -> int:
    digest = hashlib.sha256(f"moecompress-rotation:{int(seed)}:{int(layer)}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_signs(K: int, seed: int, layer: int, stage: str) -> torch.Tensor:
    """(K,) int8 in {-1, +1}, deterministic in (seed, layer, stage) on the CPU."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    g = torch.Generator(device="cpu").manual_seed(_seed(seed, layer, stage))
    return (torch.randint(0, 2, (K,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.int8)


def check_signs(signs, K: int) -> str | None:
    """Why `signs` is not a valid stored sign vector of width K, or None."""
    if not isinstance(signs, torch.Tensor) or signs.dtype != torch.int8 or tuple(signs.shape) != (K,):
        got = f"{signs.dtype} {list(signs.shape)}" if isinstance(signs, torch.Tensor) else type(signs).__name__
        return f"should be int8 [{K}], found {got}"
    if signs.device.type != "meta" and not bool(((signs == 1) | (signs == -1)).all()):
        return "holds values other than +1 and -1"
    return None
