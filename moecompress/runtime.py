"""`moecompress.load()`: a packed checkpoint as a transformers causal LM with packed experts.

The model skeleton is built on the meta device from the packed config, each MoE layer's fused experts
module is replaced by `MoEExperts` over the stored `PackedTensor`s (decoded on the fly, only for experts
that receive tokens; Triton kernels on CUDA, the torch reference on the CPU), and every other tensor is
loaded as stored. The manifest is validated against the shards (checksums, codecs from the fixed
registry, shapes) before anything is built.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from safetensors import safe_open

from .arch import PROJS, arch_for
from .errors import PackedFormatError
from .experts import MoEExperts
from .layerwise import fresh_rotary, find_experts, hf_config, meta_model, set_submodule
from .packed import read_manifest, rebuild, verify_files


def _read_shards(path: str, manifest: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(manifest["files"]):
        try:
            with safe_open(os.path.join(path, name), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        except Exception as e:
            raise PackedFormatError(f"cannot read packed shard {name}: {e}") from None
    return out


def load(path: str, device: str = "cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Load packed checkpoint `path`; experts stay packed. dtype defaults to float32 on CPU."""
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg_dict = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PackedFormatError(f"{path}/config.json is missing or invalid ({e})") from None
    arch = arch_for(cfg_dict)
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    config = hf_config(cfg_dict, dtype)
    model = meta_model(config)
    glu = None
    tensors = _read_shards(path, manifest)

    by_layer: dict[int, dict[int, dict[str, object]]] = defaultdict(lambda: defaultdict(dict))
    consumed = set()
    for ent in manifest["tensors"]:
        try:
            layer, e, proj = int(ent["layer"]), int(ent["expert"]), ent["proj"]
        except (KeyError, TypeError, ValueError):
            raise PackedFormatError(f"malformed manifest entry {str(ent)[:80]}") from None
        if proj not in PROJS or not 0 <= layer < config.num_hidden_layers or not 0 <= e < 1 << 20:
            raise PackedFormatError(f"manifest entry {ent.get('name')!r}: bad layer/expert/proj")
        by_layer[layer][e][proj] = rebuild(ent, tensors)
        consumed.update(f"{ent['name']}.{f}" for f in ent["fields"])

    from .experts import make_glu
    glu = make_glu(arch.glu, config)
    layers = model.model.layers
    expert_paths = {}
    for i, experts in by_layer.items():
        found = find_experts(layers[i])
        if found is None:
            raise PackedFormatError(f"manifest has experts for layer {i}, which has no MoE block in this config")
        n = max(experts) + 1
        weights = [experts.get(e) if len(experts.get(e, {})) == 3 else None for e in range(n)]
        expected = getattr(found[1], "num_experts", n)
        if n > expected:
            raise PackedFormatError(f"layer {i}: manifest has {n} experts, the config {expected}")
        weights += [None] * (expected - n)
        expert_paths[i] = found[0]
        set_submodule(layers[i], found[0], torch.nn.Module())  # placeholder while the rest materializes

    prefix = "model.layers"
    state = {}
    for k, t in tensors.items():
        if k in consumed:
            continue
        state[arch.to_mem(k)] = t
    biases = {}
    for i in by_layer:  # GPT-OSS expert biases, stored as the fused tensors they came from
        bk = f"{prefix}.{i}.mlp.experts"
        if f"{bk}.gate_up_proj_bias" in state:
            gub, db = state.pop(f"{bk}.gate_up_proj_bias").to(dtype), state.pop(f"{bk}.down_proj_bias").to(dtype)
            biases[i] = [{"gate": gub[e, 0::2], "up": gub[e, 1::2], "down": db[e]} for e in range(gub.shape[0])]
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.startswith("lm_head."))]
    if missing or unexpected:
        raise PackedFormatError(f"packed tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    fresh_rotary(model)
    model = model.to(dtype)
    for i, experts in by_layer.items():
        n = getattr(layers[i].get_submodule(expert_paths[i].rpartition(".")[0] or ""), "num_experts", None)
        weights = [experts.get(e) if len(experts.get(e, {})) == 3 else None for e in range(max(experts) + 1)]
        set_submodule(layers[i], expert_paths[i], MoEExperts(weights, glu, biases.get(i)))
    model.eval()
    model.moecompress_manifest = manifest
    return model.to(device)
