"""transformers integration: quant_method "moecompress" as a registered `HfQuantizer`.

After `import moecompress`, `AutoModelForCausalLM.from_pretrained(packed_dir, dtype=..., device_map=...)`
builds the packed model: the checkpoint is validated (`runtime.validate`: manifest, shard sizes, config
against the stored tensors, every packed entry by its codec, every shape on the meta device), each MoE
layer's dense experts module on the skeleton becomes a `MoEExperts` over meta `PackedWeight` buffers named
as in the checkpoint (`<experts path>.<e>.<proj>.<field>`), packed shared-expert Linears become
`PackedLinear`s, merged routers get their per-layer rows; transformers' own loader then fills every tensor
by name, places it per `device_map` (offload included) and keeps the packed tensors' stored dtypes (the
meta buffers carry them). dtype "auto" (transformers' default) means float32 when everything loads on
the CPU, as `moecompress.load`; otherwise the config's dtype.

The quantizer owns the packed names: `save_pretrained` writes the model's own tensor names (no reverse
renaming, which would move `mlp.experts.<e>.<proj>.*` to the source layout's names), adds the shared
sub1 dictionaries and the refusal placeholders (`packed.guard_tensors`), then writes `moecompress.json`
with the new shards' sizes and checksums: the result loads back with `moecompress.load` or
`from_pretrained`.

Registration is idempotent (`register()` checks transformers' tables first). `import moecompress` does no
work: it registers at once when transformers is already imported, else when `transformers.quantizers.auto`
is first imported (`install_import_hook`).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys

QUANT_METHOD = "moecompress"
_HOOKED = "transformers.quantizers.auto"


def register() -> None:
    """Register the config and quantizer with transformers, once."""
    from transformers.quantizers import auto
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(_classes()[0])
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(_classes()[1])


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `register()` right after transformers.quantizers.auto executes, wherever it is imported from."""

    def find_spec(self, name, path=None, target=None):
        if name != _HOOKED:
            return None
        sys.meta_path.remove(self)  # one shot; and the lookup below must not find this finder again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            register()
        spec.loader.exec_module = exec_module
        return spec


def install_import_hook() -> None:
    if _HOOKED in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_CLASSES = []


def _classes():
    """(config class, quantizer class), defined on first use so that this module imports without transformers."""
    if _CLASSES:
        return _CLASSES
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class MoeCompressConfig(QuantizationConfigMixin):
        """config.json's quantization_config of a packed checkpoint, kept as written."""

        def __init__(self, **kwargs):
            kwargs.pop("quant_method", None)
            self.quant_method = QUANT_METHOD
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    class MoeCompressHfQuantizer(HfQuantizer):
        """Loads packed checkpoints written by `moecompress quantize` (pre-quantized only)."""

        requires_calibration = True

        def validate_environment(self, device_map=None, **kwargs):
            if not self.pre_quantized:
                raise ValueError("moecompress quantizes with `moecompress quantize`; from_pretrained only loads "
                                 "its packed checkpoints")
            self.device_map = device_map

        def update_attn_implementation(self, config):
            if _cpu_only(getattr(self, "device_map", None)):
                config.dtype = torch.float32  # dtype="auto" on the CPU: float32, as moecompress.load
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
            from . import runtime
            v = getattr(runtime._PENDING, "validated", None)  # moecompress.load: checked and read already
            if v is None:  # from_pretrained called directly: check everything but the checksums
                if not checkpoint_files:
                    raise ValueError("moecompress: from_pretrained needs the packed checkpoint's directory")
                v = runtime.validate(os.path.dirname(checkpoint_files[0]), verify=False, dtype=dtype or torch.float32)
            runtime._PENDING.validated = None
            runtime.install(model, v, meta=True)
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {f"^{re.escape(k)}$" for k in v.skip}
            self.manifest = v.manifest
            # decode tables are non-persistent buffers, which transformers re-creates empty after loading
            self.tables = {name: dict(m._buffers) for name, m in model.named_modules()
                           if m.__class__.__name__ == "MoEExperts" and m.shared_tables()}
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .experts import MoEExperts
            for name, bufs in getattr(self, "tables", {}).items():
                m = model.get_submodule(name)
                for k, t in bufs.items():
                    if k.startswith("sub1_dictionary_"):
                        m._buffers[k] = t.to(_device_of(m, t))
            self.tables = {}
            for m in model.modules():
                if isinstance(m, MoEExperts):
                    m._sync()
                    _check_loaded(m)
            cast_renamed_params(model)
            keep_rotary_float32(model)
            model.moecompress_manifest = self.manifest
            model._weight_conversions = []  # the packed names are ours: nothing to revert on save
            _bind_save(model)
            return model

        def get_state_dict_and_metadata(self, model):
            return packed_state_dict(model), {}

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    _CLASSES.extend([MoeCompressConfig, MoeCompressHfQuantizer])
    return _CLASSES


