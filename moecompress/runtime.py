"""`moecompress.load()`: a packed checkpoint as a transformers causal LM with packed experts.

The model skeleton is built on the meta device from the packed config, each MoE layer's fused experts
module is replaced by `MoEExperts` over the stored `PackedTensor`s (decoded on the fly, only for experts
that receive tokens; Triton kernels on CUDA, the torch reference on the CPU), and every other tensor is
loaded as stored, except the packed shared experts' Linears (manifest entries that name a `module`),
which become `PackedLinear`s. A quantized `merge --ratio` output keeps its per-layer expert counts in
config.json ("moecompress_merge"): those layers' routers get K_l rows and their experts K_l slots. The
manifest is validated against the shards (checksums, codecs from the fixed registry, shapes) before
anything is built.
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import defaultdict
from typing import NamedTuple

import torch
from safetensors import safe_open

from .arch import PROJS, arch_for
from .checkpoint import merged_counts, read_safetensors_header
from .errors import CheckpointError, PackedFormatError
from .codecs import PackedTensor
from .experts import MoEExperts, PackedLinear
from .layerwise import find_experts, hf_config, meta_model, set_submodule
from .packed import check_file_entries, guard_names, read_manifest, rebuild, verify_files


def _read_shards(path: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Every stored tensor. Each header is parsed and bounded by its file's size before safetensors maps it."""
    out = {}
    for name in sorted(manifest["files"]):
        p = os.path.join(path, name)
        try:
            header, _ = read_safetensors_header(p)
        except CheckpointError as e:
            raise PackedFormatError(f"packed shard {e}") from None
        except OSError as e:
            raise PackedFormatError(f"cannot read packed shard {name}: {e.strerror}") from None
        try:
            with safe_open(p, "pt") as f:
                for k in f.keys():
                    if k in out:
                        raise PackedFormatError(f"tensor {k} is stored twice (second copy in {name})")
                    out[k] = f.get_tensor(k)
        except PackedFormatError:
            raise
        except Exception as e:
            raise PackedFormatError(f"cannot read packed shard {name}: {str(e).splitlines()[0][:160]}") from None
        if set(out).isdisjoint(header) and len(header) > 1:
            raise PackedFormatError(f"packed shard {name}: header and tensors disagree")
    return out


def _read_config(path: str, tensors: dict[str, torch.Tensor], dtype):
    """config.json as a transformers config, after checking its sizes against the stored tensors."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg_dict = json.load(f)
        if not isinstance(cfg_dict, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PackedFormatError(f"{path}/config.json is missing or invalid ({e})") from None
    if not isinstance(cfg_dict.get("model_type"), str):
        raise PackedFormatError(f"config.json: model_type should be a name, found {str(cfg_dict.get('model_type'))[:40]!r}")
    try:
        arch = arch_for(cfg_dict)
    except CheckpointError as e:
        raise PackedFormatError(f"config.json: {e}") from None
    except TypeError:  # e.g. architectures that is not a list of names
        raise PackedFormatError("config.json: malformed model_type or architectures") from None
    n = cfg_dict.get("num_hidden_layers")
    stored = {int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LAYERS or stored != set(range(n)):
        raise PackedFormatError(f"config.json claims num_hidden_layers={n!r} but the shards hold layers "
                                f"{_ranges(stored)}: damaged or mismatched packed checkpoint")
    try:
        config = hf_config(cfg_dict, dtype)
    except CheckpointError as e:
        raise PackedFormatError(f"config.json: {e}") from None
    except Exception as e:  # transformers' own validation of hostile values
        raise PackedFormatError(f"config.json is not a valid {cfg_dict.get('model_type')} config: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from None
    try:
        counts = merged_counts(cfg_dict) or {}  # a quantized `merge --ratio` output: {layer: K_l}
    except CheckpointError as e:
        raise PackedFormatError(str(e)) from None
    return arch, config, counts


def _ranges(ids: set[int]) -> str:
    return "none" if not ids else f"{min(ids)}..{max(ids)} ({len(ids)} distinct)"


_LAYER = re.compile(r"model\.layers\.(\d+)\.")
MAX_LAYERS = 4096


def _check_shapes(model, state: dict[str, torch.Tensor], tied: bool) -> None:
    """Every non-expert parameter stored with the shape the config implies: checked on meta, before allocating."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in state and not (tied and k.startswith("lm_head."))]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise PackedFormatError(f"packed tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    bad = [k for k, t in state.items() if tuple(t.shape) != want[k]]
    if bad:
        raise PackedFormatError(f"packed tensor {bad[0]} has shape {list(state[bad[0]].shape)}, the config implies "
                                f"{list(want[bad[0]])}")


