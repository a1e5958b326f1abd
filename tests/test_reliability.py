"""Reliability: bad inputs fail cleanly before any work, runs are deterministic, atomic and resumable.

Everything runs on a tiny random Mixtral (5 layers, hidden 64, 4 experts) written into tmp_path, so the
whole file takes seconds of quantization. Each bad input is driven through the CLI entry point in-process:
exit code 2, one `error:` line on stderr, no traceback, no output and no partial directory left behind.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import digest, interrupt_at, write_tiny
from moecompress import api, cli
from moecompress.config import CalibConfig, QuantizeConfig
from moecompress.errors import CheckpointError, MoeCompressError, PackedFormatError
from moecompress.packed import PROGRESS, partial_dir
from moecompress.validate import validate_checkpoint

DEMO = api.builtin_model_path()
TEXT = os.path.join(DEMO, "..", "text", "calib_mix.txt")
LAYERS = 5
OPTS = ["--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "32", "--seed", "3", "--min-tokens", "4"]
CFG = QuantizeConfig(bits=4, group_size=32, min_tokens=4, calib=CalibConfig((TEXT,), nsamples=8, seqlen=32, seed=3))


def _tiny(path: str, layers: int = LAYERS, shard: str | None = None) -> str:
    write_tiny(path, "Mixtral", layers=layers)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, f), path)
    if shard:  # re-save as several shards with an index
        import transformers as tf
        tf.AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, max_shard_size=shard)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rel")


@pytest.fixture(scope="module")
def tiny(root):
    return _tiny(str(root / "tiny"))


@pytest.fixture(scope="module")
def reference(root, tiny):
    """An uninterrupted run: the bytes every other run must reproduce."""
    out = str(root / "ref")
    api.quantize(tiny, out, CFG, progress=False)
    return out


def copy(src: str, dst) -> str:
    shutil.copytree(src, str(dst))
    return str(dst)


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the setup printed
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


# ---- bad inputs ------------------------------------------------------------------------------------

def _truncate(d):
    f = sorted(glob.glob(d + "/*.safetensors"))[0]
    os.truncate(f, os.path.getsize(f) // 2)


def _poke(value):
    def f(d):
        p = sorted(glob.glob(d + "/*.safetensors"))[0]
        t = load_file(p)
        k = next(k for k in sorted(t) if ".experts." in k)
        t[k][0, 0] = value
        save_file(t, p, metadata={"format": "pt"})
    return f


def _config(**changes):
    def f(d):
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        c.update(changes)
        json.dump(c, open(p, "w"))
    return f


def _dense(d):
    import transformers as tf
    for f in glob.glob(d + "/*.safetensors") + [d + "/config.json"]:
        os.remove(f)
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d)


def _pickle_only(d):
    for f in glob.glob(d + "/*.safetensors"):
        os.remove(f)
    torch.save({"a": torch.zeros(2)}, os.path.join(d, "pytorch_model.bin"))


def _corrupt_config(d):
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"model_type": "mixtral", "hidden_size": 64,')


def _write(name, text):
    def f(d):
        with open(os.path.join(d, name), "w") as fh:
            fh.write(text)
    return f


# (kind, how to damage a copy of the tiny checkpoint, extra CLI args, words the one-line error must contain)
BAD = [
    ("truncated shard", _truncate, [], "truncated"),
    ("NaN weight", _poke(float("nan")), [], "NaN"),
    ("Inf weight", _poke(float("inf")), [], "Inf"),
    ("beyond fp16 range", _poke(1e6), [], "fp16 range"),
    ("dense model", _dense, [], "dense model"),
    ("unsupported MoE architecture", _config(model_type="jamba_moe"), [], "unsupported MoE architecture"),
    ("pickle-only checkpoint", _pickle_only, [], "never unpickles"),
    ("corrupt config.json", _corrupt_config, [], "config.json is not valid JSON"),
    ("expert count disagrees with config", _config(num_local_experts=6), [], "config.json says 6"),
    ("hidden size disagrees with config", _config(hidden_size=48), [], "hidden_size=48"),
    ("bits 7", None, ["--bits", "7"], "unsupported bit width 7"),
    ("group 100", None, ["--group-size", "100"], "group size 100 does not divide"),
    ("impossible lp budget", None, ["--allocation", "lp", "--bits", "0.5"], "not a usable average budget"),
    ("calibration file missing", None, ["--calib", "/nonexistent/calib.txt"], "calibration source not found"),
    ("calibration file empty", "empty", [], "is empty"),
    ("seqlen longer than the text", "short", ["--seqlen", "4096"], "too short"),
    ("nsamples 0", None, ["--nsamples", "0"], "--nsamples must be at least 1"),
]


@pytest.mark.parametrize("kind,damage,extra,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_cleanly(tmp_path, tiny, capsys, kind, damage, extra, words):
    src = copy(tiny, tmp_path / "ckpt")
    calib = TEXT
    if damage == "empty":
        calib = str(tmp_path / "empty.txt")
        open(calib, "w").close()
    elif damage == "short":
        calib = str(tmp_path / "short.txt")
        open(calib, "w").write("only a few words of text here")
    elif damage is not None:
        damage(src)
    out = str(tmp_path / "out")
    code, err = run_cli(["-q", "quantize", src, "--out", out, *OPTS, "--calib", calib, *extra], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert not os.path.exists(out) and not os.path.exists(partial_dir(out))


def test_missing_dir_and_missing_shard(tmp_path, capsys):
    code, err = run_cli(["-q", "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err and not os.path.exists(tmp_path / "o")
    src = _tiny(str(tmp_path / "sharded"), layers=2, shard="150KB")
    shards = sorted(glob.glob(src + "/model-*.safetensors"))
    assert len(shards) >= 3
    os.remove(shards[1])
    code, err = run_cli(["-q", "quantize", src, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "missing shard named by the index: " + os.path.basename(shards[1]) in err


def test_validation_reports_every_problem_at_once(tmp_path):
    src = _tiny(str(tmp_path / "many"), layers=2, shard="150KB")
    shards = sorted(glob.glob(src + "/model-*.safetensors"))
    os.remove(shards[0])                                   # 1: a shard named by the index is gone
    t = load_file(shards[-1])
    k = sorted(t)[0]
    t[k].view(-1)[0] = float("nan")                         # 2: a NaN in another shard
    save_file(t, shards[-1], metadata={"format": "pt"})
    _config(num_local_experts=5)(src)                       # 3 + 4: both layers disagree with the expert count
    r = validate_checkpoint(src)
    assert not r.ok and r.family == "Mixtral"
    text = " | ".join(r.problems)
    assert "missing shard" in text and "NaN" in text and "config.json says 5" in text, text
    assert len(r.problems) == 4, r.problems
    with pytest.raises(CheckpointError, match="4 problems found before any work was done"):
        r.raise_if_bad()


def test_clean_checkpoint_validates(tiny):
    r = validate_checkpoint(tiny)
    assert r.ok and r.moe_layers == tuple(range(LAYERS)) and r.checked_values == r.tensors > 5 * LAYERS


def test_output_exists(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(["-q", "quantize", tiny, "--out", str(out), *OPTS, "--calib", TEXT], capsys)
    assert code == 2 and "already exists" in err and os.listdir(out) == []


def test_damaged_packed_file_fails_eval(tmp_path, reference, capsys):
    d = copy(reference, tmp_path / "dmg")
    f = os.path.join(d, "layer-00001.safetensors")
    b = bytearray(open(f, "rb").read())
    for i in range(len(b) // 3, len(b) // 3 + 64):
        b[i] ^= 0xFF
    open(f, "wb").write(bytes(b))
    code, err = run_cli(["-q", "eval", d, "--text", TEXT, "--max-tokens", "64", "--seqlen", "32"], capsys)
    assert code == 2 and "layer-00001.safetensors is damaged (checksum mismatch)" in err, err


# ---- determinism, atomicity, resume ------------------------------------------------------------------

def test_same_seed_same_bytes(tmp_path, tiny, reference):
    out = str(tmp_path / "again")
    s = api.quantize(tiny, out, CFG, progress=False)
    assert digest(out) == digest(reference)
    assert len(digest(out)) == LAYERS + 3 and 4.0 < s["expert_bits_per_param"] < 5.5  # layers, globals, moecompress-guard
    assert not any(f.startswith(("hidden-", PROGRESS)) for f in os.listdir(out))  # bookkeeping stays behind
    other = str(tmp_path / "seed4")
    api.quantize(tiny, other, QuantizeConfig(bits=4, group_size=32, min_tokens=4,
                                             calib=CalibConfig((TEXT,), nsamples=8, seqlen=32, seed=4)), progress=False)
    assert digest(other)["layer-00000.safetensors"] != digest(reference)["layer-00000.safetensors"]


KILLER = """
import os, signal, sys
import moecompress.passes.quantize as q
real = q.quantize_moe_layer
def dying(*a, **k):
    if k["layer_idx"] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real SIGKILL, mid-run, at a known point
    return real(*a, **k)
