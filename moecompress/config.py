"""Run configurations: frozen dataclasses validated on construction, persisted with a format_version.

The CLI takes its defaults from here, so the two cannot drift.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import MoeCompressError

FORMAT_VERSION = 1
METHODS = ("gptq", "rtn", "ternary")
SAMPLERS = ("random", "balanced", "ebss")
BALANCE_OBJECTIVES = ("sqrt", "entropy", "log")  # --sampler balanced: calibration/samplers.py
ALLOCATIONS = ("uniform", "lp")
GRIDS = ("minmax", "mse")  # --grid (quant/grids.py GRIDS)
CANDIDATES = (2, 3, 4, 8, "sub1", "ternary", "prune")  # --allocation lp widths; sub1: ternary experts coded to
# 1 bit/weight, all counted; ternary: dense ternary codes, 5 weights per byte (1.6 bits) plus per-row levels


@dataclass(frozen=True)
class CalibConfig:
    sources: tuple[str, ...] = ()   # empty: the built-in mixed-domain text
    nsamples: int = 128
    seqlen: int = 256
    seed: int = 0
    sampler: str = "random"
    batch_size: int = 8              # windows per accumulation chunk: fixes the order Hessians are summed in
    forward_tokens: int = 4096       # tokens per forward call of a decoder layer (whole chunks; at least one)
    ebss_tau: float = 1.2            # --sampler ebss: score = NLL + std of log expert usage / tau (MoEQuant's tau)
    ebss_beams: int = 4              # --sampler ebss: beam width
    ebss_expand: int = 8             # --sampler ebss: candidates proposed per beam and step
    ebss_real: float = 0.0           # --sampler ebss: share of windows taken from the real text, the rest generated
    balance_objective: str = "sqrt"  # --sampler balanced: what the greedy window selection maximizes

    def __post_init__(self):
        if self.nsamples < 1:
            raise MoeCompressError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 8:
            raise MoeCompressError(f"--seqlen must be at least 8, got {self.seqlen}")
        if self.batch_size < 1 or self.forward_tokens < 1:
            raise MoeCompressError(f"batch_size and forward_tokens must be positive, got {self.batch_size}, "
                                   f"{self.forward_tokens}")
        if not self.ebss_tau > 0 or self.ebss_beams < 1 or self.ebss_expand < 1:
            raise MoeCompressError(f"--ebss-tau must be positive and --ebss-beams, --ebss-expand at least 1, got "
                                   f"{self.ebss_tau}, {self.ebss_beams}, {self.ebss_expand}")
        if not 0.0 <= self.ebss_real < 1.0:
            raise MoeCompressError(f"--ebss-real is the share of real windows beside the generated ones, in [0, 1); "
                                   f"got {self.ebss_real}")
        if self.sampler not in SAMPLERS:
            raise MoeCompressError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.balance_objective not in BALANCE_OBJECTIVES:
            raise MoeCompressError(f"unknown balance objective {self.balance_objective!r}; choose one of "
                                   f"{', '.join(BALANCE_OBJECTIVES)}")


@dataclass(frozen=True)
class QuantizeConfig:
    bits: float = 4
    group_size: int | None = None    # None: 128, or the largest of 64/32/16 dividing every expert width
    method: str = "gptq"
    allocation: str = "uniform"
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = True           # GPTQ columns by decreasing Hessian diagonal, static groups (issue 21: the default)
    sweeps: int = 0                  # coordinate-descent sweeps over GPTQ's integer codes (quant/coord.py); opt-in:
    # better at 2 bits on the validation split, but several times GPTQ's own time on real expert shapes
    affinity: bool = False           # AGQ: weight each token's Hessian term by its gate weight
    min_tokens: int = 16             # fewer routed tokens than this: round-to-nearest (GPTQ on the prior with hessian_prior)
    hessian_prior: float = 0.0       # a > 0: each expert's Hessian + a * K tokens' worth of its all-token statistics
    all_tokens: float = 0.0          # L > 0: each expert's Hessian + L x (layer-normalized) every token weighted by
    # its router score before top-k (passes/calibrate.py); 0: routed tokens only
    fp_target: float | None = None   # A > 0: GPTQ aims each expert at the full-precision model's output on its tokens
    # (quant/target.py): the target moves by A x the least-squares correction for its already-perturbed inputs.
    # None ("auto", the default): 1 for integer experts of 2 bits or fewer, 0 above (neutral at 3 and 4 bits on the
    # validation split; docs/calibration.md)
    router_bits: int | None = None   # MoEQuant: GPTQ the router too (2/3/4/8), routing recomputed with it
    symmetric: bool = False          # symmetric integer grids (zero at 2^(b-1), scale from max|w|): routed and
    # shared experts; what compressed-tensors' symmetric pack-quantized stores (`moecompress export`)
    grid: str = "mse"                # how integer grids fit each group's range: "mse" (the clipping of least
    # rounding error, quant/grids.py; the default) or "minmax"; same format and size. Every integer grid of the
    # run: routed experts (uniform or LP candidates) and shared experts
    refit: int = 0                   # --refit T: after GPTQ, T rounds of Hessian-weighted least-squares refits of the
    # integer grids' scales (quant/refit.py; zeros, codes and format unchanged); 0: off
    rotate: bool = False             # --rotate: randomized Hadamard rotation of the routed experts' input dimension
    # before GPTQ (incoherence processing, quant/hadamard.py); signs stored per layer in the packed checkpoint
    shared_bits: int | None = None   # shared experts' width (2/3/4/8; 0 keeps them dense); None: --bits when
    # that is a uniform integer width, else 4 (passes/shared.py)
    ternary_threshold: float | None = None  # --method ternary: dead zone |w| < t * (hi - lo) codes to 0;
    # None: searched per batch of experts to fit the --bits budget (sub1), or 0 for dense ternary
    # --allocation lp (see moecompress.allocation.AllocationConfig): bits is the average CODE bits per expert
    # weight; the byte budget adds the int codec's scale/zero overhead at the group size (2.5 @ g64 -> 3.0 stored)
    candidates: tuple = (2, 3, 4)    # ints and/or "sub1", "ternary", "prune"
    budget_scope: str = "model"      # "model": one budget for all experts; "layer": one per MoE layer
    budget: str | None = None        # --budget 24GB: the whole checkpoint on disk (passes/joint.py); with "prune"
    # among the candidates --bits is stored bits per routed-expert parameter, pruned experts at 0
    min_bits: float | None = None    # per-layer bounds on an expert's width
    max_bits: float | None = None
    top_two: bool = False            # MC-MoE: every layer keeps an expert at each of its two widest widths
    alpha: float = 1.0               # cost = phi^alpha * w^beta * eps(b)
    beta: float = 1.5
    cost: str | None = None          # --allocation lp objective: "fisher", loss-weighted costs (allocation/fisher.py), or
    # "legacy", phi^alpha w^beta eps; None: fisher (it ranks plans as perplexity does, benchmarks/cost_model.py; the
    # prune candidate is priced on either scale, passes/prune_cost.py, and wins with fisher: benchmarks/joint_budget.py)
    calib: CalibConfig = field(default_factory=CalibConfig)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise MoeCompressError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.allocation not in ALLOCATIONS:
            raise MoeCompressError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if self.method == "ternary":
            if not (0.3 <= self.bits < 1.6 or self.bits == 1.6):
                raise MoeCompressError(f"--method ternary takes --bits 1.6 (dense ternary, 5 weights per byte) or a "
                                       f"budget B in [0.3, 1.6) bits per weight (dictionary-coded), got {self.bits:g}")
        elif self.allocation == "uniform" and self.bits not in (2, 3, 4, 8):
            hint = " (fractional budgets need --allocation lp)" if self.bits != int(self.bits) else ""
            raise MoeCompressError(f"unsupported bit width {self.bits:g}: choose 2, 3, 4 or 8{hint}")
        if self.allocation == "lp" and not 1 <= self.bits <= 8:
            raise MoeCompressError(f"--bits {self.bits:g} is not a usable average budget: use a value between 1 and 8 (below 2 needs sub1, ternary or prune among --candidates)")
        if self.group_size is not None and self.group_size < 1:
            raise MoeCompressError(f"--group-size must be positive, got {self.group_size}")
        if not 0 <= self.percdamp < 1:
            raise MoeCompressError(f"--percdamp must be in [0, 1), got {self.percdamp}")
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, int) or not 0 <= self.sweeps <= 16:
            raise MoeCompressError(f"--sweeps must be an integer from 0 to 16, got {self.sweeps}")
        if self.ternary_threshold is not None and not 0 <= self.ternary_threshold < 0.5:
            raise MoeCompressError(f"--ternary-threshold must be in [0, 0.5), got {self.ternary_threshold}")
        if self.shared_bits is not None and (isinstance(self.shared_bits, bool) or self.shared_bits not in (0, 2, 3, 4, 8)):
            raise MoeCompressError(f"--shared-bits must be 0 (keep dense), 2, 3, 4 or 8, got {self.shared_bits}")
        if self.router_bits is not None and (isinstance(self.router_bits, bool) or self.router_bits not in (2, 3, 4, 8)):
            raise MoeCompressError(f"--router-bits must be 2, 3, 4 or 8, got {self.router_bits}")
        if not self.hessian_prior >= 0:
            raise MoeCompressError(f"--hessian-prior must be >= 0, got {self.hessian_prior}")
        if not (self.all_tokens >= 0 and self.all_tokens < float("inf")):
            raise MoeCompressError(f"--all-tokens must be a finite weight >= 0, got {self.all_tokens}")
        if self.fp_target is not None and not (0 <= self.fp_target <= 1):
            raise MoeCompressError(f"--fp-target must be in [0, 1], got {self.fp_target}")
        if self.min_tokens < 0:
            raise MoeCompressError(f"--min-tokens must be >= 0, got {self.min_tokens}")
        if self.symmetric and (self.method == "ternary" or self.allocation != "uniform"):
            raise MoeCompressError("--symmetric applies to uniform integer widths (--method gptq or rtn, --bits 2/3/4/8 "
                                   "without --allocation lp); drop --symmetric or those options")
        if self.grid not in GRIDS:
            raise MoeCompressError(f"unknown --grid {self.grid!r}; choose one of {', '.join(GRIDS)}")
        if isinstance(self.refit, bool) or not isinstance(self.refit, int) or not 0 <= self.refit <= 8:
            raise MoeCompressError(f"--refit is a number of rounds from 0 (off) to 8, got {self.refit}")
        if self.rotate and self.method == "ternary":
            raise MoeCompressError("--rotate applies to integer codes (ternary codes live on the zeros a rotation would "
                                   "spread): use --method gptq or rtn, or drop --rotate")
        if self.allocation == "lp" and self.method == "ternary":
            raise MoeCompressError("--allocation lp chooses among integer widths: use --method gptq or rtn")
        if self.cost is None:
            object.__setattr__(self, "cost", "fisher")
        if self.cost not in ("fisher", "legacy"):
            raise MoeCompressError(f"--cost must be fisher or legacy, got {self.cost!r}")
        if self.budget_scope not in ("model", "layer"):
            raise MoeCompressError(f"--budget-scope must be model or layer, got {self.budget_scope!r}")
        if (self.budget is not None or "prune" in self.candidates) and (self.allocation != "lp" or self.budget_scope != "model"):
            raise MoeCompressError("--budget and the prune candidate need --allocation lp with one model-wide budget "
                                   "(--budget-scope model)")
        if self.budget is not None:
            from .allocation.joint import parse_size
            parse_size(self.budget)  # one line on a bad size, before anything is read
        if not self.candidates or any(isinstance(b, bool) or b not in CANDIDATES for b in self.candidates):
            raise MoeCompressError(f"--candidates must list widths from 2, 3, 4, 8, sub1 (ternary, dictionary-coded "
                                   f"to 1 bit per weight with everything counted), ternary (dense, 1.6 bits) and prune (0 bytes), "
                                   f"e.g. sub1,2,3 or prune,ternary,2,3,4; "
                                   f"got {self.candidates}")

    def to_json(self) -> dict:
        return asdict(self)


def resolve_group_size(requested: int | None, widths: list[int]) -> int:
    """The group size to use for expert input widths `widths` (all must be divisible)."""
    if requested is not None:
        bad = sorted({k for k in widths if k % requested})
        if bad:
            raise MoeCompressError(f"group size {requested} does not divide the expert input dimension {bad[0]}; "
                                   f"choose a divisor of {bad[0]} such as " +
                                   ", ".join(str(g) for g in (128, 64, 32, 16) if all(k % g == 0 for k in widths)))
        return requested
    for g in (128, 64, 32, 16, 8):
        if all(k % g == 0 for k in widths):
            return g
    raise MoeCompressError(f"no group size in 128/64/32/16/8 divides the expert widths {sorted(set(widths))}; pass --group-size")


AUTO_FP_TARGET_BITS = 2  # --fp-target auto: on for integer experts this narrow or narrower
AUTO_FP_TARGET_TOKENS = 8  # ... and where an expert's mean calibration tokens reach this many per input of its widest projection


def fp_strength(config, spec, tokens_per_input: float | None = None) -> float:
    """--fp-target's strength for experts stored as `spec` (quant/target.py): the option's value, or with auto
    (None) 1 for integer codecs of at most AUTO_FP_TARGET_BITS bits whose layer gives an expert on average at
    least AUTO_FP_TARGET_TOKENS calibration tokens per input of its widest projection (`tokens_per_input`; the
    cross term D is a (K, K) estimate, and from few tokens it fits their noise), 0 otherwise; 0 for
    round-to-nearest."""
    if config.method == "rtn":
        return 0.0
    if config.fp_target is not None:
        return float(config.fp_target)
    enough = tokens_per_input is None or tokens_per_input >= AUTO_FP_TARGET_TOKENS
    return 1.0 if spec.codec == "int" and spec.bits <= AUTO_FP_TARGET_BITS and enough else 0.0


def tokens_per_input(reader, layer: int, tokens: int) -> float:
    """Mean routed calibration tokens of an expert of MoE layer `layer` (tokens x top-k / experts) per input of its
    widest projection: what --fp-target auto asks to be at least AUTO_FP_TARGET_TOKENS."""
    k = int(reader.config.get("num_experts_per_tok") or reader.config.get("moe_topk") or 1)
    shapes = reader.expert_shapes(layer)
    return tokens * k / reader.layer_num_experts(layer) / max(s[1] for s in shapes.values())


def fp_target_possible(config, reader=None) -> bool:
    """Whether --fp-target can act anywhere in a quantize run, from its options and shapes alone (`quantize
    --dry-run`): a strength given, or under auto an integer width of at most AUTO_FP_TARGET_BITS (the uniform --bits
    or, with --allocation lp, a candidate width) and, given the checkpoint's reader, a MoE layer with enough
    calibration tokens per expert input (`tokens_per_input`)."""
    if config.method == "rtn":
        return False
    if config.fp_target is not None:
        return config.fp_target > 0
    if config.method == "ternary":
        return False
    widths = [c for c in config.candidates if isinstance(c, int)] if config.allocation == "lp" else [config.bits]
    if not any(w <= AUTO_FP_TARGET_BITS for w in widths):
        return False
    tokens = config.calib.nsamples * config.calib.seqlen
    return reader is None or any(tokens_per_input(reader, i, tokens) >= AUTO_FP_TARGET_TOKENS for i in reader.moe_layers)

