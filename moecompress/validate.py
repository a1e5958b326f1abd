"""Validate a checkpoint before any long work, and report every problem at once.

A compression run takes hours on a large MoE; a bad shard found at layer 40 wastes all of them. This
pass reads only config.json and the safetensors headers first (every shard named by the index present,
readable and not truncated; no pickle-only checkpoints, which are refused and never loaded), checks the
tensors against the config (hidden size, routed expert count and expert width of every MoE layer, with
the per-layer counts of a `merge --ratio` output's "moecompress_merge" entry; one floating dtype per
expert tensor, no layer beyond num_hidden_layers), and then scans the values of every readable tensor
for NaN/Inf and, in expert tensors, magnitudes beyond the fp16 range (65504), which no
fp16 scale can represent. Quantized sources (FP8 with `_scale_inv` block scales, MXFP4 `_blocks` with
`_scales`; source_formats.py) are checked as the logical tensors they stand for: the parts must pair up
with consistent shapes, the logical shape is checked against the config, and the values are scanned
dequantized. It keeps going after a problem: the user gets the whole list in one message
and fixes it in one go.

`validate_checkpoint(path) -> ValidationReport`; `report.raise_if_bad()` raises one `CheckpointError`
whose one-line message lists the problems (the first few in full, then a count).
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

import torch

from .arch import PROJS, ArchSpec, arch_for
from .errors import CheckpointError
from .source_formats import SourceTensor, companions, find_sources

FP16_MAX = 65504.0
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
INDEX = "model.safetensors.index.json"
# Config keys holding the routed experts' intermediate width, most specific first. Qwen2/3-MoE and
# DeepSeek keep the dense MLP width in `intermediate_size` and the expert width in `moe_intermediate_size`.
WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")
SHOWN = 6  # problems quoted in full in the one-line message


@dataclass(frozen=True)
class ValidationReport:
    path: str
    problems: tuple[str, ...] = ()
    family: str | None = None
    moe_layers: tuple[int, ...] = ()
    tensors: int = 0
    checked_values: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self) -> str:
        n = len(self.problems)
        shown = "; ".join(self.problems[:SHOWN]) + (f"; and {n - SHOWN} more" if n > SHOWN else "")
        return (f"{self.path}: {n} problem{'s' if n > 1 else ''} found before any work was done: {shown}"
                if n > 1 else f"{shown}")

    def raise_if_bad(self) -> None:
        if self.problems:
            raise CheckpointError(self.message())


@dataclass
class _Scan:
    """Mutable state while scanning; frozen into a ValidationReport at the end."""
    path: str
    problems: list[str] = field(default_factory=list)
    infos: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)  # name -> (shard, dtype, shape)
    stored: dict[str, tuple[str, str, tuple[int, ...]]] = field(default_factory=dict)  # infos as on disk
    sources: dict[str, SourceTensor] = field(default_factory=dict)  # logical tensors stored quantized
    shapes: dict[tuple, list[str]] = field(default_factory=dict)  # (found, wanted, why) -> tensor names
    readable: list[str] = field(default_factory=list)

    def add(self, msg: str) -> None:
        self.problems.append(msg)


def validate_checkpoint(path: str, check_values: bool = True, progress=None) -> ValidationReport:
    """All problems of checkpoint directory `path` (see the module docstring). Never unpickles."""
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        return ValidationReport(path, (f"checkpoint directory {path} {what}: pass a Hugging Face checkpoint directory",))
    s = _Scan(path)
    config, arch = _config(s)
    _shards(s)
    _sources(s, config or {})
    layers: tuple[int, ...] = ()
    if config is not None and arch is not None and s.infos:
        layers = _structure(s, config, arch)
    checked = _values(s, progress) if check_values else 0
    return ValidationReport(path, tuple(s.problems), arch.family if arch else None, layers, len(s.infos), checked)


def _config(s: _Scan) -> tuple[dict | None, ArchSpec | None]:
    p = os.path.join(s.path, "config.json")
    if not os.path.isfile(p):
        s.add(f"no config.json in {s.path}: not a Hugging Face checkpoint directory")
        return None, None
    try:
        with open(p, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        s.add(f"config.json is not valid JSON ({getattr(e, 'msg', e)}): restore it from the original checkpoint")
        return None, None
    if not isinstance(config, dict):
        s.add("config.json is not a JSON object: restore it from the original checkpoint")
        return None, None
    if not isinstance(config.get("model_type"), str):
        s.add(f"config.json has no model_type name (found {str(config.get('model_type'))[:40]!r}): restore it from the original")
        return config, None
    try:
        arch = arch_for(config)
    except CheckpointError as e:
        s.add(str(e))
        return config, None
    except TypeError:
        s.add("config.json: malformed architectures list: restore it from the original checkpoint")
        return config, None
    try:
        from transformers import AutoConfig
        AutoConfig.for_model(config.get("model_type"))
    except (ValueError, KeyError):
        import transformers
        s.add(f"transformers {transformers.__version__} does not know model_type {config.get('model_type')!r}: upgrade transformers")
    for key in ("hidden_size", "num_hidden_layers"):
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            s.add(f"config.json: {key} should be a positive integer, found {v!r}")
    try:
        n = arch.num_experts(config)
        if n < 1:
            s.add(f"config.json: {arch.expert_count_key(config)} should be at least 1, found {n}")
        k = config.get("num_experts_per_tok")
        if k is not None and (not isinstance(k, int) or not 1 <= k <= n):
            s.add(f"config.json: num_experts_per_tok={k!r} should be between 1 and the {n} experts")
    except (CheckpointError, TypeError, ValueError) as e:
        s.add(str(e) if isinstance(e, CheckpointError) else f"config.json: the expert count is not an integer ({e})")
    return config, arch


def _pickles(path: str) -> list[str]:
    from .checkpoint import PICKLE_NAMES
    return sorted({os.path.basename(p) for pat in PICKLE_NAMES for p in glob.glob(os.path.join(path, pat))})


def _shards(s: _Scan) -> None:
    from .checkpoint import read_safetensors_header
    idx = os.path.join(s.path, INDEX)
    named: dict[str, str] = {}
    if os.path.isfile(idx):
        try:
            with open(idx, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError
            named = wm
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            s.add(f"{INDEX} is not a valid safetensors index (needs a weight_map of tensor -> shard)")
        shards = sorted(set(named.values()))
        bad = [x for x in shards if os.path.basename(x) != x]
        for x in bad:
            s.add(f"{INDEX} names shard {x!r} outside the checkpoint directory")
        missing = [x for x in shards if x not in bad and not os.path.isfile(os.path.join(s.path, x))]
        if missing:
            s.add(f"missing shard{'s' if len(missing) > 1 else ''} named by the index: {', '.join(missing)}")
        shards = [x for x in shards if x not in bad and x not in missing]
    else:
        shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(s.path, "*.safetensors")))
        if not shards:
            pk = _pickles(s.path)
            if pk:
                s.add(f"{s.path} holds only pickle weights ({', '.join(pk)}); moecompress never unpickles files: "
                      "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))")
            else:
                s.add(f"{s.path} has no *.safetensors weights")
            return
    for shard in shards:
        try:
            header, _ = read_safetensors_header(os.path.join(s.path, shard))
        except CheckpointError as e:
            s.add(f"{e}: re-download or re-copy this shard")
            continue
        except OSError as e:
            s.add(f"{shard} cannot be read ({e.strerror})")
            continue
        s.readable.append(shard)
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if k in s.infos:
                s.add(f"tensor {k} is stored twice ({s.infos[k][0]} and {shard})")
            s.infos[k] = (shard, v["dtype"], tuple(int(d) for d in v["shape"]))
    wrong = sorted(k for k, sh in named.items() if sh in s.readable and s.infos.get(k, (sh,))[0] != sh)
    if wrong:
        s.add(f"the index places {len(wrong)} tensor{'s' if len(wrong) > 1 else ''} in shards that do not hold "
              f"them (e.g. {wrong[0]} in {named[wrong[0]]})")


def _sources(s: _Scan, config: dict) -> None:
    """Pair quantized parts into logical tensors: `s.infos` becomes the logical view, `s.stored` keeps the parts."""
    s.stored = dict(s.infos)
    s.sources, problems = find_sources({k: v[1:] for k, v in s.infos.items()}, config)
    for p in problems:
        s.add(p)
    drop = companions(s.sources)
    by_part = {src.values: k for k, src in s.sources.items()}
    s.infos = {by_part.get(k, k): (v[0], s.sources[by_part[k]].format, s.sources[by_part[k]].shape)
               if k in by_part else v for k, v in s.stored.items() if k in by_part or k not in drop}


def _prefix(names) -> str | None:
    for cand in ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h"):
        if any(k.startswith(cand + ".") for k in names):
            return cand
    return None


def _structure(s: _Scan, config: dict, arch: ArchSpec) -> tuple[int, ...]:
    """Tensor shapes and dtypes against config.json; returns the MoE layers found."""
    prefix = _prefix(s.infos)
    if prefix is None:
        s.add("no decoder layers found in the tensor names (expected e.g. model.layers.0....)")
        return ()
    H, L = config.get("hidden_size"), config.get("num_hidden_layers")
    try:
        E = arch.num_experts(config)
    except CheckpointError:
        E = None
    width_key = next((k for k in WIDTH_KEYS if isinstance(config.get(k), int)), None)
    I = config.get(width_key) if width_key else None
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    seen = sorted({int(m.group(1)) for k in s.infos if (m := pat.match(k))})
    # DeepSeek-V3 stores its multi-token-prediction layers after the decoder's (model.layers.61 of 61); unused here
    mtp = config.get("num_nextn_predict_layers") or 0
    if isinstance(L, int) and isinstance(mtp, int) and seen and seen[-1] >= L + mtp:
        s.add(f"tensors for layer {seen[-1]} exist but config.json says num_hidden_layers={L}")
    gone = sorted(set(range(L)) - set(seen)) if isinstance(L, int) else []
    if gone:
        s.add(f"no tensors at all for decoder layer{'s' if len(gone) > 1 else ''} {', '.join(map(str, gone[:5]))} "
              f"(config.json says {L} layers)")
    counts = _layer_counts(s, config, E)  # {layer: K_l} of a `merge --ratio` output, else {}
    moe = []
    for i in (i for i in seen if not isinstance(L, int) or i < L):
        if arch.fused_keys(i, prefix)["gate_up"] in s.infos:
            moe.append(i)
            _fused_layer(s, arch, prefix, i, counts.get(i, E), H, I, width_key)
        elif any(k.startswith(f"{prefix}.{i}.{arch.moe_disk}.experts.") for k in s.infos):
            moe.append(i)
            _per_expert_layer(s, arch, prefix, i, counts.get(i, E), H, I, width_key)
    extra = sorted(set(counts) - set(moe))
    if extra:
        s.add(f"config.json: moecompress_merge gives expert counts for layer{'s' if len(extra) > 1 else ''} "
              f"{', '.join(map(str, extra[:5]))}, which hold no experts: restore config.json from the merge output")
    if not moe:
        s.add(f"config says {arch.family} but no expert tensors were found "
              f"(looked for e.g. {arch.per_expert_key(0, 0, 'gate', prefix)})")
    for (shape, want, what), names in s.shapes.items():
        n = len(names)
        s.add(f"{names[0]}{f' and {n - 1} more expert tensors' if n > 1 else ''} ha{'ve' if n > 1 else 's'} shape "
              f"{list(shape)} but config.json implies {list(want)} ({what})")
    emb = f"{prefix.rsplit('.', 1)[0]}.embed_tokens.weight"
    if emb in s.infos and isinstance(H, int) and s.infos[emb][2][-1:] != (H,):
        s.add(f"{emb} has shape {list(s.infos[emb][2])} but config.json says hidden_size={H}")
    return tuple(moe)


def _layer_counts(s: _Scan, config: dict, E: int | None) -> dict[int, int]:
    """Per-layer expert counts recorded by `moecompress merge --ratio` (config.json "moecompress_merge"),
    checked against the config's count (their maximum) and top-k; {} for any other checkpoint."""
    from .checkpoint import merged_counts
    try:
        counts = merged_counts(config) or {}
    except CheckpointError as e:
        s.add(str(e))
        return {}
    k = config.get("num_experts_per_tok")
    for i, n in sorted(counts.items()):
        if E is not None and n > E:
            s.add(f"config.json: moecompress_merge gives layer {i} {n} experts, more than the model's {E}: "
                  "restore config.json from the merge output")
        if isinstance(k, int) and n < k:
            s.add(f"config.json: moecompress_merge gives layer {i} {n} experts, fewer than num_experts_per_tok={k}: "
                  "merge again with a larger --ratio")
    return counts


