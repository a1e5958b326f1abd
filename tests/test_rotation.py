"""`quantize --rotate`: randomized Hadamard rotations of the routed experts' input dimension.

The transform itself (exact, orthonormal, block sizes for widths that are not powers of two), the packed
round trip on the demo model (stored signs, effective weights deq(W') R, the torch decode path against a dense
model of those weights, from_pretrained and save_pretrained), 2-bit perplexity against the unrotated run,
refusals (exporter, ternary layers, damaged signs) and the Triton path under TRITON_INTERPRET=1.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton wraps any kernel (see test_kernels.py)

import json  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moecompress import api  # noqa: E402
from moecompress.codecs import QuantSpec, decode  # noqa: E402
from moecompress.config import CalibConfig, QuantizeConfig  # noqa: E402
from moecompress.errors import MoeCompressError, PackedFormatError  # noqa: E402
from moecompress.quant.hadamard import (CONSTRUCTION, check_signs, factors, fwht, hadamard_matrix, paley,  # noqa: E402
                                        random_signs, rotate, rotate_hessian, unrotate)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest
EVAL = os.path.join(os.path.dirname(api.builtin_model_path()), "text", "eval_mix.txt")


def sylvester(b: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < b:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / b ** 0.5


# ---------------------------------------------------------------- the transform

@pytest.mark.parametrize("n", [12, 20, 28, 44, 180])
def test_paley_orders(n):
    P = paley(n)  # 28 by construction II (q = 13), the others by I
    assert torch.equal(P.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(P @ P.T, n * torch.eye(n, dtype=torch.float64))


# (n, b): Hd = P_n (x) S_b (normalized); n = 1: Sylvester alone; n = 0: block-diagonal I (x) S_b (no Paley order)
@pytest.mark.parametrize("K,n,b", [(8, 1, 8), (192, 12, 16), (384, 12, 32), (1408, 44, 32), (14336, 28, 512),
                                   (4096, 1, 4096), (2880, 180, 16), (10, 0, 2)])
def test_hadamard_exact_and_inverse(K, n, b):
    assert factors(K) == (n, b)
    gen = torch.Generator().manual_seed(K)
    s = random_signs(K, 0, 3, "down")
    assert s.dtype == torch.int8 and set(s.unique().tolist()) == {-1, 1} and check_signs(s, K) is None
    x = torch.randn(5, K, generator=gen, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, s), s), x, atol=1e-12)
    assert torch.allclose(rotate(unrotate(x, s), s), x, atol=1e-12)
    assert torch.allclose(rotate(x, s).norm(dim=-1), x.norm(dim=-1), rtol=1e-12)  # orthogonal
    if K <= 1408:  # the dense matrix: Kronecker of Paley and Sylvester (or block-diagonal), orthonormal
        Hd = hadamard_matrix(K)
        want = torch.kron(paley(n) / n ** 0.5, sylvester(b)) if n > 1 else torch.block_diag(*[sylvester(b)] * (K // b))
        assert torch.allclose(Hd, want, atol=1e-14)
        assert torch.allclose(Hd @ Hd.T, torch.eye(K, dtype=torch.float64), atol=1e-12)
        R = Hd * s.double()  # Hd diag(s)
        assert torch.allclose(rotate(x, s), x @ R.T, atol=1e-12)
        A = torch.randn(K, 16, generator=gen, dtype=torch.float64)
        Hs = A @ A.T
        assert torch.allclose(rotate_hessian(Hs[None], s)[0], R @ Hs @ R.T, atol=1e-9)
        W = torch.randn(7, K, generator=gen, dtype=torch.float64)  # W x = (W R^T)(R x)
        assert torch.allclose(rotate(W, s) @ rotate(x, s).T, W @ x.T, atol=1e-9)


def test_fwht_float32_and_signs_deterministic():
    x = torch.randn(3, 384)
    assert fwht(x).dtype == torch.float32 and torch.allclose(fwht(fwht(x), transpose=True), x, atol=1e-5)
    a = random_signs(384, 0, 1, "gate_up")
    assert torch.equal(a, random_signs(384, 0, 1, "gate_up"))
    for other in (random_signs(384, 1, 1, "gate_up"), random_signs(384, 0, 2, "gate_up"), random_signs(384, 0, 1, "down")):
        assert not torch.equal(a, other)
    assert check_signs(torch.full((4,), 2, dtype=torch.int8), 4) and check_signs(a.float(), 384)


def test_ternary_layers_stay_unrotated(caplog):
    from moecompress.passes.quantize import layer_rotation
    shapes = {"gate": (384, 192), "up": (384, 192), "down": (192, 384)}
    rot = layer_rotation({0: QuantSpec("int", 2, 64), 1: QuantSpec("int", 3, 64)}, 5, 0, shapes)
    assert rot["gate_up"].shape == (192,) and rot["down"].shape == (384,)
    assert torch.equal(rot["down"], random_signs(384, 0, 5, "down"))
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        assert layer_rotation({0: QuantSpec("int", 2, 64), 1: QuantSpec("sub1", 1, 0)}, 5, 0, shapes) is None
    assert "layer 5: not rotated" in caplog.text
    with pytest.raises(MoeCompressError, match="--rotate applies to integer codes"):
        QuantizeConfig(bits=1.6, method="ternary", rotate=True)


# ---------------------------------------------------------------- the demo model, packed and loaded

CALIB = CalibConfig(nsamples=16, seqlen=128, seed=0)


@pytest.fixture(scope="module")
def demo2(tmp_path_factory):
    """The demo model at 2 bits, group 64, with and without --rotate (same calibration)."""
    root = tmp_path_factory.mktemp("rot")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for rot in (False, True):
        out[rot] = str(root / f"q2{'r' if rot else ''}")
        api.quantize(None, out[rot], QuantizeConfig(bits=2, group_size=64, calib=CALIB, rotate=rot), progress=False)
    torch.set_num_threads(n)
    return out


def test_rotated_checkpoint_round_trip(demo2):
    import transformers as tf

    import moecompress
    from moecompress.experts import MoEExperts
    plain, rotd = (json.load(open(os.path.join(demo2[r], "moecompress.json"))) for r in (False, True))
    assert rotd["rotation"] == {"method": "randomized-hadamard", "hadamard": CONSTRUCTION, "layers": [0, 1, 2, 3],
                                "unrotated": []}
    assert "rotation" not in plain
    assert 0 < rotd["expert_bits_per_param"] - plain["expert_bits_per_param"] < 0.01  # 2 x K int8 per layer
    model = moecompress.load(demo2[True])
    src = tf.AutoModelForCausalLM.from_pretrained(api.builtin_model_path(), dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        s_x, s_h = ex.rotation()
        assert torch.equal(s_x, random_signs(192, 0, i, "gate_up")) and torch.equal(s_h, random_signs(384, 0, i, "down"))
        dense = src.model.layers[i].mlp.experts
        for e in (0, 5):
            for p, (R, w0) in {"gate": (s_x, dense.gate_up_proj[e, :384]), "up": (s_x, dense.gate_up_proj[e, 384:]),
                               "down": (s_h, dense.down_proj[e])}.items():
                eff = ex.effective_weight(e, p)  # decode(W') R, against an explicit R
                Rm = hadamard_matrix(eff.shape[1], torch.float32) * R.float()
                assert torch.allclose(eff, decode(ex.weights[e][p]) @ Rm, atol=1e-5)
                err = ((eff - w0).norm() / w0.norm()).item()
                assert err < 1.0, (i, e, p, err)  # 2-bit GPTQ: 0.59-0.82 as unrotated; decode(W') itself: > 1.5
    # the packed torch path computes what a dense model of the effective weights computes
    ex = model.model.layers[1].mlp.experts
    dense_ex = MoEExperts([{p: ex.effective_weight(e, p) for p in ("gate", "up", "down")} for e in range(8)], ex.glu)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 192, generator=gen)
    w, idx = torch.topk(torch.randn(9, 8, generator=gen).softmax(-1), 2)
    torch.testing.assert_close(ex(x, idx, w), dense_ex(x, idx, w), rtol=1e-4, atol=1e-5)
    h, y = ex.expert_forward(3, x)
    h2, y2 = dense_ex.expert_forward(3, x)
    torch.testing.assert_close(h, h2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)
    # transformers' own front door and save_pretrained keep the signs
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    ref = model(ids).logits
    hf = tf.AutoModelForCausalLM.from_pretrained(demo2[True]).eval()
    torch.testing.assert_close(hf(ids).logits, ref)
    return_dir = os.path.join(os.path.dirname(demo2[True]), "saved")
    hf.save_pretrained(return_dir)
    again = moecompress.load(return_dir)
    assert torch.equal(again.model.layers[2].mlp.experts.rotation()[1], model.model.layers[2].mlp.experts.rotation()[1])
    torch.testing.assert_close(again(ids).logits, ref)


def test_rotated_2bit_perplexity(demo2):
    """2-bit perplexity on the built-in eval text (4096 tokens), 16 x 128 calibration tokens, seed 0. Measured:
    50.25 unrotated, 48.86 rotated (-2.8%; the block-diagonal I_3 (x) S_64 Hadamard gave 50.08). On the fixture
    domains (3 seeds) the gain is within the seed spread on this small model, so this is a regression guard for
    this configuration: rotated no worse than unrotated; a rotation applied wrongly anywhere (quantize basis,
    stored signs, decode path) costs far more."""
    ppl = {r: api.evaluate(demo2[r], [EVAL], max_tokens=4096, progress=False)[EVAL]["perplexity"] for r in (False, True)}
    assert 40 < ppl[True] <= ppl[False], ppl


def test_export_refuses_rotated(demo2, tmp_path):
    with pytest.raises(MoeCompressError) as e:
        api.export(demo2[True], str(tmp_path / "ct"))
    msg = str(e.value)
    assert "rotation" in msg and "\n" not in msg and not (tmp_path / "ct").exists()


def test_damaged_signs_refused(demo2, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    import moecompress
    bad = tmp_path / "bad"
    shutil.copytree(demo2[True], bad)
    shard = bad / "layer-00002.safetensors"
    t = load_file(str(shard))
    t["model.layers.2.mlp.experts.rotation_down"][7] = 3
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(PackedFormatError, match="rotation signs .* values other than"):
        moecompress.load(str(bad), verify=False)
    m = json.load(open(bad / "moecompress.json"))
    m["rotation"]["hadamard"] = "another-construction"
    json.dump(m, open(bad / "moecompress.json", "w"))
    with pytest.raises(PackedFormatError, match="Hadamard construction 'another-construction'"):
        moecompress.load(str(bad), verify=False)
    del m["rotation"]  # signs stored, but the manifest rotates nothing: unexpected tensors
    json.dump(m, open(bad / "moecompress.json", "w"))
    with pytest.raises(PackedFormatError, match="rotation_"):
        moecompress.load(str(bad), verify=False)


# ---------------------------------------------------------------- Triton, under TRITON_INTERPRET=1

def test_kernels_apply_the_rotation(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be checked")
    from conftest import make_int

    from moecompress import kernels as mk
    from moecompress.experts import MoEExperts, make_glu
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    H, I, E, T = 64, 96, 4, 11
    experts = [{"gate": make_int(I, H, b, 32, 3 * e), "up": make_int(I, H, b, 32, 3 * e + 1),
                "down": make_int(H, I, b, 32, 3 * e + 2)} for e, b in enumerate((2, 3, 4, 2))]
    rot = (random_signs(H, 0, 0, "gate_up"), random_signs(I, 0, 0, "down"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=gen)
    w, idx = torch.topk(torch.randn(T, E, generator=gen).softmax(-1), 2)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    for e in range(E):  # the kernels decode exactly the stored W'
        for p in ("gate", "down"):
            assert torch.equal(mk.decode(experts[e][p]), decode(experts[e][p]))
    y = mk.moe_experts_forward(x, idx, w, experts, None, None, rot)
    ref = mk.moe_reference(x, idx, w, experts, None, None, rot)
    scale = ref.abs().max().item()
    assert scale > 0 and (y - ref).abs().max().item() <= 1e-5 * scale  # the unrotated path's fp32 tolerance
    assert (y - mk.moe_reference(x, idx, w, experts)).abs().max().item() > 0.1 * scale  # the rotation matters
    # the experts module: Triton path == torch path == a dense module of the effective weights
    glu = make_glu("silu", type("C", (), {"hidden_act": "silu"})())
    packed = MoEExperts([dict(ex) for ex in experts], glu, rotation={"gate_up": rot[0], "down": rot[1]})
    y_triton = packed(x, idx, w)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    packed._prepared = None
    y_torch = packed(x, idx, w)
    dense = MoEExperts([{p: packed.effective_weight(e, p) for p in ("gate", "up", "down")} for e in range(E)], glu)
    assert (y_triton - y_torch).abs().max().item() <= 1e-5 * scale
    assert (y_torch - dense(x, idx, w)).abs().max().item() <= 1e-5 * scale


# ---------------------------------------------------------------- every family, and the LP allocator

@pytest.mark.parametrize("family,layout", [("Mixtral", "native"), ("Qwen2Moe", "native"), ("GptOss", "native"),
                                           ("DeepseekV3", "fused")])
def test_rotated_families_match_unrotated(tiny_dir, tmp_path, family, layout):
    """8-bit GPTQ with and without --rotate on tiny checkpoints of several families (shared experts, GPT-OSS's
    biases and clamped GLU, DeepSeek's dense first layer): both close to the source's logits, the rotated one
    about as close as the unrotated one."""
    import transformers as tf

    import moecompress
    from conftest import TEXT
    src = tiny_dir(family, layout)
    ids = torch.tensor([[3, 17, 40, 9, 77, 5, 12, 60]])
    ref = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
    err = {}
    for rot in (False, True):
        out = str(tmp_path / f"q{int(rot)}")
        api.quantize(src, out, QuantizeConfig(bits=8, group_size=32, rotate=rot, calib=CalibConfig(
            (os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32)), progress=False)
        m = moecompress.load(out)
        err[rot] = ((m(ids).logits - ref).norm() / ref.norm()).item()
    man = json.load(open(os.path.join(out, "moecompress.json")))
    moe = sorted({t["layer"] for t in man["tensors"] if "expert" in t})
    assert man["rotation"]["layers"] == moe and man["rotation"]["unrotated"] == []
    assert err[False] < 0.01 and err[True] < 1.5 * err[False], err  # measured: rotated within 7% of unrotated


def test_lp_allocation_measures_rotated(tiny_dir, tmp_path):
    """--allocation lp --rotate: the sensitivity pass quantizes integer candidates in the rotated basis; with sub1
    among the candidates, a layer holding a sub1 expert stays unrotated (and is recorded so)."""
    from conftest import TEXT

    import moecompress
    calib = CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32)
    runs = {}
    for rot in (False, True):
        out = str(tmp_path / f"lp{int(rot)}")
        api.quantize(tiny_dir("Mixtral"), out, QuantizeConfig(bits=2.5, group_size=32, allocation="lp", rotate=rot,
                                                               candidates=(2, 3), calib=calib), progress=False)
        runs[rot] = json.load(open(os.path.join(out, "run", "allocation.json")))
    e0, e1 = (torch.tensor([runs[r]["eps"][k] for k in sorted(runs[r]["eps"])], dtype=torch.float64)
              for r in (False, True))  # {width: (L, E)} -> (C, L, E)
    assert e0.shape == e1.shape and torch.isfinite(e1).all() and not torch.equal(e0, e1)  # measured in another basis
    assert 0.7 < (e1 / e0).median().item() < 1.3  # measured 0.96: rotated codes measured through deq(W') R
    out = str(tmp_path / "sub1")
    api.quantize(tiny_dir("Mixtral"), out, QuantizeConfig(bits=1.5, group_size=32, allocation="lp", rotate=True,
                                                           candidates=("sub1", 2), calib=calib), progress=False)
    man = json.load(open(os.path.join(out, "moecompress.json")))
    with_sub1 = sorted({t["layer"] for t in man["tensors"] if t["codec"] in ("sub1", "ternary")})
    assert with_sub1 and set(man["rotation"]["unrotated"]) == set(with_sub1)
    assert set(man["rotation"]["layers"]).isdisjoint(with_sub1)
    moecompress.load(out)  # loads: rotated integer layers beside unrotated ternary ones
