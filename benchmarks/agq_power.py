"""AGQ's token weight end to end: GPTQ with Hessian weights c^p (c: the token's gate weight), perplexity per domain.

`--affinity` (MoEQuant's AGQ) is p = 1: H_e = sum_t c_t x_t x_t^T. p = 0 is plain GPTQ, p = 2 the weight
under which GPTQ's loss is the MoE block's output error (benchmarks/agq_block_error.py compares the
three on one layer's block error). Here each p quantizes the whole fixture, calibrated on random prose
windows, and is evaluated on the four domains: the paired difference from p = 0 per seed, mean +-
standard error. For the analysis only, this script raises the gate weights the Hessian collector sees
to the power p (the quantize pass itself has no such option).

    python benchmarks/agq_power.py --bits 3 --seeds 0 1 2 3 4 5        # about 12 min, one thread
    python benchmarks/agq_power.py --powers 1 --seeds 0 1 2 3 --percdamp 0.05   # AGQ at other GPTQ settings
    python benchmarks/agq_power.py --powers 1 --seeds 0 1 2 3 --nsamples 256

`--sensitivity` adds two token weights from the loss (the AGQ variant that uses per-token loss
sensitivity): g_t = |dL/dy_t|^2, the squared gradient of the windows' summed next-token loss with
respect to the MoE layer's output y_t (the residual stream after the layer), from one backward pass of
the full-precision model over the calibration windows, normalized to mean 1 per layer; "g" weights the
Hessian by g_t alone, "c*g" by c_t g_t (under the diagonal approximation of the loss curvature, c_t^2 g_t
is the weight under which GPTQ's loss is the loss change itself). It loads the whole model (fine for
the fixture; the quantize pass has no such option).

    python benchmarks/agq_power.py --powers 1 --sensitivity --seeds 0 1 2 3 4 5

`--jitter EPS` adds `--draws` runs of plain GPTQ whose token weights are 1 + EPS * u_t (u_t uniform in
[-1, 1], a fixed draw per run): Hessians equal to plain GPTQ's to within EPS relative, far below their
sampling error, so the spread of those runs around plain GPTQ is the rounding's own chaos, the floor
under which no difference between two calibration methods means anything.

    python benchmarks/agq_power.py --powers --jitter 1e-5 --draws 3 --seeds 0 1 2 3 4 5
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import DOMAINS, add_fixture_args, mean_se, quantize_and_evaluate


def loss_sensitivity(model_path: str, windows, batch_size: int = 8) -> dict:
    """{decoder layer: (S * L,) |dL/dy_t|^2 / its mean}: L the windows' summed next-token NLL, y_t the
    residual stream after the layer (whose gradient is the MoE block output's), token t = window * L + pos."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    layers = model.model.layers
    g = {k: [] for k in range(len(layers))}
    outs = {}  # this batch's layer outputs, kept for their gradients

    def keep(k):
        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            y.retain_grad()
            outs[k] = y
        return hook
    hooks = [layer.register_forward_hook(keep(k)) for k, layer in enumerate(layers)]
    try:
        for s in range(0, windows.shape[0], batch_size):
            ids = windows[s:s + batch_size]
            logits = model(input_ids=ids).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
            model.zero_grad(set_to_none=True)
            for k, y in outs.items():
                g[k].append(y.grad.float().pow(2).sum(-1).flatten())
    finally:
        for h in hooks:
            h.remove()
    g = {k: torch.cat(v) for k, v in g.items()}
    return {k: v / v.mean() for k, v in g.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--powers", nargs="*", type=float, default=[0.5, 1.0, 2.0], help="p > 0 (p = 0 always runs)")
    ap.add_argument("--bits", nargs="+", type=int, default=[3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ relative damping (quantize --percdamp)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per domain")
    ap.add_argument("--sensitivity", action="store_true", help="also the loss-sensitivity weights g and c*g")
    ap.add_argument("--jitter", type=float, default=0.0, help="also plain GPTQ with token weights 1 + EPS * u, u in [-1, 1]")
    ap.add_argument("--draws", type=int, default=3, help="--jitter: how many draws of u")
    a = ap.parse_args(argv)

    import torch

    from moecompress import api
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.passes import calibrate, moe_cache
    from moecompress.passes import quantize as qpass

    collect, replay, quantize_layer = (calibrate.HessianCollector.__call__, moe_cache.MoECache.replay,
                                       qpass.quantize_moe_layer)
    # the weight ("p"; "g": the loss sensitivities of "seed"'s windows; "u": each jitter draw's u per layer), and
    # where the pass is: the layer being quantized and the first token index of the mini-batch ("offset")
    now = {"p": 1.0, "g": None, "seed": None, "u": {}, "layer": None, "offset": 0, "next": 0}
    ntok = a.nsamples * a.seqlen

    def weighted(self, e, tok, x, h, w):  # c -> c^p (or g, c*g) in the Hessian (and in the gate sums it records)
        p = now["p"]
        if isinstance(p, str):  # "g", "c*g" or "jN": a weight per token, found by its index in the windows
            if p.startswith("j"):
                key = (p, now["layer"])
                if key not in now["u"]:  # drawn once per draw and layer, not per observed batch
                    gen = torch.Generator().manual_seed(1_000_003 * int(p[1:]) + 1009 * now["layer"])
                    now["u"][key] = torch.rand(ntok, generator=gen) * 2 - 1
                return collect(self, e, tok, x, h, 1 + a.jitter * now["u"][key][now["offset"] + tok.long()])
            g = now["g"][now["layer"]][now["offset"] + tok.long()]
            return collect(self, e, tok, x, h, g * w.float().clamp(min=0) if p == "c*g" else g)
        return collect(self, e, tok, x, h, w.float().clamp(min=0) ** p if self.affinity else w)

    def counted_replay(self, num_experts, observer, *args, **kw):  # the first token index of each cached chunk
        offset = 0
        for c in self.chunks:
            now["offset"] = offset
            replay(moe_cache.MoECache([c], self.device), num_experts, observer, *args, **kw)
            offset += c.x.shape[0]

    def layer_known(*args, layer_idx, **kw):
        now["layer"] = layer_idx
        return quantize_layer(*args, layer_idx=layer_idx, **kw)

    variants = [0.0] + a.powers + (["g", "c*g"] if a.sensitivity else []) + \
        ([f"j{i}" for i in range(a.draws)] if a.jitter else [])
    ppl = {}
    work = tempfile.mkdtemp(prefix="agq-power-")
    calibrate.HessianCollector.__call__ = weighted
    moe_cache.MoECache.replay = counted_replay
    qpass.quantize_moe_layer = layer_known
    try:
        for bits in a.bits:
            for seed in a.seeds:
                calib = CalibConfig((a.calib,), a.nsamples, a.seqlen, seed)
                if a.sensitivity and now["seed"] != seed:
                    now["g"], now["seed"] = loss_sensitivity(a.model, api.calibration_windows(a.model, calib)), seed
                for p in variants:
                    now["p"] = p
                    cfg = QuantizeConfig(bits=bits, group_size=64, affinity=p != 0, percdamp=a.percdamp, calib=calib)
                    ppl[(bits, seed, p)] = quantize_and_evaluate(a.model, cfg, os.path.join(work, "q"), a.max_tokens)
                    print(f"[w{bits} seed {seed} p {p}] "
                          + " ".join(f"{d} {v:.3f}" for d, v in zip(DOMAINS, ppl[(bits, seed, p)])), flush=True)
    finally:
        calibrate.HessianCollector.__call__ = collect
        moe_cache.MoECache.replay = replay
        qpass.quantize_moe_layer = quantize_layer
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nGPTQ group 64, damping {a.percdamp:g}, on random prose windows ({a.nsamples} x {a.seqlen}), seeds {a.seeds}, eval "
          f"{a.max_tokens} tokens/domain: Hessian token weight c^p against p = 0 (plain GPTQ), paired by seed, "
          f"mean +- standard error (negative = lower perplexity); p = 1 is --affinity")
    for bits in a.bits:
        base = [statistics.mean(ppl[(bits, s, 0.0)][i] for s in a.seeds) for i in range(len(DOMAINS))]
        print(f"{bits}-bit, p = 0: " + "  ".join(f"{d} {v:.3f}" for d, v in zip(DOMAINS, base)))
        print(f"{'p':>6}" + "".join(f"{d:>20}" for d in DOMAINS))
        for p in variants[1:]:
            row = []
            for i in range(len(DOMAINS)):
                m, se = mean_se([ppl[(bits, s, p)][i] - ppl[(bits, s, 0.0)][i] for s in a.seeds])
                row.append(f"{m:+.3f} +-{se:.3f}")
            print(f"{p:>6}" + "".join(f"{c:>20}" for c in row))
        if a.jitter:  # the spread of one run: plain GPTQ and its jittered copies are the same method
            runs = [0.0] + [v for v in variants if isinstance(v, str) and v.startswith("j")]
            sd = [(statistics.mean(statistics.variance([ppl[(bits, s, v)][i] for v in runs]) for s in a.seeds)) ** 0.5
                  for i in range(len(DOMAINS))]
            print(f"rounding chaos, standard deviation of one run (plain GPTQ and {len(runs) - 1} copies with token weights "
                  f"1 +- {a.jitter:g}, pooled over seeds): " + "  ".join(
                      f"{d} {v:.3f} ({100 * v / b:.2f}%)" for d, v, b in zip(DOMAINS, sd, base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