def _expect(s: _Scan, name: str, want: tuple, what: str) -> None:
    info = s.infos.get(name)
    if info is None:
        s.add(f"{name} is missing")
        return
    _, dtype, shape = info
    if dtype not in FLOAT_DTYPES and name not in s.sources:
        s.add(f"{name} has dtype {dtype}; expert weights must be floating point ({', '.join(FLOAT_DTYPES)})")
    if None not in want and shape != want:  # grouped: one line per kind of mismatch, not one per expert
        s.shapes.setdefault((shape, want, what), []).append(name)


def _per_expert_layer(s, arch, prefix, i, E, H, I, width_key) -> None:
    pat = re.compile(re.escape(f"{prefix}.{i}.{arch.moe_disk}.experts.") + r"(\d+)\.")
    present = {int(m.group(1)) for k in s.infos if (m := pat.match(k))}
    count = max(present) + 1
    if E is not None and count != E:
        s.add(f"layer {i} has {count} experts but config.json says {E}")
    what = f"hidden_size={H}, {width_key}={I}"
    for e in range(count):  # experts missing in the middle show up as missing tensors
        for p in PROJS:
            want = (I, H) if p != "down" else (H, I)
            _expect(s, arch.per_expert_key(i, e, p, prefix), want, what)


def _fused_layer(s, arch, prefix, i, E, H, I, width_key) -> None:
    fk = arch.fused_keys(i, prefix)
    what = f"{E} experts, hidden_size={H}, {width_key}={I}"
    I2 = None if I is None else 2 * I
    if arch.glu == "gptoss":  # gate_up [E, H, 2I] interleaved, down [E, I, H], biases [E, 2I], [E, H]
        want = {"gate_up": (E, H, I2), "down": (E, I, H), "gate_up_bias": (E, I2), "down_bias": (E, H)}
    else:  # transformers v5 layout: gate_up [E, 2I, H], down [E, H, I]
        want = {"gate_up": (E, I2, H), "down": (E, H, I)}
    for k, shape in want.items():
        _expect(s, fk[k], shape, what)


