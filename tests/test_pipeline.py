"""End to end on the trained fixture: quantize, pack, load, evaluate (small calibration, so CI stays fast)."""
import json
import os

import pytest
import torch

from conftest import DOMAINS, TEXT, TRAINED


def _quantize(out, bits, method, nsamples=32):
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    cfg = QuantizeConfig(bits=bits, group_size=64, method=method,
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=nsamples, seqlen=256))
    return quantize(TRAINED, str(out), cfg, progress=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    out = {}
    for bits, method in ((4, "gptq"), (2, "gptq"), (2, "rtn")):
        out[(bits, method)] = str(root / f"{method}{bits}")
        _quantize(out[(bits, method)], bits, method)
    return out


def test_manifest_and_honest_size(packed):
    from safetensors import safe_open
    d = packed[(4, "gptq")]
    m = json.load(open(os.path.join(d, "moecompress.json")))
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "moecompress"
    assert m["format_version"] == 1 and len(m["source"]["fingerprint"]) == 32
    # bits per expert parameter recounted from the files: expert tensors only, scales and zeros included
    n = 0
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as t:
                n += sum(t.get_tensor(k).numel() * t.get_tensor(k).element_size() for k in t.keys()
                         if ".experts." in k and k not in m.get("guard", []))  # guard: 1-byte refusal placeholders
    bits = 8 * n / m["source"]["expert_params"]
    assert abs(bits - m["expert_bits_per_param"]) < 1e-6
    assert bits <= 4 + 0.55
    assert m["total_bytes"] < 0.5 * m["source_total_bytes"]
    # routing statistics saved with the run; rarely routed experts are listed, never NaN
    calib = json.load(open(os.path.join(d, "run", "calibration.json")))
    assert len(calib["layers"]) == 4 and all(sum(layer["tokens"]) == 32 * 256 * 2 for layer in calib["layers"])
    assert all(isinstance(x, list) and len(x) == 3 for x in m["fallback_experts"])


def test_load_equals_dequantized_model(packed):
    import transformers as tf
    import moecompress
    from moecompress.codecs import decode
    q = moecompress.load(packed[(2, "gptq")])
    ref = tf.AutoModelForCausalLM.from_pretrained(TRAINED, dtype=torch.float32).eval()
    for i, layer in enumerate(q.model.layers):
        ex = layer.mlp.experts
        gu = torch.stack([torch.cat([decode(ex.weights[e]["gate"]), decode(ex.weights[e]["up"])]) for e in range(8)])
        dn = torch.stack([decode(ex.weights[e]["down"]) for e in range(8)])
        ref.model.layers[i].mlp.experts.gate_up_proj.data.copy_(gu)
        ref.model.layers[i].mlp.experts.down_proj.data.copy_(dn)
    ids = torch.randint(1, 4096, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (q(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_quality_gptq_beats_rtn_and_4bit_is_close(packed):
    from moecompress.api import evaluate
    text = os.path.join(DOMAINS, "c_test.txt")
    ppl = {k: evaluate(v, [text], max_tokens=8192, progress=False)[text]["perplexity"] for k, v in packed.items()}
    base = evaluate(TRAINED, [text], max_tokens=8192, progress=False)[text]["perplexity"]
    assert ppl[(4, "gptq")] < base * 1.015, (ppl, base)
    assert ppl[(2, "gptq")] < ppl[(2, "rtn")], ppl
