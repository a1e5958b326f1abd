"""Triton kernels against the torch reference, on the CPU under TRITON_INTERPRET=1.

triton.jit reads TRITON_INTERPRET when it wraps a function; moecompress.kernels wraps its kernels
lazily, once per mode, so setting the variable here (before any kernel runs) is enough even when
another test module imported triton first.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the kernels cannot be checked")

from moecompress import kernels as mk  # noqa: E402
from moecompress.codecs import CODECS, PackedTensor, decode, get_codec  # noqa: E402
from moecompress.errors import MoeCompressError  # noqa: E402
from moecompress.kernels.intq_triton import LaunchConfig, int_matmul  # noqa: E402
from moecompress.kernels.moe import route  # noqa: E402
from conftest import make_int  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")


def check_product(y, x, packed):
    """fp32: 1e-5 of the largest output; 16-bit: within one rounding of x's dtype."""
    ref = x.float() @ decode(packed).T
    assert y.dtype == x.dtype and y.shape == ref.shape
    scale = ref.abs().max().clamp(min=1e-6)
    if x.dtype == torch.float32:
        err = ((y - ref).abs().max() / scale).item()
        assert err < 1e-5, err
    else:
        rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[x.dtype]
        torch.testing.assert_close(y.float(), ref, rtol=rtol, atol=1e-5 * scale.item())


# ---------------------------------------------------------------- import, backend, errors

def test_import_does_not_load_triton():
    code = "import sys, moecompress, moecompress.kernels as k; k.__all__; assert 'triton' not in sys.modules, 'triton'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("MOECOMPRESS_KERNELS")
    assert mk.backend("cpu") == "torch"
    assert mk.backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    assert mk.backend("cuda") == "torch"
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    assert mk.backend("cpu") == "triton"
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "cuda")
    with pytest.raises(MoeCompressError, match="torch"):
        mk.backend("cpu")


def test_bad_inputs(monkeypatch):
    p = make_int(7, 64, 4, 32)
    with pytest.raises(MoeCompressError, match=r"\(batch, 64\)"):
        mk.packed_linear(torch.randn(2, 32), p)
    with pytest.raises(MoeCompressError, match="float16"):
        mk.packed_linear(torch.randn(2, 64).double(), p)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoeCompressError, match="TRITON_INTERPRET=1"):
        mk.packed_linear(torch.randn(2, 64), p)


