"""The layer loop: read a decoder layer, calibrate it, run the passes, hand its outputs on, write it.

One decoder layer is materialized at a time, on the run's device. The calibration windows go through it
in forward calls of about `forward_tokens` tokens (whole accumulation chunks of `batch_size` windows;
both are calibration options, fixed whatever the machine, since they fix the numerics). A MoE layer runs
at most three times, whatever its number of experts:

  1. capture: the layer runs with its experts replaced by a recorder, which caches what the MoE block
     hands them (input and routing, passes/moe_cache.py);
  (1b. with --router-bits, the router is quantized from the cache and the layer captured again;)
  2. every pass works from the cache: the routed experts (gate/up, then down on the outputs of their own
     quantized gate/up) in memory chunks of whole GPTQ units, the shared experts;
  3. the quantized layer runs once more to produce the next layer's inputs.

With --fp-target (quant/target.py) the run also carries the unquantized model's hidden states: step 1 first
runs the layer, still unquantized, on them (its experts' inputs join the cache as the targets' inputs, its
outputs are the next layer's unquantized hidden states). While no layer is quantized yet both streams are
one, and step 1 runs once with outputs; later layers run three times.

With several processes (torchrun) the micro-batches are split across ranks (each rank keeps the hidden
states of its own windows), the cache is broadcast so every rank holds all of it, the experts' GPTQ units
are split across ranks and their results exchanged, and rank 0 writes every file (distributed.py).
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from ..device import Placer, tensor_nbytes, workspace_bytes
from ..layerwise import find_experts
from .moe_cache import CacheChunk, Capture, MoECache

log = logging.getLogger("moecompress")


def forward_windows(calib, seqlen: int) -> int:
    """Windows per forward call: whole accumulation chunks of about `calib.forward_tokens` tokens. The
    call size is part of the run's options: experts routed only a few tokens in a call round differently
    in another call size, so it never follows the machine."""
    return calib.batch_size * max(1, calib.forward_tokens // (calib.batch_size * seqlen))


class LayerRunner:
    """Runs decoder layers over the calibration windows: this rank's micro-batches, counted."""

    def __init__(self, streamer, windows: torch.Tensor, calib, dist, device: torch.device):
        S, L = windows.shape
        self.streamer, self.dist, self.device = streamer, dist, device
        self.chunk = calib.batch_size  # windows per accumulation chunk: fixes every summation order
        self.fwd = forward_windows(calib, L)  # windows per forward call
        self.batches = [(s, min(s + self.fwd, S)) for s in range(0, S, self.fwd)]
        self.mine = list(dist.mine(len(self.batches)))
        self.seqlen = L
        self.kwargs = streamer.layer_kwargs(min(self.fwd, S), L)
        self.forwards: dict[int, int] = defaultdict(int)  # decoder layer -> passes over the windows
        self.spilled_bytes = 0  # largest share of activations kept in pinned host memory (CUDA)
        self.windows = windows

    # -- activations: {micro-batch index: (B, L, H)} of this rank's micro-batches -----------------------
    def _placer(self) -> Placer:
        return Placer(self.device, workspace_bytes(self.device))

    def _spilled(self, placer: Placer) -> None:
        self.spilled_bytes = max(self.spilled_bytes, placer.spilled)

    def embed(self) -> dict[int, torch.Tensor]:
        place = self._placer()
        out = {j: place(self.streamer.embed(self.windows[s:e])) for j, (s, e) in ((j, self.batches[j]) for j in self.mine)}
        self._spilled(place)
        return out

    def split(self, hidden: torch.Tensor) -> dict[int, torch.Tensor]:
        """Full (S, L, H) hidden states (a resumed run's) -> this rank's micro-batches."""
        place = self._placer()
        out = {j: place(hidden[s:e].clone()) for j, (s, e) in ((j, self.batches[j]) for j in self.mine)}
        self._spilled(place)
        return out

    def gather(self, acts: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """All ranks' micro-batches as one (S, L, H) tensor on the CPU of rank 0 (None on the others)."""
        got = self.dist.gather_to_main({str(j): t.cpu() for j, t in acts.items()})
        return None if got is None else torch.cat([got[str(j)] for j in range(len(self.batches))])

    def forward(self, layer, i: int, acts: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        self.forwards[i] += 1
        out = {}
        with torch.no_grad():
            for j, x in acts.items():
                y = self.streamer.run_layer(layer, x, self.kwargs[i], x.shape[0])
                out[j] = y if x.device == y.device else y.to(x.device)
        return out

    def capture(self, layer, i: int, acts: dict[int, torch.Tensor], shared_paths=(), outputs: bool = False,
                scores: tuple | None = None):
        """Run layer i once with its experts recording -> the MoE cache, identical on every rank. With
        outputs=True the experts also compute, and the layer's outputs come back too: (cache, acts).
        scores=(ArchSpec, rule) (--all-tokens): the cache also keeps every expert's router score."""
        _, ex = find_experts(layer)
        place = self._placer()
        cap = Capture(self.chunk * self.seqlen, place)
        cap.compute_outputs = outputs
        outs = {}
        hooks = [layer.get_submodule(p).register_forward_pre_hook(cap.shared_hook(p), with_kwargs=True)
                 for p in shared_paths]
        if scores is not None:
            from .router import router_module
            hooks.append(router_module(layer, scores[0]).register_forward_hook(cap.router_hook(scores[1])))
        ex.capture = cap
        self.forwards[i] += 1
        per_batch: dict[int, list[CacheChunk]] = {}
        try:
            with torch.no_grad():
                for j, x in acts.items():
                    n0 = len(cap.chunks)
                    y = self.streamer.run_layer(layer, x, self.kwargs[i], x.shape[0])
                    if outputs:
                        outs[j] = y if x.device == y.device else y.to(x.device)
                    cap.end_batch()
                    per_batch[j] = cap.chunks[n0:]
        finally:
            ex.capture = None
            for h in hooks:
                h.remove()
        chunks = [c for j in sorted(per_batch) for c in per_batch[j]]
        if self.dist.active:  # every rank gets every micro-batch's chunks, bit for bit, in window order
            mine = {}
            for j, cs in per_batch.items():
                for n, c in enumerate(cs):
                    mine.update(c.to_tensors(j * 100_000 + n))
            got = self.dist.gather_dicts(mine)
            keys = sorted({int(k.split(".")[0]) for k in got})
            chunks = [CacheChunk.from_tensors(got, k) for k in keys]
            place = self._placer()
            chunks = [CacheChunk(*(place(t) for t in (c.x, c.idx, c.w)), {p: place(t) for p, t in c.shared.items()},
                                 None if c.s is None else place(c.s)) for c in chunks]
        self._spilled(place)
        cache = MoECache(chunks, self.device)
        return (cache, outs) if outputs else cache

    def hidden_bytes(self, acts: dict[int, torch.Tensor]) -> int:
        return tensor_nbytes(*acts.values())


def quantize_checkpoint(reader, out: str, config, specs: dict, windows: torch.Tensor, *, fingerprints: dict,
                        allocator=None, resume: bool, progress: bool, dist, device: torch.device) -> dict:
    """The quantize pass over every decoder layer of `reader` into packed directory `out` (see the module
    docstring); -> the run's summary. Only rank 0 writes."""
    import time

    from ..api import _progress
    from ..config import resolve_group_size
    from ..errors import MoeCompressError
    from ..layerwise import LayerStreamer, copy_tokenizer_files
    from ..packed import PackedWriter, packed_entry, tensor_bytes
    from ..quant.gptq import GPTQConfig
    from . import quantize as qpass
    from .outputs import finish_run, layer_record
    from .shared import shared_experts
    from .units import layer_units, split_units

    t_start = time.time()
    writer = PackedWriter(out, resume=resume, fingerprints=fingerprints) if dist.main else None
    # ranks other than 0 learn from rank 0 where a resumed run stands
    done = dist.broadcast_tensors({"n": torch.tensor([len(writer.completed) if writer else 0]),
                                   "threads": torch.tensor([writer.threads if writer else 0])} if dist.main else None, 0)
    completed, run_threads = int(done["n"][0]), int(done["threads"][0])
    streamer = LayerStreamer(reader, device=device)
    runner = LayerRunner(streamer, windows, config.calib, dist, device)
    records, expert_bytes = [], 0
    for rec in (writer.completed if writer else []):  # --resume: layers already done, their records
        expert_bytes += rec["expert_bytes"]
        if rec["record"] is not None:
            records.append(layer_record(rec["record"]))
    from ..config import fp_strength, tokens_per_input
    from .shared import shared_spec
    tokens = int(windows.numel())  # calibration tokens
    per_input = {i: tokens_per_input(reader, i, tokens) for i in reader.moe_layers}  # --fp-target auto's measure
    # --fp-target: two hidden streams when a routed expert or the shared experts (if the family has them) qualify
    # (shared experts see every token: their tokens per input are checked against their widths when quantized)
    fp_on = any(fp_strength(config, s, per_input[i]) > 0 for (i, _), s in specs.items()) or (
        config.shared_bits != 0 and reader.arch.shared_expert_paths
        and fp_strength(config, shared_spec(config, 64), tokens / int(reader.config.get("hidden_size") or 1)) > 0)
    if completed:
        full = writer.load_hidden() if writer else None
        full = dist.broadcast_tensors({"h": full} if dist.main else None, 0)["h"]
        acts = runner.split(full)
        acts_fp = acts
        if fp_on:  # the unquantized model's hidden states, saved beside them once they differ
            full = writer.load_hidden("hidden_fp") if writer else None
            full = dist.broadcast_tensors(({} if full is None else {"h": full}) if dist.main else None, 0).get("h")
            acts_fp = acts if full is None else runner.split(full)
        del full
        log.info("resuming %s after layer %d", out, completed - 1)
    else:
        acts = runner.embed()
        acts_fp = acts  # --fp-target: the unquantized model's hidden states (the same tensors until they differ)
    gcfg = GPTQConfig(config.percdamp, config.block_size, config.act_order, sweeps=config.sweeps, refit=config.refit)
    if config.refit:
        from ..quant.refit import reset_stats
        reset_stats()
    encoder = qpass.LayerEncoder(len(reader.moe_layers), reader.expert_params)  # holds the sub1 dictionary
    if writer:
        encoder.restore_from(writer.tmp)
    elif completed:
        from ..packed import partial_dir
        encoder.restore_from(partial_dir(out))
    arch = reader.arch
    mem = {"layer_weights_bytes": 0, "hessian_bytes_peak": 0, "activation_cache_bytes": 0}
    bar = _progress(range(completed, streamer.num_layers), desc="quantizing layers", enabled=progress and dist.main)
    threads = torch.get_num_threads()
    if run_threads and run_threads != threads:  # the interrupted run's thread count, or the bytes would differ
        log.warning("resuming with %d torch threads, as the interrupted run used", run_threads)
        torch.set_num_threads(run_threads)
    try:
        for i in bar:
            own = None
            if i in reader.moe_layers:  # expert-parallel ranks read only the experts they quantize
                layer_specs = {e: specs[(i, e)] for e in range(reader.layer_num_experts(i))}
                mine = split_units(layer_units(layer_specs, reader.expert_shapes(i)), layer_specs, dist)
                own = None if mine is None else {e for u in mine for e in u}
                if fp_on:  # the unquantized layer's outputs (the next layer's unquantized stream) need every expert
                    own = None
            layer = streamer.build_layer(i, only=own)
            mem["layer_weights_bytes"] = max(mem["layer_weights_bytes"], _module_bytes(layer))
            tensors, entries, rec, layer_bytes = {}, [], None, 0
            skip = set()  # dense tensors stored packed instead (shared experts)
            router_w = None
            if i in reader.moe_layers:
                path = find_experts(layer)[0]
                found = shared_experts(layer, arch) if config.shared_bits != 0 else []
                shared_paths = [p for p, _, _ in found]
                scores = (arch, arch.router_score) if config.all_tokens > 0 and config.method != "rtn" else None
                fp_cache = None
                if fp_on and acts_fp is acts:  # one stream still: one capture (with --router-bits, also its input)
                    cache, acts_fp_next = runner.capture(layer, i, acts, shared_paths, scores=scores, outputs=True)
                    fp_cache = cache
                else:
                    if fp_on:  # the unquantized layer on the unquantized stream: its experts' inputs, its outputs
                        fp_cache, acts_fp_next = runner.capture(layer, i, acts_fp, shared_paths, outputs=True)
                    cache = runner.capture(layer, i, acts, shared_paths, scores=scores)
                if config.router_bits:  # before the experts: they are calibrated on the quantized routing
                    from .router import quantize_router
                    router_w, router_rec = quantize_router(
                        layer, cache, arch, config.router_bits,
                        resolve_group_size(config.group_size, [reader.expert_shapes(i)["gate"][1]]), gcfg)
                    del cache  # (fp_cache, when it is the same cache, keeps it for attach_fp)
                    cache = runner.capture(layer, i, acts, shared_paths, scores=scores)
                if fp_cache is not None:
                    cache.attach_fp(fp_cache)
                    del fp_cache
                mem["activation_cache_bytes"] = max(mem["activation_cache_bytes"], cache.nbytes + runner.hidden_bytes(acts)
                                                    + (runner.hidden_bytes(acts_fp) if acts_fp is not acts else 0))
                stats: dict = {}
                rotation = (qpass.layer_rotation(layer_specs, i, config.calib.seed, reader.expert_shapes(i))
                            if config.rotate else None)  # --rotate: this layer's signs, stored beside its experts
                for stage, signs in (rotation or {}).items():
                    tensors[f"{reader.prefix}.{i}.{path}.rotation_{stage}"] = signs
                    layer_bytes += tensor_bytes({stage: signs})
                packed, rec = qpass.quantize_moe_layer(
                    find_experts(layer)[1], cache, layer_idx=i, specs=layer_specs, method=config.method, gcfg=gcfg,
                    affinity=config.affinity, min_tokens=config.min_tokens, dtype=streamer.dtype, encoder=encoder,
                    hessian_prior=config.hessian_prior, dist=dist, budget=workspace_bytes(device), stats=stats,
                    all_tokens=config.all_tokens, rotation=rotation, fp_target={e: fp_strength(config, s, per_input[i]) for e, s in layer_specs.items()},
                    original=_original_reader(reader, i, streamer.dtype, device))
                mem["hessian_bytes_peak"] = max(mem["hessian_bytes_peak"], stats.get("hessian_bytes_peak", 0))
                for (e, p), pt in sorted(packed.items()):
                    name = f"{reader.prefix}.{i}.{path}.{e}.{p}"
                    for f, t in pt.tensors.items():
                        tensors[f"{name}.{f}"] = t.cpu()
                    entries.append(packed_entry(name, pt, layer=i, expert=e, proj=p,
                                                fallback=e in rec.fallback and config.method != "rtn"))
                    layer_bytes += tensor_bytes(pt.tensors)
                shared = encoder.take_shared()  # the sub1 dictionary, stored once
                tensors.update({k: v.cpu() for k, v in shared.items()})
                layer_bytes += tensor_bytes(shared)
                if router_w is not None:
                    rec.router = router_rec
                shared_packed, rec.shared = _quantize_shared(layer, cache, reader, i, config, gcfg, found, dist)
                del cache
                for name, pt in sorted(shared_packed.items()):
                    for f, t in pt.tensors.items():
                        tensors[f"{name}.{f}"] = t.cpu()
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
                tensors[key] = router_w.to(tensors[key].dtype).cpu()
            same = acts_fp is acts  # no layer quantized yet: one stream
            if fp_on and i in reader.moe_layers:  # the unquantized stream, from before this layer's quantization
                acts_fp, acts_fp_next = acts_fp_next, None
            elif fp_on and not same:
                acts_fp = runner.forward(layer, i, acts_fp)
            acts = runner.forward(layer, i, acts)
            if same and i not in reader.moe_layers:
                acts_fp = acts
            expert_bytes += layer_bytes
            hidden = runner.gather(acts) if dist.active else torch.cat([acts[j] for j in sorted(acts)]).cpu()
            hidden_fp = None
            if fp_on and acts_fp is not acts:
                hidden_fp = runner.gather(acts_fp) if dist.active else torch.cat([acts_fp[j] for j in sorted(acts_fp)]).cpu()
            if writer:
                writer.commit_layer(i, f"layer-{i:05d}.safetensors", tensors, entries, hidden,
                                    None if rec is None else dict(rec.__dict__), layer_bytes, hidden_fp=hidden_fp)
            del layer, hidden, hidden_fp
            dist.barrier()
    except KeyboardInterrupt:
        if writer:
            log.warning("interrupted after %d of %d layers: rerun the same command with --resume to continue",
                        len(writer.completed), streamer.num_layers)
        raise
    finally:
        torch.set_num_threads(threads)
    layer_forwards = [runner.forwards.get(i, 0) for i in range(streamer.num_layers)]
    metrics = {"layer_forwards": sum(layer_forwards), "layer_forwards_per_layer": layer_forwards,
               "forward_windows": runner.fwd, "ranks": dist.world, "device": str(device),
               "memory": dict(mem, activations_spilled_bytes=runner.spilled_bytes)}
    if config.refit:  # --refit: rows refit, and rows that kept GPTQ's scales (quant/refit.py)
        from ..quant.refit import REFIT_STATS
        metrics["refit"] = dict(REFIT_STATS)
    summary = None
    if writer:
        writer.write_shard("globals.safetensors", {k: reader.get(k) for k in reader.global_keys()})
        copy_tokenizer_files(reader.path, writer.tmp)
        summary = finish_run(writer, reader, config, specs, windows, records, expert_bytes, encoder, allocator,
                             metrics, time.time() - t_start, device)
    dist.barrier()
    return summary


def _original_reader(reader, i: int, dtype, device):
    """--fp-target: expert e's original projection p of layer i, read again from the checkpoint (e, p) -> tensor."""
    from ..arch import ExpertKey
    return lambda e, p: reader.expert(ExpertKey(i, e, p)).to(device=device, dtype=dtype)


def _module_bytes(module) -> int:
    """Bytes a materialized layer holds (meta placeholders of experts another rank quantizes: none)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
               if t.device.type != "meta")


def _quantize_shared(layer, cache, reader, i: int, config, gcfg, found, dist):
    """The shared experts of MoE layer i (if its family has them): ({name: PackedTensor}, records with bytes)."""
    from ..packed import tensor_bytes
    from .outputs import shared_group_size
    from .shared import quantize_shared_experts, shared_spec
    if not found:
        return {}, []
    widths = [w for _, mod, _ in found for w in (mod.gate_proj.in_features, mod.down_proj.in_features)]
    spec = shared_spec(config, shared_group_size(config, widths, ", ".join(p for p, _, _ in found)))
    from ..config import fp_strength
    per_input = cache.tokens / max(widths)  # every token goes through a shared expert
    packed, recs = quantize_shared_experts(layer, cache, arch=reader.arch, layer_idx=i, prefix=reader.prefix,
                                           spec=spec, method=config.method, gcfg=gcfg, affinity=config.affinity,
                                           min_tokens=config.min_tokens, dist=dist,
                                           fp_target=fp_strength(config, spec, per_input) if cache.fp_attached else 0.0)
    for rec in recs:
        names = [n for n in packed if n.startswith(f"{reader.prefix}.{i}.{rec['path']}.")]
        rec["bytes"] = sum(tensor_bytes(packed[n].tensors) for n in names)
        rec["dense_bytes"] = sum(reader.tensors[reader.arch.to_disk(f"{n}.weight")].nbytes for n in names)
    return packed, recs