def _resize_routers(layers, arch, counts: dict[int, int], moe_layers, num_experts: int, top_k) -> None:
    """Routers of a quantized `merge --ratio` model on meta: (K_l, H) rows (and K_l-long per-expert router
    tensors) where the config's count implies (E, H); `_check_shapes` then holds the stored tensors to them."""
    from .merge.loader import resize_router
    for i, k in sorted(counts.items()):
        if i not in moe_layers or not max(top_k or 1, 1) <= k <= num_experts:
            raise PackedFormatError(f"config.json: moecompress_merge gives layer {i} {k} experts, which does not fit "
                                    f"its MoE layers, {num_experts} experts and top-{top_k}: damaged or mismatched "
                                    "packed checkpoint")
        router = layers[i].get_submodule(arch.router_mem)
        want = {n: torch.empty((k, *t.shape[1:]), device="meta")
                for n, t in list(router.named_parameters(recurse=False)) + list(router.named_buffers(recurse=False))
                if t is not None and t.dim() >= 1 and t.shape[0] == num_experts}
        resize_router(router, want, k)


def _manifest_experts(manifest: dict, tensors: dict, num_layers: int, num_experts: int, counts: dict | None = None):
    """{layer: {expert: {proj: PackedTensor}}} from the manifest, every entry validated by its codec
    (expert indices below the layer's own count in a `merge --ratio` model)."""
    by_layer: dict[int, dict[int, dict[str, object]]] = defaultdict(lambda: defaultdict(dict))
    consumed = set()
    for ent in manifest["tensors"]:
        if not isinstance(ent, dict):
            raise PackedFormatError(f"malformed manifest entry {str(ent)[:80]}")
        if "module" in ent:  # a packed Linear outside the experts (shared experts): `_manifest_modules`
            continue
        try:
            layer, e, proj = ent["layer"], ent["expert"], ent["proj"]
        except KeyError:
            raise PackedFormatError(f"malformed manifest entry {str(ent)[:80]}") from None
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (layer, e))
        limit = (counts or {}).get(layer, num_experts) if ints else num_experts
        if not ints or proj not in PROJS or not 0 <= layer < num_layers or not 0 <= e < limit:
            raise PackedFormatError(f"manifest entry {str(ent.get('name'))[:80]!r}: layer/expert/proj "
                                    f"{layer!r}/{e!r}/{proj!r} out of range ({num_layers} layers, {limit} experts)")
        if proj in by_layer[layer][e]:
            raise PackedFormatError(f"manifest lists layer {layer} expert {e} {proj} twice")
        by_layer[layer][e][proj] = rebuild(ent, tensors)
        consumed.update(f"{ent['name']}.{f}" for f in ent["fields"])
    return by_layer, consumed


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _manifest_modules(manifest: dict, tensors: dict, layers) -> tuple[dict, set]:
    """{(layer, module path): PackedTensor} of the packed Linears outside the experts (shared experts), each
    checked against the model's own Linear at that path (on meta: its shape)."""
    out, consumed = {}, set()
    for ent in manifest["tensors"]:
        if not isinstance(ent, dict) or "module" not in ent:
            continue
        i, mod = ent.get("layer"), ent.get("module")
        if (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(layers) or not isinstance(mod, str)
                or len(mod) > 200 or not _MODULE.fullmatch(mod)):
            raise PackedFormatError(f"manifest entry {str(ent.get('name'))[:80]!r}: bad layer/module "
                                    f"{str(i)[:20]}/{str(mod)[:80]}")
        try:
            lin = layers[i].get_submodule(mod)
        except AttributeError:
            lin = None
        if not isinstance(lin, torch.nn.Linear):
            raise PackedFormatError(f"manifest packs layer {i} {mod[:80]}, which is not a Linear of this model")
        if (i, mod) in out:
            raise PackedFormatError(f"manifest lists layer {i} {mod[:80]} twice")
        pt = rebuild(ent, tensors)
        if tuple(pt.shape) != tuple(lin.weight.shape):
            raise PackedFormatError(f"layer {i} {mod[:80]}: packed shape {list(pt.shape)}, the config implies "
                                    f"{list(lin.weight.shape)}")
        out[(i, mod)] = pt
        consumed.update(f"{ent['name']}.{f}" for f in ent["fields"])
    return out, consumed


