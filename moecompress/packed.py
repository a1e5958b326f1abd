"""The packed checkpoint: written atomically, read back with validation.

Layout of a packed directory:
    config.json                 the source config plus quantization_config {"quant_method": "moecompress", ...}
    layer-00000.safetensors ... one shard per decoder layer: packed expert tensors named
                                `<layer path>.<experts path>.<e>.<proj>.<field>`, other tensors unchanged
    globals.safetensors         embeddings, final norm, head (unchanged)
    model.safetensors.index.json
    moecompress.json            the manifest: format_version, source fingerprint, every packed tensor's codec,
                                shape and attributes, shard checksums, size figures
    moecompress-guard.safetensors  1-element placeholders under each MoE layer's dense expert names, so
                                that plain transformers (without `import moecompress`) refuses with a size
                                mismatch instead of building random experts (`guard_tensors`)
    tokenizer files, run/       (run_config.json, plan.json, metrics.json, calibration.json)

Everything is written into `.<name>.partial` beside the target and renamed into place at the end, so a
killed run never leaves a directory that looks complete. While a run is in progress the partial
directory also holds `progress.json` (fingerprints of the input, plan, options and calibration tokens;
per finished layer its shard's sha256, tensor names, manifest entries and calibration record) and
`hidden-<i>.safetensors`, the float32 hidden states leaving the last finished layer. `--resume` checks
the fingerprints and checksums and continues with the next layer; since every layer's inputs are
restored bit for bit (and the torch thread count is adopted), the result is byte-identical to an
uninterrupted run. Neither file reaches the finished output.

Reading is defensive: the manifest's structure, every shard name, size and checksum, each safetensors
header (bounded by its file's size before it is mapped) and each entry (codec from the fixed registry,
shape, fields, codec `check`) are validated, and the runtime ties every shape to config.json on the
meta device before allocating, so a damaged or hostile directory raises PackedFormatError.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

from .codecs import PackedTensor, get_codec
from .errors import MoeCompressError, PackedFormatError

log = logging.getLogger("moecompress")
MANIFEST = "moecompress.json"
PROGRESS = "progress.json"  # in the partial directory only
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


@contextmanager
def output_lock(out: str, wait: bool = False):
    """Exclusive right to write `out` and its partial directory, held through an flock on `.<name>.lock`.

    The kernel drops the lock when its holder exits, even by SIGKILL, so a stale lock file never blocks.
    wait=False (a fresh run): another live writer is an error. wait=True (--resume): wait for it to
    finish or die, then continue from what it left."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        fcntl = None
    if fcntl is None or not os.path.isdir(parent):
        yield
        return
    path = os.path.join(parent, f".{os.path.basename(out)}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise MoeCompressError(f"another moecompress run is writing {out} right now: wait for it, "
                                       "or choose another --out") from None
            log.warning("waiting for the run still writing %s to finish or die", out)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder removes the file when done: make sure ours is still the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def dump_json(path: str, obj, compact: bool = False) -> None:
    """Sorted keys; compact (no whitespace) for the manifest, whose bytes count in the size on disk."""
    with open(path, "w") as f:
        if compact:
            json.dump(obj, f, sort_keys=True, separators=(",", ":"))
        else:
            json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")


