"""Quantized source checkpoints: DeepSeek-V3's block-scaled FP8 and GPT-OSS's MXFP4 experts.

Tiny checkpoints are quantized here by reference implementations written independently of
moecompress/source_formats.py (loops over blocks; nearest-value FP4 search), beside a bf16 copy holding
their reference dequantization (what DeepSeek's fp8_cast_bf16 or transformers' MXFP4 conversion would
write). The reader must serve exactly that copy's tensors, and quantizing either must write the same bytes.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.arch import PROJS, ExpertKey
from moecompress.checkpoint import CheckpointReader
from moecompress.errors import CheckpointError
from moecompress.source_formats import FP4_VALUES, SourceTensor, dequant_fp8_block, dequant_mxfp4
from moecompress.validate import validate_checkpoint

from conftest import FAMILIES, TEXT, write_tiny

FP8_BLOCK = (32, 48)  # not 128 x 128: the tiny model's 40- and 64-wide weights then have partial blocks
FP8_MAX = 448.0


# -- reference implementations (independent of the code under test) --------------------------------------
def ref_fp8_quant(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax / 448 scales (DeepSeek's recipe): (N, K) -> fp8 codes (N, K), fp32 scale_inv (nb, kb)."""
    bn, bk = block
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(N / bn), math.ceil(K / bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            scale = max(blk.abs().max().item() / FP8_MAX, 1e-12)
            s[i, j] = scale
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / scale).to(torch.float8_e4m3fn)
    return q, s


