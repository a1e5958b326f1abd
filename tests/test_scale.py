"""Real-size data path: --device, one decoder-layer forward per stage, budgets that never change the bytes,
several processes writing the bytes of one (torchrun, gloo)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import digest, write_tiny

DEMO = os.path.join(os.path.dirname(__file__), "..", "moecompress", "data", "demo-model")
CALIB = os.path.join(os.path.dirname(__file__), "..", "moecompress", "data", "text", "calib_mix.txt")


def _cfg(bits=4, nsamples=16, seqlen=64, forward_tokens=4096, **kw):
    from moecompress.config import CalibConfig, QuantizeConfig
    return QuantizeConfig(bits=bits, group_size=kw.pop("group_size", 16), calib=CalibConfig(
        (CALIB,), nsamples=nsamples, seqlen=seqlen, forward_tokens=forward_tokens), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, capsys):
    from moecompress.cli import main
    out = tmp_path / "q"
    for cmd in (["quantize", DEMO, "--out", str(out), "--device", "cuda"], ["eval", DEMO, "--text", CALIB, "--device", "cuda:1"],
                ["calib-stats", "--device", "cuda"], ["prune", DEMO, "--out", str(out), "--experts", "4", "--device", "cuda"],
                ["quantize", "--out", str(out), "--device", "tpu"]):
        assert main(["-q", *cmd]) == 2, cmd
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--device" in err, err
    assert not out.exists() and not any(p.name.startswith(".q") for p in tmp_path.iterdir())


def _count_calls(monkeypatch, module, names):
    calls = dict.fromkeys(names.values(), 0)
    for cls_name, key in names.items():
        cls = getattr(module, cls_name)
        orig = cls.forward

        def counted(self, *a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(cls, "forward", counted)
    return calls


@pytest.mark.parametrize("router_bits,fp_target", [(None, 0.0), (4, 0.0), (4, 1.0)])
def test_attention_and_router_run_at_most_three_times_per_layer(tmp_path, monkeypatch, router_bits, fp_target):
    """A one-layer Qwen2-MoE with 32 experts and a shared expert: the decoder layer's attention and router
    run once per stage (capture, [recapture on the quantized router,] the quantized output), not once per
    expert chunk; the metrics record it and --dry-run predicts it. With --fp-target on the first MoE layer
    (one stream still), the unquantized capture is also the router's input: no fourth run."""
    import transformers as tf
    from transformers.models.qwen2_moe import modeling_qwen2_moe as M

    from moecompress.api import predict_run, quantize
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(vocab_size=4096, hidden_size=128, intermediate_size=64, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=32, num_experts_per_tok=4,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, decoder_sparse_step=1,
                            mlp_only_layers=[], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    src = tmp_path / "wide"
    tf.Qwen2MoeForCausalLM(cfg).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO, f), src)
    # a working budget of a few experts' Hessians: the old pipeline re-ran the layer per expert chunk
    monkeypatch.setenv("MOECOMPRESS_WORKSPACE", str(3 * 4 * 128 * 128 * 4))
    monkeypatch.setattr("moecompress.passes.units.GPTQ_BUDGET", 1)  # one expert per GPTQ unit, so the budget decides the chunks
    calls = _count_calls(monkeypatch, M, {"Qwen2MoeAttention": "attention", "Qwen2MoeTopKRouter": "router"})
    config = _cfg(nsamples=16, seqlen=32, router_bits=router_bits, fp_target=fp_target)
    quantize(str(src), str(tmp_path / "q"), config, progress=False, device="cpu")
    want = 3 if router_bits else 2
    assert calls == {"attention": want, "router": want}, calls
    m = json.load(open(tmp_path / "q" / "run" / "metrics.json"))
    assert m["layer_forwards_per_layer"] == [want] and m["layer_forwards"] == want
    # the budget's chunk of 4 experts' Hessians, no more; with --fp-target 3 experts' Hessians and cross terms
    assert m["memory"]["hessian_bytes_peak"] == (6 if fp_target else 4) * 128 * 128 * 4
    p = predict_run(str(src), config, "cpu")
    assert p.forwards_per_layer == [want]


def _quantize_digest(out, src, config, **kw):
    from moecompress.api import quantize
    quantize(src, str(out), config, progress=False, device="cpu", **kw)
    return digest(str(out))


def test_bytes_do_not_depend_on_the_working_budget(tmp_path, monkeypatch):
    """One expert per GPTQ call and per Hessian chunk gives the bytes that all experts at once give."""
    src = str(tmp_path / "qwen")
    write_tiny(src, "Qwen2Moe")  # 8 routed experts and a shared expert per layer
    config = _cfg(bits=3, nsamples=8, seqlen=32, affinity=True, hessian_prior=1.0)
    free = _quantize_digest(tmp_path / "all", src, config)
    monkeypatch.setenv("MOECOMPRESS_WORKSPACE", "1")  # one unit per chunk
    monkeypatch.setattr("moecompress.passes.units.GPTQ_BUDGET", 1)  # one expert per unit
    tight = _quantize_digest(tmp_path / "one", src, config)
    assert tight == free


