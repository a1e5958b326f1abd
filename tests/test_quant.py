"""Codecs, grids and GPTQ: exact round trips, SQNR floors, and GPTQ beating round-to-nearest."""
import math

import pytest
import torch

from moecompress.codecs import QuantSpec, decode, get_codec, nbytes
from moecompress.codecs.intq import pack_bits, unpack_bits
from moecompress.errors import MoeCompressError
from moecompress.quant.gptq import GPTQConfig, gptq, rtn
from moecompress.quant.grids import AsymmetricGrid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 8), (7, 24), (13, 40), (5, 3)])
def test_bit_packing_is_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    q = torch.randint(0, 1 << bits, shape, generator=g)
    p = pack_bits(q, bits)
    assert p.dtype == torch.uint8 and p.shape == (shape[0], math.ceil(shape[1] * bits / 8))
    assert torch.equal(unpack_bits(p, bits, shape[1]), q.int())


def sqnr_db(W, Q):
    return 10 * math.log10(float((W ** 2).sum() / ((W - Q) ** 2).sum()))


@pytest.mark.parametrize("bits,floor", [(2, 5.0), (3, 11.0), (4, 20.0), (8, 44.0)])
@pytest.mark.parametrize("N,K,gs", [(7, 48, 16), (33, 96, 32), (5, 64, 64)])
def test_int_codec_round_trip(bits, floor, N, K, gs):
    W = torch.randn(1, N, K, generator=torch.Generator().manual_seed(N * K))
    spec = QuantSpec("int", bits, gs)
    r = rtn(W, AsymmetricGrid(bits), gs)
    codec = get_codec("int")
    pt = codec.encode(r.codes[0], r.scale[0], r.zero[0], spec)
    assert torch.equal(codec.codes(pt), r.codes[0])  # exact on the integer codes
    assert torch.equal(decode(pt), r.deq[0])  # the decode is exactly the quantizer's output
    assert sqnr_db(W[0], decode(pt)) > floor
    assert pt.nbytes == nbytes((N, K), spec)
    codec.check(pt)


def test_specs_validate_in_user_terms():
    with pytest.raises(MoeCompressError, match="unsupported bit width 7"):
        QuantSpec("int", 7, 64)
    with pytest.raises(MoeCompressError, match="does not divide"):
        nbytes((8, 192), QuantSpec("int", 4, 128))


def _layer_problem(E=4, N=48, K=64, T=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, N, K, generator=g)
    mix = torch.randn(K, K, generator=g) / math.sqrt(K)
    X = torch.randn(E, T, K, generator=g) @ mix + 0.1 * torch.randn(E, T, K, generator=g)  # correlated inputs
    return W, X, X.transpose(1, 2) @ X


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest(bits, act_order):
    W, X, H = _layer_problem()
    grid = AsymmetricGrid(bits)
    out_err = lambda Q: float(((X @ (W - Q).transpose(1, 2)) ** 2).sum())
    g = gptq(W, H, grid, 16, GPTQConfig(act_order=act_order))
    r = rtn(W, grid, 16)
    assert out_err(g.deq) < 0.8 * out_err(r.deq)
    # codes, scales and zeros reproduce the returned weights exactly
    s, z = g.scale.repeat_interleave(16, 2), g.zero.repeat_interleave(16, 2)
    assert torch.equal((g.codes.float() - z) * s, g.deq)
    assert torch.isfinite(g.deq).all()


def test_gptq_batched_equals_per_expert_loop():
    W, _, H = _layer_problem(E=3)
    grid = AsymmetricGrid(3)
    batched = gptq(W, H, grid, 16)
    for e in range(3):
        one = gptq(W[e:e + 1], H[e:e + 1], grid, 16)
        assert torch.allclose(one.deq[0], batched.deq[e], atol=1e-5)


def test_gptq_identity_and_zero_hessians_do_not_nan():
    W, _, _ = _layer_problem(E=2)
    grid = AsymmetricGrid(4)
    H = torch.stack([torch.eye(64), torch.zeros(64, 64)])  # identity (fallback) and no tokens at all
    g = gptq(W, H, grid, 16)
    assert torch.isfinite(g.deq).all()
    assert torch.allclose(g.deq[0], rtn(W[:1], grid, 16).deq[0], atol=1e-6)  # identity Hessian == RTN
