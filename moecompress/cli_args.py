"""The command line's argument definitions: value parsers, the calibration and device options shared by
several subcommands, and `quantize`'s own (the longest list). `cli.py` builds the parser from them and runs
the subcommands; defaults come from the config dataclasses, so the two cannot drift.
"""
from __future__ import annotations

import argparse

from moecompress.config import BALANCE_OBJECTIVES, CalibConfig, QuantizeConfig

Q, C = QuantizeConfig(), CalibConfig()


def _bits(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    return int(v) if v == int(v) else v


def _widths(s: str) -> tuple:
    try:
        return tuple(x.strip() if x.strip() in ("sub1", "ternary", "prune") else int(x)
                     for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of bit widths: {s!r} (e.g. 2,3,4 or sub1,2,3)") from None


def add_calib_args(p):
    p.add_argument("--calib", nargs="+", metavar="FILE", default=list(C.sources),
                   help="calibration text: files, .jsonl (a 'text' field), directories, PATH:WEIGHT mixes "
                        "(default: the built-in mixed-domain text)")
    p.add_argument("--nsamples", type=int, default=C.nsamples, help=f"calibration windows (default {C.nsamples})")
    p.add_argument("--seqlen", type=int, default=C.seqlen, help=f"tokens per window (default {C.seqlen})")
    p.add_argument("--seed", type=int, default=C.seed, help=f"random seed (default {C.seed})")
    p.add_argument("--forward-tokens", type=int, default=C.forward_tokens,
                   help=f"tokens per forward call of a decoder layer, in whole chunks of {C.batch_size} windows; under "
                        f"torchrun the calls are shared out among the ranks. Part of the run's options: another value "
                        f"may round rarely routed experts differently (default {C.forward_tokens})")
    p.add_argument("--sampler", choices=["random", "balanced", "ebss"], default=C.sampler,
                   help=f"how calibration windows are chosen (default {C.sampler})")
    p.add_argument("--balance-objective", choices=list(BALANCE_OBJECTIVES), default=C.balance_objective,
                   help=f"--sampler balanced: what the window selection maximizes per layer, the sum over experts "
                        f"of sqrt(usage share), the entropy of the shares, or the sum of log counts (log favours the "
                        f"least-used experts most) (default {C.balance_objective})")
    p.add_argument("--ebss-tau", type=float, default=C.ebss_tau,
                   help=f"--sampler ebss: weight of expert balance, score = NLL + std of log usage counts / tau "
                        f"(default {C.ebss_tau})")
    p.add_argument("--ebss-beams", type=int, default=C.ebss_beams, help=f"--sampler ebss: beam width (default {C.ebss_beams})")
    p.add_argument("--ebss-expand", type=int, default=C.ebss_expand,
                   help=f"--sampler ebss: most likely next tokens each beam proposes per step (default {C.ebss_expand})")
    p.add_argument("--ebss-real", type=float, default=C.ebss_real,
                   help=f"--sampler ebss: share of the windows taken at random from the calibration text, the rest "
                        f"self-generated (default {C.ebss_real}: all generated, as MoEQuant; on the fixture 0.75 kept most "
                        f"of the other domains' gain at a cost of 0-0.2%% on the calibration domain, docs/calibration.md)")


def add_device_arg(p):
    p.add_argument("--device", default="auto",
                   help="where to run: auto (CUDA when available, else CPU), cpu, cuda or cuda:N; under torchrun "
                        "each process takes its local rank's GPU (default auto)")


def _fp_target(v: str):
    """--fp-target: 'auto' (None) or a strength."""
    if v == "auto":
        return None
    try:
        return float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {v!r}") from None


def add_quantize_args(q) -> None:
    """The `quantize` subcommand's arguments (its defaults come from QuantizeConfig and CalibConfig)."""
    q.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the built-in demo model)")
    q.add_argument("--out", default=None, help="output directory for the packed checkpoint (default: ./demo-w<bits>)")
    q.add_argument("--bits", type=_bits, default=Q.bits,
                   help=f"code bits per expert weight (default {Q.bits}); with --allocation lp the average code bits: "
                        "the byte budget is (B + the fp16 scale/zero bits per weight of the group size) x expert "
                        "params / 8, so --bits 2.5 --group-size 64 stores 3.0 bits/param, between uniform 2 (2.5) and 3 (3.5)")
    q.add_argument("--group-size", type=int, default=Q.group_size,
                   help="weights per scale along the input dimension (default 128, or the largest of 64/32/16 that divides)")
    q.add_argument("--method", choices=["gptq", "rtn", "ternary"], default=Q.method, help=f"quantizer (default {Q.method})")
    q.add_argument("--allocation", choices=["uniform", "lp"], default=Q.allocation, help="bit allocation across experts")
    q.add_argument("--plan", default=None, help="replay a plan.json (per-expert widths) from an earlier run")
    q.add_argument("--candidates", type=_widths, default=Q.candidates, metavar="B,B,...",
                   help="--allocation lp: the widths an expert may get, from 2,3,4,8, sub1 (ternary experts "
                        "dictionary-coded to 1 bit/weight, everything counted), ternary (dense, 1.6 bits/weight) and prune "
                        "(0 bytes: the expert and its router row leave; --bits is then stored bits per routed-expert parameter) "
                        "(default " + ",".join(map(str, Q.candidates)) + ")")
    q.add_argument("--budget", default=None, metavar="SIZE",
                   help="--allocation lp: the whole checkpoint on disk (24GB, 800MB, 1.5GiB or bytes; every file of the output "
                        "but run/); with prune among "
                        "--candidates, --bits is instead stored bits per routed-expert parameter (pruned experts at 0)")
    q.add_argument("--budget-scope", choices=["model", "layer"], default=Q.budget_scope,
                   help="--allocation lp: one byte budget for all experts (model) or one per MoE layer (default model)")
    q.add_argument("--min-bits", type=float, default=Q.min_bits, help="--allocation lp: narrowest width in every layer")
    q.add_argument("--max-bits", type=float, default=Q.max_bits, help="--allocation lp: widest width in every layer")
    q.add_argument("--top-two", action="store_true",
                   help="--allocation lp: every layer keeps at least one expert at each of its two widest widths (MC-MoE)")
    q.add_argument("--alpha", type=float, default=Q.alpha, help=f"--allocation lp: cost exponent of activation frequency (default {Q.alpha})")
    q.add_argument("--beta", type=float, default=Q.beta, help=f"--allocation lp: cost exponent of gate weight (default {Q.beta})")
    q.add_argument("--cost", choices=["fisher", "legacy"], default=None,
                   help="--allocation lp: the objective: fisher (each expert's output error weighted by the loss's "
                        "squared gradient, predicted nats per token) or legacy (phi^alpha w^beta eps) (default fisher)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=Q.act_order,
                   help="GPTQ: quantize columns by decreasing Hessian diagonal, groups on their static original-order "
                        "grids (default on; --no-act-order: natural column order)")
    q.add_argument("--percdamp", type=float, default=Q.percdamp, help=f"GPTQ relative damping (default {Q.percdamp})")
    q.add_argument("--sweeps", type=int, default=Q.sweeps, metavar="N",
                   help="GPTQ: coordinate-descent sweeps over the integer codes after GPTQ, each lowering the layer's "
                        "output error on the calibration inputs; 4 measured best at 2 bits; each costs 0.5-0.8x "
                        "GPTQ's own time on real expert shapes (default 0)")
    q.add_argument("--affinity", action="store_true", help="weight each token's Hessian term by its gate weight (AGQ)")
    q.add_argument("--ternary-threshold", type=float, default=Q.ternary_threshold,
                   help="--method ternary: weights with |w| < t * (hi - lo) become 0; more zeros, fewer bits "
                        "(default: searched per batch of experts so the sub-1-bit codes fit --bits; 0 at --bits 1.6)")
    q.add_argument("--hessian-prior", type=float, default=Q.hessian_prior, metavar="A",
                   help="add to each expert's GPTQ Hessian A x (input width) tokens' worth of the statistics it would "
                        "see on all of the layer's tokens: rarely routed experts lean on typical inputs instead of a "
                        f"handful of their own, and those under --min-tokens are GPTQ'd on it instead of rounded "
                        f"(default {Q.hessian_prior}: off)")
    q.add_argument("--all-tokens", type=float, default=Q.all_tokens, metavar="L",
                   help="blend into each expert's GPTQ Hessian every calibration token, weighted by the router's score "
                        "for that expert before top-k (softmax; DeepSeek-V3: sigmoid + correction bias); L = 1 gives "
                        "the all-token terms the layer's routed weight in total. Rarely or never routed experts get a "
                        "real Hessian (no round-to-nearest fallback); costs E expert forwards over all tokens "
                        f"(default {Q.all_tokens:g}: off)")
    q.add_argument("--fp-target", type=_fp_target, default=Q.fp_target, metavar="A|auto",
                   help="aim each expert's GPTQ at what the unquantized model computes on the same tokens, not at its "
                        "own weights on the already-quantized inputs: the target moves by A (0-1) times the "
                        "least-squares correction for the input error. Costs one more forward of each layer and a "
                        "second (K, K) matrix per expert (default auto: 1 for experts of 2 bits or fewer with at least 8 calibration tokens per expert "
                        "input on average, else 0). It fits the calibration text: pass 0 when that text is narrower "
                        "than what the model will run")
    q.add_argument("--min-tokens", type=int, default=Q.min_tokens,
                   help=f"experts with fewer routed calibration tokens fall back to round-to-nearest, or with "
                        f"--hessian-prior to GPTQ on their few tokens plus the prior (default {Q.min_tokens})")
    q.add_argument("--shared-bits", type=int, default=Q.shared_bits, choices=(0, 2, 3, 4, 8),
                   help="width of the shared experts (Qwen2-MoE, DeepSeek), GPTQ'd like the routed ones; 0 keeps "
                        "them dense (default: --bits when that is a uniform integer width, else 4)")
    q.add_argument("--router-bits", type=int, default=Q.router_bits, choices=(2, 3, 4, 8),
                   help="also GPTQ the router to this width (MoEQuant); the experts are then calibrated on the "
                        "quantized routing (default: router kept as it is)")
    q.add_argument("--symmetric", action="store_true",
                   help="symmetric integer grids (zero point at the grid's midpoint, scale from max|w|) for the routed "
                        "and shared experts: what `moecompress export --format compressed-tensors` needs")
    q.add_argument("--grid", choices=("minmax", "mse"), default=Q.grid,
                   help="how integer grids fit each group's range: min/max, or mse (the clipping of least rounding "
                        "error, |w - w_hat|^4, searched per group row; same format and size) (default %(default)s)")
    q.add_argument("--refit", type=int, default=Q.refit, metavar="T",
                   help="after GPTQ, refit each integer group's scale by Hessian-weighted least squares against the "
                        "layer's output error, T rounds (each further round re-runs GPTQ on the refit grid); codes, "
                        "zeros and format unchanged; keeps a copy of W and H per GPTQ call (default %(default)s: off)")
    q.add_argument("--rotate", action="store_true",
                   help="incoherence processing: quantize the routed experts in a randomized Hadamard basis of their "
                        "input dimension (signs stored per layer, ~no extra bytes; layers with ternary/sub1 experts "
                        "stay unrotated; not exportable to compressed-tensors)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    q.add_argument("--dry-run", action="store_true",
                   help="print the calibration coverage table and the run's predicted peak memory and decoder-layer "
                        "forwards, and stop (nothing is quantized)")
    add_calib_args(q)
    add_device_arg(q)
