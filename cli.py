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

from moecompress.cli_args import Q, add_calib_args, add_device_arg, add_quantize_args
from moecompress.config import CalibConfig, QuantizeConfig


def check_device(a) -> None:
    """--device checked before any work: asking for CUDA where there is none is a one-line error."""
    from moecompress.device import resolve_device
    resolve_device(a.device)


def calib_config(a) -> CalibConfig:
    """The calibration options `add_calib_args` parsed."""
    return CalibConfig(tuple(a.calib or ()), a.nsamples, a.seqlen, a.seed, a.sampler, ebss_tau=a.ebss_tau,
                       ebss_beams=a.ebss_beams, ebss_expand=a.ebss_expand, ebss_real=a.ebss_real,
                       balance_objective=a.balance_objective, forward_tokens=a.forward_tokens)


class _Parser(argparse.ArgumentParser):
    """argparse with bad input reported in one line (the command and the problem; `--help` has the usage), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="moecompress", description="Compress trained Mixture-of-Experts checkpoints.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate, quantize and pack the experts of a checkpoint")
    add_quantize_args(q)

    cs = sub.add_parser("calib-stats", help="expert coverage of a calibration set (tokens and gate mass per expert)")
    cs.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the built-in demo model)")
    cs.add_argument("--threshold", type=int, default=Q.min_tokens,
                    help=f"flag experts with fewer routed tokens than this (default {Q.min_tokens})")
    cs.add_argument("--json", default=None, help="write the coverage as JSON here")
    add_calib_args(cs)
    add_device_arg(cs)

    e = sub.add_parser("eval", help="perplexity of an original or packed checkpoint")
    e.add_argument("model", help="checkpoint or packed directory")
    e.add_argument("--text", nargs="+", required=True, help="text file(s) to evaluate on")
    e.add_argument("--seqlen", type=int, default=256, help="window length (default 256)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    e.add_argument("--json", default=None, help="write the results as JSON here")
    add_device_arg(e)
    r = sub.add_parser("report", help="size and accuracy of a compressed checkpoint next to its original (json, md, html, png)")
    r.add_argument("compressed", help="packed (or merged) checkpoint directory")
    r.add_argument("--baseline", required=True, help="the original checkpoint it was made from")
    r.add_argument("--text", nargs="+", required=True, help="text file(s) to measure perplexity on")
    r.add_argument("--out", required=True, help="directory for report.json, report.md, report.html and the plots")
    r.add_argument("--seqlen", type=int, default=256, help="perplexity window length, as in eval (default 256)")
    r.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens of each text, as in eval")
    r.add_argument("--prompts", type=int, default=4, help="prompts generated greedily by both models (default 4)")
    r.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    r.add_argument("--tasks", nargs="*", default=None,
                   help="lm-eval tasks, run when lm-eval and the task data are installed (default arc_easy hellaswag piqa)")
    r.add_argument("--lm-eval-limit", type=int, default=200, help="examples per lm-eval task (default 200)")
    add_device_arg(r)
    for name, default, what in (("merge", "msmoe", "merge experts into fewer"), ("prune", "reap", "drop experts")):
        m = sub.add_parser(name, help=f"{what}: a checkpoint with fewer experts per MoE layer")
        m.add_argument("model", help="checkpoint directory")
        m.add_argument("--out", required=True, help="output directory")
        k = m.add_mutually_exclusive_group(required=True)
        k.add_argument("--experts", type=int, help="experts per MoE layer (a standard Hugging Face checkpoint)")
        k.add_argument("--ratio", type=float, help="fraction of all experts to keep, counts chosen per layer "
                                                   "(moecompress format with an expert map)")
        m.add_argument("--method", choices=["frequency", "reap", "average", "msmoe", "hcsmoe"], default=default,
                       help=f"how experts are chosen and combined (default {default})")
        m.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                       help="least-squares refit of the kept/merged experts' down projections to the original layer's "
                            "output (default: on for reap, msmoe and hcsmoe; off for the frequency and average baselines)")
        add_calib_args(m)
        add_device_arg(m)

    pl = sub.add_parser("plan", help="print a plan (per-expert widths) as a layer x expert table")
    pl.add_argument("path", help="plan.json, or a packed directory with run/plan.json")
    x = sub.add_parser("export", help="write a packed checkpoint in a serving format (compressed-tensors)")
    x.add_argument("packed", help="packed directory (uniform symmetric int4/int8 experts: quantize --symmetric)")
    x.add_argument("--format", required=True, choices=["compressed-tensors"], help="target format")
    x.add_argument("--out", required=True, help="output directory")
    return ap


def cmd_quantize(a) -> int:
    from moecompress import api
    check_device(a)
    calib = calib_config(a)
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, method=a.method, allocation=a.allocation,
                         percdamp=a.percdamp, act_order=a.act_order, sweeps=a.sweeps, affinity=a.affinity, min_tokens=a.min_tokens,
                         hessian_prior=a.hessian_prior, all_tokens=a.all_tokens, fp_target=a.fp_target,
                         router_bits=a.router_bits, shared_bits=a.shared_bits, symmetric=a.symmetric, grid=a.grid, refit=a.refit, rotate=a.rotate,
                         ternary_threshold=a.ternary_threshold, candidates=a.candidates, budget_scope=a.budget_scope, budget=a.budget,
                         min_bits=a.min_bits, max_bits=a.max_bits, top_two=a.top_two, alpha=a.alpha, beta=a.beta,
                         cost=a.cost, calib=calib)
    if a.dry_run:
        a.threshold, a.json = a.min_tokens, None
        cmd_calib_stats(a)
        print(api.predict_run(a.model, cfg, a.device).table())
        return 0
    out = a.out or f"demo-w{a.bits:g}"
    s = api.quantize(a.model, out, cfg, plan=a.plan, progress=not a.quiet, resume=a.resume, device=a.device)
    if s is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(f"packed {s['out']}: expert bits/param {s['expert_bits_per_param']:.3f}, "
          f"{s['source_bytes'] / 1e6:.1f} MB -> {s['packed_bytes'] / 1e6:.1f} MB ({s['compression']:.2f}x), "
          f"{s['seconds']:.1f} s" + (f", {s['fallback_experts']} experts fell back to round-to-nearest" if s["fallback_experts"] else ""))
    sh = s.get("shared_experts")
    if sh:
        print(f"shared experts: {sh['count']} at int{'/'.join(map(str, sh['bits']))}, "
              f"{sh['dense_bytes'] / 1e6:.1f} MB -> {sh['bytes'] / 1e6:.1f} MB (--shared-bits 0 keeps them dense)")
    t = s.get("ternary")
    if t:
        line = (f"ternary experts: {100 * t['zero_fraction']:.1f}% zeros, entropy bound {t['pair_entropy_bpw']:.3f} "
                f"bits/weight; {t['sub1_tensors']} sub1 / {t['dense_tensors']} dense tensors")
        if "codeword_bpw" in t:
            line += (f"; sub1 codewords {t['codeword_bpw']:.3f} bits/weight ({t['coder_over_entropy']:.3f}x their "
                     f"entropy {t['sub1_pair_entropy_bpw']:.3f}), {t['with_offsets_and_dictionary_bpw']:.3f} with "
                     f"row offsets and dictionary")
        print(line)
    if a.allocation == "lp" or a.plan:
        from moecompress.allocation.plan import plan_table
        print(plan_table(s["out"]))
        if "allocation" in s:
            print(f"allocation: sensitivity pass {s['allocation']['sensitivity_seconds']:.1f} s, "
                  f"solver {s['allocation']['solve_seconds']:.2f} s ({s['allocation']['status']})")
            rp = os.path.join(s["out"], "run", "allocation.json")
            rec = json.load(open(rp)) if os.path.isfile(rp) else {}
            if "fisher_seconds" in rec:  # --cost fisher: its pass's time (allocation/fisher.py)
                print(f"allocation: fisher pass {rec['fisher_seconds']:.1f} s ({rec['fisher_tokens']} tokens), "
                      f"predicted loss increase {rec.get('allocation', rec)['objective']:.5f} nats/token")  # joint: top level
    return 0


def cmd_merge(a) -> int:
    from moecompress.merge.pipeline import run_merge
    check_device(a)
    s = run_merge(a.model, a.out, experts=a.experts, ratio=a.ratio, method=a.method, calib=calib_config(a),
                  progress=not a.quiet, refit=a.refit, device=a.device)
    if s is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(json.dumps(s, indent=1, default=str))
    return 0


def cmd_plan(a) -> int:
    from moecompress.allocation.plan import plan_table
    print(plan_table(a.path))
    return 0


def cmd_eval(a) -> int:
    from moecompress import api
    check_device(a)
    res = api.evaluate(a.model, a.text, seqlen=a.seqlen, max_tokens=a.max_tokens, progress=not a.quiet,
                       device=a.device)
    for t, r in res.items():
        print(f"{t}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens (windows of {r['seqlen']})")
    if a.json:
        body = next(iter(res.values())) if len(res) == 1 else {"texts": res}
        if len(res) > 1:  # top-level figures: the first text's, for scripts that read one number
            body.update(next(iter(res.values())))
        with open(a.json, "w") as f:
            json.dump({**body, "model": os.path.abspath(a.model)}, f, indent=1)
    return 0


def cmd_calib_stats(a) -> int:
    from moecompress import api
    check_device(a)
    calib = calib_config(a)
    cov, seconds = api.calibration_stats(a.model, calib, threshold=a.threshold, progress=not a.quiet,
                                         device=a.device)
    print(cov.table())
    print(f"sampler {a.sampler}: {seconds:.1f} s")
    if a.json:
        cov.save(a.json)
    return 0


def cmd_report(a) -> int:
    from moecompress import api
    check_device(a)
    r = api.report(a.compressed, a.baseline, a.text, a.out, seqlen=a.seqlen, max_tokens=a.max_tokens, prompts=a.prompts,
                   new_tokens=a.new_tokens, tasks=a.tasks, lm_eval_limit=a.lm_eval_limit, progress=not a.quiet,
                   device=a.device)
    print(f"saved: {r['summary']['saved']}")
    print(f"lost: {r['summary']['lost']}")
    print(f"report: {os.path.join(os.path.abspath(a.out), 'report.html')} ({len(r['plots'])} plots)")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "calib-stats": cmd_calib_stats}
COMMANDS["report"] = cmd_report
COMMANDS["plan"] = cmd_plan


def cmd_export(a) -> int:
    from moecompress import api
    print(json.dumps(api.export(a.packed, a.out, format=a.format), indent=1))
    return 0


COMMANDS["export"] = cmd_export
COMMANDS["merge"] = COMMANDS["prune"] = cmd_merge


def _return_freed_memory() -> None:
    """Large buffers straight from mmap: glibc otherwise raises its mmap threshold after the first big
    free and keeps later layers' freed buffers in the heap, so resident memory grows layer after layer."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    _return_freed_memory()
    args = build_parser().parse_args(argv)
    if args.quiet:  # transformers' own "Loading weights" bar too
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
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