q.quantize_moe_layer = dying
from moecompress.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny, reference, capsys):
    out = str(tmp_path / "killed")
    argv = ["-q", "quantize", tiny, "--out", out, *OPTS, "--calib", TEXT]
    p = subprocess.run([sys.executable, "-c", KILLER, *argv], env={**os.environ, "KILL_AT": "3", "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    assert not os.path.exists(out)  # nothing that looks complete
    prog = json.load(open(os.path.join(partial_dir(out), PROGRESS)))
    assert [r["layer"] for r in prog["layers"]] == [0, 1, 2]
    assert sorted(f for f in os.listdir(partial_dir(out)) if f.startswith("hidden-")) == ["hidden-00002.safetensors"]
    code, err = run_cli(argv + ["--resume"], capsys)
    assert code == 0, err
    assert digest(out) == digest(reference)
    assert not os.path.exists(partial_dir(out))
    code, err = run_cli(argv + ["--resume"], capsys)  # resuming a finished run: nothing to do, nothing changed
    assert code == 0 and digest(out) == digest(reference)


def test_ctrl_c_then_resume(tmp_path, tiny, reference, monkeypatch):
    import moecompress.passes.quantize as q
    real, calls = q.quantize_moe_layer, []

    def interrupted(*a, **k):
        calls.append(k["layer_idx"])
        if k["layer_idx"] == 1:
            raise KeyboardInterrupt
        return real(*a, **k)
    out = str(tmp_path / "ctrlc")
    monkeypatch.setattr(q, "quantize_moe_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(tiny, out, CFG, progress=False)
    assert not os.path.exists(out) and os.path.isdir(partial_dir(out))
    monkeypatch.setattr(q, "quantize_moe_layer", lambda *a, **k: (calls.append(k["layer_idx"]), real(*a, **k))[1])
    calls.clear()
    torch.set_num_threads(2)  # a resume adopts the interrupted run's thread count (bytes depend on it)
    try:
        api.quantize(tiny, out, CFG, progress=False, resume=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert calls == list(range(1, LAYERS))  # layer 0 was not redone
    assert digest(out) == digest(reference)


def test_resume_checks_fingerprints(tmp_path, tiny, monkeypatch):
    import moecompress.passes.quantize as q
    out = str(tmp_path / "fp")
    real = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(tiny, out, CFG, progress=False)
    monkeypatch.setattr(q, "quantize_moe_layer", real)
    other_seed = QuantizeConfig(bits=4, group_size=32, min_tokens=4,
                                calib=CalibConfig((TEXT,), nsamples=8, seqlen=32, seed=9))
    with pytest.raises(MoeCompressError, match="cannot resume: the calibration tokens and the options differ"):
        api.quantize(tiny, out, other_seed, progress=False, resume=True)
    with pytest.raises(MoeCompressError, match="cannot resume: the options differ"):
        api.quantize(tiny, out, QuantizeConfig(bits=4, group_size=32, min_tokens=5, calib=CFG.calib),
                     progress=False, resume=True)
    shard = os.path.join(partial_dir(out), "layer-00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(MoeCompressError, match="layer-00000.safetensors .* changed"):
        api.quantize(tiny, out, CFG, progress=False, resume=True)
    assert not os.path.exists(out)


def test_loader_rejects_lying_config(tmp_path, reference):
    from moecompress.runtime import load
    d = copy(reference, tmp_path / "lie")
    _config(num_hidden_layers=100000)(d)
    with pytest.raises(PackedFormatError, match="num_hidden_layers=100000"):
        load(d)
    _config(num_hidden_layers=LAYERS, vocab_size=10 ** 9)(d)
    with pytest.raises(PackedFormatError, match="shape"):
        load(d)


def test_one_writer_per_output(tmp_path, tiny, reference):
    """A second fresh run into a busy output is refused; --resume waits for the busy run, then finishes."""
    import threading

    from moecompress.packed import output_lock
    out = str(tmp_path / "busy")
    held = output_lock(out, wait=False)
    held.__enter__()  # stands in for a live run (a different open file: flock conflicts even in-process)
    try:
        with pytest.raises(MoeCompressError, match="another moecompress run is writing"):
            api.quantize(tiny, out, CFG, progress=False)
        timer = threading.Timer(1.0, held.__exit__, (None, None, None))
        timer.start()
        api.quantize(tiny, out, CFG, progress=False, resume=True)  # blocks until the timer releases the lock
        timer.join()
    except BaseException:
        held.__exit__(None, None, None)
        raise
    assert digest(out) == digest(reference)
    assert not os.path.exists(os.path.join(str(tmp_path), ".busy.lock"))
