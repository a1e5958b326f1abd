"""The packed checkpoint: written atomically, read back with validation.

Layout of a packed directory:
    config.json                 the source config plus quantization_config {"quant_method": "moecompress", ...}
    layer-00000.safetensors ... one shard per decoder layer: packed expert tensors named
                                `<layer path>.<experts path>.<e>.<proj>.<field>`, other tensors unchanged
    globals.safetensors         embeddings, final norm, head (unchanged)
    model.safetensors.index.json
    moecompress.json            the manifest: format_version, source fingerprint, every packed tensor's codec,
                                shape and attributes, shard checksums, size figures
    tokenizer files, run/       (run_config.json, plan.json, metrics.json, calibration.json)

Everything is written into `.<name>.partial` beside the target and renamed into place at the end, so a
killed run never leaves a directory that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from .codecs import PackedTensor, get_codec
from .errors import MoeCompressError, PackedFormatError

MANIFEST = "moecompress.json"
FORMAT_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def partial_dir(out: str) -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def dump_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


class PackedWriter:
    """Writes shards into a partial directory; `finish` adds index, config and manifest, then renames."""

    def __init__(self, out: str, resume: bool = False):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out):
            raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise MoeCompressError(f"output parent directory {parent} does not exist")
        self.tmp = partial_dir(out)
        if os.path.exists(self.tmp) and not resume:
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.entries: list[dict] = []

    def shard_done(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.tmp, name))

    def write_shard(self, name: str, tensors: dict[str, torch.Tensor], entries: list[dict] = ()) -> None:
        """Write one shard (atomically within the partial directory) and remember its tensors."""
        path = os.path.join(self.tmp, name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        self.register(name, list(tensors), entries)

    def register(self, name: str, keys: list[str], entries: list[dict] = ()) -> None:
        for k in keys:
            self.weight_map[k] = name
        self.entries.extend(entries)

    def finish(self, config: dict, manifest: dict, extra_files: dict[str, object] = None) -> None:
        dump_json(os.path.join(self.tmp, "config.json"), config)
        dump_json(os.path.join(self.tmp, "model.safetensors.index.json"),
                  {"metadata": {"format": "moecompress"}, "weight_map": dict(sorted(self.weight_map.items()))})
        for rel, obj in (extra_files or {}).items():
            p = os.path.join(self.tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            dump_json(p, obj)
        shards = sorted(set(self.weight_map.values()))
        manifest = dict(manifest)
        manifest["files"] = {s: {"bytes": os.path.getsize(os.path.join(self.tmp, s)),
                                 "sha256": sha256_file(os.path.join(self.tmp, s))} for s in shards}
        manifest["tensors"] = sorted(self.entries, key=lambda e: e["name"])
        dump_json(os.path.join(self.tmp, MANIFEST), manifest)  # last: its presence means complete
        os.replace(self.tmp, self.out)


def packed_entry(name: str, packed: PackedTensor, **where) -> dict:
    return {"name": name, "codec": packed.codec, "shape": list(packed.shape), "attrs": packed.attrs,
            "fields": sorted(packed.tensors), **where}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_manifest(path: str) -> dict:
    p = os.path.join(path, MANIFEST)
    if not os.path.isfile(p):
        raise PackedFormatError(f"{path} is not a moecompress packed checkpoint (no {MANIFEST})")
    if os.path.getsize(p) > 256 * 1024 * 1024:
        raise PackedFormatError(f"{MANIFEST} is implausibly large ({os.path.getsize(p)} bytes)")
    try:
        with open(p) as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackedFormatError(f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise PackedFormatError(f"{MANIFEST}: unsupported format_version {m.get('format_version') if isinstance(m, dict) else None!r} "
                                f"(this moecompress reads {FORMAT_VERSION})")
    for key in ("tensors", "files"):
        if not isinstance(m.get(key), (list, dict)):
            raise PackedFormatError(f"{MANIFEST}: missing or malformed {key!r}")
    return m


def verify_files(path: str, manifest: dict) -> None:
    """Every shard present, of the recorded size and checksum."""
    for name, rec in sorted(manifest["files"].items()):
        if os.path.basename(name) != name or not isinstance(rec, dict):
            raise PackedFormatError(f"{MANIFEST}: bad file entry {name!r}")
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise PackedFormatError(f"packed shard {name} is missing")
        if os.path.getsize(p) != rec.get("bytes"):
            raise PackedFormatError(f"packed shard {name} has {os.path.getsize(p)} bytes, the manifest says {rec.get('bytes')}: truncated or replaced")
        if sha256_file(p) != rec.get("sha256"):
            raise PackedFormatError(f"packed shard {name} is damaged (checksum mismatch)")


def rebuild(entry: dict, tensors: dict[str, torch.Tensor]) -> PackedTensor:
    """A PackedTensor from a manifest entry and its stored tensors, validated by its codec."""
    try:
        codec = get_codec(entry["codec"])
        shape = tuple(int(d) for d in entry["shape"])
        if len(shape) != 2 or min(shape) < 1 or shape[0] * shape[1] > 1 << 36:
            raise PackedFormatError(f"tensor {entry['name']}: implausible shape {shape}")
        pt = PackedTensor(entry["codec"], shape, {f: tensors[f"{entry['name']}.{f}"] for f in entry["fields"]},
                          dict(entry.get("attrs") or {}))
    except KeyError as e:
        raise PackedFormatError(f"manifest entry {entry.get('name')!r} names a tensor that is not stored: {e}") from None
    except (TypeError, ValueError):
        raise PackedFormatError(f"malformed manifest entry {entry.get('name')!r}") from None
    codec.check(pt)
    return pt
