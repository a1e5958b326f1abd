"""Fuzz the packed-checkpoint loader: damaged or hostile directories raise PackedFormatError, nothing else.

Hypothesis (derandomized, fixed example budget, no database) mutates a tiny real packed checkpoint:
truncated and bit-flipped shards (with the manifest's checksums re-signed, as a hostile writer would, so
the loader's deeper checks are what stands in the way), lying manifests (codec names outside the
registry, shapes that disagree with the tensors, huge claimed sizes, out-of-range layers, experts and
attributes, file names that escape the directory), lying config.json values, and safetensors headers
that claim huge tensors. Every example must either load and run a forward pass and a decode of every
expert without error, or raise PackedFormatError; a hang trips the deadline; the peak RSS over the whole
fuzz is bounded (no allocation sized by a claim instead of by the file).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tiny
from moecompress import api
from moecompress.codecs import PackedTensor, decode
from moecompress.config import CalibConfig, QuantizeConfig
from moecompress.errors import PackedFormatError
from moecompress.experts import MoEExperts
from moecompress.packed import MANIFEST, sha256_file
from moecompress.runtime import load

DEMO = api.builtin_model_path()
FUZZ = settings(max_examples=int(os.environ.get("MOECOMPRESS_FUZZ_EXAMPLES", 30)), deadline=timedelta(seconds=60),
                derandomize=True, database=None, suppress_health_check=list(HealthCheck))
RSS_BUDGET_MB = 1024  # peak RSS growth allowed over the whole fuzz; the packed checkpoint is ~200 KB


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    src = str(root / "src")
    write_tiny(src, "Mixtral", layers=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, f), src)
    out = str(root / "packed")
    text = os.path.join(DEMO, "..", "text", "calib_mix.txt")
    api.quantize(src, out, QuantizeConfig(bits=3, group_size=32, method="rtn",
                                          calib=CalibConfig((text,), nsamples=2, seqlen=16)), progress=False)
    return out


@pytest.fixture(scope="module")
def rss_guard():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < RSS_BUDGET_MB, f"peak RSS grew by {grown:.0f} MB while fuzzing"


class Work:
    """A fresh copy of the packed checkpoint per example (hypothesis reuses function-scoped fixtures)."""

    def __init__(self, src: str, root: str):
        self.path = os.path.join(root, "work")
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.copytree(src, self.path)

    def manifest(self) -> dict:
        with open(os.path.join(self.path, MANIFEST)) as f:
            return json.load(f)

    def save_manifest(self, m: dict) -> None:
        with open(os.path.join(self.path, MANIFEST), "w") as f:
            json.dump(m, f)

    def shards(self) -> list[str]:
        return sorted(self.manifest()["files"])

    def resign(self) -> None:
        """Make the manifest's sizes and checksums match the files again, as a hostile writer would."""
        m = self.manifest()
        for name in m["files"]:
            p = os.path.join(self.path, name)
            m["files"][name] = {"bytes": os.path.getsize(p), "sha256": sha256_file(p)}
        self.save_manifest(m)


def must_load_cleanly(path: str) -> None:
    """Load; on success, run a forward pass and decode every packed expert. Anything but success or
    PackedFormatError fails the test."""
    try:
        model = load(path)
    except PackedFormatError as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 600, msg
        return
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 200, 7, 3]])).logits
    assert logits.shape == (1, 6, model.config.vocab_size)
    n = 0
    for mod in model.modules():
        if isinstance(mod, MoEExperts):
            for w in mod.weights:
                for t in (w or {}).values():
                    if isinstance(t, PackedTensor):
                        assert decode(t).shape == t.shape
                        n += 1
    assert n > 0


def test_unmodified_checkpoint_loads(packed):
    model = load(packed)
    experts = [m for m in model.modules() if isinstance(m, MoEExperts)]
    assert len(experts) == 2 and all(len(m.weights) == 4 for m in experts)
    must_load_cleanly(packed)


@FUZZ
@given(data=st.data(), resign=st.booleans())
def test_truncated_shards(packed, tmp_path, rss_guard, data, resign):
    w = Work(packed, str(tmp_path))
    name = data.draw(st.sampled_from(w.shards()))
    p = os.path.join(w.path, name)
    size = os.path.getsize(p)
    os.truncate(p, data.draw(st.integers(0, size - 1)))
    if resign:
        w.resign()
    with pytest.raises(PackedFormatError):
        load(w.path)


@FUZZ
@given(data=st.data(), resign=st.booleans())
def test_flipped_bytes(packed, tmp_path, rss_guard, data, resign):
    w = Work(packed, str(tmp_path))
    target = data.draw(st.sampled_from(w.shards() + ["config.json", MANIFEST]))
    p = os.path.join(w.path, target)
    b = bytearray(open(p, "rb").read())
    header = struct.unpack("<Q", bytes(b[:8]))[0] + 8 if target.endswith(".safetensors") else len(b)
    in_header = data.draw(st.booleans())  # half the flips land in the JSON header, where they matter most
    hi = min(header, len(b)) - 1 if in_header else len(b) - 1
    for pos in data.draw(st.lists(st.integers(0, hi), min_size=1, max_size=8)):
        b[pos] ^= data.draw(st.integers(1, 255))
    open(p, "wb").write(bytes(b))
    if resign and target != MANIFEST:
        w.resign()
    must_load_cleanly(w.path)


