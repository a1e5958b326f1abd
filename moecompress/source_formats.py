"""Quantized source checkpoints: FP8 block-scaled (DeepSeek-V3/R1) and MXFP4 (GPT-OSS), dequantized on read.

Some checkpoints ship their weights already quantized, each logical tensor stored as two on-disk parts:

- **FP8 with block scales** (config `quantization_config.quant_method == "fp8"`, DeepSeek-V3/R1): a
  float8_e4m3fn tensor `X` of shape (..., N, K) and its fp32 companion `X_scale_inv` of shape
  (..., ceil(N/bn), ceil(K/bk)), (bn, bk) = `weight_block_size` (128 x 128):
  W[n, k] = float(X[n, k]) * scale_inv[n // bn, k // bk] (the last block of a row or column may be
  partial). Per-expert names are `...experts.{e}.gate_proj.weight` + `...weight_scale_inv`; attention and
  dense MLP weights are stored the same way. Reference: DeepSeek-V3 `inference/kernel.py`
  `weight_dequant` (the product in fp32, stored in the default dtype, bf16) and transformers
  `integrations/finegrained_fp8.py` `_dequantize_fp8_weight`.
- **MXFP4** (`quant_method == "mxfp4"`, GPT-OSS experts): `X_blocks`, uint8 (..., R, G, 16), two FP4
  e2m1 codes per byte, low nibble first, and `X_scales`, uint8 E8M0 exponents (..., R, G), one per 32
  values: row r, values 32 g .. 32 g + 31 = FP4_VALUES[code] * 2^(scale - 127). The decoded (..., R, 32 G)
  is then transposed to (..., 32 G, R), as transformers' `integrations/mxfp4.py`
  `convert_moe_packed_tensors` does: GPT-OSS's `gate_up_proj_blocks` [E, 2I, H/32, 16] becomes the
  `gate_up_proj` [E, H, 2I] (gate and up interleaved along the last dim) of a bf16 GPT-OSS checkpoint,
  and `down_proj_blocks` [E, H, I/32, 16] becomes `down_proj` [E, I, H].

`find_sources` groups a checkpoint's on-disk names into logical tensors (a `SourceTensor` each, named by
the logical name: `X` for FP8, the name without `_blocks` for MXFP4) and lists what does not fit (a
companion without its tensor, an FP8 tensor without scales, shapes that disagree). The dequantizers are
pure tensor functions returning float32 on the device of their inputs; readers cast the result to the
checkpoint's dtype (`logical_dtype`, bf16 unless config.json says otherwise), as the references do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype names
SCALE_DTYPES = ("F32", "BF16", "F16")  # FP8 scale_inv companions
SCALE_INV = "_scale_inv"  # FP8 companion: X -> X_scale_inv
MX_BLOCKS, MX_SCALES = "_blocks", "_scales"  # MXFP4 parts: X_blocks + X_scales -> X
MX_GROUP = 32  # values per E8M0 scale (16 bytes)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 code -> value
SUPPORTED = ("fp8", "mxfp4")  # quant_method values read here; "moecompress" is our own packed output
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """W = float(w) * scale_inv expanded per (bn, bk) block. w: (..., N, K) fp8, scale_inv: (..., ceil(N/bn),
    ceil(K/bk)) -> (..., N, K) float32 (each element one fp32 product, as DeepSeek's weight_dequant)."""
    bn, bk = block
    N, K = w.shape[-2:]
    s = scale_inv.float().repeat_interleave(bn, dim=-2)[..., :N, :]  # (..., nb, kb) -> (..., N, kb)
    s = s.repeat_interleave(bk, dim=-1)[..., :K]  # (..., N, kb) -> (..., N, K)
    return w.float() * s


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 codes to float32, rows as stored. blocks: (..., R, G, 16) uint8, two e2m1 codes per byte, low
    nibble first; scales: (..., R, G) uint8 E8M0 -> (..., R, 32 G) = FP4_VALUES[code] * 2^(scale - 127)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]  # 2 x (..., R, G, 16)
    v = torch.stack([lo, hi], dim=-1).flatten(-2)  # (..., R, G, 16, 2) -> (..., R, G, 32): low nibble first
    v = v * torch.exp2(scales.to(torch.float32) - 127).unsqueeze(-1)  # exact: a power of two per group
    return v.flatten(-2)  # (..., R, G, 32) -> (..., R, 32 G)


