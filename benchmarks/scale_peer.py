"""llm-compressor's GPTQ on a checkpoint, timed whole: the peer side of benchmarks/scale.py.

    /work/llmc-venv/bin/python benchmarks/scale_peer.py CKPT --out DIR --windows W.safetensors \
        --bits 4 --group-size 128 [--device cpu|cuda] [--result R.json]

Runs in llm-compressor's own virtual environment (it pins its own transformers), so it imports nothing
from moecompress. It loads CKPT with plain `from_pretrained`, turns the fused experts into one Linear per
expert projection (`linearize_moe`, what llm-compressor needs to calibrate experts; `load_quantizable_moe`
would need torchvision), runs `oneshot` with a GPTQModifier on every Linear except attention, routers and
lm_head (the routed and shared experts: what moecompress quantizes) at `--bits` asymmetric integer
weights in groups of `--group-size` along the input, on the token windows in W.safetensors (`input_ids`,
(N, L) int64: the exact windows moecompress calibrates on) with oneshot's defaults otherwise, and saves
the compressed model. --result gets the seconds of each phase and the versions.

--dense DIR also writes what that compressed model stores as a dense float32 checkpoint of the original
layout (for benchmarks/quality.py, which evaluates it with `moecompress eval`, the code that evaluates
moecompress's own output): every quantized Linear is decompressed from the saved files by
compressed-tensors' own PackedQuantizationCompressor.decompress with float32 scales, checked against the
weights llm-compressor holds in memory after oneshot (its fake-quantized bf16 weights: within two bf16
ulps, or the script fails), and written under the original checkpoint's tensor name (Mixtral's
w1/w3/w2 for gate/up/down_proj); all other tensors are the original checkpoint's, upcast to float32.
phases["total"] stops before this step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time

T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--result")
    ap.add_argument("--dense", help="also write the compressed result as a dense float32 checkpoint here")
    a = ap.parse_args()

    import compressed_tensors
    import datasets
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file

    phases = {"import": time.perf_counter() - T0}
    t = time.perf_counter()
    ids = load_file(a.windows)["input_ids"]  # (N, L)
    n, seqlen = ids.shape
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.model, dtype="auto", device_map=None if a.device == "cpu" else a.device)
    phases["load"] = time.perf_counter() - t

    t = time.perf_counter()
    linearize_moe(model)
    phases["linearize"] = time.perf_counter() - t

    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=a.bits, type="int", strategy="group", group_size=a.group_size, symmetric=False, dynamic=False))
    recipe = GPTQModifier(config_groups={"group_0": scheme},
                          ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*mlp\\.gate\\..*",
                                  "re:.*shared_expert_gate.*"])
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seqlen)
    phases["oneshot"] = time.perf_counter() - t

    qdq = {n: m.weight.detach().float().cpu().clone() for n, m in model.named_modules()
           if getattr(m, "quantization_scheme", None) is not None} if a.dense else None
    t = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    phases["save"] = time.perf_counter() - t
    phases["total"] = time.perf_counter() - T0
    quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    res = {"phases": {k: round(v, 1) for k, v in phases.items()}, "windows": [n, seqlen],
           "quantized_linears": quantized,
           "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                        "transformers": transformers.__version__, "torch": torch.__version__}}
    if a.dense:
        t = time.perf_counter()
        res["dense"] = write_dense(a.model, a.out, a.dense, scheme, qdq)
        res["phases"]["dense"] = round(time.perf_counter() - t, 1)
    print(json.dumps(res))
    if a.result:
        with open(a.result, "w") as f:
            json.dump(res, f, indent=1)


def write_dense(model: str, compressed: str, dense: str, scheme, qdq: dict) -> dict:
    """The compressed checkpoint in `compressed`, decompressed into a dense float32 checkpoint in `dense`
    with the tensor names of the original `model` (see the module docstring); -> what was checked."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors.torch import load_file, save_file

    def norm(name: str) -> str:  # transformers 5 calls Mixtral's block_sparse_moe "mlp" in memory, not on disk
        return re.sub(r"\.(mlp|block_sparse_moe)\.", ".", name)

    mem = {norm(k): v for k, v in qdq.items()}
    ct = {}
    for f in sorted(os.listdir(compressed)):
        if f.endswith(".safetensors"):
            ct.update(load_file(os.path.join(compressed, f)))
    dec, worst = {}, 0.0
    for name in sorted(k[: -len(".weight_packed")] for k in ct if k.endswith(".weight_packed")):
        sd = {k.rsplit(".", 1)[-1]: v for k, v in ct.items() if k.rsplit(".", 1)[0] == name}
        sd["weight_scale"] = sd["weight_scale"].float()
        w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].float()
        ref = mem.get(norm(name))
        if ref is None or ref.shape != w.shape:
            raise SystemExit(f"--dense: {name} is in the saved checkpoint but not a quantized module in memory")
        # llm-compressor keeps (q - z) * s rounded to bf16 (measured: up to 1/260 relative apart at 3 and 4
        # bits, 0 at 2); two bf16 ulps (2^-7) is far below one code step at these widths
        err = ((w - ref).abs() / ref.abs().clamp_min(1e-30)).masked_fill((w - ref) == 0, 0).max().item()
        if err > 2 ** -7:
            raise SystemExit(f"--dense: {name} decompresses {err:.3g} (relative) away from llm-compressor's weights")
        worst = max(worst, err)
        dec[norm(name)] = w
    rename = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's disk names
    out, used = {}, set()
    for f in sorted(os.listdir(model)):
        if not f.endswith(".safetensors"):
            continue
        for k, v in load_file(os.path.join(model, f)).items():
            base = norm(k[: -len(".weight")]) if k.endswith(".weight") else None
            m = re.match(r"(.*\.experts\.\d+)\.(\w+)$", base or "")
            cands = [base] + ([f"{m.group(1)}.{rename[m.group(2)]}"] if m and m.group(2) in rename else [])
            hit = next((c for c in cands if c in dec), None)
            if hit is not None:
                if dec[hit].shape != v.shape:
                    raise SystemExit(f"--dense: {hit} has shape {tuple(dec[hit].shape)}, {k} {tuple(v.shape)}")
                out[k] = dec[hit]
                used.add(hit)
            else:
                out[k] = v.float() if v.is_floating_point() else v
    if used != set(dec):
        raise SystemExit(f"--dense: no tensor of {model} for {sorted(set(dec) - used)[0]}")
    os.makedirs(dense, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dense, "model.safetensors"))
    for f in os.listdir(model):
        if not f.endswith((".safetensors", ".safetensors.index.json")) and os.path.isfile(os.path.join(model, f)):
            shutil.copyfile(os.path.join(model, f), os.path.join(dense, f))
    cfg = json.load(open(os.path.join(dense, "config.json")))
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    json.dump(cfg, open(os.path.join(dense, "config.json"), "w"), indent=2)
    return {"decompressed_linears": len(dec), "max_rel_diff_vs_llmc_memory": worst,
            "dtype": str(torch.float32)}


if __name__ == "__main__":
    main()
