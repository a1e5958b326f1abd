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
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import DOMAINS, add_fixture_args, mean_se, quantize_and_evaluate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--powers", nargs="+", type=float, default=[0.5, 1.0, 2.0], help="p > 0 (p = 0 always runs)")
    ap.add_argument("--bits", nargs="+", type=int, default=[3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--percdamp", type=float, default=0.01, help="GPTQ relative damping (quantize --percdamp)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per domain")
    a = ap.parse_args(argv)

    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.passes import calibrate

    collect = calibrate.HessianCollector.__call__
    power = {"p": 1.0}

    def weighted(self, e, tok, x, h, w):  # c -> c^p in the Hessian (and in the gate sums it records)
        return collect(self, e, tok, x, h, w.float().clamp(min=0) ** power["p"] if self.affinity else w)

    ppl = {}
    work = tempfile.mkdtemp(prefix="agq-power-")
    calibrate.HessianCollector.__call__ = weighted
    try:
        for bits in a.bits:
            for seed in a.seeds:
                for p in [0.0] + a.powers:
                    power["p"] = p
                    cfg = QuantizeConfig(bits=bits, group_size=64, affinity=p > 0, percdamp=a.percdamp,
                                         calib=CalibConfig((a.calib,), a.nsamples, a.seqlen, seed))
                    ppl[(bits, seed, p)] = quantize_and_evaluate(a.model, cfg, os.path.join(work, "q"), a.max_tokens)
                    print(f"[w{bits} seed {seed} p {p:g}] "
                          + " ".join(f"{d} {v:.3f}" for d, v in zip(DOMAINS, ppl[(bits, seed, p)])), flush=True)
    finally:
        calibrate.HessianCollector.__call__ = collect
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nGPTQ group 64, damping {a.percdamp:g}, on random prose windows ({a.nsamples} x {a.seqlen}), seeds {a.seeds}, eval "
          f"{a.max_tokens} tokens/domain: Hessian token weight c^p against p = 0 (plain GPTQ), paired by seed, "
          f"mean +- standard error (negative = lower perplexity); p = 1 is --affinity")
    for bits in a.bits:
        base = [statistics.mean(ppl[(bits, s, 0.0)][i] for s in a.seeds) for i in range(len(DOMAINS))]
        print(f"{bits}-bit, p = 0: " + "  ".join(f"{d} {v:.3f}" for d, v in zip(DOMAINS, base)))
        print(f"{'p':>6}" + "".join(f"{d:>20}" for d in DOMAINS))
        for p in a.powers:
            row = []
            for i in range(len(DOMAINS)):
                m, se = mean_se([ppl[(bits, s, p)][i] - ppl[(bits, s, 0.0)][i] for s in a.seeds])
                row.append(f"{m:+.3f} +-{se:.3f}")
            print(f"{p:>6g}" + "".join(f"{c:>20}" for c in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