def test_torch_backend_is_the_reference(monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    p, x = make_int(7, 64, 3, 16), torch.randn(3, 64)
    assert torch.equal(mk.packed_linear(x, p), x @ decode(p).T)


# ---------------------------------------------------------------- decode: bit for bit

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_int_exact(bits):
    cases = [(N, K, g) for N in (1, 7, 33) for K in (32, 64, 96, 192) for g in (16, 32, 64) if K % g == 0]
    cases += [(5, 40, 8), (3, 72, 24)]  # groups that are not powers of two / smaller than a tile
    for i, (N, K, g) in enumerate(cases):
        p = make_int(N, K, bits, g, seed=i)
        got, want = mk.decode_int(p), decode(p)
        assert got.dtype == torch.float32 and torch.equal(got, want), (N, K, g)


# ---------------------------------------------------------------- packed_linear: tight tolerance

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("g", [16, 32, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_linear_int(bits, g):
    shapes = [(N, K) for N in (1, 7, 33) for K in (32, 64, 96, 192) if K % g == 0]
    batches = (1, 3, 17, 64)
    for i, (N, K) in enumerate(shapes):
        B, dt = batches[(i + bits) % 4], DTYPES[(i + g // 16) % 3]
        p = make_int(N, K, bits, g, seed=i)
        x = torch.randn(B, K, generator=torch.Generator().manual_seed(i)).to(dt)
        check_product(mk.packed_linear(x, p), x, p)


@pytest.mark.parametrize("bits", [3, 8])
def test_packed_linear_unfactored_groups(bits):
    # g = 8 or 24: a K step spans several groups, so every element is decoded before the product
    for i, (N, K, g, B) in enumerate([(7, 96, 8, 1), (33, 72, 24, 17), (5, 40, 8, 64)]):
        p = make_int(N, K, bits, g, seed=i)
        x = torch.randn(B, K, generator=torch.Generator().manual_seed(i))
        check_product(mk.packed_linear(x, p), x, p)
        check_product(mk.packed_linear(x.half(), p), x.half(), p)


@pytest.mark.parametrize("bits", [3, 4])
def test_gpu_tiles_and_split_k(bits):
    # the tiles the heuristic picks on a GPU, and a hand-made split-K, run under the interpreter
    N, K, g = 33, 192, 32
    p = make_int(N, K, bits, g, seed=bits)
    t = p.tensors
    for B in (1, 17):
        x = torch.randn(B, K, generator=torch.Generator().manual_seed(B)).half()
        cfg = LaunchConfig.pick(B, N, K, g, x.dtype, on_gpu=True)
        check_product(int_matmul(x, t["qweight"], t["scales"], t["zeros"], N, K, bits, g, config=cfg), x, p)
        split = LaunchConfig(cfg.BLOCK_M, 16, 32, cfg.USE_DOT, True, True, SPLIT_K=3, k_per_split=64)
        check_product(int_matmul(x, t["qweight"], t["scales"], t["zeros"], N, K, bits, g, config=split), x, p)
    big = LaunchConfig.pick(1, 8, 4096, 64, torch.float16, on_gpu=True)
    assert big.SPLIT_K > 1 and big.k_per_split % big.BLOCK_K == 0  # GEMV on a tall K splits K


# ---------------------------------------------------------------- routing and the MoE path

def test_route_pads_each_expert_to_blocks():
    idx = torch.tensor([[0, 2], [2, 3], [0, 2], [3, 0], [2, 1]])
    r = route(idx, num_experts=5, block_m=2)
    flat = idx.reshape(-1)
    assert sorted(r.pos.tolist()) == sorted(set(r.pos.tolist()))  # one padded row per slot
    assert torch.equal(r.row_expert[r.pos], flat[r.order])  # each slot lands in its expert's blocks
    assert torch.equal(r.rows1[r.pos].long(), r.order // 2)  # and reads its own token
    assert int((r.rows1 >= 0).sum()) == flat.numel() and r.block_expert[-1] == 5  # tail blocks: none


def gelu_glu(gate, up):
    return torch.nn.functional.gelu(gate) * up


def make_layer(H, I, bits_per_expert, g, seed=0):
    experts = []
    for e, b in enumerate(bits_per_expert):
        if b is None:
            experts.append(None)
            continue
        up_bits = b if e != 1 else 8  # expert 1: gate and up in different formats (two launches)
        experts.append({"gate": make_int(I, H, b, g, seed + 3 * e), "up": make_int(I, H, up_bits, g, seed + 3 * e + 1),
                        "down": make_int(H, I, b, g, seed + 3 * e + 2)})
    return experts


@pytest.mark.parametrize("T,dtype,use_bias", [(1, torch.float32, True), (7, torch.float16, False),
                                              (40, torch.float32, False), (33, torch.bfloat16, True)])
def test_moe_matches_reference(T, dtype, use_bias):
    H, I, k = 64, 96, 2
    experts = make_layer(H, I, [2, 3, 4, 8, None, 4], g=32, seed=T)  # mixed precision, expert 4 pruned
    E = len(experts)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w, idx = torch.topk(torch.randn(T, E, generator=gen).softmax(-1), k)
    if T == 40:
        idx[:, 0] = 4  # every token also routed to the pruned expert
    biases = [{"gate": torch.randn(I, generator=gen), "up": torch.randn(I, generator=gen),
               "down": torch.randn(H, generator=gen)} for _ in range(E)] if use_bias else None
    glu = gelu_glu if T == 7 else None
    y = mk.moe_experts_forward(x, idx, w.to(dtype), experts, glu, biases)
    ref = mk.moe_reference(x, idx, w.to(dtype), experts, glu, biases)
    scale = ref.float().abs().max().item()
    assert y.dtype == dtype and y.shape == (T, H) and scale > 0
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale


def test_moe_grouped_split_k_keeps_other_groups():
    # split-K in a grouped launch must not overwrite rows that belong to another group's blocks
    H, I = 64, 32
    experts = make_layer(H, I, [4, 4, 2], g=32)
    idx = torch.tensor([[0, 2], [1, 2], [2, 0]])
    r = route(idx, 3, block_m=1)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(3))
    out = torch.full((r.rows1.numel(), I), 7.0)
    stack = {n: torch.stack([experts[e]["gate"].tensors[n] for e in (0, 1)]) for n in ("qweight", "scales", "zeros")}
    blk = torch.tensor([0, 1, -1, -1], dtype=torch.int32)[r.block_expert.clamp(max=3)]
    cfg = LaunchConfig(1, 16, 32, False, False, True, SPLIT_K=2, k_per_split=32)
    int_matmul(x, stack["qweight"], stack["scales"], stack["zeros"], I, H, 4, 32, out=out, rows=r.rows1,
               block_expert=blk, block_m=1, config=cfg)
    for slot, p in enumerate(r.pos.tolist()):
        e, t = int(idx.reshape(-1)[r.order[slot]]), int(r.order[slot]) // 2
        want = x[t] @ decode(experts[e]["gate"]).T if e < 2 else torch.full((I,), 7.0)
        torch.testing.assert_close(out[p], want, rtol=1e-5, atol=1e-5)


def test_moe_experts_without_tokens_and_prepared_reuse():
    H, I = 32, 64
    experts = make_layer(H, I, [4, 3, 4, 2], g=16, seed=5)
    px = mk.prepare_experts(experts)
    assert len(px.stage1) == 4 and len(px.stage2) == 3  # expert 1 split (gate 3 bits, up 8 bits); down: 2,3,4
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(5))  # not the global RNG: order-independent
    idx = torch.full((5, 1), 2)  # only expert 2 gets tokens
    w = torch.ones(5, 1)
    torch.testing.assert_close(mk.moe_experts_forward(x, idx, w, px), mk.moe_reference(x, idx, w, experts),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(MoeCompressError, match="outside"):
        mk.moe_experts_forward(x, idx + 3, w, px)


class _Dense16:
    """Test-only codec without a Triton kernel: exercises the fallbacks."""

    name = "dense16_test"

    def check(self, packed):
        pass

    def decode(self, packed):
        return packed.tensors["w"].float()


def test_codec_without_kernel_falls_back(monkeypatch):
    monkeypatch.setitem(CODECS, "dense16_test", _Dense16())
    H, I = 32, 16

    def dense(N, K, seed):
        return PackedTensor("dense16_test", (N, K), {"w": torch.randn(N, K, generator=torch.Generator().manual_seed(seed)).half()})
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(7))
    p = dense(I, H, 0)
    torch.testing.assert_close(mk.packed_linear(x, p), x @ decode(p).T)
    experts = [{"gate": dense(I, H, 1), "up": dense(I, H, 2), "down": dense(H, I, 3)},
               {"gate": make_int(I, H, 4, 16, 4), "up": make_int(I, H, 4, 16, 5), "down": make_int(H, I, 4, 16, 6)}]
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.rand(3, 2, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(mk.moe_experts_forward(x, idx, w, experts), mk.moe_reference(x, idx, w, experts),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dense ternary

def make_ternary(N, K, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gg = K if g == 0 else g
    t = torch.randint(0, 3, (N, K), generator=gen)
    lo, hi = -torch.rand(N, K // gg, generator=gen) / K ** 0.5, torch.rand(N, K // gg, generator=gen) / K ** 0.5
    return get_codec("ternary").encode(t, lo, hi, g)


def test_ternary_decode_exact_and_products():
    # K not a multiple of 5 (padded last byte), g = 0 (one group per row), g smaller than a tile
    cases = [(7, 96, 32, 1), (33, 192, 64, 17), (1, 35, 0, 3), (5, 40, 8, 64), (9, 64, 16, 3), (3, 100, 0, 17)]
    for i, (N, K, g, B) in enumerate(cases):
        p = make_ternary(N, K, g, seed=i)
        assert torch.equal(mk.decode(p), decode(p)), (N, K, g)
        x = torch.randn(B, K, generator=torch.Generator().manual_seed(i)).to(DTYPES[i % 3])
        check_product(mk.packed_linear(x, p), x, p)


def test_moe_with_ternary_and_int_experts():
    H, I = 64, 32
    experts = make_layer(H, I, [4, 2], g=32, seed=1)
    experts.append({"gate": make_ternary(I, H, 32, 1), "up": make_ternary(I, H, 32, 2), "down": make_ternary(H, I, 0, 3)})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, H, generator=gen)
    w, idx = torch.topk(torch.randn(9, 3, generator=gen).softmax(-1), 2)
    torch.testing.assert_close(mk.moe_experts_forward(x, idx, w, experts), mk.moe_reference(x, idx, w, experts),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sub1 (dictionary-coded ternary)

def sparse_codes(N, K, zero_frac, gen):
    """Ternary codes with about `zero_frac` zeros (code 1) and runs of zeros, like GPTQ-ternary experts."""
    u = torch.rand(N, K, generator=gen)
    return torch.where(u < zero_frac, 1, torch.where(u < (1 + zero_frac) / 2, 0, 2))


def make_sub1(N, K, g, zero_frac=0.9, seed=0, dictionary=None):
    from moecompress.codecs import sub1_dict as sd
    gen = torch.Generator().manual_seed(seed)
    gg = K if g == 0 else g
    t = sparse_codes(N, K, zero_frac, gen)
    lo, hi = -torch.rand(N, K // gg, generator=gen) / K ** 0.5, torch.rand(N, K // gg, generator=gen) / K ** 0.5
    if dictionary is None:
        dictionary = sd.build_dictionary([t], max_entries=512, max_len=16, sizes=(512,))
    return get_codec("sub1").encode(t, lo, hi, dictionary, g)


def test_sub1_decode_exact_and_products():
    # odd K (a padded last pair), g = 0 (one group per row), odd groups, batch 1 to 64, three dtypes
    cases = [(7, 96, 32, 1, 0.9), (33, 193, 0, 17, 0.95), (1, 35, 5, 3, 0.6), (5, 40, 8, 64, 0.99),
             (9, 64, 16, 3, 0.0), (3, 101, 0, 40, 0.85)]
    for i, (N, K, g, B, zf) in enumerate(cases):
        p = make_sub1(N, K, g, zf, seed=i)
        assert p.codec == "sub1"
        assert torch.equal(mk.decode(p), decode(p)), (N, K, g)
        x = torch.randn(B, K, generator=torch.Generator().manual_seed(i)).to(DTYPES[i % 3])
        check_product(mk.packed_linear(x, p), x, p)


def test_sub1_kernel_does_not_fall_back(monkeypatch):
    from moecompress.kernels import dispatch
    calls = []
    monkeypatch.setattr(dispatch, "reference_linear", lambda *a: calls.append(1))
    p = make_sub1(16, 64, 32)
    y = mk.packed_linear(torch.randn(2, 64), p)
    assert not calls and y.shape == (2, 16)


def test_moe_grouped_ternary_and_sub1_experts():
    # experts of every format in one layer: int (2 widths), dense ternary x2 (one grouped launch), sub1 x2
    # sharing a dictionary (gate and up fused; encode_ternary's informational "sizes" attrs included)
    from moecompress.codecs import sub1_dict as sd
    from moecompress.codecs.ternary import encode_ternary
    H, I = 64, 48
    gen = torch.Generator().manual_seed(3)
    experts = make_layer(H, I, [4, 2], g=16, seed=2)
    for s in (4, 5):
        experts.append({"gate": make_ternary(I, H, 32, s), "up": make_ternary(I, H, 32, s + 10),
                        "down": make_ternary(H, I, 0, s + 20)})
    codes = {(e, n): sparse_codes(*shape, 0.92, gen) for e in (6, 7)
             for n, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I)))}
    dictionary = sd.build_dictionary(list(codes.values()), max_entries=1024, max_len=16, sizes=(1024,))
    for e in (6, 7):
        ex = {}
        for n in ("gate", "up", "down"):
            N, K = codes[e, n].shape
            g = 16 if n != "down" else 0
            G = K // (g or K)
            ex[n] = encode_ternary(codes[e, n], -torch.rand(N, G, generator=gen) / 8, torch.rand(N, G, generator=gen) / 8,
                                   g, dictionary)
            assert ex[n].codec == "sub1" and "sizes" in ex[n].attrs
        experts.append(ex)
    px = mk.prepare_experts(experts)
    fmts = {(g.codec, len(g.experts)) for g in px.stage1}
    assert ("ternary", 2) in fmts and ("sub1", 2) in fmts, fmts
    for T in (1, 6, 23):
        x = torch.randn(T, H, generator=gen)
        w, idx = torch.topk(torch.randn(T, len(experts), generator=gen).softmax(-1), 2)
        torch.testing.assert_close(mk.moe_experts_forward(x, idx, w, px), mk.moe_reference(x, idx, w, experts),
                                   rtol=1e-5, atol=1e-6)


def test_sub1_rows_across_chunks_and_blocks(monkeypatch):
    """Row starts come from row_counts plus one anchor per 64 rows: blocks of 16 rows (as CUDA's 32, below
    the chunk) run the kernel's in-chunk prefix loop; 100 and 72 rows cross a chunk boundary. Plain decode
    and the grouped launch, whose joined buffer holds each member's stored stream as a byte range."""
    from moecompress.codecs import sub1_dict as sd
    from moecompress.kernels import sub1_triton
    monkeypatch.setattr(sub1_triton, "CPU_BLOCK_N", 16)
    gen = torch.Generator().manual_seed(11)
    p = make_sub1(100, 24, 8, 0.9, seed=11)
    assert torch.equal(mk.decode(p), decode(p))
    H, I, E = 16, 72, 2
    codes = [sparse_codes(*shape, 0.9, gen) for _ in range(E) for shape in ((I, H), (I, H), (H, I))]
    dictionary = sd.build_dictionary(codes, max_entries=256, max_len=16, sizes=(256,))
    experts = []
    for e in range(E):
        ex = {}
        for j, n in enumerate(("gate", "up", "down")):
            c = codes[3 * e + j]
            G = c.shape[1] // 8
            ex[n] = get_codec("sub1").encode(c, -torch.rand(c.shape[0], G, generator=gen), torch.rand(c.shape[0], G,
                                             generator=gen), dictionary, 8)
        experts.append(ex)
    px = mk.prepare_experts(experts)
    for g in px.stage1 + px.stage2:  # gate and up apart (offsets 0 and I), down: one group each
        assert g.codec == "sub1" and len(g.experts) == E
        for e, proj, v in g.views():
            assert torch.equal(v["codewords"], experts[e][proj].tensors["codewords"])
            assert torch.equal(v["row_counts"], experts[e][proj].tensors["row_counts"])
    assert sorted(g.col_off for g in px.stage1) == [0, I]
    x = torch.randn(3, H, generator=gen)
    w, idx = torch.topk(torch.randn(3, E, generator=gen).softmax(-1), 2)
    torch.testing.assert_close(mk.moe_experts_forward(x, idx, w, px), mk.moe_reference(x, idx, w, experts),
                               rtol=1e-5, atol=1e-6)


def test_packed_linear_module_takes_any_leading_shape():
    """PackedLinear (shared experts) runs the Triton kernel on (B, L, K) inputs as on (rows, K), with its bias."""
    from moecompress.experts import PackedLinear
    p = make_int(24, 64, 4, 32, seed=5)
    bias = torch.randn(24, generator=torch.Generator().manual_seed(6))
    lin = PackedLinear(p, bias)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(7))
    y = lin(x)
    assert y.shape == (2, 5, 24)
    check_product(y.reshape(10, 24) - bias, x.reshape(10, 64), p)
