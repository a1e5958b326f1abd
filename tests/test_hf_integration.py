"""transformers integration: from_pretrained through the registered quantizer, refusal without it,
save/load round trips, dtype casts that leave packed tensors alone, device maps with offload, merged
checkpoints, and packed bytes resident once on both kernel paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # read when triton wraps the kernels; only MOECOMPRESS_KERNELS=triton uses them on CPU

import pytest
import torch
from safetensors.torch import load_file

import moecompress
from moecompress import api
from moecompress.codecs import decode
from moecompress.config import CalibConfig, QuantizeConfig
from moecompress.experts import MoEExperts

DEMO = api.builtin_model_path()
X = torch.arange(1, 65)[None]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _quantize(out, **kw):
    cfg = QuantizeConfig(group_size=64, calib=CalibConfig(nsamples=4, seqlen=32), **kw)
    api.quantize(None, str(out), cfg, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    return _quantize(tmp_path_factory.mktemp("hf") / "q4", bits=4)


def _packed(model) -> dict[str, torch.Tensor]:
    return {k: t for k, t in model.state_dict().items() if ".experts." in k and not k.endswith("_bias")}


def _dense_reference(packed_model):
    """The demo model in float32 with every expert replaced by its decoded packed weights."""
    import transformers as tf
    ref = tf.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    for i, layer in enumerate(packed_model.model.layers):
        ex = layer.mlp.experts
        dense = ref.model.layers[i].mlp.experts
        for e, w in enumerate(ex.weights):
            gate, up, down = (decode(w[p]).float() for p in ("gate", "up", "down"))
            dense.gate_up_proj.data[e] = torch.cat([gate, up])  # (2I, H): gate rows, then up rows
            dense.down_proj.data[e] = down
    return ref


def test_from_pretrained_matches_dense_dequantized_model(q4):
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(q4).eval()  # dtype "auto": float32 on the CPU
    assert hf.dtype == torch.float32
    assert isinstance(hf.model.layers[0].mlp.experts, MoEExperts)
    with torch.no_grad():
        got = hf(X).logits
        want = _dense_reference(hf)(X).logits
        d = (got - want).abs().max().item()
        assert d <= 1e-5, d
        d_load = (moecompress.load(q4)(X).logits - got).abs().max().item()
    assert d_load <= 1e-6, d_load


def test_registration_is_idempotent():
    from transformers.quantizers import auto
    from moecompress.hf_quantizer import install_import_hook, register
    cls = auto.AUTO_QUANTIZER_MAPPING["moecompress"]
    register()
    install_import_hook()
    assert auto.AUTO_QUANTIZER_MAPPING["moecompress"] is cls


def test_save_pretrained_round_trip(q4, tmp_path):
    m = moecompress.load(q4)
    m.save_pretrained(tmp_path / "rt")
    files = set(os.listdir(tmp_path / "rt"))
    assert "moecompress.json" in files and "config.json" in files
    assert json.load(open(tmp_path / "rt" / "config.json"))["quantization_config"]["quant_method"] == "moecompress"
    back = moecompress.load(str(tmp_path / "rt"))  # validates the new manifest's checksums
    a, b = _packed(m), _packed(back)
    assert a.keys() == b.keys() and len(a) == 4 * 8 * 3 * 3
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(m(X).logits, back(X).logits)


def test_cast_leaves_packed_tensors_bit_identical(q4):
    m = moecompress.load(q4)
    before = {k: t.clone() for k, t in _packed(m).items()}
    assert {t.dtype for t in before.values()} == {torch.uint8, torch.float16}
    for cast in (lambda x: x.to(torch.bfloat16), lambda x: x.half(), lambda x: x.bfloat16()):
        after = _packed(cast(m))
        assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    m = moecompress.load(q4).to(torch.bfloat16)  # straight from float32, as a user would
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        a = m(X).logits.float()
        b = moecompress.load(q4, dtype=torch.bfloat16)(X).logits.float()
    assert (a - b).abs().max().item() <= 1e-5


def test_renamed_params_left_in_their_stored_dtype_are_cast(q4):
    """transformers before 5.23 (the lent GPU image has 5.17) loads a pre-quantized checkpoint's renamed keys as
    stored: Mixtral's router came back bf16 beside float32 hidden states and the first forward failed. The
    loader casts such parameters to the embeddings' dtype; packed tensors stay as stored."""
    from moecompress.hf_quantizer import cast_renamed_params
    m = moecompress.load(q4)
    with torch.no_grad():
        ref = m(X).logits
    gate = m.model.layers[0].mlp.gate
    gate.weight.data = gate.weight.data.to(torch.bfloat16)  # what transformers 5.17 leaves
    packed = {k: t.clone() for k, t in _packed(m).items()}
    cast_renamed_params(m)
    assert gate.weight.dtype == torch.float32
    assert all(torch.equal(t, packed[k]) and t.dtype == packed[k].dtype for k, t in _packed(m).items())
    with torch.no_grad():  # the stored router is bf16: the round trip through bf16 loses nothing
        assert torch.equal(m(X).logits, ref)


