"""Every codec on CUDA (tests marked `cuda`, skipped without a GPU) and the device-agnostic paths on the CPU.

CUDA: each codec's decode equals the CPU decode bit for bit under MOECOMPRESS_KERNELS=torch and triton,
the grouped MoE path at 1, 16 and 256 tokens against the torch reference, a mixed-precision layer, no
host synchronisation on the Triton path (`torch.cuda.set_sync_debug_mode("error")`), and
`from_pretrained(packed, device_map="cuda")` after `import moecompress`. Run them with `pytest -m cuda`
(benchmarks/gpu_check.sh does, on the GPU machine).

CPU stand-ins for the same properties: decode on the meta device (shapes alone), decode tables made on
the tensor's own device and found there without a host copy, codec checks run once, the Triton path
(under TRITON_INTERPRET=1) calling nothing that syncs with the host, and every kernel variant the CUDA
path launches compiled for sm_90 by Triton's own compiler (no GPU needed to compile).
"""
import os
import sys

import pytest
import torch

from moecompress.codecs import PackedTensor, decode, ensure_checked, get_codec, is_checked
from moecompress.errors import MoeCompressError, PackedFormatError
from conftest import make_int

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moecompress", "data", "text")


# ---------------------------------------------------------------- packed tensors of every codec

def _levels(N, K, g, gen):
    G = K // (g or K)
    return -torch.rand(N, G, generator=gen) / K ** 0.5, torch.rand(N, G, generator=gen) / K ** 0.5


