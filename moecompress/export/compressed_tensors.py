"""Export to compressed-tensors `pack-quantized`: what llm-compressor writes, transformers loads and vLLM serves.

Exportable: every packed expert (routed and shared) in the "int" codec at one width b in {4, 8} and one group
size g, on a symmetric grid (`quantize --symmetric`: every zero point is 2^(b-1)). Our int codec decodes
W = (q - z) * s with unsigned codes q, fp16 scales s and zero points z; compressed-tensors' symmetric group
scheme stores no zero point and decodes W = q' * s with signed codes q' in [-2^(b-1), 2^(b-1)), packed as
q' + 2^(b-1). With z = 2^(b-1) the two are the same numbers, so the export is exact: q is re-packed as is and
s is kept bit for bit. Per expert projection M, named as the source checkpoint names it (Mixtral
`model.layers.{i}.block_sparse_moe.experts.{e}.w1`, Qwen `...mlp.experts.{e}.gate_proj`, a shared expert
`...mlp.shared_expert.gate_proj`: the names transformers' conversion mapping and vLLM's loaders read):

    M.weight_packed  int32 (N, ceil(K b / 32))  32/b codes per word, code k of a row at bits [k b, k b + b)
                                                 of the row's little-endian word stream (`pack_to_int32`)
    M.weight_scale   float32 (N, K / g)          our fp16 scales, widened exactly
    M.weight_shape   int64 [N, K]

Every other tensor is copied as stored (not the packed checkpoint's guard placeholders). config.json gets compressed-tensors' quantization_config: one config
group (format pack-quantized, weights int b, symmetric, strategy group, group_size g, actorder "static" when
the run used --act-order, which keeps groups static as llm-compressor's does), targets as llm-compressor
writes them for the experts (tests/data/llmcompressor_layout.json, made by benchmarks/ct_layout.py), and an
ignore list naming every other Linear-like module (attention, routers, lm_head) in module order, as
llm-compressor expands it.

Where this differs from llm-compressor 0.14 (measured, see the layout file): it names Mixtral's linearized
experts `block_sparse_moe.experts.{e}.gate_proj`, which neither transformers 5.17 nor 5.25 maps onto the
fused experts (they load as random weights), so the expert tensors here keep the checkpoint's own names; its
scales are in the model dtype (bfloat16 for the demo model), ours are float32: transformers dequantizes MoE
experts in the scale's dtype and keeps that dtype for the fused experts, so on the demo model (4-bit, g64,
logits of 128 tokens against the exact dense decode, max abs difference / max abs) float32 scales give 0.0,
float16 4.4e-4 (experts computed in fp16), bfloat16 3.3e-3 (the scales themselves move); vLLM casts scales to
its activation dtype on load (exact for float16). float32 scales cost what our fp16 scale plus fp16 zero
cost: 4.5 bits per weight at int4 g64, the packed checkpoint's own size. The targets stay llm-compressor's `gate_proj|up_proj|down_proj`
regex: vLLM matches a fused MoE layer's scheme against `<layer>.experts.0.gate_proj`, whatever the family.

Refused, each with one line: another codec (ternary, sub1), mixed widths (per expert, per layer, or shared
experts at another width), widths other than 4 and 8, asymmetric grids, a quantized router (--router-bits:
its grid is not a scheme of the format's dense layers), rotations, per-layer expert counts (merge --ratio:
one num_local_experts per model), fused on-disk experts with biases (GPT-OSS).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..arch import arch_for
from ..checkpoint import merged_counts
from ..codecs import get_codec
from ..errors import MoeCompressError
from ..packed import MANIFEST, partial_dir, read_manifest, rebuild, verify_files

log = logging.getLogger("moecompress")
BITS = (4, 8)
SCALE_DTYPE = torch.float32  # exact widening of our fp16 scales; see the module docstring
CT_VERSION = "0.19.0"  # the compressed-tensors release whose layout this follows (tests/data/llmcompressor_layout.json)
EXPERT_TARGET = r"re:.*experts\.\d+\.(gate_proj|up_proj|down_proj)$"  # llm-compressor's, and what vLLM matches
MARLIN_GROUPS = (32, 64, 128)  # group sizes vLLM's Marlin MoE kernels run
FIELDS = ("qweight", "scales", "zeros")


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: (N, K) unsigned codes in [0, 2^bits) -> (N, ceil(K bits / 32)) int32, 32/bits codes per word, LSB first."""
    N, K = q.shape
    per = 32 // bits
    q = torch.nn.functional.pad(q.to(torch.int64), (0, (-K) % per)).view(N, -1, per)  # (N, K) -> (N, words, per)
    w = (q << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)  # (N, words) in [0, 2^32)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)  # two's complement int32


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _disk_name(entry: dict, arch) -> str:
    """The source checkpoint's module name of a packed entry (without `.weight`)."""
    name = entry["name"]
    if "module" in entry:  # shared expert Linear: stored under its in-memory name
        return arch.to_disk(f"{name}.weight")[: -len(".weight")]
    i = entry["layer"]
    prefix = name[: name.index(f".{i}.")]
    return arch.per_expert_key(i, entry["expert"], entry["proj"], prefix)[: -len(".weight")]