class PackedWriter:
    """Writes shards into a partial directory; `finish` adds index, config and manifest, then renames.

    Resumable: `commit_layer` records each finished decoder layer in `progress.json` (atomically, after
    its shard and the hidden states entering the next layer are on disk), under fingerprints of the
    input, the plan and the options. `PackedWriter(out, resume=True, fingerprints=...)` picks a matching
    partial run up again (`completed`, `load_hidden()`); a mismatch is an error that names what changed.
    """

    def __init__(self, out: str, resume: bool = False, fingerprints: dict | None = None):
        self.out = os.path.abspath(out)
        if os.path.exists(self.out):
            raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
        parent = os.path.dirname(self.out)
        if not os.path.isdir(parent):
            raise MoeCompressError(f"output parent directory {parent} does not exist")
        self.tmp = partial_dir(out)
        self.fingerprints = dict(fingerprints or {})
        self.weight_map: dict[str, str] = {}
        self.entries: list[dict] = []
        self.completed: list[dict] = []  # progress records of the layers already done, in order
        # CPU reductions split by thread count: the same bytes need the same count, so a resume adopts it
        self.threads = torch.get_num_threads()
        if os.path.exists(self.tmp) and not (resume and self._resume()):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp, exist_ok=True)

    # -- resume ---------------------------------------------------------------------------------
    def _resume(self) -> bool:
        """Load a partial run's progress; False when there is nothing usable to continue."""
        p = os.path.join(self.tmp, PROGRESS)
        if not os.path.isfile(p):
            return False  # killed before its first layer was committed: nothing worth keeping
        try:
            with open(p) as f:
                prog = json.load(f)
            layers, fps = prog["layers"], prog["fingerprints"]
            if not isinstance(layers, list) or not isinstance(fps, dict):
                raise TypeError(PROGRESS)
        except (OSError, ValueError, KeyError, TypeError):
            raise MoeCompressError(f"the partial run in {self.tmp} has an unreadable {PROGRESS}: remove that "
                                   "directory and run again without --resume") from None
        changed = sorted(k for k in set(fps) | set(self.fingerprints) if fps.get(k) != self.fingerprints.get(k))
        if changed:
            raise MoeCompressError(f"cannot resume: the {' and the '.join(changed)} differ{'s' if len(changed) == 1 else ''} "
                                   f"from the interrupted run in {self.tmp}; rerun with the same input and options, "
                                   "or drop --resume to start over")
        for n, rec in enumerate(layers):
            shard = os.path.join(self.tmp, rec["shard"])
            if rec["layer"] != n or not os.path.isfile(shard) or sha256_file(shard) != rec["sha256"]:
                raise MoeCompressError(f"cannot resume: {rec['shard']} in {self.tmp} is missing or changed since it "
                                       "was written; drop --resume to start over")
        if layers:
            h = os.path.join(self.tmp, layers[-1]["hidden"])
            if not os.path.isfile(h) or sha256_file(h) != layers[-1]["hidden_sha256"]:
                raise MoeCompressError(f"cannot resume: the saved activations {layers[-1]['hidden']} in {self.tmp} "
                                       "are missing or damaged; drop --resume to start over")
        self.completed = layers
        if isinstance(prog.get("torch_threads"), int) and prog["torch_threads"] > 0:
            self.threads = prog["torch_threads"]
        for rec in layers:
            self.register(rec["shard"], rec["keys"], rec["entries"])
        return True

    def load_hidden(self, stream: str = "hidden") -> torch.Tensor | None:
        """The hidden states entering the first layer not yet done (saved by the last commit); stream
        "hidden_fp": the unquantized model's (--fp-target), None where they were still the same."""
        from safetensors.torch import load_file
        got = load_file(os.path.join(self.tmp, self.completed[-1]["hidden"]))
        if stream == "hidden" and stream not in got:
            raise MoeCompressError(f"cannot resume: the saved activations in {self.tmp} hold no {stream!r}")
        return got.get(stream)

    def commit_layer(self, layer: int, name: str, tensors: dict[str, torch.Tensor], entries: list[dict],
                     hidden: torch.Tensor, record: dict | None = None, expert_bytes: int = 0,
                     hidden_fp: torch.Tensor | None = None) -> None:
        """Write layer `layer`'s shard and the hidden states it outputs (and with --fp-target the unquantized
        model's, `hidden_fp`), then record both in progress.json."""
        assert layer == len(self.completed), (layer, len(self.completed))
        self.write_shard(name, tensors, entries)
        hname = f"hidden-{layer:05d}.safetensors"
        hpath = os.path.join(self.tmp, hname)
        streams = {"hidden": hidden.contiguous()}
        if hidden_fp is not None:
            streams["hidden_fp"] = hidden_fp.contiguous()
        save_file(streams, hpath + ".tmp")
        os.replace(hpath + ".tmp", hpath)
        self.completed.append({"layer": layer, "shard": name, "sha256": sha256_file(os.path.join(self.tmp, name)),
                               "keys": sorted(tensors), "entries": list(entries), "record": record,
                               "expert_bytes": int(expert_bytes), "hidden": hname, "hidden_sha256": sha256_file(hpath)})
        self._write_progress()
        if layer > 0:  # only the newest activations are needed to continue
            old = os.path.join(self.tmp, f"hidden-{layer - 1:05d}.safetensors")
            if os.path.exists(old):
                os.remove(old)

    def _write_progress(self) -> None:
        p = os.path.join(self.tmp, PROGRESS)
        dump_json(p + ".tmp", {"format_version": FORMAT_VERSION, "fingerprints": self.fingerprints,
                               "torch_threads": self.threads, "layers": self.completed})
        os.replace(p + ".tmp", p)

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
        guard = guard_tensors(self.entries)
        if guard:
            self.write_shard(GUARD_SHARD, guard)
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
        if guard:
            manifest["guard"] = sorted(guard)
        for f in os.listdir(self.tmp):  # resume bookkeeping never reaches the output
            if f == PROGRESS or (f.startswith("hidden-") and f.endswith(".safetensors")) or f.endswith(".tmp"):
                os.remove(os.path.join(self.tmp, f))
        dump_json(os.path.join(self.tmp, MANIFEST), manifest, compact=True)  # last: its presence means complete
        os.replace(self.tmp, self.out)


