"""Shared fixtures: tiny random MoE checkpoints of every family (both on-disk layouts), the trained model.

Everything a test reads ships with the project, so a fresh clone runs every test: the trained demo model
and its calibration/evaluation mixes are package data (moecompress/data), the per-domain texts a few tests
need are in tests/data/text (see tests/data/README.md).
"""
from __future__ import annotations

import os
import shutil
from importlib import resources

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: -n 2 on 2 cores
    torch.set_num_threads(1)

_DATA = str(resources.files("moecompress.data"))
TRAINED = os.path.join(_DATA, "demo-model")  # the trained Mixtral demo model (9 M parameters, 8 experts, top-2)
TEXT = os.path.join(_DATA, "text")  # calib_mix.txt, eval_mix.txt: four domains mixed
DOMAINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "text")  # calib_prose, prose_test, c_test

V = 4096
BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
FAMILIES = {
    "Mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                     num_experts=8, num_experts_per_tok=2),
    "Qwen3Moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16),
    "Olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "DeepseekV2": dict(intermediate_size=128, moe_intermediate_size=64, first_k_dense_replace=1, num_key_value_heads=4,
                       n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
    "DeepseekV3": dict(intermediate_size=128, moe_intermediate_size=64, first_k_dense_replace=1, num_key_value_heads=4,
                       n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1),
    "Phimoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "GptOss": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
}


def write_tiny(path: str, family: str, layout: str = "native", seed: int = 0, layers: int = 2):
    """Write a tiny random checkpoint of `family` to `path`.

    layout "native": what save_pretrained writes (per expert for most families, fused for GPT-OSS);
    "fused": experts as transformers v5 holds them in memory (gate_up_proj [E, 2I, H], down_proj [E, H, I]).
    Routers are scaled up so routing is decisive, as in trained models.
    """
    import transformers as tf
    from safetensors.torch import load_file, save_file
    torch.manual_seed(seed)
    cfg = getattr(tf, family + "Config")(**{**BASE, **FAMILIES[family], "num_hidden_layers": layers})
    m = getattr(tf, family + "ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(30)
    m.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the demo model's tokenizer (vocabulary 4096 = V)
        shutil.copy(os.path.join(TRAINED, f), path)
    if layout == "fused" and family != "GptOss":
        f = os.path.join(path, "model.safetensors")
        d = load_file(f)
        sd = m.state_dict()
        out = {k: v for k, v in d.items() if ".experts." not in k or "shared_expert" in k}
        for k, v in sd.items():
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                out[k] = v.to(next(iter(d.values())).dtype).contiguous()
        save_file(out, f, metadata={"format": "pt"})
    return m


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A callable: tiny_dir(family, layout) -> path, cached per session."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def make(family="Mixtral", layout="native"):
        key = (family, layout)
        if key not in cache:
            p = str(root / f"{family}-{layout}")
            write_tiny(p, family, layout)
            cache[key] = p
        return cache[key]
    return make


def digest(d: str) -> dict[str, str]:
    """sha256 of every shard and the manifest of packed directory d: two runs are byte-identical when equal."""
    import glob
    import hashlib
    files = sorted(glob.glob(os.path.join(d, "*.safetensors"))) + [os.path.join(d, "moecompress.json")]
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}


def tiny_qwen_run(root, config) -> tuple:
    """A tiny Qwen2-MoE (8 routed experts and a shared one per layer) at root/src, quantized in one process with
    `config` into root/one -> (root, src, digest of root/one)."""
    from moecompress.api import quantize
    src = str(root / "src")
    write_tiny(src, "Qwen2Moe")
    quantize(src, str(root / "one"), config, progress=False, device="cpu")
    return root, src, digest(str(root / "one"))


def quantize_under_two_ranks(tmp_path, module: str, cfg: str, src: str, out: str):
    """`quantize(src, out, <module>._cfg(<cfg>))` under `torchrun --nproc-per-node 2` (gloo, one thread per rank)
    -> the CompletedProcess."""
    import subprocess
    import sys
    script = tmp_path / "ranks.py"
    script.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                      f"from {module} import _cfg\nfrom moecompress.api import quantize\n"
                      f"quantize({src!r}, {out!r}, _cfg({cfg}), progress=False, device='cpu')\n")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=600)


def interrupt_at(monkeypatch, layer: int):
    """Make the quantize pass raise KeyboardInterrupt (Ctrl-C) when it reaches MoE layer `layer`;
    returns the real pass, to put back with monkeypatch.setattr before resuming."""
    import moecompress.passes.quantize as q
    real = q.quantize_moe_layer

    def stop(*a, **k):
        if k["layer_idx"] == layer:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(q, "quantize_moe_layer", stop)
    return real


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): bytes depend on the
    thread count, and on a shared 2-core box tiny tensors only gain contention from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_int(N, K, bits, g, seed=0):
    """Random "int" PackedTensor with realistic magnitudes (|W| ~ 1/sqrt(K))."""
    from moecompress.codecs import QuantSpec, get_codec
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (N, K), generator=gen)
    s = (torch.rand(N, K // g, generator=gen) + 0.5) * 2 / ((1 << bits) - 1) / K ** 0.5
    z = torch.randint(0, 1 << bits, (N, K // g), generator=gen).float()
    return get_codec("int").encode(q, s, z, QuantSpec("int", bits, g))
