"""GPTQ's in-place path for large Hessians (quant/gptq.INPLACE_BYTES): LAPACK factorizations and the act-order
permutation in H's own storage. Lowering the threshold runs it on small shapes, against the torch path."""
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moecompress.quant import gptq as G
from moecompress.quant.grids import AsymmetricGrid
from moecompress.quant.ternary import TernaryGrid


def _spd(E, K, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(K, K, generator=g) / math.sqrt(K)) @ torch.randn(E, K, rank or 2 * K, generator=g)
    return X @ X.transpose(1, 2) / K + 1e-2 * torch.eye(K)


def _both(H, monkeypatch):
    """(U from the torch path, U from the in-place path, the in-place input's storage pointer)."""
    monkeypatch.setattr(G, "INPLACE_BYTES", 1 << 62)
    ref = G._inverse_cholesky(G.Owned(H.clone()))
    monkeypatch.setattr(G, "INPLACE_BYTES", 1)
    Hc = H.clone()
    ptr = Hc.data_ptr()
    return ref, G._inverse_cholesky(G.Owned(Hc)), ptr


def test_threshold_keeps_small_and_cuda_shapes_on_torch():
    assert G._in_place(torch.empty(1, 4096, 4096)) and not G._in_place(torch.empty(8, 4095, 4095))  # 64 MiB each
    assert not G._in_place(torch.empty(1, 4096, 4096, device="meta"))  # not on the CPU (as CUDA): torch's ops
    assert not G._in_place(torch.empty(1, 4096, 4096, dtype=torch.float64))


def test_inplace_inverse_cholesky_matches_torch_and_reuses_storage(monkeypatch):
    H = _spd(3, 200)
    ref, U, ptr = _both(H, monkeypatch)
    assert U.data_ptr() == ptr  # U lives in H's storage: no second (K, K) matrix
    assert torch.equal(U, U.triu())  # upper, strict lower triangle zeroed
    assert (U - ref).abs().max() <= 1e-5 * ref.abs().max()
    Hinv = torch.linalg.inv(H.double())
    assert torch.allclose(U.double().transpose(1, 2) @ U.double(), Hinv, rtol=0, atol=1e-4 * Hinv.abs().max())


