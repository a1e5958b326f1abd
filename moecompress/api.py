"""The Python API: one function per CLI subcommand. The CLI only parses arguments and calls these."""
from __future__ import annotations

import logging
import os
import time

import torch

from .config import CalibConfig, QuantizeConfig, resolve_group_size
from .errors import CheckpointError, MoeCompressError

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
        spec = QuantSpec("ternary", 1, 0)
    else:
        spec = QuantSpec("int", int(config.bits), gs)
    for i in reader.moe_layers:  # shapes first: every option priced before a weight is read
        for p, shape in reader.expert_shapes(i).items():
            nbytes(shape, spec)
    return {(i, e): spec for i in reader.moe_layers for e in range(reader.layer_num_experts(i))}


def quantize(model: str | None, out: str, config: QuantizeConfig = QuantizeConfig(), *, plan: str | None = None,
             progress: bool = True, resume: bool = False) -> dict:
    """Quantize the experts of checkpoint `model` (None: the built-in demo model) into packed dir `out`."""
    from .checkpoint import CheckpointReader
    from .layerwise import LayerStreamer, copy_tokenizer_files, find_experts
    from .packed import FORMAT_VERSION, PackedWriter, packed_entry, tensor_bytes
    from .passes.quantize import quantize_moe_layer
    from .quant.gptq import GPTQConfig

    t_start = time.time()
    model = model or builtin_model_path()
    reader = CheckpointReader(model)
    if config.allocation == "lp" or plan:
        from .passes.allocate import allocation_specs  # LP bit allocation / replayed plan
        specs = allocation_specs(reader, config, plan)
    else:
        specs = plan_specs(reader, config)
    if os.path.exists(out):
        raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
    with _progress(total=len(reader.tensors), desc="checking weights", enabled=progress) as bar:
        problems = reader.check_values(progress=bar)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError("; ".join(problems[:3]) + more)

    windows = calibration_windows(model, config.calib)
    writer = PackedWriter(out, resume=resume)
    streamer = LayerStreamer(reader)
    bs = config.calib.batch_size
    kwargs = streamer.layer_kwargs(min(bs, len(windows)), windows.shape[1])
    hidden = torch.cat([streamer.embed(windows[s:s + bs]) for s in range(0, len(windows), bs)])
    gcfg = GPTQConfig(config.percdamp, config.block_size, config.act_order)
    records, expert_bytes = [], 0
    arch = reader.arch
    bar = _progress(range(streamer.num_layers), desc="quantizing layers", enabled=progress)
    for i in bar:
        layer = streamer.build_layer(i)
        tensors, entries = {}, []
        if i in reader.moe_layers:
            path = find_experts(layer)[0]
            layer_specs = {e: specs[(i, e)] for e in range(reader.layer_num_experts(i))}
            packed, rec = quantize_moe_layer(streamer, layer, hidden, kwargs[i], layer_idx=i, specs=layer_specs,
                                             method=config.method, gcfg=gcfg, affinity=config.affinity,
                                             min_tokens=config.min_tokens, batch_size=bs)
            for (e, p), pt in sorted(packed.items()):
                name = f"{reader.prefix}.{i}.{path}.{e}.{p}"
                for f, t in pt.tensors.items():
                    tensors[f"{name}.{f}"] = t
                entries.append(packed_entry(name, pt, layer=i, expert=e, proj=p,
                                            fallback=e in rec.fallback and config.method != "rtn"))
                expert_bytes += tensor_bytes(pt.tensors)
            records.append(rec)
            bias = reader.layer_expert_biases(i, torch.float32)
            for k in reader.expert_keys_on_disk(i):  # expert biases (GPT-OSS) stay as they are
                if k.endswith("_bias"):
                    tensors[k] = reader.get(k)
            bar.set_postfix_str(f"layer {i}: {rec.seconds:.1f}s")
        for k in reader.layer_keys(i):
            if not reader.is_expert_tensor(k):
                tensors[k] = reader.get(k)
        hidden = streamer.run_layer(layer, hidden, kwargs[i], bs)
        writer.write_shard(f"layer-{i:05d}.safetensors", tensors, entries)
        del layer
    writer.write_shard("globals.safetensors", {k: reader.get(k) for k in reader.global_keys()})
    copy_tokenizer_files(reader.path, writer.tmp)

    total_bytes = sum(reader.tensors[k].nbytes for k in reader.tensors if not reader.is_expert_tensor(k)
                      or k.endswith("_bias")) + expert_bytes
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
    run = {
        "run/run_config.json": {"model": reader.path, "config": config.to_json(), "format_version": FORMAT_VERSION},
        "run/plan.json": {"format_version": FORMAT_VERSION, "source_fingerprint": reader.fingerprint,
                          "experts": [{"layer": i, "expert": e, **s.to_json()} for (i, e), s in sorted(specs.items())]},
        "run/calibration.json": {"windows": list(windows.shape), "layers": [r.__dict__ for r in records]},
        "run/metrics.json": summary,
    }
    writer.finish(cfg, manifest, run)
    return summary


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


def load(path: str, device: str = "cpu", dtype=None):
    from .runtime import load as _load
    return _load(path, device=device, dtype=dtype)
