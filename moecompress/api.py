"""The Python API: one function per CLI subcommand. The CLI only parses arguments and calls these."""
from __future__ import annotations

import logging
import os

import torch

from .config import CalibConfig, QuantizeConfig, resolve_group_size
from .errors import MoeCompressError

log = logging.getLogger("moecompress")


def _progress(iterable=None, total=None, desc=None, enabled=True):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def builtin_model_path() -> str:
    from importlib import resources
    return str(resources.files("moecompress.data") / "demo-model")


def calibration_windows(model_path: str, calib: CalibConfig, device="cpu") -> torch.Tensor:
    from .calibration import data
    tok = data.load_tokenizer(model_path)
    pool = data.token_pool(tok, data.parse_sources(list(calib.sources)))
    if calib.sampler == "random":
        return data.random_windows(pool, calib.nsamples, calib.seqlen, calib.seed)
    from .calibration import samplers  # balanced / ebss
    return samplers.sample(model_path, pool, calib, device)


def plan_specs(reader, config: QuantizeConfig) -> dict:
    """{(layer, expert): QuantSpec} for a uniform plan; validated on shapes before any weight is read."""
    from .arch import PROJS
    from .codecs import QuantSpec, nbytes
    widths = [reader.expert_shapes(i)[p][1] for i in reader.moe_layers for p in PROJS]
    gs = resolve_group_size(config.group_size, widths)
    if config.method == "ternary":
        if config.bits == 1.6:  # dense ternary: 5 weights per byte whatever the sparsity, so the least-error
            # levels (Lloyd "mse" fit, no extra dead zone): half the error of min-max levels (measured)
            t = 0.0 if config.ternary_threshold is None else config.ternary_threshold
            spec = QuantSpec("ternary", 1, 0, (("fit", "mse"), ("threshold", t)))
        elif config.ternary_threshold is None:  # sub1 under a budget: the threshold is searched
            spec = QuantSpec("sub1", 1, 0, (("target_bits", float(config.bits)),))
        else:
            spec = QuantSpec("sub1", 1, 0, (("threshold", config.ternary_threshold),))
    else:
        from .quant.grids import int_options
        spec = QuantSpec("int", int(config.bits), gs, int_options(config.symmetric, config.grid))
    for i in reader.moe_layers:  # shapes first: every option priced before a weight is read
        for p, shape in reader.expert_shapes(i).items():
            nbytes(shape, spec)
    return {(i, e): spec for i in reader.moe_layers for e in range(reader.layer_num_experts(i))}


def validate_input(model: str, progress: bool = True) -> None:
    """Structural checks (files, headers, shapes against config.json); on a problem, every problem at once."""
    from .validate import validate_checkpoint
    if not validate_checkpoint(model, check_values=False).ok:  # cheap; the full scan adds value problems
        with _progress(desc="checking weights", enabled=progress) as bar:
            validate_checkpoint(model, progress=bar).raise_if_bad()


def run_fingerprints(reader, config: QuantizeConfig, specs: dict, windows: torch.Tensor, plan: str | None) -> dict:
    """What a resumed run must share with the interrupted one: input, plan, options, calibration tokens."""
    import hashlib
    import json

    from . import __version__

    def h(obj) -> str:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
        return hashlib.sha256(data).hexdigest()[:32]
    return {"input": reader.fingerprint,
            "plan": h([[i, e, s.to_json()] for (i, e), s in sorted(specs.items())]),
            "options": h({"config": config.to_json(), "plan_file": plan, "moecompress": __version__,
                          "torch": torch.__version__}),
            "calibration tokens": h(windows.to(torch.int64).contiguous().numpy().tobytes())}


