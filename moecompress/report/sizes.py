"""Size accounting: bytes by component, counted from the safetensors headers and the manifest.

Every tensor of a checkpoint directory is put in one component by its name (and, for packed expert
tensors, by the manifest): expert weights (the integer codes of packed experts, or the dense weights
of an original checkpoint), expert scales and dictionaries (the floating-point fields of packed
experts: scales, zeros, codebooks), attention, embeddings and head, norms and router, dense MLP and
shared experts. Metadata is every byte the loader reads that is not tensor data: safetensors headers,
config.json, the shard index and the moecompress manifest. Tokenizer files and run records are left
out on both sides (they are identical or not needed to run the model).

    bits per expert parameter = 8 * (expert codes + expert scales) / expert parameters of the original
    bits per parameter        = 8 * all bytes / all parameters of the original
    compression ratio         = original bytes / compressed bytes
"""
from __future__ import annotations

import glob
import math
import os
import re
from typing import NamedTuple

from ..checkpoint import read_safetensors_header
from ..errors import MoeCompressError

COMPONENTS = ("experts", "expert scales", "attention", "embeddings/head", "norms/router", "dense MLP/shared experts",
              "other", "metadata")
META_FILES = ("config.json", "model.safetensors.index.json", "moecompress.json")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
_ROUTER = re.compile(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$|shared_expert_gate\.weight$")


class TensorEntry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SizeBreakdown(NamedTuple):
    path: str
    components: dict[str, int]       # component -> bytes
    params: int                      # logical parameters (packed experts counted by their logical shape)
    expert_params: int
    expert_grid: dict[tuple[int, int], dict]   # (layer, expert) -> {"bytes", "params", "label"} (packed only)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def expert_bytes(self) -> int:
        return self.components["experts"] + self.components["expert scales"]


def read_tensors(path: str) -> dict[str, TensorEntry]:
    """Every tensor of the *.safetensors files in `path` (headers only; no tensor data is read)."""
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise MoeCompressError(f"{path} holds no .safetensors files: pass a checkpoint or packed directory")
    out = {}
    for s in shards:
        header, _ = read_safetensors_header(s)
        for k, v in header.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                out[k] = TensorEntry(k, v["dtype"], tuple(int(d) for d in v["shape"]), b - a)
    return out


def classify(name: str) -> str:
    """The component of a dense (not packed) tensor, from its name alone."""
    n = name.lower()
    if ".experts." in n:
        return "experts"
    if "embed" in n or "lm_head" in n or n.endswith(("wte.weight", "wpe.weight", "output.weight")):
        return "embeddings/head"
    if "attn" in n or "attention" in n:
        return "attention"
    if "norm" in n or _ROUTER.search(n):
        return "norms/router"
    if "mlp" in n or "shared_expert" in n or "feed_forward" in n:
        return "dense MLP/shared experts"
    return "other"


def _metadata_bytes(path: str, shards: list[str], tensors: dict[str, TensorEntry]) -> int:
    files = sum(os.path.getsize(s) for s in shards)
    meta = files - sum(t.nbytes for t in tensors.values())  # safetensors headers (and any padding)
    return meta + sum(os.path.getsize(os.path.join(path, f)) for f in META_FILES if os.path.isfile(os.path.join(path, f)))


def size_breakdown(path: str, manifest: dict | None = None) -> SizeBreakdown:
    """Bytes by component of checkpoint or packed directory `path` (manifest: its moecompress.json)."""
    tensors = read_tensors(path)
    comp = dict.fromkeys(COMPONENTS, 0)
    params = expert_params = 0
    grid: dict[tuple[int, int], dict] = {}
    packed = set()
    for ent in (manifest or {}).get("tensors", []):
        n = int(ent["shape"][0]) * int(ent["shape"][1])
        params += n
        cell = None
        if "module" not in ent:  # a routed expert's projection; "module": a packed Linear outside the experts
            # (a shared expert's), counted where its dense weight would be
            cell = grid.setdefault((int(ent["layer"]), int(ent["expert"])), {"bytes": 0, "params": 0, "codecs": set()})
            cell["params"] += n
            cell["codecs"].add(_label(ent))
            expert_params += n
        for f in ent["fields"]:
            t = tensors.get(f"{ent['name']}.{f}")
            if t is None:
                raise MoeCompressError(f"{path}: the manifest names {ent['name']}.{f}, which no shard holds")
            packed.add(t.name)
            if cell is None:
                comp["dense MLP/shared experts"] += t.nbytes
            else:
                comp["expert scales" if t.dtype in FLOAT_DTYPES else "experts"] += t.nbytes
                cell["bytes"] += t.nbytes
    guard = set((manifest or {}).get("guard", []))  # 1-byte placeholders that make plain transformers refuse
    guard_bytes = 0
    for k, t in tensors.items():
        if k in packed:
            continue
        if k in guard:
            guard_bytes += t.nbytes
            continue
        c = classify(k)
        comp[c] += t.nbytes
        if not k.endswith("_bias"):
            params += t.numel
            if c == "experts":
                expert_params += t.numel
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    comp["metadata"] = _metadata_bytes(path, shards, tensors) + guard_bytes
    for cell in grid.values():
        cell["label"] = "/".join(sorted(cell.pop("codecs")))
    return SizeBreakdown(os.path.abspath(path), comp, params, expert_params, grid)


def _label(ent: dict) -> str:
    a = ent.get("attrs") or {}
    bits, gs = a.get("bits"), a.get("group_size")
    return f"{ent['codec']}{bits if bits is not None else ''}" + (f"g{gs}" if gs else "")


def compare_sizes(baseline: SizeBreakdown, compressed: SizeBreakdown) -> dict:
    """The report's size section: bytes per component on both sides and the headline ratios."""
    params, eparams = baseline.params, baseline.expert_params
    if compressed.expert_params and compressed.expert_params > eparams:
        raise MoeCompressError("the compressed model has more expert parameters than --baseline: "
                               "pass the original checkpoint it was made from as --baseline")
    rows = {c: {"baseline": baseline.components[c], "compressed": compressed.components[c]} for c in COMPONENTS
            if baseline.components[c] or compressed.components[c]}
    return {
        "components": rows,
        "baseline_bytes": baseline.total, "compressed_bytes": compressed.total,
        "saved_bytes": baseline.total - compressed.total,
        "compression_ratio": round(baseline.total / compressed.total, 4),
        "params": params, "expert_params": eparams,
        "baseline_bits_per_param": round(8 * baseline.total / params, 4),
        "bits_per_param": round(8 * compressed.total / params, 4),
        "baseline_expert_bits_per_param": round(8 * baseline.expert_bytes / eparams, 4),
        "expert_bits_per_param": round(8 * compressed.expert_bytes / eparams, 4),
        "expert_share_baseline": round(baseline.expert_bytes / baseline.total, 4),
    }
