"""What a quantize run leaves besides its shards: config.json with quantization_config, the manifest's
figures, the summary printed to the user and the run files (run/run_config.json, plan.json,
calibration.json, metrics.json, coverage.json, allocation.json)."""
from __future__ import annotations

import os

import torch

from ..config import QuantizeConfig, resolve_group_size
from ..errors import MoeCompressError


def layer_record(d: dict):
    from .quantize import LayerRecord
    d = dict(d)
    d["specs"] = {int(k): v for k, v in (d.get("specs") or {}).items()}  # JSON turned the int keys into str
    return LayerRecord(**d)


def shared_group_size(config: QuantizeConfig, widths: list[int], path: str) -> int:
    try:
        return resolve_group_size(config.group_size, widths)
    except MoeCompressError as e:
        raise MoeCompressError(f"shared expert {path}: {e} (or --shared-bits 0 to keep it dense)") from None


def check_shared_widths(reader, config: QuantizeConfig) -> None:
    """Refuse a --group-size that does not divide a shared expert's widths, from the checkpoint's shapes."""
    if config.shared_bits == 0:
        return
    for i in reader.moe_layers:
        for path in reader.arch.shared_expert_paths:
            widths = [reader.tensors[k].shape[1] for p in ("gate_proj", "down_proj")
                      if (k := reader.arch.to_disk(f"{reader.prefix}.{i}.{path}.{p}.weight")) in reader.tensors]
            if widths:
                shared_group_size(config, widths, path)


def coverage_json(records, windows, config: QuantizeConfig) -> dict:
    from ..calibration.stats import coverage_from_records
    recs = [r if isinstance(r, dict) else r.__dict__ for r in records]
    return coverage_from_records(recs, config.min_tokens, windows=windows.shape[0], seqlen=windows.shape[1],
                                 sampler=config.calib.sampler).to_json()


def finish_run(writer, reader, config: QuantizeConfig, specs: dict, windows: torch.Tensor, records: list,
               expert_bytes: int, encoder, allocator, metrics: dict, seconds: float, device) -> dict:
    """Write config.json, the manifest and the run files, rename the output into place; -> the summary."""
    from ..device import peak_device_bytes, peak_rss_bytes
    from ..packed import FORMAT_VERSION
    arch = reader.arch
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
        "int_grids": sorted({"symmetric" if s.option("sym") else "asymmetric" for s in specs.values() if s.codec == "int"}),
        "int_grid_fit": sorted({"mse" if s.option("grid") == "mse" else "minmax" for s in specs.values() if s.codec == "int"}),
    }
    if config.rotate:  # --rotate: which MoE layers carry sign vectors `<experts>.rotation_{gate_up,down}`
        rotated = sorted(r.layer for r in records if r.rotated)
        from ..quant.hadamard import CONSTRUCTION
        manifest["rotation"] = {"method": "randomized-hadamard", "hadamard": CONSTRUCTION, "layers": rotated,
                                "unrotated": sorted(r.layer for r in records if not r.rotated)}
    summary = {"expert_bits_per_param": round(bits, 4), "source_bytes": reader.total_bytes, "packed_bytes": total_bytes,
               "compression": round(reader.total_bytes / total_bytes, 3), "seconds": round(seconds, 1),
               "fallback_experts": len(fallback), "out": os.path.abspath(writer.out)}
    if shared:  # shared experts: packed beside the routed ones, outside the expert bits/param above
        summary["shared_experts"] = {"count": len(shared), "bits": sorted({s["bits"] for s in shared}),
                                     "bytes": sum(s["bytes"] for s in shared),
                                     "dense_bytes": sum(s["dense_bytes"] for s in shared)}
        manifest["shared_expert_bits"] = summary["shared_experts"]["bits"]
    metrics = dict(metrics)
    metrics["memory"] = dict(metrics["memory"], peak_rss_bytes=peak_rss_bytes())
    dev_peak = peak_device_bytes(device)
    if dev_peak is not None:
        metrics["memory"]["peak_device_bytes"] = dev_peak
    run_metrics = dict(summary, **metrics)
    run = {
        "run/run_config.json": {"model": reader.path, "config": config.to_json(), "format_version": FORMAT_VERSION},
        "run/plan.json": {"format_version": FORMAT_VERSION, "source_fingerprint": reader.fingerprint,
                          "experts": [{"layer": i, "expert": e, **s.to_json()} for (i, e), s in sorted(specs.items())]},
        "run/calibration.json": {"windows": list(windows.shape), "layers": [r.__dict__ for r in records]},
        "run/metrics.json": run_metrics,
        "run/coverage.json": coverage_json(records, windows, config),
    }
    limits = encoder.limits()  # ternary experts: the coder against the entropy bound
    if limits is not None:
        summary["ternary"] = limits
        run_metrics["ternary"] = limits
    if allocator is not None and allocator.record is not None:
        run["run/allocation.json"] = allocator.record
        summary["allocation"] = {k: allocator.record[k] for k in ("sensitivity_seconds", "solve_seconds", "status",
                                                                   "predicted_bits_per_param")}
        run_metrics["allocation"] = summary["allocation"]
    writer.finish(cfg, manifest, run)
    return summary