class Validated(NamedTuple):
    """A packed checkpoint, checked: what `install` needs to build its packed modules on a skeleton."""

    path: str
    manifest: dict
    tensors: dict[str, torch.Tensor]  # every stored tensor, under its stored name
    arch: object
    config: object  # transformers config (compute dtype set)
    counts: dict[int, int]  # merge --ratio: {layer: K_l}
    by_layer: dict  # {layer: {expert: {proj: PackedTensor}}}
    modules: dict  # {(layer, module path): PackedTensor}
    skip: set  # stored names transformers must not look for in the model (guard, shared dictionaries)
    rotations: dict = {}  # --rotate: {layer: {"gate_up": (H,), "down": (I,)} int8 signs}, see `_rotations`


def validate(path: str, verify: bool = True, dtype: torch.dtype = torch.float32) -> Validated:
    """Check packed checkpoint `path` completely (manifest, shard sizes and, with verify, checksums; config
    against the stored tensors; every entry by its codec; every tensor's shape on the meta device) before
    anything is allocated beyond the stored tensors themselves. Raises PackedFormatError."""
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    else:
        check_file_entries(path, manifest)
    guard = guard_names(manifest)
    tensors = _read_shards(path, manifest)
    arch, config, counts = _read_config(path, tensors, dtype)
    try:
        model = meta_model(config)  # meta device: a config that lies about sizes allocates nothing here
    except Exception as e:
        raise PackedFormatError(f"config.json describes no buildable model: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:120] if str(e) else ''}") from None
    layers = model.model.layers
    num_experts = max([getattr(found[1], "num_experts", 0) for found in map(find_experts, layers) if found] or [0])
    top_k = getattr(config, "num_experts_per_tok", None)
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= max(num_experts, 1)):
        raise PackedFormatError(f"config.json: num_experts_per_tok={str(top_k)[:20]} is not between 1 and the "
                                f"{num_experts} experts")
    by_layer, consumed = _manifest_experts(manifest, tensors, config.num_hidden_layers, num_experts, counts)
    modules, consumed_m = _manifest_modules(manifest, tensors, layers)
    consumed |= consumed_m
    for i, experts in sorted(by_layer.items()):
        if find_experts(layers[i]) is None:
            raise PackedFormatError(f"manifest has experts for layer {i}, which has no MoE block in this config")
        _check_expert_shapes(i, experts, config.hidden_size)
    _resize_routers(layers, arch, counts, set(by_layer), num_experts, top_k)
    skip = guard | {k for k in tensors if k.startswith("moecompress.")}
    rotations = _rotations(manifest, tensors, layers, by_layer)
    v = Validated(path, manifest, tensors, arch, config, counts, dict(by_layer), modules, skip, rotations)
    _check_biases(v)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        qcfg = json.load(f).get("quantization_config")
    config.quantization_config = dict(qcfg) if isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD \
        else {"quant_method": QUANT_METHOD}
    install(model, v, meta=True)
    state = {arch.to_mem(k): t for k, t in tensors.items() if k not in skip}
    _check_shapes(model, state, bool(getattr(config, "tie_word_embeddings", False)))
    return v


