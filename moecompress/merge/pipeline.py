"""`run_merge`: reduce the experts of a checkpoint, layer by layer, and write the result.

Pass 1 (only for --ratio) streams the original model one decoder layer at a time and collects routing
statistics to choose per-layer counts (counts.py). The reducing pass then streams the layers again:
a pre-hook on each MoE layer's experts module sees the exact hidden states, top-k indices and
weights the family's own router produced, `compute_layer_stats` turns them into a `LayerStats`, the
layer is reduced, and the *reduced* layer's outputs feed the next layer (sequential calibration).

Output: a Hugging Face checkpoint directory with per-expert tensors under the source's own disk names
(or fused, when the source is fused), router rows reduced to the kept experts, and the config's
expert count set to K. With --experts K every MoE layer has K experts and plain transformers loads
it. With --ratio R the counts differ per layer; config.json then carries a "moecompress_merge" entry
(experts per layer, expert map) and `loader.load_merged` (behind moecompress.load) builds it.
run/merge_record.json records, per layer, which experts merged into which or were dropped, with usage.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

import torch

from ..config import CalibConfig
from ..errors import MoeCompressError
from . import METHODS, reduce_layer
from .counts import allocate_counts, importance, routing_floor
from .stats import LayerStats, combine, compute_layer_stats

log = logging.getLogger("moecompress")
FORMAT_VERSION = 1


def _router(layer, arch):
    try:
        return layer.get_submodule(arch.router_mem)
    except AttributeError:
        raise MoeCompressError(f"{arch.family}: router {arch.router_mem!r} not found in the decoder layer") from None


def _on(device: torch.device):
    """New tensors of the merge math on `device`: its statistics and solvers allocate without naming one."""
    import contextlib
    return device if device.type == "cuda" else contextlib.nullcontext()


def _stack(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """MoEExperts dense weights -> gate_up (E, 2I, H), down (E, H, I)."""
    gu = torch.stack([torch.cat([w["gate"], w["up"]]) for w in experts.weights])  # E x (2I, H)
    dn = torch.stack([w["down"] for w in experts.weights])  # E x (H, I)
    return gu, dn


def _layer_stats(cache, router, experts, max_router_samples, max_output_tokens=4096) -> LayerStats:
    """Statistics of a layer from its MoE cache (what its experts module received, chunk by chunk)."""
    gu, dn = _stack(experts)
    acc: list[LayerStats] = []
    per_batch = max(16, max_output_tokens // max(1, len(cache.chunks)))  # HC-SMoE's sample, spread over chunks
    for c in cache.chunks:
        x, idx, w = (t.to(cache.device) for t in (c.x, c.idx, c.w))
        logits = torch.nn.functional.linear(x.float(), router.weight.float(),
                                            None if getattr(router, "bias", None) is None else router.bias.float())
        acc.append(compute_layer_stats(x, logits, idx, w, gu, dn, max_output_tokens=per_batch,
                                       max_router_samples=max_router_samples))
    return combine(acc)


def run_merge(source: str, out: str, *, experts: int | None = None, ratio: float | None = None,
              method: str = "msmoe", calib: CalibConfig = CalibConfig(nsamples=64), max_router_samples: int = 8192,
              progress: bool = True, router_mode: str | None = None, refit: bool | None = None,
              device: str = "auto", keep: dict | None = None) -> dict | None:
    """Reduce every MoE layer of checkpoint `source` to `experts` experts (or `ratio` of all, adaptively).
    router_mode / refit override the method's defaults (merged router rows; least-squares down refit,
    merge.DEFAULT_REFIT: on for reap, msmoe and hcsmoe); the benchmark measures them. The layers run on
    `device`, through the quantize pass's layer loop (passes/pipeline.py: the MoE cache, forwards split
    across torchrun ranks); every rank reduces each layer from the same cache (the statistics are not split
    across ranks), rank 0 writes and returns the summary, the others None. keep ({layer: kept expert indices},
    instead of experts/ratio): prune exactly those sets (REAP's router rows and refit; quantize's joint plans)."""
    from ..distributed import from_env
    from ..passes.pipeline import LayerRunner
    dist, dev = from_env(device)
    if not dist.main:
        log.setLevel(logging.ERROR)
    from ..api import _progress, calibration_windows
    from ..checkpoint import CheckpointReader
    from ..layerwise import LayerStreamer, copy_tokenizer_files, find_experts
    from .writer import MergedWriter

    t0 = time.time()
    if keep is None and (experts is None) == (ratio is None):
        raise MoeCompressError("give exactly one of --experts K (per layer) or --ratio R (of all experts)")
    if method not in METHODS:
        raise MoeCompressError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if os.path.exists(out):
        raise MoeCompressError(f"output {out} already exists: remove it or choose another --out")
    reader = CheckpointReader(source)
    arch = reader.arch
    if arch.glu != "swiglu":
        raise MoeCompressError(f"merge/prune supports SwiGLU experts; {arch.family} experts are not supported yet")
    top_k = int(reader.config.get("num_experts_per_tok") or reader.config.get("moe_topk") or 1)
    layers = reader.moe_layers
    sizes = {i: reader.layer_num_experts(i) for i in layers}
    floor, multiple = routing_floor(reader.config, top_k)
    if experts is not None:
        for i in layers:
            from .reduction import check_target
            check_target(sizes[i], experts, top_k)
        if experts % multiple or experts < floor:
            raise MoeCompressError(f"this model routes in {multiple} expert groups (top-{top_k} within "
                                   f"{reader.config.get('topk_group')} groups): choose --experts divisible by {multiple} "
                                   f"and at least {floor}")
    windows = calibration_windows(source, calib, dev)
    streamer = LayerStreamer(reader, device=dev)
    runner = LayerRunner(streamer, windows, calib, dist, dev)

    counts = {i: experts for i in layers} if experts is not None else None
    if keep is not None:
        counts = {i: len(keep[i]) for i in layers}
    if counts is None:  # pass 1: importance per layer on the original model, then per-layer counts
        acts, shares = runner.embed(), []
        for i in _progress(range(streamer.num_layers), desc="routing statistics", enabled=progress and dist.main):
            layer = streamer.build_layer(i)
            if i in sizes:
                path, ex = find_experts(layer)
                cache, acts = runner.capture(layer, i, acts, outputs=True)
                with _on(dev):
                    shares.append(importance(_layer_stats(cache, _router(layer, arch), ex, 1), method))
                del cache
            else:
                acts = runner.forward(layer, i, acts)
            del layer
        counts = dict(zip(layers, allocate_counts(shares, ratio, floor, multiple)))

    writer = MergedWriter(reader, out) if dist.main else None
    acts, records = runner.embed(), []
    for i in _progress(range(streamer.num_layers), desc=f"{method} layers", enabled=progress and dist.main):
        layer = streamer.build_layer(i)
        if i not in sizes:
            acts = runner.forward(layer, i, acts)
            if writer:
                writer.write_layer(i, None)
            continue
        path, ex = find_experts(layer)
        router = _router(layer, arch)
        cache = runner.capture(layer, i, acts)
        with _on(dev):  # statistics and reduction on the run's device (their new tensors too)
            st = _layer_stats(cache, router, ex, max_router_samples)
            del cache
            gu, dn = _stack(ex)
            bias = getattr(router, "bias", None)
            if keep is not None:
                from .prune import PRUNE_RIDGE
                from .reduction import merge_groups
                red = merge_groups(gu, dn, router.weight.data, None if bias is None else bias.data,
                                   [(e,) for e in keep[i]], method=method, stats=st, router_mode="dominant",
                                   refit=True if refit is None else refit, top_k=top_k, ridge=PRUNE_RIDGE)
            else:
                red = reduce_layer(method, gu, dn, router.weight.data, None if bias is None else bias.data, st,
                                   counts[i], top_k=top_k, router_mode=router_mode, refit=refit)
        red.record["layer"] = i
        records.append(red.record)
        # the reduced layer feeds the next one
        from ..experts import MoEExperts
        I = dn.shape[2]
        weights = [{"gate": red.gate_up[k, :I], "up": red.gate_up[k, I:], "down": red.down[k]} for k in range(red.num_experts)]
        from ..layerwise import set_submodule
        set_submodule(layer, path, MoEExperts(weights, streamer.glu))
        router.weight = torch.nn.Parameter(red.router_weight.to(router.weight.dtype), requires_grad=False)
        if bias is not None:
            router.bias = torch.nn.Parameter(red.router_bias.to(bias.dtype), requires_grad=False)
        reps = [g[0] for g in red.groups]
        for name, buf in list(router.named_buffers(recurse=False)):  # e.g. DeepSeek-V3 score correction
            if buf is not None and buf.dim() >= 1 and buf.shape[0] == gu.shape[0]:
                setattr(router, name, buf[reps].clone())
        for attr in ("num_experts", "n_routed_experts"):
            if hasattr(router, attr):
                setattr(router, attr, red.num_experts)
        acts = runner.forward(layer, i, acts)
        if writer:
            writer.write_layer(i, red)
        del layer
    dist.barrier()
    if not writer:
        return None
    uniform = len(set(counts.values())) == 1
    writer.write_globals()
    copy_tokenizer_files(reader.path, writer.tmp)
    saved = reader.total_bytes - writer.total_bytes
    summary = {"method": method, "experts_per_layer": [counts[i] for i in layers], "uniform": uniform,
               "source_bytes": reader.total_bytes, "merged_bytes": writer.total_bytes, "saved_bytes": saved,
               "seconds": round(time.time() - t0, 1), "out": os.path.abspath(out)}
    run = {
        "run/run_config.json": {"source": reader.path, "fingerprint": reader.fingerprint, "method": method,
                                "experts": experts, "ratio": ratio, "calib": asdict(calib),
                                "router_mode": router_mode, "refit": refit, "format_version": FORMAT_VERSION,
                                "keep": None if keep is None else {str(i): list(k) for i, k in keep.items()}},
        "run/merge_record.json": {"format_version": FORMAT_VERSION, "source_fingerprint": reader.fingerprint,
                                  "layers": records},
        "run/metrics.json": dict(summary, layer_forwards=sum(runner.forwards.values()),
                                 layer_forwards_per_layer=[runner.forwards.get(i, 0) for i in range(streamer.num_layers)],
                                 ranks=dist.world, device=str(dev)),
    }
    writer.finish(counts, records, uniform, run)
    return summary