def _values(s: _Scan, progress=None) -> int:
    """NaN/Inf anywhere, |w| > fp16 max in expert tensors; reads one tensor at a time."""
    from safetensors import safe_open
    n = 0
    if progress is not None:
        progress.total = len([k for k, v in s.infos.items() if v[0] in s.readable])
    for shard in s.readable:
        names = sorted(k for k, v in s.infos.items() if v[0] == shard)
        try:
            with safe_open(os.path.join(s.path, shard), "pt") as f:
                for k in names:
                    if k in s.sources:  # parts may sit in other shards
                        _check_tensor(s, k, s.sources[k].decode(*(_part(s, f, shard, p) for p in s.sources[k].parts())))
                        n += 1
                    elif s.infos[k][1] in FLOAT_DTYPES:
                        _check_tensor(s, k, f.get_tensor(k))
                        n += 1
                    if progress is not None:
                        progress.update(1)
        except Exception as e:  # safetensors raises its own types on corrupt data
            s.add(f"{shard}: cannot read its tensors ({str(e).splitlines()[0][:120]}): re-download or re-copy it")
    return n


def _part(s: _Scan, f, shard: str, name: str) -> torch.Tensor:
    """Stored tensor `name`, from the open shard `f` when it lives there."""
    from safetensors import safe_open
    where = s.stored[name][0]
    if where == shard:
        return f.get_tensor(name)
    with safe_open(os.path.join(s.path, where), "pt") as g:
        return g.get_tensor(name)


def _check_tensor(s: _Scan, name: str, t: torch.Tensor) -> None:
    t = t.float()
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
        kinds = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if x)
        s.add(f"{name} holds {kinds} value{'s' if nan + inf > 1 else ''}: the checkpoint is corrupt or was saved "
              "after a diverged step")
    elif ".experts." in name and t.numel() and float(t.abs().max()) > FP16_MAX:
        s.add(f"{name} has values beyond the fp16 range (max |w| = {float(t.abs().max()):.3g} > {FP16_MAX:g}): "
              "fp16 scales cannot represent it")