def ref_fp8_dequant(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    bn, bk = block
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float() * s[i, j]
    return out


def ref_mxfp4_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX: per 32 values along the last dim a shared exponent floor(log2 amax) - 2, each value the nearest
    e2m1 value. (..., R, C) -> blocks (..., R, C/32, 16) uint8 (low nibble first), scales (..., R, C/32) uint8."""
    table = torch.tensor(FP4_VALUES[:8])
    g = w.float().unflatten(-1, (-1, 32))  # (..., R, C) -> (..., R, G, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2, torch.zeros_like(amax))
    x = g / torch.exp2(e).unsqueeze(-1)
    mag = (x.abs().unsqueeze(-1) - table).abs().argmin(-1)  # index of the nearest magnitude, 0..7
    code = (mag + 8 * (x < 0)).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)  # (..., G, 32) -> (..., G, 16)
    return blocks, (e + 127).to(torch.uint8)


def ref_mxfp4_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Byte by byte: (..., R, G, 16), (..., R, G) -> (..., R, 32 G)."""
    flat_b, flat_s = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    out = []
    for row, s in zip(flat_b, flat_s):
        for byte in row:
            out += [FP4_VALUES[byte & 15] * 2.0 ** (s - 127), FP4_VALUES[byte >> 4] * 2.0 ** (s - 127)]
    return torch.tensor(out).reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(ref.float().pow(2).sum() / (ref.float() - got.float()).pow(2).sum())


# -- tiny quantized checkpoints -----------------------------------------------------------------------------
def _fp8_target(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3 stores in FP8: every 2D projection of a decoder layer except the router."""
    return ".layers." in name and name.endswith(".weight") and t.dim() == 2 and not name.endswith("mlp.gate.weight")


def _finish(src: str, dst: str, shards: list[dict], config: dict) -> None:
    os.makedirs(dst, exist_ok=True)
    wm = {}
    for n, d in enumerate(shards):
        fn = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(d, os.path.join(dst, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in d})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    for fn in os.listdir(src):
        if fn.startswith("tokenizer") or fn == "generation_config.json":
            with open(os.path.join(src, fn), "rb") as a, open(os.path.join(dst, fn), "wb") as b:
                b.write(a.read())


def write_quantized(root: str, family: str) -> tuple[str, str, dict]:
    """(quantized dir, bf16 reference dir, original fp32 tensors) for DeepseekV3 (FP8) or GptOss (MXFP4)."""
    src = os.path.join(root, f"{family}-orig")
    if family == "GptOss":  # intermediate 96 != hidden 64, so a transposed down_proj cannot pass unnoticed
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(FAMILIES, "GptOss", {**FAMILIES["GptOss"], "intermediate_size": 96})
            write_tiny(src, family)
    else:
        write_tiny(src, family)
    orig = load_file(os.path.join(src, "model.safetensors"))
    config = json.load(open(os.path.join(src, "config.json")))
    config["dtype"] = "bfloat16"
    quant, plain, ref = {}, {}, {}
    for k, t in orig.items():
        keep = t.float() if k.endswith("e_score_correction_bias") else t.to(torch.bfloat16)  # as DeepSeek ships it
        if family == "DeepseekV3" and _fp8_target(k, t):
            q, s = ref_fp8_quant(t, FP8_BLOCK)
            quant[k], plain[k + "_scale_inv"] = q, s  # codes and scales in different shards
            ref[k] = ref_fp8_dequant(q, s, FP8_BLOCK).to(torch.bfloat16)
        elif family == "GptOss" and k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            b, s = ref_mxfp4_quant(t.transpose(1, 2))  # [E, H, 2I] -> [E, 2I, H]: blocks run along the input dim
            quant[k + "_blocks"], plain[k + "_scales"] = b, s
            ref[k] = ref_mxfp4_dequant(b, s).transpose(1, 2).to(torch.bfloat16).contiguous()  # back to [E, H, 2I]
        else:
            plain[k], ref[k] = keep, keep
    qcfg = ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(FP8_BLOCK), "activation_scheme": "dynamic"}
            if family == "DeepseekV3" else
            {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                  "model.embed_tokens", "lm_head"]})
    qdir, rdir = os.path.join(root, f"{family}-quantized"), os.path.join(root, f"{family}-bf16")
    _finish(src, qdir, [quant, plain], {**config, "quantization_config": qcfg})
    _finish(src, rdir, [ref], config)
    return qdir, rdir, orig


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sources"))
    return {f: write_quantized(root, f) for f in ("DeepseekV3", "GptOss")}


# -- the dequantizers ---------------------------------------------------------------------------------------
def test_fp8_dequant_matches_references():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    torch.manual_seed(0)
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 200)  # partial 128-blocks on both dims, columns of scales
    q, s = ref_fp8_quant(w, (128, 128))
    got = dequant_fp8_block(q, s)
    assert got.dtype == torch.float32 and torch.equal(got, ref_fp8_dequant(q, s, (128, 128)))
    assert torch.equal(got, _dequantize_fp8_weight(q, s, [128, 128], torch.float32))  # transformers
    assert sqnr_db(w, got) > 28  # e4m3: 3 mantissa bits
    stacked = dequant_fp8_block(torch.stack([q, q.flip(0)]), torch.stack([s, s.flip(0)]))  # (E, N, K) experts
    assert torch.equal(stacked[0], got) and torch.equal(stacked[1], ref_fp8_dequant(q.flip(0), s.flip(0), (128, 128)))


def test_mxfp4_dequant_matches_references():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    torch.manual_seed(0)
    w = torch.randn(3, 40, 96) * torch.logspace(-3, 1, 96)  # (E, R, C): 3 scale groups per row
    b, s = ref_mxfp4_quant(w)
    assert b.shape == (3, 40, 3, 16) and s.shape == (3, 40, 3)
    got = dequant_mxfp4(b, s)
    assert torch.equal(got, ref_mxfp4_dequant(b, s))
    assert sqnr_db(w, got) > 14  # e2m1 with a power-of-two scale per 32
    # transformers' conversion returns (E, C, R), the layout SourceTensor.decode serves
    tf = convert_moe_packed_tensors(b, s, dtype=torch.float32)
    assert torch.equal(tf, SourceTensor("mxfp4", "x_blocks", "x_scales", (3, 96, 40)).decode(b, s))
    # low nibble first: byte 0x2F holds -6 (code 15) then 1.0 (code 2); scale 128 doubles both
    one = dequant_mxfp4(torch.tensor([[[0x2F] + [0] * 15]], dtype=torch.uint8), torch.tensor([[128]], dtype=torch.uint8))
    assert one[0, :3].tolist() == [-12.0, 2.0, 0.0]


# -- the reader ---------------------------------------------------------------------------------------------
def test_fp8_checkpoint_reads_dequantized(sources):
    qdir, rdir, orig = sources["DeepseekV3"]
    r, ref = CheckpointReader(qdir), CheckpointReader(rdir)
    assert sorted(r.tensors) == sorted(ref.tensors)  # no *_scale_inv among the logical tensors
    assert {t.dtype for t in r.stored.values()} == {"F8_E4M3", "F32", "BF16"}
    assert sum(t.source is not None for t in r.tensors.values()) == sum(_fp8_target(k, v) for k, v in orig.items())
    for k, t in r.tensors.items():
        assert (t.dtype, t.shape, t.nbytes) == (ref.tensors[k].dtype, ref.tensors[k].shape, ref.tensors[k].nbytes), k
        assert torch.equal(r.get(k), ref.get(k)), k  # dense attention, shared and routed experts alike
    for i in r.moe_layers:
        assert r.layout(i) == "per_expert" and r.expert_shapes(i) == ref.expert_shapes(i)
        assert r.layer_num_experts(i) == 8 and r.layer_keys(i) == ref.layer_keys(i)
        assert not any(k.endswith("_scale_inv") for k in r.layer_keys(i) + r.expert_keys_on_disk(i))
        a, b = r.layer_experts(i), ref.layer_experts(i)
        assert all(torch.equal(a[p], b[p]) for p in PROJS)
        w = orig[r.arch.per_expert_key(i, 5, "down", r.prefix)]
        assert sqnr_db(w, r.expert(ExpertKey(i, 5, "down"))) > 25
    assert r.expert_params == ref.expert_params == 2 * 8 * 3 * 64 * 64 // 2
    files = sum(os.path.getsize(f) for f in glob.glob(os.path.join(qdir, "*.safetensors")))
    assert r.total_bytes < files < r.total_bytes + 20_000  # codes and scales as stored, not the bf16 size
    assert r.expert_bytes < ref.expert_bytes * 0.6  # 1 byte per weight plus one fp32 per 32 x 48 block
    assert r.fingerprint != ref.fingerprint


def test_mxfp4_checkpoint_reads_dequantized(sources):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    qdir, rdir, orig = sources["GptOss"]
    r, ref = CheckpointReader(qdir), CheckpointReader(rdir)
    assert sorted(r.tensors) == sorted(ref.tensors)
    i = r.moe_layers[-1]
    fk = r.arch.fused_keys(i, r.prefix)
    assert r.layout(i) == "fused" and r.expert_shapes(i) == {"gate": (96, 64), "up": (96, 64), "down": (64, 96)}
    assert r.tensors[fk["gate_up"]].shape == (4, 64, 192) and r.tensors[fk["down"]].shape == (4, 96, 64)
    stored = load_file(glob.glob(os.path.join(qdir, "*-00001-*"))[0]) | load_file(glob.glob(os.path.join(qdir, "*-00002-*"))[0])
    tf = convert_moe_packed_tensors(stored[fk["gate_up"] + "_blocks"], stored[fk["gate_up"] + "_scales"], dtype=torch.bfloat16)
    assert torch.equal(r.get(fk["gate_up"]), tf)  # transformers' own conversion is the truth
    assert torch.equal(r.get_slice(fk["down"], 2), ref.get_slice(fk["down"], 2))
    for k in r.tensors:
        assert torch.equal(r.get(k), ref.get(k)), k
    for e in range(4):
        for p in PROJS:
            key = ExpertKey(i, e, p)
            assert torch.equal(r.expert(key), ref.expert(key)) and torch.equal(r.expert_bias(key), ref.expert_bias(key))
    gate = orig[fk["gate_up"]][1][:, 0::2].t()  # expert 1, (H, 2I) interleaved -> gate (I, H)
    assert sqnr_db(gate, r.expert(ExpertKey(i, 1, "gate"))) > 14
    assert r.expert_params == ref.expert_params == 2 * 4 * 3 * 96 * 64
    assert r.expert_bytes < ref.expert_bytes * 0.35  # 4.25 bits per weight (+ bf16 biases) against 16


def test_reader_dequantizes_on_its_device(sources):
    qdir, _, _ = sources["DeepseekV3"]
    r = CheckpointReader(qdir, device="meta" if not torch.cuda.is_available() else "cuda")
    k = r.arch.per_expert_key(1, 0, "gate", r.prefix)
    t = r.get(k)
    assert t.device.type == r.device.type and t.dtype == torch.bfloat16 and t.shape == (64, 64)


def test_bad_sources_are_refused(sources, tmp_path):
    qdir, _, _ = sources["DeepseekV3"]
    d = tmp_path / "bad"
    shutil.copytree(qdir, d)
    shard = str(d / "model-00002-of-00002.safetensors")
    t = load_file(shard)
    k = next(k for k in t if k.endswith("o_proj.weight_scale_inv"))
    t[k] = t[k][:, :1].contiguous()  # wrong number of column blocks
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=r"o_proj.weight_scale_inv is F32\[2, 1\] .* needs float\[2, 2\]"):
        CheckpointReader(str(d))
    assert any("o_proj.weight_scale_inv" in p for p in validate_checkpoint(str(d)).problems)
    del t[k]
    save_file(t, shard)
    with pytest.raises(CheckpointError, match=r"o_proj.weight is F8_E4M3 without a .*weight_scale_inv companion"):
        CheckpointReader(str(d))
    cfg = json.load(open(d / "config.json"))
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="source quantization 'awq' is not supported"):
        CheckpointReader(str(d))


def test_validate_accepts_sources_and_scans_dequantized_values(sources, tmp_path):
    for family in ("DeepseekV3", "GptOss"):
        rep = validate_checkpoint(sources[family][0])
        assert rep.ok, rep.problems
        assert rep.tensors == len(CheckpointReader(sources[family][0]).tensors) == rep.checked_values
    qdir = sources["DeepseekV3"][0]
    d = tmp_path / "nan"
    shutil.copytree(qdir, d)
    shard = str(d / "model-00001-of-00002.safetensors")
    t = load_file(shard)
    k = next(k for k in t if ".experts.3.up_proj" in k)
    t[k].view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    save_file(t, shard)
    assert [p for p in validate_checkpoint(str(d)).problems if k in p and "1 NaN" in p]


# -- end to end ---------------------------------------------------------------------------------------------
def _digest(d: str) -> dict[str, str]:
    return {os.path.basename(f): hashlib.sha256(open(f, "rb").read()).hexdigest()
            for f in sorted(glob.glob(os.path.join(d, "*.safetensors")))}


@pytest.mark.parametrize("family", ["DeepseekV3", "GptOss"])
def test_quantize_and_eval_quantized_source(sources, tmp_path, family):
    import moecompress
    from moecompress.api import evaluate, quantize
    from moecompress.config import CalibConfig, QuantizeConfig
    qdir, rdir, _ = sources[family]
    cfg = QuantizeConfig(bits=4, group_size=16, calib=CalibConfig((os.path.join(TEXT, "calib_mix.txt"),), nsamples=4,
                                                                  seqlen=32))
    quantize(qdir, str(tmp_path / "from-src"), cfg, progress=False)
    quantize(rdir, str(tmp_path / "from-bf16"), cfg, progress=False)
    # the quantized source gives the bytes its reference bf16 dequantization gives
    assert _digest(str(tmp_path / "from-src")) == _digest(str(tmp_path / "from-bf16"))
    for f in glob.glob(str(tmp_path / "from-src" / "*.safetensors")):
        t = load_file(f)
        assert not [k for k in t if k.endswith(("_scale_inv", "_blocks", "_scales"))], f
        assert not {v.dtype for v in t.values()} & {torch.float8_e4m3fn, torch.float8_e5m2}, f
    out_cfg = json.load(open(tmp_path / "from-src" / "config.json"))
    assert out_cfg["quantization_config"]["quant_method"] == "moecompress"
    ids = torch.randint(1, 4096, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = moecompress.load(str(tmp_path / "from-src"))(ids).logits
        b = moecompress.load(str(tmp_path / "from-bf16"))(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
    text = os.path.join(TEXT, "calib_mix.txt")  # any text: the two perplexities are compared with each other
    src = evaluate(qdir, [text], seqlen=32, max_tokens=256, progress=False)[text]["perplexity"]
    bf16 = evaluate(rdir, [text], seqlen=32, max_tokens=256, progress=False)[text]["perplexity"]
    assert math.isfinite(src) and abs(src / bf16 - 1) < 1e-4, (src, bf16)  # equal on this machine


def test_deepseek_mtp_layer_is_accepted_and_left_out(sources, tmp_path):
    """DeepSeek-V3 ships its multi-token-prediction layer as model.layers.{num_hidden_layers} (FP8 too)."""
    qdir = sources["DeepseekV3"][0]
    d = tmp_path / "mtp"
    d.mkdir()
    for f in os.listdir(qdir):
        (d / f).write_bytes(open(os.path.join(qdir, f), "rb").read())
    idx = json.load(open(d / "model.safetensors.index.json"))
    extra = {}
    for fn in sorted(set(idx["weight_map"].values())):
        extra |= {k.replace(".layers.1.", ".layers.2."): v for k, v in load_file(str(d / fn)).items() if ".layers.1." in k}
    save_file(extra, str(d / "mtp.safetensors"))
    idx["weight_map"].update({k: "mtp.safetensors" for k in extra})
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    cfg = json.load(open(d / "config.json"))
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    assert any("tensors for layer 2 exist" in p for p in validate_checkpoint(str(d)).problems)
    (d / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))  # DeepSeek-V3's value
    rep = validate_checkpoint(str(d))
    assert rep.ok and rep.moe_layers == (1,), rep.problems
    r = CheckpointReader(str(d))
    assert r.moe_layers == [1] and not any(".layers.2." in k for k in r.global_keys() + r.layer_keys(1))


def test_prune_of_a_quantized_source_writes_a_plain_checkpoint(sources, tmp_path):
    from moecompress.config import CalibConfig
    from moecompress.merge.pipeline import run_merge
    qdir, rdir, _ = sources["DeepseekV3"]
    out = str(tmp_path / "pruned")
    run_merge(qdir, out, experts=4, method="frequency", calib=CalibConfig(nsamples=4, seqlen=32), progress=False)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "quantization_config" not in cfg and cfg["n_routed_experts"] == 4
    r = CheckpointReader(out)
    assert r.quantized_source is None and {t.dtype for t in r.stored.values()} <= {"BF16", "F32"}
    assert validate_checkpoint(out).ok
    k = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"  # dense FP8 weights come out dequantized
    assert torch.equal(r.get(k), CheckpointReader(rdir).get(k))


def test_fused_fp8_experts_read_per_expert(tiny_dir, tmp_path):
    """transformers v5's fused layout in FP8: experts.gate_up_proj (E, 2I, H) with scale_inv (E, nb, kb)."""
    src = tiny_dir("Qwen3Moe", "fused")
    t = load_file(os.path.join(src, "model.safetensors"))
    out, want = {}, {}
    for k, v in t.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            qs = [ref_fp8_quant(v[e], FP8_BLOCK) for e in range(v.shape[0])]
            out[k], out[k + "_scale_inv"] = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
            want[k] = torch.stack([ref_fp8_dequant(q, s, FP8_BLOCK) for q, s in qs]).to(torch.bfloat16)
        else:
            out[k] = v
    cfg = json.load(open(os.path.join(src, "config.json")))
    qcfg = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(FP8_BLOCK), "activation_scheme": "dynamic"}
    _finish(src, str(tmp_path / "q"), [out], {**cfg, "dtype": "bfloat16", "quantization_config": qcfg})
    r = CheckpointReader(str(tmp_path / "q"))
    i = r.moe_layers[-1]
    fk = r.arch.fused_keys(i, r.prefix)
    assert r.layout(i) == "fused" and r.expert_shapes(i) == {"gate": (64, 64), "up": (64, 64), "down": (64, 64)}
    for e in (0, 5):
        gu = want[fk["gate_up"]][e]  # (2I, H)
        assert torch.equal(r.get_slice(fk["gate_up"], e), gu)
        assert torch.equal(r.expert(ExpertKey(i, e, "up")), gu[64:])
        assert torch.equal(r.expert(ExpertKey(i, e, "down")), want[fk["down"]][e])
    assert r.expert_params == CheckpointReader(src).expert_params