def make_ternary(N, K, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return get_codec("ternary").encode(torch.randint(0, 3, (N, K), generator=gen), *_levels(N, K, g, gen), g)


def sparse_codes(N, K, zero_frac, gen):
    u = torch.rand(N, K, generator=gen)
    return torch.where(u < zero_frac, 1, torch.where(u < (1 + zero_frac) / 2, 0, 2))


def make_sub1(N, K, g, seed=0, dictionary=None, entries=512):
    from moecompress.codecs import sub1_dict as sd
    gen = torch.Generator().manual_seed(seed)
    t = sparse_codes(N, K, 0.9, gen)
    if dictionary is None:
        dictionary = sd.build_dictionary([t], max_entries=entries, max_len=16, sizes=(entries,))
    return get_codec("sub1").encode(t, *_levels(N, K, g, gen), dictionary, g)


CODEC_CASES = {  # name -> (N, K, maker); odd shapes: padded bytes, pairs and trit groups
    "int2": lambda: make_int(48, 96, 2, 32, 1), "int3": lambda: make_int(33, 192, 3, 64, 2),
    "int4": lambda: make_int(40, 128, 4, 128, 3), "int8": lambda: make_int(17, 64, 8, 16, 4),
    "ternary": lambda: make_ternary(35, 101, 0, 5), "sub1": lambda: make_sub1(37, 193, 0, 6),
}


def mixed_layer(H=64, I=96, seed=0):
    """Every format in one layer: int 2/3/4/8 (expert 1's gate and up differ), dense ternary, two sub1
    experts sharing a dictionary, and a pruned expert."""
    from moecompress.codecs import sub1_dict as sd
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for e, b in enumerate((2, 3, 4, 8)):
        experts.append({"gate": make_int(I, H, b, 32, seed + 3 * e), "up": make_int(I, H, 8 if e == 1 else b, 32, seed + 3 * e + 1),
                        "down": make_int(H, I, b, 32, seed + 3 * e + 2)})
    experts.append(None)
    experts.append({"gate": make_ternary(I, H, 32, seed + 20), "up": make_ternary(I, H, 32, seed + 21),
                    "down": make_ternary(H, I, 0, seed + 22)})
    codes = [sparse_codes(*s, 0.9, gen) for s in ((I, H), (I, H), (H, I)) * 2]
    d = sd.build_dictionary(codes, max_entries=1024, max_len=16, sizes=(1024,))
    sub1 = get_codec("sub1")
    for j in (0, 3):
        experts.append({n: sub1.encode(c, *_levels(*c.shape, g, gen), d, g)
                        for n, c, g in zip(("gate", "up", "down"), codes[j:j + 3], (16, 16, 0))})
    return experts


def moved(experts, device):
    return [None if ex is None else {n: p.to(device) for n, p in ex.items()} for ex in experts]


def routing(T, E, k, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w, idx = torch.topk(torch.randn(T, E, generator=gen).softmax(-1), k)
    return idx.to(device), w.to(device)


# ---------------------------------------------------------------- CPU: device-agnostic codecs

@pytest.mark.parametrize("name", sorted(CODEC_CASES))
def test_decode_on_meta_gives_shape_and_dtype(name):
    p = CODEC_CASES[name]()
    m = p.to("meta")
    w = decode(m)
    assert w.device.type == "meta" and w.shape == p.shape and w.dtype == torch.float32


def test_decode_tables_live_on_the_tensors_device_and_need_no_host_copy(monkeypatch):
    from moecompress.codecs import sub1_trie as st, ternary as tc
    st._DEVICE_TABLES.clear()
    tc._POW3.clear()
    p, dense = make_sub1(29, 130, 0, 3), make_ternary(9, 33, 11, 4)
    before = {k: decode(x) for k, x in (("sub1", p), ("ternary", dense))}  # unchecked: keyed by a content hash
    ensure_checked(p)
    assert torch.equal(decode(p), before["sub1"])  # checked: keyed by its dictionary id
    keys = list(st._DEVICE_TABLES)
    assert {dev for _, dev in keys} == {"cpu"} and (p.attrs["dictionary_id"], "cpu") in keys
    assert all(t.device.type == "cpu" for v in st._DEVICE_TABLES.values() for t in v)
    assert set(tc._POW3) == {"cpu"} and tc._POW3["cpu"].device.type == "cpu"
    # a checked tensor's decode finds its tables by id: the dictionary is never copied to the host again

    def no_host_copy(t):
        raise AssertionError("dictionary copied to the host during decode")
    monkeypatch.setattr(st, "_bytes", no_host_copy)
    assert torch.equal(decode(p), before["sub1"]) and torch.equal(decode(dense), before["ternary"])


def test_sub1_decode_ignores_the_spare_codeword_in_the_last_byte():
    # 5-bit codewords: the stream's last byte can hold a whole extra (zero) codeword that decode unpacks
    # without knowing sum(row_counts) (no host sync); it lies past the last symbol and changes nothing
    from moecompress.codecs.ternary import get_codes
    for seed in range(6):
        p = make_sub1(7, 41 + seed, 0, seed, entries=32)
        assert p.attrs["codeword_bits"] == 5
        M = int(p.tensors["row_counts"].long().sum())
        spare = p.tensors["codewords"].numel() * 8 // 5 - M
        codes = get_codec("sub1").codes(p)
        assert torch.equal(codes, get_codes(p)) and codes.shape == p.shape, (seed, spare)
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(codes, sparse_codes(7, 41 + seed, 0.9, gen).to(torch.int32))


def test_checks_run_once_and_cast_levels_are_caught(monkeypatch):
    from moecompress.codecs.ternary import Sub1Codec
    from moecompress.kernels import packed_linear
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    p = make_sub1(16, 64, 32, 1)
    assert not is_checked(p)
    calls = []
    orig = Sub1Codec.check
    monkeypatch.setattr(Sub1Codec, "check", lambda self, q: (calls.append(1), orig(self, q))[1])
    x = torch.randn(3, 64)
    y = [packed_linear(x, p) for _ in range(3)]
    assert len(calls) == 1 and is_checked(p) and all(torch.equal(y[0], v) for v in y[1:])
    assert is_checked(p.to("meta"))  # moving keeps the data, so the check stands
    p.tensors["lo"] = p.tensors["lo"].to(torch.bfloat16)  # a cast is not the tensor that was checked
    assert not is_checked(p)
    with pytest.raises(PackedFormatError, match="float16"):
        packed_linear(x, p)


def test_check_marks_follow_the_tensors_not_the_wrapper():
    """Module state rebuilds PackedTensors over its buffers: the check stays valid for the same tensors (and
    for tensors moved with carry_check), not for a mix of tensors from two checks."""
    from moecompress.codecs import carry_check
    a, b = make_sub1(16, 64, 32, 1), make_sub1(16, 64, 32, 2)
    ensure_checked(a)
    ensure_checked(b)
    again = PackedTensor(a.codec, a.shape, dict(a.tensors), dict(a.attrs))
    assert is_checked(again)
    mixed = PackedTensor(a.codec, a.shape, {**a.tensors, "row_counts": b.tensors["row_counts"]}, dict(a.attrs))
    assert not is_checked(mixed)
    moved_one = {k: carry_check(t, t.to("meta")) for k, t in a.tensors.items()}
    assert is_checked(PackedTensor(a.codec, a.shape, moved_one, dict(a.attrs)))
    fresh = {k: t.clone() for k, t in a.tensors.items()}  # same data, never checked
    assert not is_checked(PackedTensor(a.codec, a.shape, fresh, dict(a.attrs)))


def test_loader_marks_tensors_checked():
    from moecompress.packed import packed_entry, rebuild
    for name in ("int3", "ternary", "sub1"):
        p = CODEC_CASES[name]()
        tensors = {f"w.{k}": v for k, v in p.tensors.items() if k != "dictionary"}
        if "dictionary" in p.tensors:
            tensors[f"moecompress.sub1_dictionary.{p.attrs['dictionary_id']}"] = p.tensors["dictionary"]
        entry = packed_entry("w", p)
        entry["fields"] = [f for f in entry["fields"] if f != "dictionary"]
        q = rebuild(entry, tensors)
        assert is_checked(q) and torch.equal(decode(q), decode(p)), name


# ---------------------------------------------------------------- CPU: the Triton path calls nothing that syncs

SYNCING_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu", "nonzero",
                          "repeat_interleave", "unique")
SYNCING_TORCH_FUNCTIONS = ("bincount", "nonzero", "unique", "masked_select", "repeat_interleave")


def forbid_host_sync(monkeypatch):
    """Make every tensor -> host conversion, and every torch op that sizes its output from the data (a host
    sync on CUDA), raise when called from moecompress code; returns the list of offending call sites."""
    import moecompress
    import moecompress.kernels
    ours = tuple(os.path.dirname(m.__file__) + os.sep for m in (moecompress, moecompress.kernels))
    hits = []

    def guard(name, orig):
        def f(*a, **k):
            code = sys._getframe(1).f_code
            if code.co_filename.startswith(ours):
                hits.append(f"{name} from {code.co_filename}:{code.co_name}")
                raise AssertionError(hits[-1])
            return orig(*a, **k)
        return f
    for n in SYNCING_TENSOR_METHODS:
        monkeypatch.setattr(torch.Tensor, n, guard(f"Tensor.{n}", getattr(torch.Tensor, n)))
    for n in SYNCING_TORCH_FUNCTIONS:
        monkeypatch.setattr(torch, n, guard(f"torch.{n}", getattr(torch, n)))
    monkeypatch.setattr(torch.cuda, "synchronize", guard("torch.cuda.synchronize", torch.cuda.synchronize))
    return hits


def run_isolated(fn_name: str, interpret: bool, timeout: int = 600) -> str:
    """Run this module's fn_name() in a fresh interpreter: Triton fixes interpreted or compiled mode for its own
    library when it is imported (test_kernels.py imports it interpreted), so each mode gets its own process."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0", "OMP_NUM_THREADS": "1"}
    code = f"import sys; sys.path.insert(0, {here!r}); import test_cuda; test_cuda.{fn_name}()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


def check_triton_forward_is_sync_free():
    """Prepared mixed layer and packed_linear of every codec on the Triton path (interpreted): after one warm
    call, a second calls nothing that syncs, and gives the same numbers."""
    from moecompress import kernels as mk
    mp = pytest.MonkeyPatch()
    mp.setenv("MOECOMPRESS_KERNELS", "triton")
    experts = mixed_layer(seed=1)
    px = mk.prepare_experts(experts)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    idx, w = routing(16, len(experts), 2, 1)
    ref = mk.moe_reference(x, idx, w, experts)
    lin = {n: CODEC_CASES[n]() for n in ("int3", "ternary", "sub1")}
    xs = {n: torch.randn(2, p.shape[1]) for n, p in lin.items()}
    want = {n: mk.packed_linear(xs[n], p) for n, p in lin.items()}  # checks them, builds sub1's tables
    mk.moe_experts_forward(x, idx, w, px)  # warm: tables and per-group expert ids made once
    hits = forbid_host_sync(mp)
    try:
        y = mk.moe_experts_forward(x, idx, w, px)
        got = {n: mk.packed_linear(xs[n], p) for n, p in lin.items()}
    finally:
        mp.undo()
    assert not hits, hits
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(got[n], want[n]) for n in lin)
    print("sync-free: ok")


def test_triton_forward_calls_nothing_that_syncs():
    pytest.importorskip("triton")
    assert "sync-free: ok" in run_isolated("check_triton_forward_is_sync_free", interpret=True)


def test_sync_guard_catches_a_sync(monkeypatch):
    """The guard above is not vacuous: the torch reference (which loops over torch.unique(...).tolist())
    trips it."""
    from moecompress import kernels as mk
    experts = mixed_layer(seed=2)
    idx, w = routing(4, len(experts), 2, 2)
    hits = forbid_host_sync(monkeypatch)
    with pytest.raises(AssertionError):
        mk.moe_reference(torch.randn(4, 64), idx, w, experts)
    monkeypatch.undo()
    assert hits


def test_bad_expert_ids_still_one_line_error(monkeypatch):
    from moecompress import kernels as mk
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    experts = mixed_layer(seed=3)
    idx, w = routing(3, len(experts), 2, 3)
    for bad in (idx + len(experts), idx - len(experts)):
        with pytest.raises(MoeCompressError, match="outside"):
            mk.moe_experts_forward(torch.randn(3, 64), bad, w, experts)


# ---------------------------------------------------------------- CPU: every CUDA kernel variant compiles for sm_90

def _compile(fn, types, consts):
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(inspect.signature(fn).parameters)
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    return triton.compile(ASTSource(triton.jit(fn), sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))


def _variants():
    """(name, kernel, pointer types, constexprs) of what the CUDA path launches: LaunchConfig.pick with
    on_gpu=True for GEMV (split K), 16-bit and fp32 batches, factored and unfactored groups, plain and grouped."""
    from moecompress.kernels import intq_triton as it, sub1_triton as s1, ternary_triton as tt
    from moecompress.kernels.intq_triton import LaunchConfig
    tname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    out = []
    for b in (2, 3, 4, 8):
        out.append((f"int{b} decode", it._decode_int_kernel, {"q_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16",
                                                               "out_ptr": "*fp32"}, dict(BITS=b, BLOCK_N=32, BLOCK_K=64)))
    shapes = [(1, 128, torch.float16, None), (64, 128, torch.bfloat16, None), (16, 32, torch.float32, 16),
              (4, 8, torch.float16, 4), (64, 64, torch.float16, 64)]
    for i, (M, g, dt, bm) in enumerate(shapes):
        cfg = LaunchConfig.pick(M, 256, 4096, g, dt, on_gpu=True, block_m=bm)
        gather = bm is not None
        for b in ((2, 3, 4, 8) if i < 2 else (3,)):
            out.append((f"int{b} mm {cfg}", it._int_matmul_kernel,
                        {"x_ptr": "*" + tname[dt], "rows_ptr": "*i32", "blk_ptr": "*i32", "q_ptr": "*u8", "s_ptr": "*fp16",
                         "z_ptr": "*fp16", "out_ptr": "*" + ("fp32" if cfg.SPLIT_K > 1 or gather else tname[dt])},
                        dict(BITS=b, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GATHER=gather,
                             USE_DOT=cfg.USE_DOT, DOT_NATIVE=cfg.DOT_NATIVE, FACTORED=cfg.FACTORED)))
        tt_types = {"x_ptr": "*" + tname[dt], "rows_ptr": "*i32", "blk_ptr": "*i32", "t_ptr": "*u8", "lo_ptr": "*fp16",
                    "hi_ptr": "*fp16", "out_ptr": "*" + tname[dt]}
        out.append((f"ternary mm {cfg}", tt._ternary_mm_kernel, tt_types,
                    dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, USE_DOT=cfg.USE_DOT,
                         DOT_NATIVE=cfg.DOT_NATIVE, FACTORED=cfg.FACTORED, DECODE_ONLY=False, GATHER=gather)))
        s1_types = {"x_ptr": "*" + tname[dt], "rows_ptr": "*i32", "blk_ptr": "*i32", "cw_ptr": "*u8", "cnt_ptr": "*u8", "anchor_ptr": "*i64",
                    "skip_ptr": "*u8", "tab_ptr": "*u8", "len_ptr": "*i32", "lo_ptr": "*fp16", "hi_ptr": "*fp16",
                    "out_ptr": "*" + tname[dt]}
        out.append((f"sub1 mm M={M} gather={gather}", s1._sub1_mm_kernel, s1_types,
                    dict(BLOCK_M=bm or min(64, 1 << (M - 1).bit_length()), BLOCK_N=32, CHUNK=s1.CHUNK, GATHER=gather, DECODE_ONLY=False)))
    out.append(("ternary decode", tt._ternary_mm_kernel, {**tt_types, "x_ptr": "*fp32", "out_ptr": "*fp32"},
                dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, USE_DOT=False, DOT_NATIVE=False, FACTORED=False, DECODE_ONLY=True,
                     GATHER=False)))
    out.append(("sub1 decode", s1._sub1_mm_kernel, {**s1_types, "x_ptr": "*fp32", "out_ptr": "*fp32"},
                dict(BLOCK_M=1, BLOCK_N=32, CHUNK=s1.CHUNK, GATHER=False, DECODE_ONLY=True)))
    return out


def check_kernels_compile_for_sm90():
    failed = []
    for name, fn, types, consts in _variants():
        try:
            k = _compile(fn, types, consts)
            assert "cubin" in k.asm or "ptx" in k.asm
        except Exception as e:  # collect them all, then fail with the list
            failed.append(f"{name}: {type(e).__name__}: {str(e)[:300]}")
    assert not failed, "\n".join(failed)
    print(f"compiled {len(_variants())} variants")


def test_every_cuda_kernel_variant_compiles_for_sm90():
    """Triton compiles for a GPU target without one: source -> TTIR -> TTGIR -> LLVM -> PTX -> cubin (ptxas
    ships in the triton wheel). Catches what the interpreter cannot: types of loop-carried values, dot
    shapes, constexpr branches."""
    pytest.importorskip("triton")
    assert "compiled" in run_isolated("check_kernels_compile_for_sm90", interpret=False)


# ---------------------------------------------------------------- CUDA

@pytest.fixture
def on_gpu(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set (test_kernels.py sets it when collected): run `pytest -m cuda tests/test_cuda.py`")
    torch.manual_seed(0)
    return torch.device("cuda")


@cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(CODEC_CASES))
def test_cuda_decode_equals_cpu(on_gpu, monkeypatch, backend, name):
    from moecompress import kernels as mk
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    p = CODEC_CASES[name]()
    want = decode(p)
    g = ensure_checked(p.to(on_gpu))
    assert all(t.device.type == "cuda" for t in g.tensors.values())
    assert torch.equal(decode(g).cpu(), want)  # the reference decode, in torch ops on the GPU
    if backend == "triton":
        assert torch.equal(mk.decode(g).cpu(), want)  # the Triton decode kernel
    # GEMV (split K), a 16-row tile, a 64-row tile: one dtype each (every variant is a Triton compile)
    for dt, B, tol in ((torch.float32, 1, 1e-5), (torch.float16, 16, 2e-3), (torch.bfloat16, 64, 2e-2)):
        x = torch.randn(B, p.shape[1], generator=torch.Generator().manual_seed(B)).to(dt)
        y = mk.packed_linear(x.to(on_gpu), g)
        ref = x.double() @ want.double().T
        assert y.dtype == dt and y.device.type == "cuda"
        err = (y.cpu().double() - ref).abs().max().item() / ref.abs().max().item()
        assert err <= tol, (name, backend, dt, B, err)


@cuda
@needs_cuda
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (1, torch.bfloat16), (16, torch.float16),
                                     (16, torch.float32), (256, torch.bfloat16), (256, torch.float16)])
def test_cuda_grouped_moe_matches_reference(on_gpu, monkeypatch, T, dtype):
    from moecompress import kernels as mk
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    experts = mixed_layer(seed=T)
    E = len(experts)
    idx, w = routing(T, E, 2, T)
    x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
    ref = mk.moe_reference(x.to(dtype), idx, w.to(dtype), experts).float()  # CPU, torch reference
    gx = moved(experts, on_gpu)
    px = mk.prepare_experts(gx)
    y = mk.moe_experts_forward(x.to(on_gpu, dtype), idx.to(on_gpu), w.to(on_gpu, dtype), px)
    assert y.dtype == dtype and y.device.type == "cuda"
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert (y.float().cpu() - ref).abs().max().item() <= tol * ref.abs().max().item()


@cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_mixed_precision_layer_module(on_gpu, monkeypatch, backend):
    """MoEExperts holding every format, moved with .to("cuda"): the same output as on the CPU."""
    from moecompress.experts import MoEExperts
    from moecompress.kernels.moe import silu_glu
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    experts = mixed_layer(seed=7)
    idx, w = routing(33, len(experts), 2, 7)
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(7))
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "torch")
    ref = MoEExperts(mixed_layer(seed=7), silu_glu)(x, idx, w)
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    mod = MoEExperts(experts, silu_glu).to(on_gpu)
    assert all(b.device.type == "cuda" for b in mod.buffers())
    y = mod(x.to(on_gpu), idx.to(on_gpu), w.to(on_gpu))
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-5)


@cuda
@needs_cuda
def test_cuda_triton_forward_does_not_sync(on_gpu, monkeypatch):
    from moecompress import kernels as mk
    monkeypatch.setenv("MOECOMPRESS_KERNELS", "triton")
    experts = moved(mixed_layer(seed=5), on_gpu)
    px = mk.prepare_experts(experts)
    lin = {n: ensure_checked(CODEC_CASES[n]().to(on_gpu)) for n in sorted(CODEC_CASES)}
    for T in (1, 16, 256):
        idx, w = routing(T, len(experts), 2, T, on_gpu)
        x = torch.randn(T, 64, device=on_gpu, dtype=torch.float16)
        xs = {n: torch.randn(T, p.shape[1], device=on_gpu, dtype=torch.float16) for n, p in lin.items()}

        def step():
            return (mk.moe_experts_forward(x, idx, w.half(), px), [mk.packed_linear(xs[n], p) for n, p in lin.items()])
        want = step()  # warm: compiles the kernels, makes tables and per-group expert ids on the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=1e-5)  # index_add_ order may differ
        assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))


@pytest.fixture(scope="module")
def packed_tiny(tmp_path_factory):
    """{method: packed dir} of the tiny Mixtral (tests/conftest.write_tiny) at 4-bit RTN and sub1."""
    from conftest import write_tiny
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    root = tmp_path_factory.mktemp("cuda_packed")
    src = str(root / "src")
    write_tiny(src, "Mixtral")
    calib = CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4, seqlen=32)
    out = {}
    for name, cfg in (("int4", QuantizeConfig(bits=4, group_size=32, method="rtn", calib=calib)),
                      ("sub1", QuantizeConfig(bits=1, method="ternary", calib=calib))):
        out[name] = str(root / name)
        quantize(src, out[name], cfg, progress=False)
    return out


@cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["int4", "sub1"])
def test_cuda_from_pretrained_device_map(on_gpu, monkeypatch, packed_tiny, backend, name):
    import transformers

    import moecompress
    monkeypatch.setenv("MOECOMPRESS_KERNELS", backend)
    path = packed_tiny[name]
    ids = torch.randint(1, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = moecompress.load(path)  # CPU, float32
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cuda")
    assert all(t.device.type == "cuda" for t in list(m.parameters()) + list(m.buffers()))
    with torch.no_grad():
        want = ref(ids).logits
        got = m(ids.to(on_gpu)).logits.cpu()
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= 1e-4, err


@cuda
@needs_cuda
def test_cuda_fp_target_moves_the_target_as_on_the_cpu(on_gpu):
    """--fp-target's W + W D H_d^-1 (quant/target.py) on the GPU: the CPU's answer within float32 rounding."""
    from moecompress.quant.target import move_target
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 24, 32, generator=g) / 32 ** 0.5
    X = torch.randn(400, 32, generator=g)
    Xq = X + 0.1 * torch.randn(400, 32, generator=g)
    H, D = (Xq.T @ Xq).expand(3, 32, 32).clone(), ((X - Xq).T @ Xq).expand(3, 32, 32).clone()
    cpu, gpu = W.clone(), W.to(on_gpu)
    move_target(cpu, H, D, 0.01, 1.0)
    assert move_target(gpu, H.to(on_gpu), D.to(on_gpu), 0.01, 1.0) == []
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