def _existing_output(out: str, model: str, config: QuantizeConfig) -> dict | None:
    """--resume on a run that already finished: its summary, if it was made from the same input and options."""
    import json

    from .packed import MANIFEST
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            fp = json.load(f)["source"]["fingerprint"]
        with open(os.path.join(out, "run", "run_config.json")) as f:
            same = json.load(f)["config"] == json.loads(json.dumps(config.to_json()))
        with open(os.path.join(out, "run", "metrics.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from .checkpoint import CheckpointReader
    if same and fp == CheckpointReader(model).fingerprint:
        log.warning("%s is already complete (same input and options): nothing to resume", out)
        return summary
    return None


def quantize(model: str | None, out: str, config: QuantizeConfig = QuantizeConfig(), *, plan: str | None = None,
             progress: bool = True, resume: bool = False, device: str = "auto") -> dict:
    """Quantize the experts of checkpoint `model` (None: the built-in demo model) into packed dir `out`.

    device: auto|cpu|cuda|cuda:N. Under torchrun every process runs this with the same arguments; the work
    is split across them and rank 0 writes (passes/pipeline.py). One writer per output at a time; with
    resume=True a run still writing `out` is waited for, then continued from its last finished layer (or
    reported complete)."""
    from .distributed import from_env
    from .packed import output_lock
    dist, dev = from_env(device)
    if not dist.main:  # rank 0 reports: the others keep to errors
        log.setLevel(logging.ERROR)
        return _quantize(model, out, config, plan=plan, progress=False, resume=resume, dist=dist, device=dev)
    with output_lock(out, wait=resume):
        return _quantize(model, out, config, plan=plan, progress=progress, resume=resume, dist=dist, device=dev)


def _quantize(model: str | None, out: str, config: QuantizeConfig, *, plan: str | None, progress: bool,
              resume: bool, dist, device) -> dict:
    from .checkpoint import CheckpointReader
    from .passes.outputs import check_shared_widths
    from .passes.pipeline import quantize_checkpoint
    from .validate import validate_checkpoint

    model = model or builtin_model_path()
    done = _existing_output(out, model, config) if resume else None
    if done is not None:
        return done
    if os.path.exists(out):
        raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
    validate_input(model, progress)
    reader = CheckpointReader(model)
    allocator = None
    if config.allocation == "lp" or plan:
        from .passes.joint import make_allocator  # LP widths (and pruning) / replayed plan: checked from shapes here
        allocator = make_allocator(reader, config, plan, device)
    else:
        specs = plan_specs(reader, config)
    check_shared_widths(reader, config)  # the shared experts' group size, from shapes, before any weight is read
    with _progress(desc="checking weights", enabled=progress) as bar:
        validate_checkpoint(model, progress=bar).raise_if_bad()  # NaN/Inf, fp16 range: every tensor read once

    windows = calibration_windows(model, config.calib, device)
    if allocator is not None:  # LP: sensitivity pass on the original weights, then the integer program
        specs = allocator.specs(windows, progress)
        if "prune" in specs.values():  # joint plan: the pruned experts leave, the rest are packed (passes/joint.py)
            from .passes.joint import quantize_pruned
            return _check_budget(out, config, quantize_pruned(
                reader, out, config, specs, windows, plan=plan, allocator=allocator, progress=progress, dist=dist,
                device=device))
    return _check_budget(out, config, quantize_checkpoint(
        reader, out, config, specs, windows, fingerprints=run_fingerprints(reader, config, specs, windows, plan),
        allocator=allocator, resume=resume, progress=progress, dist=dist, device=device))


def _check_budget(out: str, config: QuantizeConfig, summary: dict) -> dict:
    """--budget: the output directory's size as --budget counts it (every file but run/), in the summary; a
    checkpoint over the budget (the metadata bound failed) is logged, never silent."""
    if getattr(config, "budget", None) is None or not os.path.isdir(out):
        return summary
    from .allocation.joint import parse_size
    from .passes.disk import directory_bytes
    size, budget = directory_bytes(out), parse_size(config.budget)
    summary["directory_bytes"] = size
    if size > budget:
        log.warning("the output takes %d bytes, %d over --budget %s (the metadata bound of passes/disk.py fell "
                    "short)", size, size - budget, config.budget)
    return summary


def calibration_stats(model: str | None, calib: CalibConfig = CalibConfig(), *, threshold: int = 16,
                      progress: bool = True, device: str = "auto"):
    """Coverage of the calibration windows `calib` selects (tokens and gate mass per layer and expert),
    from a layer-streamed routing pass of the original model; nothing is quantized."""
    from .calibration import data, samplers
    from .device import resolve_device
    from .calibration.routing import route_windows
    from .calibration.stats import coverage_from_routing
    model = model or builtin_model_path()
    tok = data.load_tokenizer(model)
    pool = data.token_pool(tok, data.parse_sources(list(calib.sources)))
    sel = samplers.select(model, pool, calib, device=resolve_device(device))
    routing = sel.routing
    if routing is None:
        with _progress(desc="routing", enabled=progress) as bar:
            routing = route_windows(model, sel.windows, calib.batch_size, bar, device=device)
    cov = coverage_from_routing(routing, threshold, seqlen=calib.seqlen, sampler=calib.sampler)
    return cov, sel.seconds


def evaluate(model: str, texts: list[str], *, seqlen: int = 256, max_tokens: int | None = None,
             batch_size: int = 8, progress: bool = True, device: str = "auto") -> dict:
    """Perplexity of an original or packed checkpoint on each text file, computed on `device`."""
    from .calibration.data import load_tokenizer, read_source, tokenize
    from .evaluate import load_any, perplexity
    m = load_any(model, device=device)
    tok = load_tokenizer(model)
    results = {}
    for t in texts:
        ids = tokenize(tok, read_source(t))
        if max_tokens:
            ids = ids[:max_tokens]
        with _progress(total=len(ids) // seqlen, desc=f"eval {os.path.basename(t)}", enabled=progress) as bar:
            results[t] = perplexity(m, ids, seqlen, batch_size, bar)
    return results


def report(compressed: str, baseline: str, texts: list[str], out: str, *, seqlen: int = 256, max_tokens: int | None = None,
           prompts: int = 4, new_tokens: int = 32, tasks: tuple[str, ...] | None = None, lm_eval_limit: int | None = 200,
           progress: bool = True, device: str = "auto") -> dict:
    """Size and accuracy of `compressed` against its original `baseline`: report.json/.md/.html and PNGs in `out`."""
    from .report.build import DEFAULT_TASKS, ReportConfig, build_report
    cfg = ReportConfig(tuple(texts), seqlen, max_tokens, prompts, new_tokens,
                       DEFAULT_TASKS if tasks is None else tuple(tasks), lm_eval_limit, device=device)
    return build_report(compressed, baseline, cfg, out, progress=progress)


def export(packed: str, out: str, *, format: str = "compressed-tensors") -> dict:
    """Write packed checkpoint `packed` in a serving format into `out` (compressed-tensors pack-quantized:
    uniform symmetric int4/int8 experts); what the format cannot represent is refused (moecompress/export/)."""
    from .export import export_checkpoint
    return export_checkpoint(packed, out, format)


def load(path: str, device: str = "cpu", dtype=None):
    from .runtime import load as _load
    return _load(path, device=device, dtype=dtype)


def predict_run(model: str | None, config: QuantizeConfig = QuantizeConfig(), device: str = "auto"):
    """What `quantize` will cost (decoder-layer forwards, peak memory by part), from shapes alone."""
    from .checkpoint import CheckpointReader
    from .device import resolve_device
    from .passes.predict import predict
    return predict(CheckpointReader(model or builtin_model_path()), config, resolve_device(device))
