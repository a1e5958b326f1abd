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
"""
from __future__ import annotations

import argparse
import json
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
    print(json.dumps(res))
    if a.result:
        with open(a.result, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