HUGE = st.one_of(st.integers(-3, 3), st.integers(1 << 20, 1 << 62), st.integers(2, 4096))
JUNK = st.one_of(st.none(), st.booleans(), HUGE, st.floats(allow_nan=True), st.text(max_size=12),
                 st.lists(st.integers(-2, 10), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
CODECS = st.one_of(st.sampled_from(["int", "ternary", "sub1", "INT", "int ", "__import__('os')", "pickle", ""]), JUNK)


@FUZZ
@given(data=st.data())
def test_lying_manifest(packed, tmp_path, rss_guard, data):
    w = Work(packed, str(tmp_path))
    m = w.manifest()
    ent = m["tensors"][data.draw(st.integers(0, len(m["tensors"]) - 1))]
    kind = data.draw(st.sampled_from(["codec", "shape", "attr", "fields", "where", "drop", "file_bytes", "file_name",
                                      "top", "duplicate", "swap"]))
    if kind == "codec":
        ent["codec"] = data.draw(CODECS)
    elif kind == "shape":
        ent["shape"] = data.draw(st.one_of(st.lists(HUGE, min_size=0, max_size=3), JUNK))
    elif kind == "attr":
        ent.setdefault("attrs", {})[data.draw(st.sampled_from(["bits", "group_size", "dictionary_id", "x"]))] = data.draw(JUNK)
    elif kind == "fields":
        ent["fields"] = data.draw(st.one_of(st.lists(st.sampled_from(["qweight", "scales", "zeros", "trits", "../x"]),
                                                     max_size=4), JUNK))
    elif kind == "where":
        ent[data.draw(st.sampled_from(["layer", "expert", "proj", "name"]))] = data.draw(
            st.one_of(JUNK, st.sampled_from(["gate", "up", "down", "model.layers.0.mlp.experts.0.gate"])))
    elif kind == "drop":
        ent.pop(data.draw(st.sampled_from(sorted(ent))))
    elif kind == "file_bytes":
        rec = m["files"][data.draw(st.sampled_from(sorted(m["files"])))]
        rec[data.draw(st.sampled_from(["bytes", "sha256"]))] = data.draw(JUNK)
    elif kind == "file_name":
        name = data.draw(st.sampled_from(sorted(m["files"])))
        m["files"][data.draw(st.sampled_from(["../" + name, "/etc/passwd", "", ".", name + ".x", "nope.safetensors"]))] = m["files"].pop(name)
    elif kind == "top":
        m[data.draw(st.sampled_from(["tensors", "files", "format_version"]))] = data.draw(JUNK)
    elif kind == "duplicate":
        m["tensors"].append(dict(ent))
    else:  # two entries trade places: names and stored tensors no longer agree
        other = m["tensors"][data.draw(st.integers(0, len(m["tensors"]) - 1))]
        ent["name"], other["name"] = other["name"], ent["name"]
    w.save_manifest(m)
    must_load_cleanly(w.path)


@FUZZ
@given(key=st.sampled_from(["num_hidden_layers", "hidden_size", "vocab_size", "num_local_experts", "intermediate_size",
                            "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok",
                            "model_type", "tie_word_embeddings"]),
       value=st.one_of(HUGE, st.sampled_from([0, 1, 2, 3, 8, 64, 128, "llama", "qwen3_moe", True]), JUNK))
def test_lying_config(packed, tmp_path, rss_guard, key, value):
    w = Work(packed, str(tmp_path))
    p = os.path.join(w.path, "config.json")
    cfg = json.load(open(p))
    cfg[key] = value
    json.dump(cfg, open(p, "w"))
    must_load_cleanly(w.path)


@pytest.mark.parametrize("key,value", [("num_experts_per_tok", 8), ("num_experts_per_tok", -1), ("num_hidden_layers", 10 ** 9),
                                       ("vocab_size", 1 << 40), ("hidden_size", 0), ("hidden_act", "nope"),
                                       ("num_local_experts", 1 << 30), ("model_type", []), ("architectures", 5)])
def test_known_hostile_configs(packed, tmp_path, key, value):
    w = Work(packed, str(tmp_path))
    p = os.path.join(w.path, "config.json")
    cfg = json.load(open(p))
    cfg[key] = value
    json.dump(cfg, open(p, "w"))
    with pytest.raises(PackedFormatError):
        load(w.path)


@FUZZ
@given(data=st.data())
def test_huge_claims_in_safetensors_headers(packed, tmp_path, rss_guard, data):
    """A shard whose header claims a huge tensor or a huge header, re-signed in the manifest."""
    w = Work(packed, str(tmp_path))
    name = data.draw(st.sampled_from(w.shards()))
    p = os.path.join(w.path, name)
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    what = data.draw(st.sampled_from(["shape", "offsets", "dtype", "header_len"]))
    if what == "shape":
        header[key]["shape"] = data.draw(st.lists(HUGE, min_size=1, max_size=3))
    elif what == "offsets":
        header[key]["data_offsets"] = data.draw(st.lists(HUGE, min_size=2, max_size=2))
    elif what == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "U8", "BOOL", "F8_E4M3", "X", "F32"]))
    hb = json.dumps(header).encode()
    hlen = data.draw(st.integers(1 << 32, 1 << 63)) if what == "header_len" else len(hb)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", hlen) + hb + body)
    w.resign()
    must_load_cleanly(w.path)
