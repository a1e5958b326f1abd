"""--router-bits: the router GPTQ-quantized on its own inputs, stored on its grid, routing recomputed with it."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import DOMAINS, TEXT, TRAINED
from moecompress.config import CalibConfig, QuantizeConfig
from moecompress.errors import MoeCompressError


def _router(path, key):
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as t:
                if key in t.keys():
                    return t.get_tensor(key).float()
    raise KeyError(key)


@pytest.mark.parametrize("family", ["Mixtral", "Qwen3Moe"])
def test_router_on_grid_and_recorded(tiny_dir, tmp_path, family):
    import moecompress
    from moecompress.api import quantize
    from moecompress.checkpoint import CheckpointReader
    src = tiny_dir(family, "native")
    reader = CheckpointReader(src)
    cfg = QuantizeConfig(bits=4, group_size=16, router_bits=3,
                         calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32))
    out = str(tmp_path / "q")
    quantize(src, out, cfg, progress=False)
    i = reader.moe_layers[0]
    key = reader.arch.to_disk(f"{reader.prefix}.{i}.{reader.arch.router_mem}.weight")
    w0, w1 = _router(src, key), _router(out, key)
    assert w0.shape == w1.shape and not torch.equal(w0, w1)
    groups = w1.view(w1.shape[0], -1, 16)  # (E, H/16, 16): at most 2^3 distinct values per group (before bf16)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 16)) <= 8
    rec = json.load(open(os.path.join(out, "run", "calibration.json")))["layers"][0]["router"]
    assert rec["bits"] == 3 and 0 < rec["logit_rel_err"] < 0.5
    with torch.no_grad():
        assert torch.isfinite(moecompress.load(out)(torch.arange(1, 17)[None]).logits).all()


def test_router_bits_validated():
    with pytest.raises(MoeCompressError, match="router-bits"):
        QuantizeConfig(router_bits=5)


def test_router_8bit_costs_little_on_the_fixture(tmp_path):
    # 8-bit router on top of 4-bit experts changes perplexity by well under 1% (measured +0.0x%)
    from moecompress.api import evaluate, quantize
    calib = CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=16, seqlen=128)
    c = os.path.join(DOMAINS, "c_test.txt")
    ppl = {}
    for rb in (None, 8):
        out = str(tmp_path / f"r{rb}")
        quantize(TRAINED, out, QuantizeConfig(bits=4, group_size=64, router_bits=rb, calib=calib), progress=False)
        ppl[rb] = evaluate(out, [c], max_tokens=2048, progress=False)[c]["perplexity"]
    assert abs(ppl[8] / ppl[None] - 1) < 0.01, ppl