def test_inplace_retries_with_more_damping_from_the_kept_triangle(monkeypatch, caplog):
    # singular (rank K/2) and pulled below zero on one diagonal entry: both paths need extra damping 0.1
    H = _spd(1, 160, seed=1, rank=80) - 1e-2 * torch.eye(160)
    H[0, 7, 7] -= 0.02
    assert float(torch.linalg.eigvalsh(H.double()).min()) < -1e-3
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        ref, U, _ = _both(H, monkeypatch)
    retries = [r for r in caplog.records if "extra damping" in r.getMessage()]
    assert len(retries) == 8 and "0.1 x" in retries[-1].getMessage()  # 4 retries by each path
    assert (U - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_inplace_gives_up_like_torch(monkeypatch):
    H = _spd(1, 64)
    H[0, 3, 3] = -100.0
    monkeypatch.setattr(G, "INPLACE_BYTES", 1)
    with pytest.raises(FloatingPointError):
        G._inverse_cholesky(G.Owned(H))


def test_permute_inplace_is_exact():
    H = _spd(2, 300, seed=2)
    g = torch.Generator().manual_seed(3)
    perm = torch.stack([torch.randperm(300, generator=g) for _ in range(2)])
    perm[1] = torch.arange(300)  # the identity: nothing moves
    ref = torch.stack([H[e][perm[e]][:, perm[e]] for e in range(2)])
    G._permute_inplace(H, perm, block=64)
    assert torch.equal(H, ref)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("ternary", [False, True])
def test_gptq_inplace_matches_torch_path(monkeypatch, act_order, ternary):
    g = torch.Generator().manual_seed(4)
    E, N, K = 2, 64, 256
    W = torch.randn(E, N, K, generator=g)
    X = torch.randn(E, 4 * K, K, generator=g) @ (torch.randn(K, K, generator=g) / math.sqrt(K))
    H = X.transpose(1, 2) @ X
    H[1, 5] = H[1, :, 5] = 0.0  # a dead input
    cfg, grid = G.GPTQConfig(act_order=act_order), TernaryGrid(0.3) if ternary else AsymmetricGrid(3)
    monkeypatch.setattr(G, "INPLACE_BYTES", 1 << 62)
    ref = G.gptq(W, H, grid, 64, cfg)
    monkeypatch.setattr(G, "INPLACE_BYTES", 1)
    monkeypatch.setattr(G, "UPDATE_BYTES", 4 * E * N * 7)  # the lazy update in chunks of 7 rows
    H0 = H.clone()
    got = G.gptq(W, H, grid, 64, cfg)
    assert torch.equal(H, H0)  # a plain tensor is left untouched
    assert got.codes.dtype == torch.int32
    assert ((got.codes != ref.codes).float().mean()) < 2e-3  # another LAPACK: a rare code flips at a tie
    # a flipped ternary code moves the loss by up to ~5e-4 (scipy 1.17's LAPACK: 2 of 32,768 codes, 5.2e-4)
    assert torch.allclose(got.loss, ref.loss, rtol=2e-3, atol=0)
    assert torch.equal(got.scale, ref.scale) if act_order else torch.allclose(got.scale, ref.scale, rtol=1e-3)
    # as for the codes: a flip at a tie (ternary: the row's levels follow it) moves deq by 3e-4 of its mean there
    assert float((got.deq - ref.deq).abs().mean()) < 2e-3 * float(ref.deq.abs().mean())


def test_large_inverse_cholesky_peak_memory():
    """At K = 4096 (64 MiB per Hessian, the threshold), the real default path: factoring 2 Hessians raises the
    process's peak RSS by well under one more (K, K) matrix (the torch path allocated two more)."""
    code = textwrap.dedent("""
        import torch
        from moecompress.quant import gptq as G
        torch.manual_seed(0)
        K = 4096
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        X = torch.randn(2, K, 64)
        H = torch.eye(K).repeat(2, 1, 1)
        H.baddbmm_(X, X.transpose(1, 2))
        del X
        h0 = hwm()
        ptr = H.data_ptr()
        U = G._inverse_cholesky(G.Owned(H))
        del H
        print(hwm() - h0, U.data_ptr() == ptr)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    grew, same = out.split()
    assert same == "True"
    assert int(grew) < 0.25 * 4096 * 4096 * 4, int(grew)


def test_gptq_large_path_holds_codes_in_a_byte_and_returns_int32(monkeypatch):
    """8-bit codes (maxq 255) go through the uint8 buffer unchanged; the result keeps int32."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(1, 32, 128, generator=g)
    X = torch.randn(1, 512, 128, generator=g)
    H = X.transpose(1, 2) @ X
    monkeypatch.setattr(G, "INPLACE_BYTES", 1 << 62)
    ref = G.gptq(W, H, AsymmetricGrid(8), 32)
    monkeypatch.setattr(G, "INPLACE_BYTES", 1)
    got = G.gptq(W, H, AsymmetricGrid(8), 32)
    assert got.codes.dtype == torch.int32 and int(got.codes.max()) == 255 and int(got.codes.min()) == 0
    assert float((got.codes != ref.codes).float().mean()) < 2e-3


def test_gptq_adopts_a_handed_over_transposed_w_with_identical_results():
    """passes/quantize.py hands W over as the transposed view of a contiguous (E, K, N) tensor: gptq() uses that
    storage as its working copy (no copy) and returns the very same bytes as for a contiguous W."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(2, 48, 256, generator=g)  # K > block_size: the lazy update writes the working copy
    X = torch.randn(2, 600, 256, generator=g)
    H = X.transpose(1, 2) @ X
    ref = G.gptq(W, H, AsymmetricGrid(4), 16)
    Wt = W.transpose(1, 2).contiguous()
    got = G.gptq(G.Owned(Wt.transpose(1, 2)), G.Owned(H.clone()), AsymmetricGrid(4), 16)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert not torch.equal(Wt.transpose(1, 2), W)  # its storage was the working copy (error feedback wrote it)
    plain = W.transpose(1, 2).contiguous().transpose(1, 2)  # the same layout, not handed over: left untouched
    G.gptq(plain, H, AsymmetricGrid(4), 16)
    assert torch.equal(plain, W)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_gptq_deq_is_its_codes_in_original_column_order(monkeypatch, act_order, inplace):
    """deq is built in W^T's own rows (permuted under act-order) and laid out at the end: it must be exactly
    (codes - zero) * scale, column by column in the original order, on both paths."""
    g = torch.Generator().manual_seed(7)
    E, N, K, gs = 2, 40, 320, 64  # K not a multiple of the block (128): a short last block
    W = torch.randn(E, N, K, generator=g)
    X = torch.randn(E, 3 * K, K, generator=g) * torch.linspace(0.2, 3, K)  # distinct diagonal: act-order moves
    H = X.transpose(1, 2) @ X
    monkeypatch.setattr(G, "INPLACE_BYTES", 1 if inplace else 1 << 62)
    r = G.gptq(W, H, AsymmetricGrid(3), gs, G.GPTQConfig(act_order=act_order))
    s = r.scale.repeat_interleave(gs, dim=2)
    z = r.zero.repeat_interleave(gs, dim=2)
    assert r.deq.is_contiguous() and r.deq.shape == (E, N, K)
    assert torch.equal(r.deq, (r.codes.float() - z) * s)
    assert float((r.deq - W).abs().mean()) < 0.5 * float(W.abs().mean())  # near W, not some other column's


def test_gptq_holds_no_second_float_weight_while_u_lives():
    """At K = 4096 (the in-place path): while the factor U lives, GPTQ holds W^T, the codes in a byte and block
    temporaries; the dequantized columns go into W^T's rows (a separate (N, K) float copy is 16 MiB more here)."""
    code = textwrap.dedent("""
        import torch
        from moecompress.quant import gptq as G
        from moecompress.quant.grids import AsymmetricGrid
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        G.UPDATE_BYTES = 1 << 20
        torch.manual_seed(0)
        G.INPLACE_BYTES = 1  # the warm-up takes the LAPACK path too: imports, BLAS buffers
        G.gptq(torch.randn(1, 8, 256), torch.eye(256)[None], AsymmetricGrid(4), 128)
        G.INPLACE_BYTES = 64 << 20
        N, K = 1024, 4096
        Wt = torch.randn(1, K, N)
        X = torch.randn(1, K, 96)
        H = torch.eye(K)[None]
        H.baddbmm_(X, X.transpose(1, 2))
        del X
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        w, h = G.Owned(Wt.transpose(1, 2)), G.Owned(H)
        del Wt, H  # handed over: gptq holds the only references
        h0 = hwm()
        r = G.gptq(w, h, AsymmetricGrid(4), 128)
        print(hwm() - h0)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    grew = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.split()[-1])
    # measured: 16 MiB (LAPACK's workspace, the byte codes, block temporaries); 32 MiB with the separate copy.
    # U (64 MiB) is H's storage, and the end (deq laid out, int32 codes) comes after U is freed
    assert grew < 24 << 20, grew


def test_quantize_pass_hands_the_layer_weights_over_to_gptq(tmp_path, monkeypatch):
    """passes/quantize.py: a stage's weights leave the layer (shape-only meta placeholders; GPTQ's W^T is their
    one copy) before its Hessians are allocated, and every placeholder is replaced by a dense dequantized weight
    after its GPTQ call."""
    from conftest import write_tiny
    from moecompress.api import quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.experts import MoEExperts
    import moecompress.passes.calibrate as calibrate
    import moecompress.passes.quantize as q
    src = str(tmp_path / "mixtral")
    write_tiny(src, "Mixtral", layers=1)
    events, state = [], {}
    real_set, real_gptq, real_col = MoEExperts.set_dense, q.gptq, calibrate.HessianCollector.__init__

    def set_dense(self, e, proj, weight):
        events.append(("set", e, proj, weight.device.type))
        state[(e, proj)] = weight.device.type
        return real_set(self, e, proj, weight)

    def gptq(W, H, *a, **k):
        meta = sorted(p for (e, p), d in state.items() if d == "meta")
        events.append(("gptq", W.shape[0], meta))
        return real_gptq(W, H, *a, **k)

    def collector(self, num_experts, dim, which, **k):
        events.append(("hessians", which, sorted(p for (e, p), d in state.items() if d == "meta")))
        return real_col(self, num_experts, dim, which, **k)
    monkeypatch.setattr(MoEExperts, "set_dense", set_dense)
    monkeypatch.setattr(q, "gptq", gptq)
    monkeypatch.setattr(calibrate.HessianCollector, "__init__", collector)
    cfg = QuantizeConfig(bits=4, group_size=16, calib=CalibConfig((os.path.join(os.path.dirname(__file__), "..",
                         "moecompress", "data", "text", "calib_mix.txt"),), nsamples=4, seqlen=32))
    quantize(src, str(tmp_path / "out"), cfg, progress=False, device="cpu")
    sets = [ev for ev in events if ev[0] == "set"]
    E = len({ev[1] for ev in sets})
    assert E == 4 and len(sets) == 2 * 3 * E  # each weight: once a placeholder, once its dequantized weight
    for key in {ev[1:3] for ev in sets}:
        assert [ev[3] for ev in sets if ev[1:3] == key] == ["meta", "cpu"]
    stages = [ev for ev in events if ev[0] == "hessians"]
    assert [ev[1] for ev in stages] == ["x", "h"]  # one memory chunk per stage here
    assert stages[0][2] == ["gate"] * E + ["up"] * E and stages[1][2] == ["down"] * E  # handed over before
    calls = [ev for ev in events if ev[0] == "gptq"]
    assert len(calls) >= 2 and all(len(ev[2]) >= ev[1] for ev in calls)  # a call's weights are placeholders