GUARD_SHARD = "moecompress-guard.safetensors"
GUARD_PARAMS = ("gate_up_proj", "down_proj")


def guard_tensors(entries) -> dict[str, torch.Tensor]:
    """Refusal by plain transformers: a 1-element placeholder under each MoE layer's dense fused expert
    parameters (`<experts path>.gate_up_proj`, `.down_proj`, the names transformers' own module holds).
    Without the moecompress quantizer, transformers loads them into the (E, 2I, H) / (E, H, I) parameters
    and raises a size mismatch, for every codec (8-bit codes alone would fit the dense shape); with it, the
    experts module is packed and the placeholders are skipped. Listed in the manifest under "guard"."""
    paths = sorted({e["name"].rsplit(".", 2)[0] for e in entries
                    if isinstance(e, dict) and "expert" in e and "module" not in e and isinstance(e.get("name"), str)})
    return {f"{p}.{n}": torch.zeros(1, dtype=torch.uint8) for p in paths for n in GUARD_PARAMS}


def guard_names(manifest: dict) -> set[str]:
    g = manifest.get("guard", [])
    if not isinstance(g, list) or not all(isinstance(n, str) and n.rsplit(".", 1)[-1] in GUARD_PARAMS for n in g):
        raise PackedFormatError(f"{MANIFEST}: malformed 'guard' (names of refusal placeholders)")
    return set(g)


def packed_entry(name: str, packed: PackedTensor, **where) -> dict:
    return {"name": name, "codec": packed.codec, "shape": list(packed.shape), "attrs": packed.attrs,
            "fields": sorted(packed.tensors), **where}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


MAX_SHARDS = 100_000


def read_manifest(path: str) -> dict:
    """The manifest, with its top-level structure checked (entries are checked by `rebuild`)."""
    p = os.path.join(path, MANIFEST)
    if not os.path.isfile(p):
        raise PackedFormatError(f"{path} is not a moecompress packed checkpoint (no {MANIFEST})")
    if os.path.getsize(p) > 256 * 1024 * 1024:
        raise PackedFormatError(f"{MANIFEST} is implausibly large ({os.path.getsize(p)} bytes)")
    try:
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PackedFormatError(f"{MANIFEST} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise PackedFormatError(f"{MANIFEST}: unsupported format_version {m.get('format_version') if isinstance(m, dict) else None!r} "
                                f"(this moecompress reads {FORMAT_VERSION})")
    if not isinstance(m.get("tensors"), list):
        raise PackedFormatError(f"{MANIFEST}: missing or malformed 'tensors' (a list of packed tensors)")
    if not isinstance(m.get("files"), dict) or not 0 < len(m["files"]) <= MAX_SHARDS:
        raise PackedFormatError(f"{MANIFEST}: missing or malformed 'files' (shard -> size and checksum)")
    return m


