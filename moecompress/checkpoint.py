"""Lazy, validated access to a Hugging Face checkpoint directory.

`CheckpointReader` parses config.json and the safetensors headers (one or many shards, with or without
model.safetensors.index.json) without reading tensor data, checks that every shard the index names is
present and that no shard is truncated, and then reads tensors one at a time. Expert weights are served
in canonical form, `expert(layer, e, proj) -> (out, in)` float tensor, whatever the on-disk layout: one
tensor per expert (Mixtral's `block_sparse_moe.experts.{e}.w1`, Qwen's `mlp.experts.{e}.gate_proj`) or
fused 3D tensors (transformers v5's `mlp.experts.gate_up_proj [E, 2I, H]`, GPT-OSS's interleaved
`[E, H, 2I]` with biases). Pickle-only checkpoints are refused, never loaded.

Quantized sources (FP8 with 128x128 block scales, DeepSeek-V3/R1; MXFP4 experts, GPT-OSS; see
source_formats.py) are read as the float checkpoints they stand for: `tensors` lists logical tensors only
(a `weight` with its `weight_scale_inv`, or `*_blocks` with `*_scales`, is one entry with the dequantized
shape and dtype), and `get`, `get_slice`, `expert` and `layer_experts` dequantize one tensor at a time, on
`device`. `stored` keeps the tensors as they are on disk; `total_bytes` and `expert_bytes` count those.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cached_property

import torch

from .arch import PROJS, ArchSpec, ExpertKey, arch_for
from .errors import CheckpointError
from .source_formats import SourceTensor, companions, find_sources, logical_dtype

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 1024 * 1024
MERGE_KEY = "moecompress_merge"  # config.json entry of a `merge --ratio` output (merge/writer.py writes it)
PICKLE_NAMES = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    source: SourceTensor | None = None  # stored quantized: read from source.parts; dtype, shape and
    # nbytes (end - start, start = 0) are those of the dequantized tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """Parse and sanity-check a safetensors header; returns (header dict, data start offset)."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{name}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{name}: corrupt or truncated safetensors header (claims {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header")
    data_len = size - 8 - n
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            s, e = v["data_offsets"]
            shape, dtype = v["shape"], v["dtype"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{name}: corrupt entry for tensor {k!r} in the header") from None
        numel = 1
        for d in shape:
            numel *= int(d)
        if not (0 <= s <= e) or e - s != numel * DTYPE_BYTES.get(dtype, 0):
            raise CheckpointError(f"{name}: tensor {k!r} has inconsistent offsets for {dtype}{list(shape)}")
        if e > data_len:
            raise CheckpointError(f"{name} is truncated: tensor {k!r} ends at byte {8 + n + e} but the file has {size} bytes")
    return header, 8 + n


def merged_counts(config: dict) -> dict[int, int] | None:
    """Per-layer expert counts {layer: K_l} that `merge --ratio` recorded in config.json (None: one count
    for every layer, the config's own). A malformed entry is a CheckpointError that says how to fix it."""
    entry = config.get(MERGE_KEY)
    if entry is None:
        return None
    counts = entry.get("experts_per_layer") if isinstance(entry, dict) else None
    ok = isinstance(counts, dict) and counts and all(
        isinstance(k, str) and k.isdigit() and isinstance(v, int) and not isinstance(v, bool) and v >= 1
        for k, v in counts.items())
    if not ok:
        raise CheckpointError(f'config.json: "{MERGE_KEY}" needs "experts_per_layer", a map of layer -> positive '
                              "expert count: restore config.json from the merge output")
    return {int(k): v for k, v in counts.items()}


class CheckpointReader:
    """A local Hugging Face checkpoint directory, read lazily. See the module docstring."""

    def __init__(self, path: str, device: str | torch.device = "cpu"):
        self.path = os.path.abspath(path)
        self.device = torch.device(device)  # where tensors are returned and quantized sources dequantized
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint directory not found: {path}")
        cfg = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg):
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            with open(cfg) as f:
                self.config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}/config.json is not valid JSON ({e.msg})") from None
        self.arch: ArchSpec = arch_for(self.config)
        self.stored: dict[str, TensorInfo] = {}  # as on disk, quantized parts and their scales included
        for shard in self._shards():
            header, start = read_safetensors_header(os.path.join(self.path, shard))
            for k, v in header.items():
                if k != "__metadata__":
                    s, e = v["data_offsets"]
                    self.stored[k] = TensorInfo(k, shard, v["dtype"], tuple(v["shape"]), start + s, start + e)
        self.tensors = self._logical()  # what the checkpoint stands for: one float tensor per logical name
        self.prefix = self._layer_prefix()
        self.num_layers = int(self.config.get("num_hidden_layers", 0))
        self.num_experts = self.arch.num_experts(self.config)  # the largest count where layers differ
        self.experts_per_layer = merged_counts(self.config)  # {layer: K_l} of a `merge --ratio` output, else None
        if not self.moe_layers:
            raise CheckpointError(f"{path}: config says {self.arch.family} but no expert tensors were found "
                                  f"(looked for e.g. {self.arch.per_expert_key(0, 0, 'gate', self.prefix)})")

    # -- files --------------------------------------------------------------------------------
    def _shards(self) -> list[str]:
        idx = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(idx):
            try:
                with open(idx) as f:
                    wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{idx} is not a valid safetensors index (no weight_map)") from None
            shards = sorted(set(wm.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
            if missing:
                raise CheckpointError(f"missing shard{'s' if len(missing) > 1 else ''} named by the index: {', '.join(missing)}")
            return shards
        shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
        if shards:
            return shards
        pickles = sorted({os.path.basename(p) for pat in PICKLE_NAMES for p in glob.glob(os.path.join(self.path, pat))})
        if pickles:
            raise CheckpointError(f"{self.path} holds only pickle weights ({', '.join(pickles)}); moecompress never unpickles "
                                  "files: convert them to safetensors first")
        raise CheckpointError(f"{self.path} has no *.safetensors weights")

    def _logical(self) -> dict[str, TensorInfo]:
        """`stored` with each quantized tensor and its scales merged into one dequantized entry."""
        sources, problems = find_sources({k: (t.dtype, t.shape) for k, t in self.stored.items()}, self.config)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CheckpointError(f"{self.path}: {problems[0]}{more}")
        drop = companions(sources)
        by_part = {src.values: k for k, src in sources.items()}  # the logical tensor takes its codes' place
        dtype = logical_dtype(self.config)
        out = {}
        for k, t in self.stored.items():
            if k in by_part:
                src = sources[by_part[k]]
                out[by_part[k]] = TensorInfo(by_part[k], t.shard, dtype, src.shape, 0,
                                             math.prod(src.shape) * DTYPE_BYTES[dtype], src)
            elif k not in drop:
                out[k] = t
        return out

    def _layer_prefix(self) -> str:
        for cand in ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h"):
            if any(k.startswith(cand + ".") for k in self.tensors):
                return cand
        raise CheckpointError(f"{self.path}: no decoder layers found in the tensor names")

    def _read(self, info: TensorInfo, start: int, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Read bytes [start, start + nbytes) of a shard into a fresh tensor.

        Plain positional reads, not a memory map: pages of a mapped 1 TB checkpoint would count towards
        the process's resident memory, and a read tensor owns its memory and frees it when dropped."""
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.shard}: tensor {info.name!r} has unsupported dtype {info.dtype}")
        buf = bytearray(nbytes)
        with open(os.path.join(self.path, info.shard), "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(buf)
        if got != nbytes:
            raise CheckpointError(f"{info.shard} is truncated: tensor {info.name!r} could not be read whole")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def _read_stored(self, name: str, index: int | None = None) -> torch.Tensor:
        """Stored tensor `name` (row `index` of its first dimension only, when given), on `device`."""
        info = self.stored[name]
        if index is None:
            t = self._read(info, info.start, info.nbytes, info.shape)
        else:
            row = info.nbytes // info.shape[0]
            t = self._read(info, info.start + index * row, row, info.shape[1:])
        return t.to(self.device)

    def _dequant(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        src = info.source
        if index is not None and len(src.shape) < 3:  # a row of a 2D FP8 weight: its scales span 128 rows
            return self._dequant(info)[index]
        out = src.decode(*(self._read_stored(p, index) for p in src.parts()))
        return out.to(TORCH_DTYPES[info.dtype])  # fp32 products rounded once, as the references store them

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        return self._dequant(info) if info.source else self._read_stored(name)

    def get_slice(self, name: str, index: int) -> torch.Tensor:
        """Row `index` of the first dimension of tensor `name`, read without the rest."""
        info = self.tensors[name]
        if not 0 <= index < info.shape[0]:
            raise CheckpointError(f"index {index} out of range for tensor {name!r} of shape {list(info.shape)}")
        return self._dequant(info, index) if info.source else self._read_stored(name, index)

    # -- structure ------------------------------------------------------------------------------
    def layout(self, layer: int) -> str | None:
        """'per_expert', 'fused' or None (a dense layer) for decoder layer `layer`."""
        if self.arch.per_expert_key(layer, 0, "gate", self.prefix) in self.tensors:
            return "per_expert"
        if self.arch.fused_keys(layer, self.prefix)["gate_up"] in self.tensors:
            return "fused"
        return None

    @cached_property
    def moe_layers(self) -> list[int]:
        n = int(self.config.get("num_hidden_layers", 0))
        return [i for i in range(n) if self.layout(i) is not None]

    def is_expert_tensor(self, name: str) -> bool:
        return ".experts." in name

    def layer_keys(self, layer: int) -> list[str]:
        p = f"{self.prefix}.{layer}."
        return sorted(k for k in self.tensors if k.startswith(p))

    def global_keys(self) -> list[str]:
        p = f"{self.prefix}."
        return sorted(k for k in self.tensors if not k.startswith(p))

    def expert_shapes(self, layer: int) -> dict[str, tuple[int, int]]:
        """Canonical (out, in) shape of each projection in `layer`."""
        if self.layout(layer) == "per_expert":
            return {p: tuple(self.tensors[self.arch.per_expert_key(layer, 0, p, self.prefix)].shape) for p in PROJS}
        fk = self.arch.fused_keys(layer, self.prefix)
        gu, dn = self.tensors[fk["gate_up"]].shape, self.tensors[fk["down"]].shape
        if self.arch.glu == "gptoss":  # gate_up [E, H, 2I] interleaved, down [E, I, H]
            H, I2 = gu[1], gu[2]
            return {"gate": (I2 // 2, H), "up": (I2 // 2, H), "down": (dn[2], dn[1])}
        I2, H = gu[1], gu[2]  # v5 in-memory layout: gate_up [E, 2I, H], down [E, H, I]
        return {"gate": (I2 // 2, H), "up": (I2 // 2, H), "down": (dn[1], dn[2])}

    def layer_num_experts(self, layer: int) -> int:
        if self.layout(layer) == "per_expert":
            n = 0
            while self.arch.per_expert_key(layer, n, "gate", self.prefix) in self.tensors:
                n += 1
            return n
        return self.tensors[self.arch.fused_keys(layer, self.prefix)["gate_up"]].shape[0]

    def config_num_experts(self, layer: int) -> int:
        """Routed experts config.json gives `layer`: its own count in a `merge --ratio` output, else the model's."""
        return (self.experts_per_layer or {}).get(layer, self.num_experts)

    def expert_keys_on_disk(self, layer: int) -> list[str]:
        return [k for k in self.layer_keys(layer) if self.is_expert_tensor(k)]

    # -- expert weights -----------------------------------------------------------------------
    def expert(self, key: ExpertKey) -> torch.Tensor:
        """Canonical (out, in) weight of one expert projection, in its stored dtype (a quantized source's:
        the checkpoint's float dtype)."""
        layer, e, proj = key
        if self.layout(layer) == "per_expert":
            return self.get(self.arch.per_expert_key(layer, e, proj, self.prefix))
        fk = self.arch.fused_keys(layer, self.prefix)
        if proj == "down":
            d = self.get_slice(fk["down"], e)
            return d.t().contiguous() if self.arch.glu == "gptoss" else d  # GPT-OSS down is [I, H]
        gu = self.get_slice(fk["gate_up"], e)
        if self.arch.glu == "gptoss":  # [H, 2I], gate and up interleaved along the last dim
            return (gu[:, 0::2] if proj == "gate" else gu[:, 1::2]).t().contiguous()
        I = gu.shape[0] // 2
        return gu[:I] if proj == "gate" else gu[I:]  # (2I, H) -> (I, H)

    def expert_bias(self, key: ExpertKey) -> torch.Tensor | None:
        """GPT-OSS biases, canonical per projection; None for bias-free families."""
        if self.arch.glu != "gptoss":
            return None
        layer, e, proj = key
        fk = self.arch.fused_keys(layer, self.prefix)
        if proj == "down":
            return self.get_slice(fk["down_bias"], e)
        b = self.get_slice(fk["gate_up_bias"], e)
        return b[0::2] if proj == "gate" else b[1::2]

    def layer_experts(self, layer: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """All experts of a layer stacked per projection: {"gate": (E, I, H), "up": ..., "down": (E, H, I)}."""
        E = self.layer_num_experts(layer)
        return {p: torch.stack([self.expert(ExpertKey(layer, e, p)).to(dtype) for e in range(E)]) for p in PROJS}

    def layer_expert_biases(self, layer: int, dtype=torch.float32) -> dict[str, torch.Tensor] | None:
        if self.arch.glu != "gptoss":
            return None
        E = self.layer_num_experts(layer)
        return {p: torch.stack([self.expert_bias(ExpertKey(layer, e, p)).to(dtype) for e in range(E)]) for p in PROJS}

    @cached_property
    def quantized_source(self) -> str | None:
        """"fp8" or "mxfp4" when tensors are stored in that source format (dequantized on read), else None."""
        return next((t.source.format for t in self.tensors.values() if t.source is not None), None)

    # -- accounting ---------------------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config.json and every tensor's name, dtype, shape and a sample of its bytes."""
        h = hashlib.sha256()
        with open(os.path.join(self.path, "config.json"), "rb") as f:
            h.update(f.read())
        for k in sorted(self.stored):
            t = self.stored[k]
            h.update(f"{k}|{t.dtype}|{t.shape}|{t.nbytes}".encode())
        for shard in sorted({t.shard for t in self.stored.values()}):
            p = os.path.join(self.path, shard)
            size = os.path.getsize(p)
            h.update(str(size).encode())
            with open(p, "rb") as f:  # first and last MiB: cheap, catches a replaced file
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
        return h.hexdigest()[:32]

    @property
    def total_bytes(self) -> int:
        """Bytes on disk (quantized sources: codes and scales)."""
        return sum(t.nbytes for t in self.stored.values())

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for k, t in self.stored.items() if self.is_expert_tensor(k))

    @property
    def expert_params(self) -> int:
        return sum(t.numel for k, t in self.tensors.items() if self.is_expert_tensor(k) and not k.endswith("_bias"))