def test_device_argument_forms_pick_the_same_dtype(q4):
    assert moecompress.load(q4, device=torch.device("cpu")).dtype == moecompress.load(q4, device="cpu").dtype == torch.float32


def test_device_map_with_offload_on_cpu(q4, tmp_path):
    import transformers as tf
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
          "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    hf = tf.AutoModelForCausalLM.from_pretrained(q4, device_map=dm, offload_folder=str(tmp_path / "off")).eval()
    with torch.no_grad():
        d = (hf(X).logits - moecompress.load(q4)(X).logits).abs().max().item()
    assert d <= 1e-6, d


PLAIN = """
import sys, transformers as tf
for path in sys.argv[1:]:  # one transformers import for every checkpoint
    try:
        tf.AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:
        print(path, "refused:", type(e).__name__)
    else:
        print(path, "built")
"""
CODEC_CASES = {"int2": (dict(bits=2), "int"), "int3": (dict(bits=3), "int"), "int8": (dict(bits=8), "int"),
               "ternary": (dict(bits=1.6, method="ternary"), "ternary"),
               "sub1": (dict(bits=1, method="ternary"), "sub1")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Mixtral (2 layers) with the demo's tokenizer: quick to quantize with every codec."""
    from conftest import write_tiny
    src = str(tmp_path_factory.mktemp("tiny") / "src")
    write_tiny(src, "Mixtral", layers=2)  # writes the demo's tokenizer beside it
    return src


@pytest.fixture(scope="module")
def tiny_packed(tiny, tmp_path_factory):
    """{case: packed checkpoint} of the tiny model in every codec: RTN for the int widths (no calibration
    forward), one 16-token window for the ternary codecs (GPTQ-ternary; sub1's dictionary and bit budget)."""
    text = os.path.join(DEMO, "..", "text", "calib_mix.txt")
    root = tmp_path_factory.mktemp("codecs")
    out = {}
    for name, (kw, _) in CODEC_CASES.items():
        kw = dict(kw)
        out[name] = str(root / name)
        api.quantize(tiny, out[name], QuantizeConfig(group_size=32, method=kw.pop("method", "rtn"), **kw,
                                                     calib=CalibConfig((text,), nsamples=1, seqlen=16)), progress=False)
    return out


@pytest.fixture(scope="module")
def plain_transformers(tiny_packed, tmp_path_factory):
    """{path: what plain transformers (no `import moecompress`) did with it}, one subprocess for all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = list(tiny_packed.values())
    r = subprocess.run([sys.executable, "-c", PLAIN, *paths], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path_factory.mktemp("plain")))
    assert r.returncode == 0, r.stderr[-2000:]
    got = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ", 1)[0] in paths)
    assert set(got) == set(paths), r.stdout + r.stderr[-2000:]
    return got


@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_plain_transformers_refuses_every_codec(tiny_packed, plain_transformers, case):
    out = tiny_packed[case]
    codecs = {e["codec"] for e in json.load(open(os.path.join(out, "moecompress.json")))["tensors"]}
    assert codecs == {CODEC_CASES[case][1]}
    assert plain_transformers[out].startswith("refused:"), plain_transformers[out]
    m = moecompress.load(out)  # and the registered path loads it
    with torch.no_grad():
        assert torch.isfinite(m(X).logits).all()


def test_merged_checkpoint_loads_through_from_pretrained(tmp_path):
    import transformers as tf
    from moecompress.merge import pipeline
    merged = str(tmp_path / "merged")
    pipeline.run_merge(DEMO, merged, ratio=0.75, calib=CalibConfig(nsamples=4, seqlen=32), progress=False)
    out = str(tmp_path / "mq")
    api.quantize(merged, out, QuantizeConfig(bits=4, group_size=64, method="rtn", calib=CalibConfig(nsamples=2, seqlen=32)),
                 progress=False)
    counts = json.load(open(os.path.join(out, "config.json")))["moecompress_merge"]
    hf = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    sizes = [len(layer.mlp.experts.weights) for layer in hf.model.layers]
    assert sizes != [8] * 4, (sizes, counts)
    with torch.no_grad():
        d = (hf(X).logits - moecompress.load(out)(X).logits).abs().max().item()
    assert d <= 1e-6, d


TABLES = ("dictionary", "anchors")  # sub1's shared dictionary; its row anchors (one int64 per 64 rows)


def _resident_bytes(model) -> tuple[int, int]:
    """(packed expert bytes, decode-table bytes) held by the experts modules, each storage counted once:
    per-expert buffers, and on the Triton path the prepared (stacked) operands."""
    seen, packed, tables = set(), 0, 0
    for mod in model.modules():
        if not isinstance(mod, MoEExperts):
            continue
        ts = [(k, t) for k, t in mod.named_buffers() if not k.endswith("_bias")]
        if getattr(mod, "_prepared", None) is not None:
            ts += [(k, t) for g in mod._prepared.stage1 + mod._prepared.stage2 for k, t in g.tensors.items()]
        for k, t in ts:
            s = t.untyped_storage()
            if s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            if any(n in k for n in TABLES):
                tables += s.nbytes()
            else:
                packed += s.nbytes()
    return packed, tables


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["int4", "sub1"])
def test_packed_bytes_resident_once(q4, tiny_packed, case, backend, monkeypatch):
    """After a forward the experts hold their packed bytes once (1.0x the checkpoint's, the shared sub1
    dictionary aside) plus at most 1 MB of decode tables per layer; the Triton path gives the torch path's
    logits. Without re-pointing the members at the stacks the Triton path holds 2.0x (int4) / 2.2x (sub1)."""
    if backend == "triton":
        pytest.importorskip("triton")
    path = q4 if case == "int4" else tiny_packed["sub1"]
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    m = moecompress.load(path)
    with torch.no_grad():
        y = m(X[:, :4]).logits
    man = json.load(open(os.path.join(path, "moecompress.json")))
    disk = man["expert_bytes"]  # the experts' packed tensors and the shared dictionaries
    dicts = sum(t.numel() for f in man["files"] for k, t in load_file(os.path.join(path, f)).items()
                if k.startswith("moecompress.sub1_dictionary."))  # stored once, held as a decode table
    assert (dicts > 0) == (case == "sub1")
    packed, tables = _resident_bytes(m)
    if backend == "triton":
        assert all(mod._prepared is not None for mod in m.modules() if isinstance(mod, MoEExperts))
    assert disk - dicts <= packed <= 1.05 * disk, (packed, disk, dicts)
    assert tables <= len(m.model.layers) * (1 << 20), tables
    if backend == "triton":
        monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
        with torch.no_grad():
            want = moecompress.load(path)(X[:, :4]).logits
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


def test_moved_experts_are_not_checked_again(tiny_packed, monkeypatch):
    """`.to(device)` moves each packed buffer (Module._apply) and the Triton path's prepare re-points them at
    views of its stacks (MoEExperts._adopt): both keep the codec check, so neither the next forward nor the
    next prepare checks a codec again (a check reads the data on the host: a sync on CUDA). A tensor
    swapped in by other means is checked."""
    from moecompress.codecs import get_codec, is_checked
    from moecompress.kernels import prepare_experts
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    m = moecompress.load(tiny_packed["sub1"])
    experts = [mod for mod in m.modules() if isinstance(mod, MoEExperts)]
    calls = []
    codec = type(get_codec("sub1"))
    orig = codec.check
    monkeypatch.setattr(codec, "check", lambda self, q: (calls.append(q.shape), orig(self, q))[1])

    def checked():
        return all(is_checked(w[p]) for mod in experts for w in mod.weights for p in w)

    assert checked()  # every packed expert was checked once, at load
    with torch.no_grad():
        want = m(X[:, :8]).logits
        assert not calls  # so the first forward checks nothing
        m._apply(lambda t: t.clone())  # what .to(other device) does to every tensor: a new one, same data
        assert checked()
        assert torch.equal(m(X[:, :8]).logits, want) and not calls
        for mod in experts:  # the Triton forward's preparation (prepare, then adopt views of the stacks)
            mod._prepared = prepare_experts(mod.weights, mod.biases)
            mod._adopt(mod._prepared)
        assert not calls and checked() and all(mod._prepared is not None for mod in experts)
        assert torch.equal(m(X[:, :8]).logits, want) and not calls
        one = experts[0]._modules["0"]._modules["gate"]
        one._buffers["lo"] = one._buffers["lo"].clone()  # not through _apply: no mark carried
        experts[0]._sync()
        assert experts[0]._prepared is None
        prepare_experts(experts[0].weights, experts[0].biases)
    assert len(calls) == 1, calls
