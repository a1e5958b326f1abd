"""What `--budget SIZE` counts besides tensor data: upper bounds on a packed checkpoint's metadata.

`--budget` is the output directory as a user ships it: every file but `run/` (the run's own records).
Besides the tensor data (priced exactly by the allocator from `codecs.nbytes`), that is
  - one safetensors header per shard: 8 bytes of length, then JSON with one entry per tensor
    (`"name":{"dtype":..,"shape":[..],"data_offsets":[a,b]}`), padded to a multiple of 8 bytes;
  - model.safetensors.index.json: one line per tensor;
  - moecompress.json: one entry per packed weight (name, codec, shape, attributes, fields), one width
    label per expert, one line per shard (bytes, sha256), the guard's names, a few fixed fields;
  - config.json: the source's, with the quantization record and, when experts are pruned, the merge record;
  - the tokenizer files copied from the source (their sizes, exactly).
None of these depends on weight values, only on names, shapes and how wide numbers are written, so each
is bounded from shapes alone: every number at the width of the largest it could be (`digits`), codec
attributes at their widest, sub1 tensors with all of sub1's fields (a sub1 weight stored as dense ternary
has fewer). `metadata_bound(...)` -> `MetadataBound`: `per_expert[l, c]`, what a kept expert of MoE layer
l at candidate c adds (a pruned expert adds nothing), and `fixed`, everything else. The bound exceeds
what is written by a few bytes per tensor (numbers narrower than their bound); the joint budget test
checks it from both sides on a written checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np

from ..arch import PROJS
from ..codecs import QuantSpec

# per-expert stored fields of each codec as the writer stores them (sub1's dictionary is stored once per
# model, under SUB1_DICT_NAME); checked against written checkpoints by tests/test_joint_budget.py
FIELDS = {"int": ("qweight", "scales", "zeros"), "ternary": ("hi", "lo", "trits"),
          "sub1": ("codewords", "hi", "lo", "row_counts", "row_skip")}
SUB1_DICT_NAME = "moecompress.sub1_dictionary." + "0" * 16
EXPERTS_PATHS = ("mlp.experts", "block_sparse_moe.experts")  # in-memory expert paths the writer names by
DTYPE = "BF16"                     # the longest safetensors dtype name a tensor of ours is stored in
SHARD_HEADER = len('{"__metadata__":{"format":"pt"}}') + 8 + 7  # length prefix, padding to 8
MANIFEST_FIXED = 2048              # moecompress.json's fixed fields (format, family, source, totals, grids)
CONFIG_EXTRA = 512                 # config.json: quantization_config and key overhead beyond the source's


class MetadataBound(NamedTuple):
    fixed: int                 # bytes besides tensor data that do not depend on the plan
    per_expert: np.ndarray     # (L, C) int64: bytes a kept expert of MoE layer l at candidate c adds


def tokenizer_bytes(src: str) -> int:
    from ..layerwise import tokenizer_files
    return sum(os.path.getsize(os.path.join(src, f)) for f in tokenizer_files(src))


def _header_entry(name: str, ndim: int, d: int) -> int:
    """Bytes of one tensor's safetensors header entry, numbers `d` digits wide, plus its comma."""
    return len(json.dumps(name)) + len(f':{{"dtype":"{DTYPE}","shape":[],"data_offsets":[,]}},') + ndim * (d + 1) + 2 * d


def _index_entry(name: str, shard: str) -> int:
    return len(f'  {json.dumps(name)}: {json.dumps(shard)},\n')


def _tensor(name: str, shard: str, ndim: int, d: int) -> int:
    return _header_entry(name, ndim, d) + _index_entry(name, shard)


def _attrs(spec: QuantSpec, K: int, d: int) -> dict:
    g = spec.group_size or K
    if spec.codec == "int":
        return {"bits": spec.bits, "group_size": g}
    if spec.codec == "ternary":
        return {"group_size": g}
    big = 10 ** d - 1
    return {"codeword_bits": 99, "dictionary_id": "0" * 16, "group_size": g, "sizes": {"sub1": big, "ternary": big}}


def _manifest_entry(name: str, spec: QuantSpec, shape, d: int, **where) -> int:
    e = {"attrs": _attrs(spec, shape[1], d), "codec": spec.codec, "fallback": False, "fields": list(FIELDS[spec.codec]),
         "name": name, "shape": [10 ** d - 1] * 2, **where}
    return len(json.dumps(e, separators=(",", ":"))) + 1


