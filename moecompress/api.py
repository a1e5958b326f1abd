"""The Python API: one function per CLI subcommand. The CLI only parses arguments and calls these."""
from __future__ import annotations

import logging
import os
import time

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


def calibration_windows(model_path: str, calib: CalibConfig) -> torch.Tensor:
    from .calibration import data
    tok = data.load_tokenizer(model_path)
    pool = data.token_pool(tok, data.parse_sources(list(calib.sources)))
    if calib.sampler == "random":
        return data.random_windows(pool, calib.nsamples, calib.seqlen, calib.seed)
    from .calibration import samplers  # balanced / ebss
    return samplers.sample(model_path, pool, calib)


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
        spec = QuantSpec("int", int(config.bits), gs, int_options(config.symmetric))
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


def _layer_record(d: dict):
    from .passes.quantize import LayerRecord
    d = dict(d)
    d["specs"] = {int(k): v for k, v in (d.get("specs") or {}).items()}  # JSON turned the int keys into str
    return LayerRecord(**d)


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
             progress: bool = True, resume: bool = False) -> dict:
    """Quantize the experts of checkpoint `model` (None: the built-in demo model) into packed dir `out`.

    One writer per output at a time; with resume=True a run still writing `out` is waited for, then
    continued from its last finished layer (or reported complete)."""
    from .packed import output_lock
    with output_lock(out, wait=resume):
        return _quantize(model, out, config, plan=plan, progress=progress, resume=resume)