def test_cached_path_matches_a_full_layer_forward(tmp_path):
    """The MoE cache holds exactly what the experts module receives in a full forward of the layer."""
    from moecompress.checkpoint import CheckpointReader
    from moecompress.distributed import Dist
    from moecompress.layerwise import LayerStreamer, find_experts
    from moecompress.passes.pipeline import LayerRunner
    from moecompress.config import CalibConfig
    reader = CheckpointReader(DEMO)
    streamer = LayerStreamer(reader)
    windows = torch.randint(1, 4096, (12, 32), generator=torch.Generator().manual_seed(0))
    runner = LayerRunner(streamer, windows, CalibConfig(nsamples=12, seqlen=32, batch_size=4, forward_tokens=256),
                         Dist(), torch.device("cpu"))
    assert runner.fwd == 8 and len(runner.batches) == 2  # 2 calls, 3 accumulation chunks
    acts = runner.embed()
    layer = streamer.build_layer(0)
    cache = runner.capture(layer, 0, acts)
    assert [c.x.shape[0] for c in cache.chunks] == [128, 128, 128]
    seen = []
    _, ex = find_experts(layer)
    ex.observer = lambda e, tok, x, h, w: seen.append((e, x.clone(), w.clone()))
    for s in range(0, 12, 4):  # the old path: the layer itself, one chunk at a time
        streamer.run_layer(layer, streamer.embed(windows[s:s + 4]), runner.kwargs[0], 4)
    ex.observer = None
    replayed = []
    cache.replay(ex.num_experts, lambda e, tok, x, h, w: replayed.append((e, x, w)))
    assert len(seen) == len(replayed) > 0
    for (e1, x1, w1), (e2, x2, w2) in zip(seen, replayed):
        assert e1 == e2 and torch.equal(x1, x2) and torch.equal(w1, w2)


RANKS_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from test_scale import _cfg
from moecompress.api import quantize
die = int(os.environ.get("DIE_AT_LAYER", "-1"))
if die >= 0 and os.environ.get("RANK") == "1":  # this rank dies when it reaches that layer
    import moecompress.passes.quantize as q
    real = q.quantize_moe_layer
    def dying(*a, **k):
        if k["layer_idx"] == die:
            os._exit(3)
        return real(*a, **k)
    q.quantize_moe_layer = dying
quantize({src!r}, {out!r}, _cfg(bits=4, nsamples=24, seqlen=32, forward_tokens=256, group_size=16),
         progress=False, device="cpu", resume=bool(int(os.environ.get("RESUME", "0"))))
"""


def _torchrun(tmp_path, src, out, env=None):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT.format(tests=os.path.dirname(__file__), src=src, out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=env, timeout=600)


def test_two_gloo_ranks_write_the_bytes_of_one_process_and_resume_after_a_rank_dies(tmp_path):
    """Windows split across 2 ranks (3 forward calls of 8 windows), experts split across them, rank 0
    writes: byte-identical to one process. Then rank 1 dies in layer 1; --resume finishes the same bytes."""
    src = str(tmp_path / "qwen")
    write_tiny(src, "Qwen2Moe", layers=2)
    torch.set_num_threads(1)
    one = _quantize_digest(tmp_path / "one", src, _cfg(bits=4, nsamples=24, seqlen=32, forward_tokens=256,
                                                        group_size=16))
    r = _torchrun(tmp_path, src, tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    assert digest(str(tmp_path / "two")) == one
    r = _torchrun(tmp_path, src, tmp_path / "three", {"DIE_AT_LAYER": "1"})
    assert r.returncode != 0 and not (tmp_path / "three").exists()
    r = _torchrun(tmp_path, src, tmp_path / "three", {"RESUME": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert digest(str(tmp_path / "three")) == one


def test_prune_under_two_gloo_ranks_writes_the_bytes_of_one_process(tmp_path):
    """merge/prune go through the same layer loop: forwards split across ranks, rank 0 writes."""
    src = str(tmp_path / "mix")
    write_tiny(src, "Mixtral", layers=2)
    args = ["-q", "prune", src, "--experts", "2", "--method", "reap", "--calib", CALIB, "--nsamples", "24",
            "--seqlen", "32", "--forward-tokens", "256", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "moecompress", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "moecompress", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(f for f in os.listdir(tmp_path / "one") if f.endswith(".safetensors"))
    assert files and all(open(tmp_path / "one" / f, "rb").read() == open(tmp_path / "two" / f, "rb").read()
                         for f in files)


def test_gptq_allocates_its_work_tensors_where_the_weights_are():
    """With the default device set elsewhere (meta), GPTQ and RTN on CPU weights still work and give the same
    codes: none of their work tensors follows the default device (on a GPU run they follow W to CUDA)."""
    from moecompress.quant.gptq import GPTQConfig, gptq, rtn
    from moecompress.quant.grids import AsymmetricGrid
    from moecompress.quant.ternary import TernaryGrid
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(2, 64, 128, generator=g), torch.randn(2, 300, 128, generator=g)
    H = X.transpose(1, 2) @ X
    cases = [(grid, act) for grid in (AsymmetricGrid(3), TernaryGrid(threshold=0.3)) for act in (False, True)]
    ref = [gptq(W, H, grid, 64, GPTQConfig(act_order=act)).codes for grid, act in cases]
    torch.set_default_device("meta")
    try:
        got = [gptq(W, H, grid, 64, GPTQConfig(act_order=act)).codes for grid, act in cases]
        r = rtn(W, AsymmetricGrid(3), 64)
    finally:
        torch.set_default_device("cpu")
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and r.codes.device.type == "cpu"