@dataclass(frozen=True)
class SourceTensor:
    """One logical tensor stored as two on-disk parts: `values` (FP8 codes or MXFP4 blocks) and `scales`."""
    format: str                 # "fp8" | "mxfp4"
    values: str                 # on-disk name of the codes
    scales: str                 # on-disk name of the scales
    shape: tuple[int, ...]      # shape once dequantized
    block: tuple[int, int] = (128, 128)  # fp8: rows x columns per scale

    def decode(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The dequantized tensor (float32), or the same with the leading dimension(s) indexed away when
        `values` and `scales` are slices of the parts along their first dimension."""
        if self.format == "fp8":
            return dequant_fp8_block(values, scales, self.block)
        return dequant_mxfp4(values, scales).transpose(-1, -2)  # (..., R, C) -> (..., C, R), transformers' layout

    def parts(self) -> tuple[str, str]:
        return self.values, self.scales


def source_method(config: dict) -> str | None:
    """The source quantization method config.json declares (None: a plain float checkpoint)."""
    q = config.get("quantization_config")
    return q.get("quant_method") if isinstance(q, dict) else None


def fp8_block(config: dict) -> tuple[int, int]:
    q = config.get("quantization_config") or {}
    b = q.get("weight_block_size") or (128, 128)
    if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        raise ValueError(f"quantization_config.weight_block_size should be two positive integers, found {b!r}")
    return int(b[0]), int(b[1])


def logical_dtype(config: dict) -> str:
    """safetensors dtype code dequantized tensors are served in: config.json's torch dtype, else BF16."""
    d = config.get("torch_dtype") or config.get("dtype")
    return DTYPE_CODES.get(d, "BF16") if isinstance(d, str) else "BF16"


def find_sources(infos: dict[str, tuple[str, tuple[int, ...]]], config: dict
                 ) -> tuple[dict[str, SourceTensor], list[str]]:
    """Group on-disk tensors {name: (dtype, shape)} into logical tensors stored in a source format.

    Returns ({logical name: SourceTensor}, problems): each problem is one line (a companion without its
    tensor, an FP8 tensor without scales, mismatched shapes or dtypes, an unknown quant_method)."""
    sources: dict[str, SourceTensor] = {}
    problems: list[str] = []
    method = source_method(config)
    if method is not None and method not in SUPPORTED + ("moecompress",):
        problems.append(f"config.json: source quantization {method!r} is not supported (moecompress reads "
                        f"{', '.join(SUPPORTED)} and float checkpoints): dequantize it to bf16 first")
        return sources, problems
    try:
        block = fp8_block(config)
    except ValueError as e:
        problems.append(f"config.json: {e}")
        block = (128, 128)
    for name, (dtype, shape) in infos.items():
        if name.endswith(SCALE_INV):
            base = name[: -len(SCALE_INV)]
            if base not in infos:
                problems.append(f"{name} has no tensor {base} to scale")
            elif infos[base][0] not in FP8_DTYPES:
                problems.append(f"{name} scales {base}, which is {infos[base][0]}, not FP8")
        elif dtype in FP8_DTYPES:
            sc = infos.get(name + SCALE_INV)
            if sc is None:
                problems.append(f"{name} is {dtype} without a {name + SCALE_INV} companion (per-tensor or "
                                "other FP8 schemes are not supported; block-scaled FP8 is)")
                continue
            want = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])) if len(shape) >= 2 else None
            if want is None or tuple(sc[1]) != want or sc[0] not in SCALE_DTYPES:
                problems.append(f"{name + SCALE_INV} is {sc[0]}{list(sc[1])} but {name} {list(shape)} with "
                                f"{block[0]}x{block[1]} blocks needs float{list(want or ())}")
                continue
            sources[name] = SourceTensor("fp8", name, name + SCALE_INV, tuple(shape), block)
        elif name.endswith(MX_BLOCKS):
            base = name[: -len(MX_BLOCKS)]
            sc = infos.get(base + MX_SCALES)
            if sc is None:
                problems.append(f"{name} has no {base + MX_SCALES} companion (MXFP4 needs both)")
                continue
            ok = dtype == "U8" and sc[0] == "U8" and len(shape) >= 3 and shape[-1] == MX_GROUP // 2
            if not ok or tuple(sc[1]) != tuple(shape[:-1]):
                problems.append(f"{name} {dtype}{list(shape)} and {base + MX_SCALES} {sc[0]}{list(sc[1])} are not "
                                f"MXFP4 parts (uint8 (..., R, G, {MX_GROUP // 2}) and uint8 (..., R, G))")
                continue
            *lead, R, G, _ = shape
            sources[base] = SourceTensor("mxfp4", name, base + MX_SCALES, (*lead, G * MX_GROUP, R))
        elif name.endswith(MX_SCALES) and dtype == "U8" and name[: -len(MX_SCALES)] + MX_BLOCKS not in infos:
            problems.append(f"{name} has no {name[: -len(MX_SCALES)] + MX_BLOCKS} to scale")
    return sources, problems


def companions(sources: dict[str, SourceTensor]) -> set[str]:
    """On-disk names that are parts of a logical tensor under another name (scales; MXFP4 blocks)."""
    return {p for name, s in sources.items() for p in s.parts() if p != name}