def _quantize(model: str | None, out: str, config: QuantizeConfig, *, plan: str | None, progress: bool,
              resume: bool) -> dict:
    from .checkpoint import CheckpointReader
    from .layerwise import LayerStreamer, copy_tokenizer_files, find_experts
    from .packed import FORMAT_VERSION, PackedWriter, packed_entry, tensor_bytes
    from .passes.quantize import LayerEncoder, quantize_moe_layer
    from .quant.gptq import GPTQConfig
    from .validate import validate_checkpoint

    t_start = time.time()
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
        from .passes.allocate import Allocator  # LP bit allocation / replayed plan: checked from shapes here
        allocator = Allocator(reader, config, plan)
    else:
        specs = plan_specs(reader, config)
    _shared_widths(reader, config)  # the shared experts' group size, from shapes, before any weight is read
    with _progress(desc="checking weights", enabled=progress) as bar:
        validate_checkpoint(model, progress=bar).raise_if_bad()  # NaN/Inf, fp16 range: every tensor read once

    windows = calibration_windows(model, config.calib)
    if allocator is not None:  # LP: sensitivity pass on the original weights, then the integer program
        specs = allocator.specs(windows, progress)
    writer = PackedWriter(out, resume=resume, fingerprints=run_fingerprints(reader, config, specs, windows, plan))
    streamer = LayerStreamer(reader)
    bs = config.calib.batch_size
    kwargs = streamer.layer_kwargs(min(bs, len(windows)), windows.shape[1])
    records, expert_bytes = [], 0
    for rec in writer.completed:  # --resume: layers already done, their records and the activations after them
        expert_bytes += rec["expert_bytes"]
        if rec["record"] is not None:
            records.append(_layer_record(rec["record"]))
    if writer.completed:
        hidden = writer.load_hidden()
        log.info("resuming %s after layer %d", out, len(writer.completed) - 1)
    else:
        hidden = torch.cat([streamer.embed(windows[s:s + bs]) for s in range(0, len(windows), bs)])
    gcfg = GPTQConfig(config.percdamp, config.block_size, config.act_order)
    encoder = LayerEncoder(len(reader.moe_layers), reader.expert_params)  # holds the sub1 dictionary across layers
    encoder.restore_from(writer.tmp)
    arch = reader.arch
    bar = _progress(range(len(writer.completed), streamer.num_layers), desc="quantizing layers", enabled=progress)
    threads = torch.get_num_threads()
    if writer.threads != threads:  # the interrupted run's thread count, or the bytes would differ
        log.warning("resuming with %d torch threads, as the interrupted run used", writer.threads)
        torch.set_num_threads(writer.threads)
    try:
        for i in bar:
            layer = streamer.build_layer(i)
            tensors, entries, rec, layer_bytes = {}, [], None, 0
            skip = set()  # dense tensors stored packed instead (shared experts)
            router_w = None
            if i in reader.moe_layers:
                path = find_experts(layer)[0]
                if config.router_bits:  # before the experts: they are calibrated on the quantized routing
                    from .passes.router import quantize_router
                    router_w, router_rec = quantize_router(
                        streamer, layer, hidden, kwargs[i], arch, config.router_bits,
                        resolve_group_size(config.group_size, [reader.expert_shapes(i)["gate"][1]]), gcfg, bs)
                layer_specs = {e: specs[(i, e)] for e in range(reader.layer_num_experts(i))}
                packed, rec = quantize_moe_layer(streamer, layer, hidden, kwargs[i], layer_idx=i, specs=layer_specs,
                                                 method=config.method, gcfg=gcfg, affinity=config.affinity,
                                                 min_tokens=config.min_tokens, batch_size=bs, encoder=encoder,
                                                 hessian_prior=config.hessian_prior)
                for (e, p), pt in sorted(packed.items()):
                    name = f"{reader.prefix}.{i}.{path}.{e}.{p}"
                    for f, t in pt.tensors.items():
                        tensors[f"{name}.{f}"] = t
                    entries.append(packed_entry(name, pt, layer=i, expert=e, proj=p,
                                                fallback=e in rec.fallback and config.method != "rtn"))
                    layer_bytes += tensor_bytes(pt.tensors)
                shared = encoder.take_shared()  # the sub1 dictionary, stored once
                tensors.update(shared)
                layer_bytes += tensor_bytes(shared)
                if router_w is not None:
                    rec.router = router_rec
                shared_packed, rec.shared = _quantize_shared(streamer, layer, hidden, kwargs[i], reader, i, config,
                                                             gcfg, bs)
                for name, pt in sorted(shared_packed.items()):
                    for f, t in pt.tensors.items():
                        tensors[f"{name}.{f}"] = t
                    entries.append(packed_entry(name, pt, layer=i, module=name[len(f"{reader.prefix}.{i}."):]))
                    skip.add(arch.to_disk(f"{name}.weight"))
                records.append(rec)
                for k in reader.expert_keys_on_disk(i):  # expert biases (GPT-OSS) stay as they are
                    if k.endswith("_bias"):
                        tensors[k] = reader.get(k)
                bar.set_postfix_str(f"layer {i}: {rec.seconds:.1f}s")
            for k in reader.layer_keys(i):
                if not reader.is_expert_tensor(k) and k not in skip:
                    tensors[k] = reader.get(k)
            if router_w is not None:
                key = arch.to_disk(f"{reader.prefix}.{i}.{arch.router_mem}.weight")
                if key not in tensors:
                    raise MoeCompressError(f"--router-bits: the router weight {key!r} is not in layer {i}'s tensors")
                tensors[key] = router_w.to(tensors[key].dtype)
            hidden = streamer.run_layer(layer, hidden, kwargs[i], bs)
            expert_bytes += layer_bytes
            writer.commit_layer(i, f"layer-{i:05d}.safetensors", tensors, entries, hidden,
                                None if rec is None else dict(rec.__dict__), layer_bytes)
            del layer
    except KeyboardInterrupt:
        log.warning("interrupted after %d of %d layers: rerun the same command with --resume to continue",
                    len(writer.completed), streamer.num_layers)
        raise
    finally:
        torch.set_num_threads(threads)
    writer.write_shard("globals.safetensors", {k: reader.get(k) for k in reader.global_keys()})
    copy_tokenizer_files(reader.path, writer.tmp)

    shared = [s for r in records for s in r.shared]
    total_bytes = (sum(reader.tensors[k].nbytes for k in reader.tensors if not reader.is_expert_tensor(k)
                       or k.endswith("_bias")) + expert_bytes
                   + sum(s["bytes"] - s["dense_bytes"] for s in shared))
    bits = 8 * expert_bytes / reader.expert_params
    fallback = [[r.layer, e, r.tokens[e]] for r in records for e in r.fallback] if config.method != "rtn" else []
    qcfg = {"quant_method": "moecompress", "format_version": FORMAT_VERSION, "method": config.method,
            "bits": config.bits, "group_size": next(iter(specs.values())).group_size}
    cfg = dict(reader.config)
    cfg["quantization_config"] = qcfg
    manifest = {
        "format_version": FORMAT_VERSION, "family": arch.family, "method": config.method,
        "source": {"fingerprint": reader.fingerprint, "total_bytes": reader.total_bytes,
                   "expert_params": reader.expert_params, "expert_bytes": reader.expert_bytes},
        "expert_bits_per_param": round(bits, 6), "total_bytes": total_bytes, "source_total_bytes": reader.total_bytes,
        "expert_bytes": expert_bytes, "fallback_experts": fallback,
        "expert_bits": {f"{i}.{e}": s.label for (i, e), s in sorted(specs.items())},
    }
    seconds = time.time() - t_start
    summary = {"expert_bits_per_param": round(bits, 4), "source_bytes": reader.total_bytes, "packed_bytes": total_bytes,
               "compression": round(reader.total_bytes / total_bytes, 3), "seconds": round(seconds, 1),
               "fallback_experts": len(fallback), "out": os.path.abspath(out)}
    if shared:  # shared experts: packed beside the routed ones, outside the expert bits/param above
        summary["shared_experts"] = {"count": len(shared), "bits": sorted({s["bits"] for s in shared}),
                                     "bytes": sum(s["bytes"] for s in shared),
                                     "dense_bytes": sum(s["dense_bytes"] for s in shared)}
        manifest["shared_expert_bits"] = summary["shared_experts"]["bits"]
    run = {
        "run/run_config.json": {"model": reader.path, "config": config.to_json(), "format_version": FORMAT_VERSION},
        "run/plan.json": {"format_version": FORMAT_VERSION, "source_fingerprint": reader.fingerprint,
                          "experts": [{"layer": i, "expert": e, **s.to_json()} for (i, e), s in sorted(specs.items())]},
        "run/calibration.json": {"windows": list(windows.shape), "layers": [r.__dict__ for r in records]},
        "run/metrics.json": summary,
        "run/coverage.json": _coverage_json(records, windows, config),
    }
    limits = encoder.limits()  # ternary experts: the coder against the entropy bound
    if limits is not None:
        summary["ternary"] = limits
    if allocator is not None and allocator.record is not None:
        run["run/allocation.json"] = allocator.record
        summary["allocation"] = {k: allocator.record[k] for k in ("sensitivity_seconds", "solve_seconds", "status",
                                                                   "predicted_bits_per_param")}
    writer.finish(cfg, manifest, run)
    return summary


