"""Shared experts (Qwen2-MoE, DeepSeek): GPTQ'd beside the routed experts, AGQ by their own sigmoid gate,
stored packed and loaded as PackedLinear."""
import json
import os

import pytest
import torch

from moecompress.checkpoint import CheckpointReader
from moecompress.layerwise import LayerStreamer

from conftest import TEXT, digest, interrupt_at


def _calib(n=4, L=32):
    from moecompress.config import CalibConfig
    return CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=n, seqlen=L)


def test_affinity_weights_the_shared_expert_by_its_sigmoid_gate(tiny_dir):
    """H = sum_t sigmoid(shared_expert_gate(x_t)) x_t x_t^T with --affinity, the plain sum without."""
    from moecompress.passes.shared import _hessian, shared_experts
    r = CheckpointReader(tiny_dir("Qwen2Moe", "native"))
    s = LayerStreamer(r)
    ids = torch.randint(1, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    kw = s.layer_kwargs(2, 16)
    layer = s.build_layer(0)
    [(path, mod, gate)] = shared_experts(layer, r.arch)
    assert path == "mlp.shared_expert" and gate is not None
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    s.run_layer(layer, s.embed(ids), kw[0])
    h.remove()
    x = torch.cat(seen)
    with torch.no_grad():
        w = torch.sigmoid(gate(x)).reshape(-1)
    assert w.std() > 1e-3  # the gate really varies over tokens: the weighting is visible
    from moecompress.config import CalibConfig
    from moecompress.distributed import Dist
    from moecompress.passes.pipeline import LayerRunner
    runner = LayerRunner(s, ids, CalibConfig(nsamples=2, seqlen=16, batch_size=1), Dist(), torch.device("cpu"))
    cache = runner.capture(layer, 0, runner.embed(), [path])  # two chunks of one window each
    assert len(cache.chunks) == 2
    Ha, n, mean, _ = _hessian(cache, path, mod, gate, mod.gate_proj, True)
    H1, _, one, _ = _hessian(cache, path, mod, gate, mod.gate_proj, False)
    assert n == 32 and one == 1.0 and mean == pytest.approx(float(w.mean()), rel=1e-5)
    torch.testing.assert_close(Ha, (x * w[:, None]).T @ x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(H1, x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["Qwen2Moe", "DeepseekV3"])
def test_shared_experts_are_packed_and_load_back(tiny_dir, tmp_path, family):
    import moecompress
    from moecompress.api import quantize
    from moecompress.config import QuantizeConfig
    from moecompress.experts import PackedLinear
    from moecompress.report.sizes import size_breakdown
    path = tiny_dir(family, "native")
    r = CheckpointReader(path)
    out = str(tmp_path / "q4")
    summary = quantize(path, out, QuantizeConfig(bits=4, group_size=16, affinity=True, calib=_calib()), progress=False)
    man = json.load(open(os.path.join(out, "moecompress.json")))
    mods = sorted((t["layer"], t["module"]) for t in man["tensors"] if "module" in t)
    shared = r.arch.shared_expert_paths[0]
    assert mods == [(i, f"{shared}.{p}") for i in r.moe_layers for p in ("down_proj", "gate_proj", "up_proj")]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    assert not any(k.endswith(f"{shared}.gate_proj.weight") for k in index)  # no dense copy beside the packed one
    dense = sum(r.tensors[k].nbytes for k in r.tensors if f"{shared}." in k)
    assert summary["shared_experts"]["bytes"] < dense / 3  # 4-bit codes + fp16 group scales vs fp32 weights
    assert summary["shared_experts"]["bits"] == [4]
    rec = json.load(open(os.path.join(out, "run", "calibration.json")))["layers"]
    assert all(s["gated"] == (family == "Qwen2Moe") for x in rec for s in x["shared"])
    assert all(0 <= s["gate_proj_rel_err"] < 0.05 for x in rec for s in x["shared"])
    q = moecompress.load(out)
    lin = q.model.layers[r.moe_layers[0]].get_submodule(f"{shared}.down_proj")
    assert isinstance(lin, PackedLinear)
    w = r.get(r.arch.to_disk(f"model.layers.{r.moe_layers[0]}.{shared}.down_proj.weight")).float()
    from moecompress.codecs import decode
    err = ((decode(lin.weight_packed) - w).norm() / w.norm()).item()
    assert 0 < err < 0.15, err
    ids = torch.randint(1, 4096, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.isfinite(q(ids).logits).all()
    sizes = size_breakdown(out, man)
    assert sizes.total == pytest.approx(summary["packed_bytes"], rel=0.05)


def test_shared_bits_zero_keeps_them_dense(tiny_dir, tmp_path):
    from moecompress.api import quantize
    from moecompress.config import QuantizeConfig
    from moecompress.errors import MoeCompressError
    out = str(tmp_path / "q")
    s = quantize(tiny_dir("Qwen2Moe", "native"), out, QuantizeConfig(bits=4, group_size=16, shared_bits=0,
                                                                     calib=_calib()), progress=False)
    man = json.load(open(os.path.join(out, "moecompress.json")))
    assert not any("module" in t for t in man["tensors"]) and "shared_experts" not in s
    with pytest.raises(MoeCompressError, match="shared-bits"):
        QuantizeConfig(shared_bits=5)


@pytest.mark.parametrize("module,match", [("self_attn", "not a Linear"), ("mlp.shared_expert.up_proj", "twice"),
                                          ("mlp.shared_expert.gate_proj.__class__", "not a Linear"),
                                          ("mlp..x", "bad layer/module")])
def test_damaged_module_entries_are_refused(tiny_dir, tmp_path, module, match):
    import moecompress
    from moecompress.api import quantize
    from moecompress.config import QuantizeConfig
    from moecompress.errors import PackedFormatError
    out = str(tmp_path / "q")
    quantize(tiny_dir("Qwen2Moe", "native"), out, QuantizeConfig(bits=8, group_size=16, calib=_calib()), progress=False)
    p = os.path.join(out, "moecompress.json")
    man = json.load(open(p))
    ent = next(t for t in man["tensors"] if t.get("module") == "mlp.shared_expert.gate_proj")
    ent["module"] = module
    json.dump(man, open(p, "w"))
    with pytest.raises(PackedFormatError, match=match):
        moecompress.load(out)


def test_interrupted_run_with_shared_experts_resumes_to_the_same_bytes(tiny_dir, tmp_path, monkeypatch):
    """Ctrl-C after the first MoE layer, then --resume: shards, manifest and the size summary (which adds
    the shared experts' bytes from the finished layers' records) equal an uninterrupted run's."""
    import moecompress.passes.quantize as q
    from moecompress.api import quantize
    from moecompress.config import QuantizeConfig
    path = tiny_dir("Qwen2Moe", "native")
    cfg = QuantizeConfig(bits=4, group_size=16, affinity=True, calib=_calib())
    ref = quantize(path, str(tmp_path / "ref"), cfg, progress=False)
    out = str(tmp_path / "cut")
    real = interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize(path, out, cfg, progress=False)
    monkeypatch.setattr(q, "quantize_moe_layer", real)
    got = quantize(path, out, cfg, progress=False, resume=True)
    assert digest(out) == digest(str(tmp_path / "ref"))
    assert got["packed_bytes"] == ref["packed_bytes"] and got["shared_experts"] == ref["shared_experts"]