def check_exportable(packed: str, manifest: dict, config: dict, arch) -> tuple[int, int]:
    """Everything refusable from the manifest and configs (no tensor read) -> (bits, group_size)."""
    def refuse(what: str) -> MoeCompressError:
        return MoeCompressError(f"cannot export {packed} to compressed-tensors: {what}")
    if "rotation" in manifest or any("rotation" in e for e in manifest["tensors"] if isinstance(e, dict)):
        raise refuse("it carries rotations, which compressed-tensors pack-quantized cannot apply")
    if merged_counts(config) is not None:
        raise refuse("per-layer expert counts (merge --ratio) need one num_local_experts for the whole model")
    if arch.fused_on_disk:
        raise refuse(f"{arch.family}'s fused experts with biases are not a per-expert Linear layout")
    run = _read_json(os.path.join(packed, "run", "run_config.json"))
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise refuse("run/run_config.json is missing, so whether the router was quantized cannot be told")
    if run["config"].get("router_bits"):
        raise refuse(f"its router is quantized (--router-bits {run['config']['router_bits']}), which the format "
                     "cannot express beside the dense layers")
    entries = [e for e in manifest["tensors"] if isinstance(e, dict)]
    if not entries:
        raise refuse("it has no packed experts")
    codecs = sorted({str(e.get("codec")) for e in entries} - {"int"})
    if codecs:
        raise refuse(f"{', '.join(codecs)} experts: only integer codes (int4/int8) are representable")
    widths: dict[int, set] = {}
    for e in entries:
        widths.setdefault(int(e.get("layer", -1)), set()).add(((e.get("attrs") or {}).get("bits"), "module" in e))
    routed = {b for s in widths.values() for b, shared in s if not shared}
    shared = {b for s in widths.values() for b, sh in s if sh}
    if len(routed) > 1:
        per_layer = all(len({b for b, sh in s if not sh}) <= 1 for s in widths.values())
        raise refuse(f"{'per-layer' if per_layer else 'per-expert mixed'} widths ({', '.join(map(str, sorted(routed)))} "
                     "bits): transformers' MoE loader applies one experts scheme")
    if shared and shared != routed:
        raise refuse(f"shared experts at {', '.join(map(str, sorted(shared)))} bits beside routed experts at "
                     f"{next(iter(routed))}: one width for all experts")
    bits = next(iter(routed or shared))
    if bits not in BITS:
        raise refuse(f"int{bits} experts: vLLM's MoE kernels serve int4 and int8 only")
    if "asymmetric" in (manifest.get("int_grids") or []):  # recorded by quantize (the zero points decide too)
        raise refuse("asymmetric grid (quantized without --symmetric); transformers' MoE loader keeps no zero "
                     "points: quantize with --symmetric")
    groups = sorted({(e.get("attrs") or {}).get("group_size") for e in entries})
    if len(groups) > 1:
        raise refuse(f"mixed group sizes {groups}")
    return bits, groups[0]


def _ignore_list(config: dict, arch, quantized: set[str]) -> list[str]:
    """Every module with a 2-D `weight` that stays dense, by checkpoint name in module order (llm-compressor's
    expanded ignore list): attention, routers, lm_head; the input embeddings are not Linear and not listed."""
    from ..layerwise import hf_config, meta_model
    model = meta_model(hf_config(config))
    emb = model.get_input_embeddings()
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if mod is emb or not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(mod, torch.nn.Embedding):
            continue
        if "weight" not in dict(mod.named_parameters(recurse=False)):
            continue
        disk = arch.to_disk(f"{name}.weight")[: -len(".weight")]
        if disk not in quantized:
            out.append(disk)
    return out