def _quantize_shared(streamer, layer, hidden, kwargs, reader, i: int, config: QuantizeConfig, gcfg, bs: int):
    """The shared experts of MoE layer i (if its family has them): ({name: PackedTensor}, records with bytes)."""
    from .packed import tensor_bytes
    from .passes.shared import quantize_shared_experts, shared_experts, shared_spec
    found = shared_experts(layer, reader.arch)
    if not found or config.shared_bits == 0:
        return {}, []
    widths = [w for _, mod, _ in found for w in (mod.gate_proj.in_features, mod.down_proj.in_features)]
    spec = shared_spec(config, _shared_group_size(config, widths, ", ".join(p for p, _, _ in found)))
    packed, recs = quantize_shared_experts(streamer, layer, hidden, kwargs, arch=reader.arch, layer_idx=i,
                                           prefix=reader.prefix, spec=spec, method=config.method, gcfg=gcfg,
                                           affinity=config.affinity, min_tokens=config.min_tokens, batch_size=bs)
    for rec in recs:
        names = [n for n in packed if n.startswith(f"{reader.prefix}.{i}.{rec['path']}.")]
        rec["bytes"] = sum(tensor_bytes(packed[n].tensors) for n in names)
        rec["dense_bytes"] = sum(reader.tensors[reader.arch.to_disk(f"{n}.weight")].nbytes for n in names)
    return packed, recs


