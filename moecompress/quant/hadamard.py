"""Randomized Hadamard rotations of the experts' input dimension (incoherence processing).

W: (N, K) a projection, x: (K,) its input, s: (K,) random signs, Hd: (K, K) an orthonormal Hadamard matrix.
With R = Hd diag(s) (orthogonal),

    W x = (W R^T)(R x)

so the projection is quantized as W' = W R^T (GPTQ against the rotated Hessian H' = R H R^T) and decoded as
y = deq(W') (R x). The rotation spreads a few large weights (and activation outliers) over all of K before
rounding, which is where low-bit grids lose most (QuIP#, Tseng et al. 2024; QuaRot, Ashkboos et al. 2024).

Hd (construction "paley-sylvester"), K = m 2^a with m odd: a full-width Hadamard matrix whenever one is at
hand, as a Kronecker product Hd = A (x) S_b / sqrt(b) with S_b the Sylvester (Walsh-Hadamard, natural
order) matrix of a power of two b, and A = P_n / sqrt(n) a Paley matrix of order n = m 2^j (the smallest
j >= 0 with n >= 4 for which Paley's construction I (n - 1 prime, = 3 mod 4) or II (n/2 - 1 prime,
= 1 mod 4) exists, as QuIP# uses), K = n b. Examples: 4096 = S_4096; 192 = P_12 (x) S_16; 384 = P_12 (x) S_32;
1408 = P_44 (x) S_32; 14336 = P_28 (x) S_512 (II); 2880 = P_180 (x) S_16. Otherwise (no Paley order fits) a
block-diagonal Hd = I_m (x) S_b / sqrt(b), b = K & -K the largest power of two dividing K. Applied without a
(K, K) matrix: log2(b) butterfly stages (fast Walsh-Hadamard transform) and an (n, n) product, O(K (log b + n))
per vector, batched over any leading dimensions. (On the demo model at 2 bits, 3 seeds, the full-width
construction beat the block-diagonal one, I_3 (x) S_64 at K = 192, in C and matched it elsewhere.)

The signs are data, stored in the packed checkpoint (int8, +-1): a seed would not reproduce them across
torch versions or devices. They are drawn once per (run seed, layer, stage) by a CPU torch.Generator seeded
from a hash of those three, so a run is reproducible from its options.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import torch

STAGES = ("gate_up", "down")  # one sign vector per MoE layer for each: gate/up share x, down takes h
CONSTRUCTION = "paley-sylvester"  # recorded in the manifest: a decoder must build the same Hd


def block_size(K: int) -> int:
    """The Hadamard block of width K: the largest power of two dividing K (1 for odd K: signs only)."""
    if K < 1:
        raise ValueError(f"width must be positive, got {K}")
    return K & -K


def _prime(p: int) -> bool:
    return p > 2 and all(p % d for d in range(3, int(p ** 0.5) + 1, 2)) and p % 2 == 1


@lru_cache(maxsize=None)
def paley(n: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order n (P P^T = n I, float64) by Paley's construction I or II, or None."""
    def residues(q):  # Jacobsthal matrix Q_ij = chi(j - i), chi the quadratic character mod prime q
        chi = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
        return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    q = n - 1
    if _prime(q) and q % 4 == 3:  # I: I + [[0, 1^T], [-1, Q]] (Q skew)
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, residues(q)
        return S + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _prime(q) and q % 4 == 1:  # II: C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
        C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, residues(q)
        A = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        B = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)
    return None


@lru_cache(maxsize=None)
def factors(K: int) -> tuple[int, int]:
    """(n, b) with Hd = P_n / sqrt(n) (x) S_b / sqrt(b), K = n b; n = 1: Sylvester alone; n = 0: no Paley order
    fits, block-diagonal I_{K/b} (x) S_b / sqrt(b) with b = K & -K."""
    b = block_size(K)
    m = K // b
    if m == 1:
        return 1, b
    n = m
    while b > 1:
        n, b = 2 * n, b // 2
        if n >= 4 and paley(n) is not None:
            return n, b
    return 0, block_size(K)


@lru_cache(maxsize=None)
def _paley_factor(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """P_n / sqrt(n) where the activations are: made once per device and dtype, not copied per forward."""
    return (paley(n) / math.sqrt(n)).to(device=device, dtype=dtype)


def fwht(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Hd x (or Hd^T x) along the last dimension (orthonormal, see the module docstring).

    x: (..., K) floating -> (..., K) same dtype. Butterfly i pairs elements j and j + 2^i within blocks of 2^(i+1);
    then the Paley factor mixes the K/b blocks."""
    K = x.shape[-1]
    n, b = factors(K)
    lead = x.shape[:-1]
    y = x.reshape(-1, K // b, b)  # (..., K) -> (M, K/b, b)
    h = 1
    while h < b:
        y = y.view(y.shape[0], K // b, b // (2 * h), 2, h)  # (M, K/b, b/2h, 2, h)
        a, c = y[:, :, :, 0], y[:, :, :, 1]
        y = torch.stack((a + c, a - c), dim=3)
        h *= 2
    y = y.reshape(-1, K // b, b) * (1.0 / math.sqrt(b))
    if n > 1:  # (P_n / sqrt(n)) Y: (n, n) @ (M, n, b)
        P = _paley_factor(n, y.device, y.dtype)
        y = torch.matmul(P.T if transpose else P, y)
    return y.reshape(*lead, K).to(x.dtype)


def hadamard_matrix(K: int, dtype=torch.float64) -> torch.Tensor:
    """Hd as a dense (K, K) matrix (tests and small checks only)."""
    return fwht(torch.eye(K, dtype=dtype)).T  # row i of fwht(I) is Hd e_i, column i of Hd


def _compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def rotate(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R x = Hd (s * x) along the last dimension; computed in float32 (float64 stays), returned in x's dtype.
    Also W R^T for a weight W (N, K): each row w -> R w."""
    s = signs.to(device=x.device, dtype=_compute(x).dtype)
    return fwht(_compute(x) * s).to(x.dtype)


def unrotate(y: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """R^T y = s * (Hd^T y) along the last dimension: the inverse of `rotate`. Also W' R for W' (N, K): the
    effective unrotated weight of a rotated one."""
    s = signs.to(device=y.device, dtype=_compute(y).dtype)
    return (fwht(_compute(y), transpose=True) * s).to(y.dtype)


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
