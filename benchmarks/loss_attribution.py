"""Where a packed checkpoint's perplexity loss comes from: its routed experts quantized one group at a time.

Loads the packed checkpoint (`moecompress.load`), decodes every routed expert's weights (unrotated, so rotated
layers work too) and reads the originals from the source checkpoint; then evaluates, on the first --max-tokens
tokens of each text (windows of 256, float32):
    original     every routed expert back at its original weights (shared experts, attention and the rest stay
                 as the checkpoint stores them: the baseline the other rows are compared with)
    all          every routed expert as packed
    layer L      only layer L's routed experts as packed (one row per MoE layer)
    gate/up/down only that projection of every routed expert as packed
Each row prints the change against `original` per text. Rows need not add up to `all` (errors interact), but
they say which layers and projections carry the loss: what a width allocation or a better quantizer should
spend on.

    python benchmarks/loss_attribution.py PACKED [--source MODEL] [--text FILE ...] [--max-tokens N] [--json F]

By default the source is the one the checkpoint names (moecompress.json's `source.path`, else the fixture) and
the texts are the fixture's four `*_test` texts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import MODEL, domain_texts

import torch

PROJS = ("gate", "up", "down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packed")
    ap.add_argument("--source", help="the unquantized checkpoint (default: the fixture)")
    ap.add_argument("--text", nargs="+", help="texts to evaluate (default: the fixture's four *_test texts)")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--json")
    a = ap.parse_args()
    from moecompress.arch import ExpertKey
    from moecompress.calibration.data import load_tokenizer, read_source, tokenize
    from moecompress.checkpoint import CheckpointReader
    from moecompress.errors import MoeCompressError
    from moecompress.evaluate import perplexity
    from moecompress.experts import MoEExperts
    from moecompress.runtime import load
    try:
        model = load(a.packed, device="cpu", dtype=torch.float32).eval()
        source = CheckpointReader(a.source or MODEL)
    except MoeCompressError as e:
        sys.exit(f"error: {e}")
    texts = a.text or domain_texts()
    names = [os.path.basename(t).removesuffix(".txt").removesuffix("_test") for t in texts]
    tok = load_tokenizer(a.packed)
    ids = {n: tokenize(tok, read_source(t))[: a.max_tokens] for n, t in zip(names, texts)}

    layers = []  # (layer index, experts module, {(e, p): quantized}, {(e, p): original})
    for i, layer in enumerate(model.model.layers):
        mods = [m for m in layer.modules() if isinstance(m, MoEExperts)]
        if not mods:
            continue
        m = mods[0]
        q, o = {}, {}
        for e in range(m.num_experts):
            if m.weights[e] is None:
                continue
            for p in PROJS:
                q[(e, p)] = m.effective_weight(e, p).float()
                o[(e, p)] = source.expert(ExpertKey(i, e, p)).float()
                if o[(e, p)].shape != q[(e, p)].shape:
                    sys.exit(f"error: layer {i} expert {e} {p}: {tuple(q[(e, p)].shape)} packed, "
                             f"{tuple(o[(e, p)].shape)} in the source (a merged or pruned checkpoint is not supported)")
        for k in [k for k in m._buffers if k.startswith("rotation_")]:
            del m._buffers[k]  # every expert becomes dense and unrotated below
        layers.append((i, m, q, o))
    if not layers:
        sys.exit("error: no routed experts in the checkpoint")

    def run(pick) -> dict:
        for i, m, q, o in layers:
            for (e, p) in q:
                m.set_dense(e, p, q[(e, p)] if pick(i, p) else o[(e, p)])
        with torch.no_grad():
            return {n: perplexity(model, x, 256, 8)["perplexity"] for n, x in ids.items()}

    rows = {"original": run(lambda i, p: False), "all": run(lambda i, p: True)}
    for i, *_ in layers:
        rows[f"layer {i}"] = run(lambda j, p, i=i: j == i)
    for p in PROJS:
        rows[p] = run(lambda j, q, p=p: q == p)
    base = rows["original"]
    print(f"{a.packed}: change of perplexity against the routed experts' original weights, "
          f"first {a.max_tokens} tokens per text")
    print(f"{'row':<10} " + " ".join(f"{n:>16}" for n in names))
    for r, v in rows.items():
        cells = [f"{v[n]:.3f}" if r == "original" else f"{v[n]:.3f} ({100 * (v[n] / base[n] - 1):+.2f}%)" for n in names]
        print(f"{r:<10} " + " ".join(f"{c:>16}" for c in cells))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"packed": a.packed, "max_tokens": a.max_tokens, "texts": dict(zip(names, texts)),
                       "perplexity": rows}, f, indent=1)


if __name__ == "__main__":
    main()
