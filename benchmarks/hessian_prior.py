"""--hessian-prior on the trained fixture: GPTQ with and without the all-token Hessian prior, paired by seed.

Random prose windows (the calibration the issue fixes), a small set (16 x 64 tokens: most experts get
fewer routed tokens than their 192/384 input widths) and the benchmark's usual 128 x 256, at 2 and 3
bits, evaluated on the four domains' test text. Prints perplexity without / with the prior per domain
(mean over seeds) and the paired difference, mean +- standard error.

    python benchmarks/hessian_prior.py                      # seeds 0-3, prior 1.0 (about 12 min, one thread)
    python benchmarks/hessian_prior.py --seeds 0 --sizes 16x64 --bits 2     # a minute
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
    ap.add_argument("--prior", type=float, default=1.0)
    ap.add_argument("--sizes", nargs="+", default=["16x64", "128x256"], help="calibration windows x tokens")
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--affinity", action="store_true", help="also --affinity")
    ap.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens per domain")
    a = ap.parse_args(argv)

    from moecompress.config import CalibConfig, QuantizeConfig
    ppl = {}
    work = tempfile.mkdtemp(prefix="prior-bench-")
    try:
        for size in a.sizes:
            n, L = (int(v) for v in size.split("x"))
            for bits in a.bits:
                for seed in a.seeds:
                    for prior in (0.0, a.prior):
                        cfg = QuantizeConfig(bits=bits, group_size=64, affinity=a.affinity, hessian_prior=prior,
                                             calib=CalibConfig((a.calib,), n, L, seed))
                        ppl[(size, bits, seed, prior)] = quantize_and_evaluate(a.model, cfg, os.path.join(work, "q"),
                                                                               a.max_tokens)
                        print(f"[{size} w{bits} seed {seed} prior {prior:g}] "
                              + " ".join(f"{d} {v:.3f}" for d, v in zip(DOMAINS, ppl[(size, bits, seed, prior)])),
                              flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nGPTQ group 64 on random prose windows{' with --affinity' if a.affinity else ''}, seeds {a.seeds}, "
          f"eval {a.max_tokens} tokens/domain: perplexity without / with --hessian-prior {a.prior:g}, and the "
          f"paired difference (mean +- standard error over seeds; negative = the prior helps)")
    print(f"{'calib':<9}{'bits':>5}  " + "".join(f"{d:>30}" for d in DOMAINS))
    for size in a.sizes:
        for bits in a.bits:
            row = []
            for i in range(len(DOMAINS)):
                off = [ppl[(size, bits, s, 0.0)][i] for s in a.seeds]
                on = [ppl[(size, bits, s, a.prior)][i] for s in a.seeds]
                m, se = mean_se([y - x for x, y in zip(off, on)])
                row.append(f"{statistics.mean(off):.2f}/{statistics.mean(on):.2f} {m:+.2f}+-{se:.2f}")
            print(f"{size:<9}{bits:>5}  " + "".join(f"{c:>30}" for c in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
