"""Every supported family, both on-disk layouts: the reader, the layer-streamed forward, 8-bit round trip."""
import os

import pytest
import torch

from moecompress.arch import PROJS, ExpertKey
from moecompress.checkpoint import CheckpointReader
from moecompress.layerwise import LayerStreamer

from conftest import FAMILIES, TEXT

LAYOUTS = [(f, "native") for f in FAMILIES] + [(f, "fused") for f in FAMILIES if f != "GptOss"]


def _reference(path, ids):
    import transformers as tf
    m = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m, m(ids, output_hidden_states=True)


@pytest.mark.parametrize("family,layout", LAYOUTS)
def test_reader_matches_transformers(tiny_dir, family, layout):
    path = tiny_dir(family, layout)
    r = CheckpointReader(path)
    ids = torch.randint(1, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    m, out = _reference(path, ids)
    assert r.layout(r.moe_layers[0]) == ("fused" if layout == "fused" or family == "GptOss" else "per_expert")
    # canonical expert weights equal what transformers holds in memory
    i = r.moe_layers[-1]
    ex = m.model.layers[i].mlp.experts
    for e in range(r.layer_num_experts(i)):
        gate, up, down = (r.expert(ExpertKey(i, e, p)).float() for p in PROJS)
        if family == "GptOss":
            gu = ex.gate_up_proj[e]  # (H, 2I) interleaved
            assert torch.equal(gu[:, 0::2].t(), gate) and torch.equal(gu[:, 1::2].t(), up)
            assert torch.equal(ex.down_proj[e].t(), down)
        else:
            assert torch.equal(ex.gate_up_proj[e], torch.cat([gate, up]))
            assert torch.equal(ex.down_proj[e], down)
    # the layer-streamed forward reproduces transformers' hidden states
    s = LayerStreamer(r)
    kw = s.layer_kwargs(2, 24)
    h = s.embed(ids)
    for j in range(s.num_layers):
        h = s.run_layer(s.build_layer(j), h, kw[j])
    err = (m.model.norm(h) - out.hidden_states[-1]).abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("family,layout", [("Mixtral", "fused"), ("Qwen2Moe", "native"), ("DeepseekV3", "native"),
                                           ("GptOss", "native"), ("Phimoe", "native")])
def test_quantize_8bit_round_trip(tiny_dir, tmp_path, family, layout):
    import moecompress
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    path = tiny_dir(family, layout)
    cfg = QuantizeConfig(bits=8, group_size=16, method="gptq",
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    quantize(path, str(tmp_path / "q8"), cfg, progress=False)
    ids = torch.randint(1, 4096, (1, 40), generator=torch.Generator().manual_seed(2))
    _, ref = _reference(path, ids)
    q = moecompress.load(str(tmp_path / "q8"))
    with torch.no_grad():
        got = q(ids).logits
    rel = ((got - ref.logits).norm() / ref.logits.norm()).item()
    assert rel < 0.02, rel


def test_dense_and_unknown_models_are_refused(tmp_path):
    import json
    import transformers as tf
    from moecompress.errors import CheckpointError
    d = tmp_path / "llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)).save_pretrained(d)
    with pytest.raises(CheckpointError, match="dense model"):
        CheckpointReader(str(d))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="jamba_moe_x", num_experts=4)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported MoE architecture"):
        CheckpointReader(str(d))


@pytest.mark.parametrize("bits,codec", [(1, "sub1"), (1.6, "ternary")])
def test_ternary_pipeline_decodes_exactly(tiny_dir, tmp_path, bits, codec):
    import json
    import moecompress
    from moecompress.api import quantize
    from moecompress.codecs.ternary import get_codes
    from moecompress.config import CalibConfig, QuantizeConfig
    path = tiny_dir("Mixtral", "native")
    cfg = QuantizeConfig(bits=bits, method="ternary",
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    out = str(tmp_path / "t")
    quantize(path, out, cfg, progress=False)
    m = json.load(open(os.path.join(out, "moecompress.json")))
    assert {t["codec"] for t in m["tensors"]} <= {"sub1", "ternary"} and codec in {t["codec"] for t in m["tensors"]}
    q = moecompress.load(out)
    for e in q.model.layers[0].mlp.experts.weights:
        for pt in e.values():
            c = get_codes(pt)
            assert c.min() >= 0 and c.max() <= 2 and c.shape == pt.shape
    with torch.no_grad():
        assert torch.isfinite(q(torch.arange(1, 33)[None]).logits).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ebss_candidate_step_matches_the_full_model(tiny_dir, family):
    """EBSS feeds a beam's candidates as query positions of its row against the row's cache, behind a mask
    (calibration/ebss.py). Every family's attention must honour that mask: each candidate's logits equal
    the full model's on its row's prefix plus that one token."""
    from transformers import AutoModelForCausalLM
    from moecompress.calibration import ebss
    path = tiny_dir(family)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, 4096, (2, 5), generator=g)
    cand = torch.randint(1, 4096, (2, 3), generator=g)
    lm = ebss.StreamedLM(path, 1 << 30)
    cache = ebss.BeamCache()
    for p in range(5):
        lm.step(prefix[:, p], p, cache)
        cache.commit(torch.arange(2))
    h, _ = lm.step(cand, 5, cache)
    full = torch.cat([prefix.repeat_interleave(3, 0), cand.reshape(-1, 1)], 1)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(full).logits[:, -1]
    assert (lm.logits(h) - ref).abs().max().item() < 1e-3 * max(1.0, ref.abs().max().item())
