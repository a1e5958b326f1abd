"""Record what llm-compressor writes for a symmetric int4/int8, group-64, weight-only GPTQ of the demo model's
experts: tensor name patterns, dtypes and shapes, and config.json's quantization_config.

`moecompress export --format compressed-tensors` is checked against this record (tests/test_export.py), since
vLLM, which serves the format, cannot run here. llm-compressor pins an older transformers, so this script runs
in its own environment, not the project's:

    python3 -m venv /work/llmc-venv && /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor
    OMP_NUM_THREADS=1 /work/llmc-venv/bin/python benchmarks/ct_layout.py            # rewrites tests/data/llmcompressor_layout.json
    OMP_NUM_THREADS=1 /work/llmc-venv/bin/python benchmarks/ct_layout.py --keep /tmp/llmc-ct   # also keeps the checkpoint

The recipe: the model loaded with a plain `from_pretrained`, `linearize_moe` (per-expert nn.Linear modules), then
`oneshot` with a `GPTQModifier` whose one config group targets the expert projections only (what moecompress
quantizes; attention stays dense), weights int, symmetric, group strategy, and ignores the routers and lm_head;
saved with `save_compressed=True`. Calibration: 16 windows of 64 tokens of the shipped calibration text.
Tensor names are recorded as patterns with the layer and expert indices replaced by {layer} and {expert}.
`reload_in_plain_transformers` loads the saved checkpoint back with a plain `from_pretrained` (this
environment's transformers) and compares its logits with the dense model's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
MODEL = os.path.join(ROOT, "moecompress", "data", "demo-model")
CALIB = os.path.join(ROOT, "moecompress", "data", "text", "calib_mix.txt")
OUT = os.path.join(ROOT, "tests", "data", "llmcompressor_layout.json")
EXPERT_TARGET = r"re:.*experts\.\d+\.(gate_proj|up_proj|down_proj)$"  # linearized expert Linears
IGNORE = ["lm_head", r"re:.*\.gate$"]  # the routers (mlp.gate) and the head


def pattern(name: str) -> str:
    name = re.sub(r"\.layers\.\d+\.", ".layers.{layer}.", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.{expert}.", name)


def layout(directory: str) -> dict:
    """{pattern: {dtype, shape, count}} over every tensor of the checkpoint's safetensors files."""
    from safetensors import safe_open
    out: dict[str, dict] = {}
    for f in sorted(os.listdir(directory)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(directory, f), "pt") as t:
            for k in t.keys():
                s = t.get_slice(k)
                rec = {"dtype": s.get_dtype(), "shape": list(s.get_shape())}
                p = pattern(k)
                prev = out.get(p)
                if prev is not None and (prev["dtype"], prev["shape"]) != (rec["dtype"], rec["shape"]):
                    raise SystemExit(f"{p}: tensors of one pattern differ ({prev} vs {rec})")
                out[p] = dict(rec, count=(prev or {"count": 0})["count"] + 1)
                if k.endswith("weight_shape"):
                    out[p]["value"] = t.get_tensor(k).tolist()
    return dict(sorted(out.items()))


def reload_check(directory: str) -> dict:
    """The saved checkpoint loaded back with a plain from_pretrained: missing/unexpected keys and the logits'
    max abs difference / max abs against the dense demo model on tokens 1..128 (quantization error alone is a
    few percent; random experts give about 1)."""
    import torch
    from transformers import AutoModelForCausalLM
    x = torch.arange(1, 129)[None]
    # the config's dtype (bfloat16): with dtype=torch.float32 the reloaded router stays bfloat16 and fails
    m, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    ref = AutoModelForCausalLM.from_pretrained(MODEL)
    with torch.no_grad():
        a, b = m(x).logits.float(), ref(x).logits.float()
    return {"missing_keys": len(info["missing_keys"]), "unexpected_keys": len(info["unexpected_keys"]),
            "logits_rel_diff_vs_dense": round(float((a - b).abs().max() / b.abs().max()), 4)}


def run(bits: int, group_size: int, nsamples: int, seqlen: int, keep: str | None) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressed_tensors
    import llmcompressor
    import transformers

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    linearize_moe(model)
    ids = tok(open(CALIB).read())["input_ids"]
    step = max(1, (len(ids) - seqlen) // nsamples)
    windows = [ids[i * step:i * step + seqlen] for i in range(nsamples)]
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seqlen for _ in windows]})
    groups = {"group_0": {"targets": [EXPERT_TARGET],
                          "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                                      "group_size": group_size}}}
    recipe = GPTQModifier(config_groups=groups, ignore=IGNORE)
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=nsamples)
    d = keep or tempfile.mkdtemp(prefix="llmc-ct-")
    if keep and os.path.exists(keep):
        shutil.rmtree(keep)
    try:
        model.save_pretrained(d, save_compressed=True)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        reload = reload_check(d)
        return {"recipe": {"modifier": "GPTQModifier", "config_groups": groups, "ignore": IGNORE,
                           "model": "moecompress/data/demo-model (plain from_pretrained, linearize_moe)",
                           "calibration": f"{nsamples} x {seqlen} tokens of calib_mix.txt"},
                "versions": {"llmcompressor": llmcompressor.__version__,
                             "compressed_tensors": compressed_tensors.__version__,
                             "transformers": transformers.__version__, "torch": torch.__version__},
                "config_dtype": cfg.get("dtype", cfg.get("torch_dtype")),
                "reload_in_plain_transformers": reload,
                "quantization_config": cfg["quantization_config"],
                "tensors": layout(d)}
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--keep", help="also keep the compressed checkpoint(s) here (suffixed -w<bits>)")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    rec = {"about": "written by benchmarks/ct_layout.py: what llm-compressor saves for the demo model's experts",
           "schemes": {f"w{b}a16_g{a.group_size}_sym": run(b, a.group_size, a.nsamples, a.seqlen,
                                                          a.keep and f"{a.keep}-w{b}") for b in a.bits}}
    with open(a.out, "w") as f:
        json.dump(rec, f, indent=1, sort_keys=True)
        f.write("\n")
    for name, s in rec["schemes"].items():
        print(name, json.dumps(s["quantization_config"], sort_keys=True)[:400])
        for p, t in s["tensors"].items():
            if "experts" in p or "gate" in p:
                print(f"  {p}: {t}")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