def _shared_group_size(config: QuantizeConfig, widths: list[int], path: str) -> int:
    try:
        return resolve_group_size(config.group_size, widths)
    except MoeCompressError as e:
        raise MoeCompressError(f"shared expert {path}: {e} (or --shared-bits 0 to keep it dense)") from None


def _shared_widths(reader, config: QuantizeConfig) -> None:
    """Refuse a --group-size that does not divide a shared expert's widths, from the checkpoint's shapes."""
    if config.shared_bits == 0:
        return
    for i in reader.moe_layers:
        for path in reader.arch.shared_expert_paths:
            widths = [reader.tensors[k].shape[1] for p in ("gate_proj", "down_proj")
                      if (k := reader.arch.to_disk(f"{reader.prefix}.{i}.{path}.{p}.weight")) in reader.tensors]
            if widths:
                _shared_group_size(config, widths, path)


def _coverage_json(records, windows, config: QuantizeConfig) -> dict:
    from .calibration.stats import coverage_from_records
    recs = [r if isinstance(r, dict) else r.__dict__ for r in records]
    return coverage_from_records(recs, config.min_tokens, windows=windows.shape[0], seqlen=windows.shape[1],
                                 sampler=config.calib.sampler).to_json()


def calibration_stats(model: str | None, calib: CalibConfig = CalibConfig(), *, threshold: int = 16,
                      progress: bool = True):
    """Coverage of the calibration windows `calib` selects (tokens and gate mass per layer and expert),
    from a layer-streamed routing pass of the original model; nothing is quantized."""
    from .calibration import data, samplers
    from .calibration.routing import route_windows
    from .calibration.stats import coverage_from_routing
    model = model or builtin_model_path()
    tok = data.load_tokenizer(model)
    pool = data.token_pool(tok, data.parse_sources(list(calib.sources)))
    sel = samplers.select(model, pool, calib)
    routing = sel.routing
    if routing is None:
        with _progress(desc="routing", enabled=progress) as bar:
            routing = route_windows(model, sel.windows, calib.batch_size, bar)
    cov = coverage_from_routing(routing, threshold, seqlen=calib.seqlen, sampler=calib.sampler)
    return cov, sel.seconds


def evaluate(model: str, texts: list[str], *, seqlen: int = 256, max_tokens: int | None = None,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of an original or packed checkpoint on each text file."""
    from .calibration.data import load_tokenizer, read_source, tokenize
    from .evaluate import load_any, perplexity
    m = load_any(model)
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
           progress: bool = True) -> dict:
    """Size and accuracy of `compressed` against its original `baseline`: report.json/.md/.html and PNGs in `out`."""
    from .report.build import DEFAULT_TASKS, ReportConfig, build_report
    cfg = ReportConfig(tuple(texts), seqlen, max_tokens, prompts, new_tokens,
                       DEFAULT_TASKS if tasks is None else tuple(tasks), lm_eval_limit)
    return build_report(compressed, baseline, cfg, out, progress=progress)


def export(packed: str, out: str, *, format: str = "compressed-tensors") -> dict:
    """Write packed checkpoint `packed` in a serving format into `out` (compressed-tensors pack-quantized:
    uniform symmetric int4/int8 experts); what the format cannot represent is refused (moecompress/export/)."""
    from .export import export_checkpoint
    return export_checkpoint(packed, out, format)


def load(path: str, device: str = "cpu", dtype=None):
    from .runtime import load as _load
    return _load(path, device=device, dtype=dtype)