def quantization_config(bits: int, group_size: int, targets: list[str], ignore: list[str], act_order: bool) -> dict:
    weights = {"actorder": "static" if act_order else None, "block_structure": None, "dynamic": False,
               "group_size": group_size, "num_bits": bits, "observer": "memoryless_minmax", "observer_kwargs": {},
               "scale_dtype": None, "strategy": "group", "symmetric": True, "type": "int", "zp_dtype": None}
    return {"config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                          "output_activations": None, "targets": targets, "weights": weights}},
            "format": "pack-quantized", "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def _shard_tensors(packed: str, shard: str, keys=None) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(packed, shard), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}


def _check_symmetric(packed: str, manifest: dict, bits: int) -> None:
    """Every zero point is the grid's midpoint 2^(bits-1) (read from the shards: the data decides)."""
    mid = 1 << (bits - 1)
    by_shard: dict[str, list[str]] = {}
    index = _read_json(os.path.join(packed, "model.safetensors.index.json")) or {}
    wmap = index.get("weight_map", {}) if isinstance(index, dict) else {}
    for e in manifest["tensors"]:
        k = f"{e['name']}.zeros"
        if k not in wmap:
            raise MoeCompressError(f"cannot export {packed}: the index does not locate {k}")
        by_shard.setdefault(wmap[k], []).append(k)
    for shard, keys in sorted(by_shard.items()):
        for k, z in _shard_tensors(packed, shard, set(keys)).items():
            if not bool((z.float() == mid).all()):
                raise MoeCompressError(f"cannot export {packed} to compressed-tensors: asymmetric grid ({k[:-6]} has "
                                       f"zero points other than {mid}); transformers' MoE loader keeps no zero points: "
                                       "quantize with --symmetric")


def export_compressed_tensors(packed: str, out: str) -> dict:
    """Write packed checkpoint `packed` as compressed-tensors pack-quantized into `out` (see the module docstring)."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
    if not os.path.isdir(os.path.dirname(out)):
        raise MoeCompressError(f"output parent directory {os.path.dirname(out)} does not exist")
    manifest = read_manifest(packed)
    verify_files(packed, manifest)
    config = _read_json(os.path.join(packed, "config.json"))
    if not isinstance(config, dict):
        raise MoeCompressError(f"{packed}/config.json is missing or not JSON")
    arch = arch_for(config)
    bits, group_size = check_exportable(packed, manifest, config, arch)
    _check_symmetric(packed, manifest, bits)
    run = _read_json(os.path.join(packed, "run", "run_config.json"))["config"]
    warnings = []
    if group_size not in MARLIN_GROUPS:
        warnings.append(f"group size {group_size}: vLLM's Marlin MoE kernels run group sizes "
                        f"{', '.join(map(str, MARLIN_GROUPS))}; transformers loads it")
        log.warning("%s", warnings[-1])

    entries = {e["name"]: e for e in manifest["tensors"]}
    names = {n: _disk_name(e, arch) for n, e in entries.items()}
    targets = [EXPERT_TARGET]
    shared = sorted({e["module"].rsplit(".", 1)[0] for e in entries.values() if "module" in e})
    targets += [r"re:.*\." + re.escape(arch.to_disk(p)) + r"\.(gate_proj|up_proj|down_proj)$" for p in shared]
    qcfg = quantization_config(bits, group_size, targets, _ignore_list(config, arch, set(names.values())),
                               bool(run.get("act_order")))
    codec = get_codec("int")
    guard = manifest.get("guard") or []  # placeholders under the dense expert names that make plain transformers
    if not isinstance(guard, list) or not all(isinstance(g, str) for g in guard):  # refuse the packed checkpoint
        raise MoeCompressError(f"{packed}/{MANIFEST}: malformed 'guard' list")
    guard = set(guard)
    shards = []
    for shard in sorted(manifest["files"]):
        with safe_open(os.path.join(packed, shard), "pt") as f:
            if not set(f.keys()) <= guard:
                shards.append(shard)
    tmp = partial_dir(out)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        weight_map, total, n_packed = {}, 0, 0
        for j, shard in enumerate(shards):
            stored = _shard_tensors(packed, shard)
            tensors = {}
            mine = {k for n in entries for k in (f"{n}.{f}" for f in FIELDS) if k in stored}
            for k, t in stored.items():
                if k not in mine and k not in guard:
                    tensors[k] = t
            for n, e in entries.items():
                if f"{n}.qweight" not in stored:
                    continue
                pt = rebuild(e, stored)
                N, K = pt.shape
                m = names[n]
                tensors[f"{m}.weight_packed"] = pack_int32(codec.codes(pt), bits)
                tensors[f"{m}.weight_scale"] = pt.tensors["scales"].to(SCALE_DTYPE)
                tensors[f"{m}.weight_shape"] = torch.tensor([N, K], dtype=torch.int64)
                n_packed += 1
            if not tensors:
                continue
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(tmp, fname),
                      metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, fname))
        cfg = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg["quantization_config"] = qcfg
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        skip = {"config.json", "model.safetensors.index.json", MANIFEST}
        for f in sorted(os.listdir(packed)):  # tokenizer and generation files
            p = os.path.join(packed, f)
            if os.path.isfile(p) and f not in skip and not f.endswith(".safetensors") and not f.startswith("."):
                shutil.copyfile(p, os.path.join(tmp, f))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, "format": "compressed-tensors (pack-quantized)", "bits": bits, "group_size": group_size,
            "packed_tensors": n_packed, "bytes": total, "source_bytes": manifest.get("total_bytes"),
            "targets": targets, "ignored_modules": len(qcfg["ignore"]), "warnings": warnings}