def _rotations(manifest: dict, tensors: dict, layers, by_layer: dict) -> dict:
    """{layer: {"gate_up": (H,), "down": (I,)}} of a `quantize --rotate` checkpoint: the manifest's "rotation"
    names the rotated layers, each stores int8 +-1 signs `<experts path>.rotation_{gate_up,down}` of its
    experts' input widths, and only integer experts are rotated. A sign tensor in a layer the manifest does not
    name is left to `_check_shapes`, which refuses it as unexpected."""
    from .quant.hadamard import CONSTRUCTION, check_signs
    rot = manifest.get("rotation")
    if rot is None:
        return {}
    layer_ids = rot.get("layers") if isinstance(rot, dict) else None
    if (rot.get("method") if isinstance(rot, dict) else None) != "randomized-hadamard" or not isinstance(layer_ids, list) \
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in layer_ids):
        raise PackedFormatError("moecompress.json: malformed 'rotation' (method randomized-hadamard, a list of layers)")
    if rot.get("hadamard") != CONSTRUCTION:
        raise PackedFormatError(f"moecompress.json: rotation by Hadamard construction {str(rot.get('hadamard'))[:40]!r}; "
                                f"this moecompress builds {CONSTRUCTION!r} only")
    out = {}
    for i in layer_ids:
        if i not in by_layer or i in out:
            raise PackedFormatError(f"moecompress.json: rotation names layer {i}, which has no packed experts (or twice)")
        experts = by_layer[i]
        first = experts[min(experts)]
        if any(pt.codec != "int" for projs in experts.values() for pt in projs.values()):
            raise PackedFormatError(f"layer {i} is rotated but holds non-integer experts: damaged packed checkpoint")
        out[i] = {}
        for stage, K in (("gate_up", first["gate"].shape[1]), ("down", first["down"].shape[1])):
            name = f"model.layers.{i}.{find_experts(layers[i])[0]}.rotation_{stage}"
            why = check_signs(tensors.get(name), K) if name in tensors else "are missing"
            if why:
                raise PackedFormatError(f"layer {i}: rotation signs {name} {why}")
            out[i][stage] = tensors[name]
    return out


def _check_biases(v: Validated) -> None:
    """GPT-OSS expert biases, stored as the fused tensors they came from: shapes fit the experts."""
    for i, experts in v.by_layer.items():
        bk = f"model.layers.{i}.mlp.experts"
        gub, db = v.tensors.get(f"{bk}.gate_up_proj_bias"), v.tensors.get(f"{bk}.down_proj_bias")
        if gub is None and db is None:
            continue
        if (gub is None or db is None or gub.dim() != 2 or db.dim() != 2 or gub.shape[0] < max(experts) + 1
                or db.shape[0] != gub.shape[0] or db.shape[1] != v.config.hidden_size or gub.shape[1] % 2):
            raise PackedFormatError(f"layer {i}: expert biases have inconsistent shapes")