def check_file_entries(path: str, manifest: dict) -> None:
    """Shard names are plain file names in `path`, present, of the recorded size."""
    for name, rec in sorted(manifest["files"].items()):
        if (not isinstance(name, str) or os.path.basename(name) != name or name in (".", "..")
                or not name.endswith(".safetensors") or not isinstance(rec, dict)):
            raise PackedFormatError(f"{MANIFEST}: bad file entry {str(name)[:80]!r}")
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise PackedFormatError(f"packed shard {name} is missing")
        if os.path.getsize(p) != rec.get("bytes"):
            raise PackedFormatError(f"packed shard {name} has {os.path.getsize(p)} bytes, the manifest says "
                                    f"{str(rec.get('bytes'))[:40]}: truncated or replaced")


def verify_files(path: str, manifest: dict) -> None:
    """Every shard present, of the recorded size and checksum."""
    check_file_entries(path, manifest)
    for name, rec in sorted(manifest["files"].items()):
        if sha256_file(os.path.join(path, name)) != rec.get("sha256"):
            raise PackedFormatError(f"packed shard {name} is damaged (checksum mismatch): copy it again or re-run quantize")


def rebuild(entry: dict, tensors: dict[str, torch.Tensor]) -> PackedTensor:
    """A PackedTensor from a manifest entry and its stored tensors, validated by its codec.

    Everything the entry claims is checked against the stored tensors before any decode can run: the
    codec comes from the fixed registry, the shape is two positive ints, the fields are stored tensors,
    and the codec's `check` ties shapes, dtypes and attributes together (offsets, codeword indices)."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str):
        raise PackedFormatError(f"malformed manifest entry {str(entry)[:80]} (no name)")
    codec_name, shape, fields, attrs = (entry.get(k) for k in ("codec", "shape", "fields", "attrs"))
    if not isinstance(codec_name, str):
        raise PackedFormatError(f"manifest entry {name[:80]!r}: codec should be a name, found {str(codec_name)[:40]!r}")
    codec = get_codec(codec_name)  # a fixed registry: an unknown name is an error, never an import
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 1 << 31 for d in shape)):
        raise PackedFormatError(f"tensor {name[:80]}: implausible shape {str(shape)[:60]}")
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) for f in fields):
        raise PackedFormatError(f"manifest entry {name[:80]!r}: malformed fields")
    if attrs is not None and not isinstance(attrs, dict):
        raise PackedFormatError(f"manifest entry {name[:80]!r}: attrs should be an object")
    missing = [f for f in fields if f"{name}.{f}" not in tensors]
    if missing:
        raise PackedFormatError(f"manifest entry {name[:80]!r} names a tensor that is not stored: {missing[0][:40]!r}")
    stored = sum(tensors[f"{name}.{f}"].numel() for f in fields)
    if shape[0] * shape[1] > 256 * max(stored, 1):  # a sub1 codeword covers at most 128 weights
        raise PackedFormatError(f"tensor {name[:80]}: claimed shape {shape} is far larger than its {stored} stored values")
    pt = PackedTensor(codec_name, (shape[0], shape[1]), {f: tensors[f"{name}.{f}"] for f in fields}, dict(attrs or {}))
    try:
        if codec_name == "sub1":  # its dictionary is stored once per model, not per tensor
            from .codecs.ternary import attach_shared
            pt = attach_shared(pt, tensors)
        codec.check(pt)
    except PackedFormatError as e:
        raise PackedFormatError(f"tensor {name[:80]}: {e}") from None
    except Exception as e:  # a codec check tripping over hostile values is still a format error
        raise PackedFormatError(f"tensor {name[:80]}: invalid packed data ({type(e).__name__})") from None
    return pt