def _packed_weight(name: str, shard: str, spec: QuantSpec, shape, d: int, **where) -> int:
    """Header, index and manifest bytes of one packed weight stored under `name`."""
    return (sum(_tensor(f"{name}.{f}", shard, 2, d) for f in FIELDS[spec.codec])
            + _manifest_entry(name, spec, shape, d, **where))


def metadata_bound(reader, config, candidates: Sequence[QuantSpec], shared_spec_of=None) -> MetadataBound:
    """Bounds on the metadata of `reader` packed with `config` (module docstring); candidates: the widths."""
    moe = list(reader.moe_layers)
    d = len(str(2 * reader.total_bytes + 10 ** 6))  # any offset, size or dimension we write
    L = reader.num_layers
    E_max = max(reader.layer_num_experts(i) for i in moe)
    path = max(EXPERTS_PATHS, key=len)
    per = np.zeros((len(moe), len(candidates)), dtype=np.int64)
    for l, i in enumerate(moe):
        shard = f"layer-{i:05d}.safetensors"
        shapes = reader.expert_shapes(i)
        e, j = E_max - 1, 10 ** len(str(L)) - 1
        for c, spec in enumerate(candidates):
            per[l, c] = sum(_packed_weight(f"{reader.prefix}.{i}.{path}.{e}.{p}", shard, spec, shapes[p], d,
                                           layer=j, expert=e, proj=p) for p in PROJS)
            per[l, c] += len(json.dumps({f"{i}.{e}": spec.label}, separators=(",", ":")))   # expert_bits
            per[l, c] += len(json.dumps([j, e, 10 ** d - 1], separators=(",", ":"))) + 1    # a fallback entry
    fixed = tokenizer_bytes(reader.path) + MANIFEST_FIXED
    shards = [f"layer-{i:05d}.safetensors" for i in range(L)] + ["globals.safetensors", "moecompress-guard.safetensors"]
    fixed += sum(SHARD_HEADER + len(json.dumps({s: {"bytes": 10 ** d - 1, "sha256": "0" * 64}},
                                               separators=(",", ":"))) for s in shards)
    fixed += len('{\n "metadata": {\n  "format": "moecompress"\n },\n "weight_map": {\n }\n}\n')
    glob = set(reader.global_keys())
    for k, info in reader.tensors.items():  # dense tensors as stored (shared experts: also their packed form below)
        if not reader.is_expert_tensor(k) or k.endswith("_bias"):
            fixed += _tensor(k, shards[-2] if k in glob else shards[0], len(info.shape), d)
    sub1 = any(s.codec == "sub1" for s in candidates)
    for i in moe:
        shard = f"layer-{i:05d}.safetensors"
        guard = [f"{reader.prefix}.{i}.{path}.{p}" for p in ("gate_up_proj", "down_proj")]
        fixed += sum(_tensor(g, shards[-1], 1, d) + len(json.dumps(g)) + 1 for g in guard)
        if getattr(config, "rotate", False):  # the layer's sign vectors, and its number in the manifest
            fixed += sum(_tensor(f"{reader.prefix}.{i}.{path}.rotation_{s}", shard, 1, d) for s in ("gate_up", "down"))
            fixed += 2 * (len(str(L)) + 1)
        if sub1:
            fixed += _tensor(SUB1_DICT_NAME, shard, 2, d)
        if shared_spec_of is not None:
            for name, spec, shape in shared_spec_of(i):
                fixed += _packed_weight(name, shard, spec, shape, d, layer=10 ** len(str(L)) - 1,
                                        module=name[len(f"{reader.prefix}.{i}."):])
    fixed += _config_bound(reader, moe, E_max)
    return MetadataBound(int(fixed), per)


def _config_bound(reader, moe: list[int], E_max: int) -> int:
    """config.json as written (indent 1): the source's entries, the quantization record, and the merge record
    with every expert map entry at its widest (-1 or the largest index)."""
    from ..checkpoint import MERGE_KEY
    cfg = dict(reader.config)
    w = -(10 ** len(str(E_max)))
    cfg[MERGE_KEY] = {"expert_map": {str(i): [w] * E_max for i in moe},
                      "experts_per_layer": {str(i): 10 ** len(str(E_max)) for i in moe}, "format_version": 1}
    return len(json.dumps(cfg, indent=1, sort_keys=True)) + 1 + CONFIG_EXTRA


def directory_bytes(out: str) -> int:
    """What --budget measures: every file under `out` but run/."""
    total = 0
    for root, dirs, files in os.walk(out):
        if os.path.relpath(root, out) == ".":
            dirs[:] = [x for x in dirs if x != "run"]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