def install(model, v: Validated, meta: bool) -> None:
    """Swap a skeleton's dense experts for `MoEExperts` and its packed Linears for `PackedLinear`s, with the
    merged router sizes. meta=True: packed buffers on the meta device (a loader fills them, by name);
    meta=False: the validated tensors themselves. Shared tables (sub1 dictionaries) are always real."""
    from .experts import make_glu
    layers = model.model.layers
    _resize_routers(layers, v.arch, v.counts, set(v.by_layer), _num_experts(layers), getattr(v.config, "num_experts_per_tok", None))
    glu = make_glu(v.arch.glu, v.config)
    dtype = v.config.dtype if isinstance(v.config.dtype, torch.dtype) else torch.float32

    def place(t, keep=False):
        return t if keep or not meta else torch.empty_like(t, device="meta")

    def packed(pt):
        return PackedTensor(pt.codec, pt.shape, {k: place(t, k == "dictionary") for k, t in pt.tensors.items()}, pt.attrs)

    for (i, mod), pt in v.modules.items():
        lin = layers[i].get_submodule(mod)
        bias = None if lin.bias is None else torch.empty(lin.bias.shape, dtype=dtype, device="meta")
        set_submodule(layers[i], mod, PackedLinear(packed(pt), bias))
    for i, experts in v.by_layer.items():
        path, _ = find_experts(layers[i])
        weights = [None if experts.get(e) is None else {p: packed(t) for p, t in experts[e].items()}
                   for e in range(max(experts) + 1)]
        bk = f"model.layers.{i}.mlp.experts"
        fused = {n: place(v.tensors[f"{bk}.{n}"].to(dtype)) for n in ("gate_up_proj_bias", "down_proj_bias")
                 if f"{bk}.{n}" in v.tensors}
        rotation = {k: place(t) for k, t in v.rotations.get(i, {}).items()}  # int8 signs, filled by name
        set_submodule(layers[i], path, MoEExperts(weights, glu, fused_biases=fused or None, rotation=rotation or None))


def _num_experts(layers) -> int:
    return max([getattr(found[1], "num_experts", 0) for found in map(find_experts, layers) if found] or [0])


QUANT_METHOD = "moecompress"
_PENDING = threading.local()  # load() -> the quantizer, same thread: checked once, read once


def default_dtype(device) -> torch.dtype:
    """The compute dtype when none is given: float32 on the CPU, bfloat16 on an accelerator."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True):
    """Load packed checkpoint `path`; experts stay packed. dtype defaults to float32 on CPU, else bfloat16.

    A shortcut to `AutoModelForCausalLM.from_pretrained(path, dtype=..., device_map={"": device})` through the
    registered moecompress quantizer, after the full validation of `validate` (checksums with verify): a
    damaged or hostile directory raises PackedFormatError before anything is allocated beyond the stored
    tensors themselves (whose sizes are bounded by the files), and the tensors read for the checks are the
    ones the model holds (nothing is read twice)."""
    from .packed import MANIFEST
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        from .merge.loader import is_merged, load_merged
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                if is_merged(json.load(f)):  # a `merge --ratio` output: per-layer expert counts
                    return load_merged(path, dtype or torch.float32).to(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PackedFormatError(f"unknown device {str(device)[:40]!r}") from None
    dtype = dtype or default_dtype(device)
    v = validate(path, verify, dtype)
    from transformers import AutoModelForCausalLM
    from .hf_quantizer import register
    register()
    _PENDING.validated = v
    try:
        cls = AutoModelForCausalLM._model_mapping[type(v.config)]  # the class: no name to resolve, tensors given
        model, info = cls.from_pretrained(
            None, config=v.config, dtype=dtype, device_map={"": device}, output_loading_info=True,
            state_dict={k: t for k, t in v.tensors.items() if k not in v.skip})
    except PackedFormatError:
        raise
    except Exception as e:
        raise PackedFormatError(f"transformers could not build the packed model: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:160] if str(e) else ''}") from None
    finally:
        _PENDING.validated = None
    bad = {k: sorted(map(str, info.get(k) or ()))[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise PackedFormatError(f"packed tensors do not match the model: {bad}")
    return model


def _check_expert_shapes(layer: int, experts: dict, H: int) -> None:
    """Every listed expert complete, gate/up (I, H) and down (H, I): a forward can never fail on shapes."""
    for e, projs in sorted(experts.items()):
        if len(projs) != 3:
            raise PackedFormatError(f"layer {layer} expert {e} lacks {', '.join(p for p in PROJS if p not in projs)}")
        g, u, d = (tuple(projs[p].shape) for p in PROJS)
        if g != u or g[1] != H or d != (H, g[0]):
            raise PackedFormatError(f"layer {layer} expert {e}: shapes gate {g}, up {u}, down {d} do not fit "
                                    f"hidden_size {H} (want (I, {H}), (I, {H}), ({H}, I))")
