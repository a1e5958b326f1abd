"""What AGQ does to one MoE layer: GPTQ with Hessian token weights 1, c and c^2 (c: the token's gate weight).

For MoE layer L of the trained fixture (inputs from the original layers before it), each expert's gate/up
are GPTQ'd on H = sum_t c_t^p x_t x_t^T and its down on the quantized gate/up's activations (as the
quantize pass does), for p = 0 (plain GPTQ), 1 (AGQ, MoEQuant) and 2 (the weight under which GPTQ's loss
is the MoE block's output error). Printed per p, on the calibration windows and on held-out prose:

    block error  = sum_t sum_e ||c_te (E_e(x_t) - Q_e(x_t))||^2 / sum_t sum_e ||c_te E_e(x_t)||^2
    expert error = the same without the gate weights (every routed token counts alike)

    python benchmarks/agq_block_error.py --layer 0 --bits 3
"""
from __future__ import annotations

import argparse
import os
import sys

from common import FIX, add_fixture_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--heldout", default=os.path.join(FIX, "text", "prose_test.txt"))
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch
    from moecompress.calibration import data
    from moecompress.checkpoint import CheckpointReader
    from moecompress.layerwise import LayerStreamer, find_experts
    from moecompress.quant.gptq import GPTQConfig, gptq
    from moecompress.quant.grids import AsymmetricGrid

    tok = data.load_tokenizer(a.model)
    cal = data.random_windows(data.token_pool(tok, data.parse_sources([a.calib])), a.nsamples, a.seqlen, a.seed)
    ids = data.tokenize(tok, data.read_source(a.heldout))[:64 * a.seqlen].view(64, a.seqlen)
    s = LayerStreamer(CheckpointReader(a.model))
    kw = s.layer_kwargs(8, a.seqlen)

    def inputs(w):
        h = torch.cat([s.embed(w[i:i + 8]) for i in range(0, len(w), 8)])
        for i in range(a.layer):
            h = s.run_layer(s.build_layer(i), h, kw[i])
        return h
    layer = s.build_layer(a.layer)
    _, ex = find_experts(layer)

    def routed(h):  # {expert: (inputs (T_e, H), gate weights (T_e,))}
        got = {}
        ex.observer = lambda e, tok_, x, hh, w: got.setdefault(e, []).append((x.clone(), w.clone().float()))
        s.run_layer(layer, h, kw[a.layer])
        ex.observer = None
        return {e: (torch.cat([x for x, _ in v]), torch.cat([w for _, w in v])) for e, v in got.items()}
    sets = {"calibration": routed(inputs(cal)), "held-out": routed(inputs(ids))}
    W0 = [dict(ex.weights[e]) for e in range(ex.num_experts)]
    gcfg, grid = GPTQConfig(0.01, 128, False), AsymmetricGrid(a.bits)

    def out(w, x):
        return ex.glu(x @ w["gate"].T, x @ w["up"].T) @ w["down"].T
    print(f"layer {a.layer}, {a.bits}-bit GPTQ g{a.group_size}, {a.nsamples} x {a.seqlen} prose windows (seed {a.seed})")
    for p in (0, 1, 2):
        Q = {}
        for e, (x, c) in sets["calibration"].items():
            if len(x) < 16:
                continue
            wt = c ** p
            I = W0[e]["gate"].shape[0]
            gu = gptq(torch.cat([W0[e]["gate"], W0[e]["up"]]).float()[None], ((x * wt[:, None]).T @ x)[None], grid,
                      a.group_size, gcfg).deq[0]
            q = {"gate": gu[:I], "up": gu[I:]}
            h = ex.glu(x @ q["gate"].T, x @ q["up"].T)
            q["down"] = gptq(W0[e]["down"].float()[None], ((h * wt[:, None]).T @ h)[None], grid, a.group_size, gcfg).deq[0]
            Q[e] = q
        cells = []
        for name, X in sets.items():
            num = den = num1 = den1 = 0.0
            for e, (x, c) in X.items():
                if e not in Q:
                    continue
                y = out(W0[e], x)
                d = y - out(Q[e], x)
                num += float(((d * c[:, None]) ** 2).sum())
                den += float(((y * c[:, None]) ** 2).sum())
                num1 += float((d ** 2).sum())
                den1 += float((y ** 2).sum())
            cells.append(f"{name}: block error {num / den:.5f}, expert error {num1 / den1:.5f}")
        print(f"weight c^{p}  " + "  |  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
