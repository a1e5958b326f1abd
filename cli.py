"""The command line: one subcommand -> one api function, nothing else.

Installed as `moecompress` (module moecompress.cli). Errors in the user's input print one line and
exit 2; an unexpected failure prints one line and exits 1 (MOECOMPRESS_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from moecompress.config import CalibConfig, QuantizeConfig

Q, C = QuantizeConfig(), CalibConfig()


def _bits(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    return int(v) if v == int(v) else v


def add_calib_args(p):
    p.add_argument("--calib", nargs="+", metavar="FILE", default=list(C.sources),
                   help="calibration text: files, .jsonl (a 'text' field), directories, PATH:WEIGHT mixes "
                        "(default: the built-in mixed-domain text)")
    p.add_argument("--nsamples", type=int, default=C.nsamples, help=f"calibration windows (default {C.nsamples})")
    p.add_argument("--seqlen", type=int, default=C.seqlen, help=f"tokens per window (default {C.seqlen})")
    p.add_argument("--seed", type=int, default=C.seed, help=f"random seed (default {C.seed})")
    p.add_argument("--sampler", choices=["random", "balanced", "ebss"], default=C.sampler,
                   help=f"how calibration windows are chosen (default {C.sampler})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moecompress", description="Compress trained Mixture-of-Experts checkpoints.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, quantize and pack the experts of a checkpoint")
    q.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the built-in demo model)")
    q.add_argument("--out", default=None, help="output directory for the packed checkpoint (default: ./demo-w<bits>)")
    q.add_argument("--bits", type=_bits, default=Q.bits, help=f"bits per expert weight, or average with --allocation lp (default {Q.bits})")
    q.add_argument("--group-size", type=int, default=Q.group_size,
                   help="weights per scale along the input dimension (default 128, or the largest of 64/32/16 that divides)")
    q.add_argument("--method", choices=["gptq", "rtn", "ternary"], default=Q.method, help=f"quantizer (default {Q.method})")
    q.add_argument("--allocation", choices=["uniform", "lp"], default=Q.allocation, help="bit allocation across experts")
    q.add_argument("--plan", default=None, help="replay a plan.json (per-expert widths) from an earlier run")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--percdamp", type=float, default=Q.percdamp, help=f"GPTQ relative damping (default {Q.percdamp})")
    q.add_argument("--affinity", action="store_true", help="weight each token's Hessian term by its gate weight (AGQ)")
    q.add_argument("--min-tokens", type=int, default=Q.min_tokens,
                   help=f"experts with fewer routed calibration tokens fall back to round-to-nearest (default {Q.min_tokens})")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    add_calib_args(q)

    e = sub.add_parser("eval", help="perplexity of an original or packed checkpoint")
    e.add_argument("model", help="checkpoint or packed directory")
    e.add_argument("--text", nargs="+", required=True, help="text file(s) to evaluate on")
    e.add_argument("--seqlen", type=int, default=256, help="window length (default 256)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    e.add_argument("--json", default=None, help="write the results as JSON here")
    return ap


def cmd_quantize(a) -> int:
    from moecompress import api
    calib = CalibConfig(tuple(a.calib or ()), a.nsamples, a.seqlen, a.seed, a.sampler)
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, method=a.method, allocation=a.allocation,
                         percdamp=a.percdamp, act_order=a.act_order, affinity=a.affinity, min_tokens=a.min_tokens,
                         calib=calib)
    out = a.out or f"demo-w{a.bits:g}"
    s = api.quantize(a.model, out, cfg, plan=a.plan, progress=not a.quiet, resume=a.resume)
    print(f"packed {s['out']}: expert bits/param {s['expert_bits_per_param']:.3f}, "
          f"{s['source_bytes'] / 1e6:.1f} MB -> {s['packed_bytes'] / 1e6:.1f} MB ({s['compression']:.2f}x), "
          f"{s['seconds']:.1f} s" + (f", {s['fallback_experts']} experts fell back to round-to-nearest" if s["fallback_experts"] else ""))
    return 0


def cmd_eval(a) -> int:
    from moecompress import api
    res = api.evaluate(a.model, a.text, seqlen=a.seqlen, max_tokens=a.max_tokens, progress=not a.quiet)
    for t, r in res.items():
        print(f"{t}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens (windows of {r['seqlen']})")
    if a.json:
        body = next(iter(res.values())) if len(res) == 1 else {"texts": res}
        if len(res) > 1:  # top-level figures: the first text's, for scripts that read one number
            body.update(next(iter(res.values())))
        with open(a.json, "w") as f:
            json.dump({**body, "model": os.path.abspath(a.model)}, f, indent=1)
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    from moecompress.errors import MoeCompressError
    try:
        return COMMANDS[args.command](args)
    except MoeCompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, never a traceback (MOECOMPRESS_DEBUG=1 to see it)
        if os.environ.get("MOECOMPRESS_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