def _device_of(module, default):
    """Where a module's packed buffers landed (the first real one), for the tables that go beside them."""
    for t in module.buffers():
        if t.device.type != "meta":
            return t.device
    return default.device


def _cpu_only(device_map) -> bool:
    import torch
    if device_map is None:
        return True
    if isinstance(device_map, str):
        return device_map in ("cpu", "disk") or (device_map in ("auto", "balanced", "balanced_low_0", "sequential")
                                                 and not torch.cuda.is_available())
    if isinstance(device_map, dict):
        return all(str(d) in ("cpu", "disk") for d in device_map.values())
    return str(device_map) == "cpu"


def packed_state_dict(model) -> dict:
    """The model's tensors under the packed checkpoint's names: every buffer and parameter (the packed
    fields under their manifest names), the shared sub1 dictionaries, the refusal placeholders. Views
    (the stacked kernel layout shares storage) are copied, so each saved tensor owns its bytes."""
    from .experts import MoEExperts
    from .packed import guard_tensors
    sd = model.state_dict()
    for m in model.modules():
        if isinstance(m, MoEExperts):
            for i, t in m.shared_tables().items():
                sd[f"moecompress.sub1_dictionary.{i}"] = t
    sd.update(guard_tensors(getattr(model, "moecompress_manifest", {}).get("tensors", [])))
    return {k: t.contiguous().clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
            for k, t in sd.items()}


def cast_renamed_params(model) -> None:
    """Dense parameters left in their stored dtype: transformers before 5.23 loads a pre-quantized checkpoint's
    *renamed* keys (Mixtral's `block_sparse_moe.gate` -> `mlp.gate`) as stored, so a bf16 router met float32
    hidden states. Each such floating parameter is cast to the dtype the embeddings were loaded in, except
    modules the model keeps in float32 (`_keep_in_fp32_modules`); packed tensors are buffers and untouched.
    A no-op where transformers cast them already."""
    emb = model.get_input_embeddings()
    want = getattr(getattr(emb, "weight", None), "dtype", None)
    if want is None or not want.is_floating_point:
        return
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != want and p.device.type != "meta" and not any(
                f".{k}." in f".{name}." for k in keep):
            p.data = p.data.to(want)


def keep_rotary_float32(model) -> None:
    """Rotary tables (`inv_freq` buffers) follow the device but keep float32 under `.to(dtype)`: that is how
    from_pretrained(dtype=...) builds them, so `load(p).to(bf16)` computes what `load(p, dtype=bf16)` does."""
    import types
    from .experts import _apply_keep_dtype
    for m in model.modules():
        if isinstance(m._buffers.get("inv_freq"), __import__("torch").Tensor) and not m._parameters:
            m._apply = types.MethodType(_apply_keep_dtype, m)


def _bind_save(model) -> None:
    """`model.save_pretrained(d)`: transformers writes the shards and config (no reverse renaming), then the
    manifest is written with the new files' sizes and checksums. `.half()` and `.float()`, which transformers
    refuses on quantized models, cast the compute dtype (packed tensors keep theirs: `PackedWeight`)."""
    import torch
    cls_save = type(model).save_pretrained
    model.half = lambda: torch.nn.Module.half(model)
    model.float = lambda: torch.nn.Module.float(model)

    def save_pretrained(save_directory, *args, **kwargs):
        kwargs["save_original_format"] = False
        cls_save(model, save_directory, *args, **kwargs)
        write_manifest(model, save_directory)
    model.save_pretrained = save_pretrained


def write_manifest(model, path: str) -> None:
    from .packed import MANIFEST, dump_json, guard_tensors, sha256_file
    m = dict(model.moecompress_manifest)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    m["files"] = {f: {"bytes": os.path.getsize(os.path.join(path, f)), "sha256": sha256_file(os.path.join(path, f))}
                  for f in files}
    guard = guard_tensors(m.get("tensors", []))
    if guard:
        m["guard"] = sorted(guard)
    dump_json(os.path.join(path, MANIFEST), m, compact=True)


def _check_loaded(experts) -> None:
    """Codec checks once, at load, for every packed expert whose tensors are here (an offloaded one is
    checked when its tensors arrive, at its first use)."""
    from .codecs import PackedTensor, ensure_checked
    for w in experts.weights:
        for v in (w or {}).values():
            if isinstance(v, PackedTensor) and all(t.device.type != "meta" for t in v.tensors.values()):
                ensure_checked(v)
