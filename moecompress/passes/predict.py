"""`quantize --dry-run`: what a run will cost, from the checkpoint's shapes alone (no weight is read).

Decoder-layer forwards over the calibration windows: a MoE layer runs twice (capture, then the quantized
layer's output), three times with --router-bits (the cache is captured again on the quantized routing);
a dense layer once. --fp-target adds one run of every layer after the first MoE layer (the unquantized
stream), a second (K, K) matrix per expert in flight and the unquantized hidden states and MoE inputs. Peak memory is predicted as its parts, the ones `run/metrics.json` records after a
run: the largest layer's weights (float32 on the device), the activation cache (the hidden states of all
windows plus one MoE layer's cache: its input, routing and any shared-expert input), and the Hessians in
flight (all experts of the largest stage, or the chunk the device's free memory allows).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import fp_target_possible
from ..device import workspace_bytes
from .pipeline import forward_windows

F32 = 4


@dataclass
class RunPrediction:
    forwards: int
    forwards_per_layer: list[int]
    forward_windows: int
    layer_weights_bytes: int
    activation_cache_bytes: int
    hessian_bytes_peak: int
    budget_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.layer_weights_bytes + self.activation_cache_bytes + self.hessian_bytes_peak

    def table(self) -> str:
        gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        return "\n".join([
            "predicted from shapes (nothing read):",
            f"  decoder-layer forwards over the windows: {self.forwards} "
            f"({'/'.join(map(str, sorted(set(self.forwards_per_layer))))} per layer), {self.forward_windows} windows per call",
            f"  peak memory ~{gb(self.peak_bytes)} = layer weights {gb(self.layer_weights_bytes)} + activation cache "
            f"{gb(self.activation_cache_bytes)} + Hessians in flight {gb(self.hessian_bytes_peak)} "
            f"(working budget {gb(self.budget_bytes)})",
        ])

    def to_json(self) -> dict:
        return dict(self.__dict__, peak_bytes=self.peak_bytes)


def predict(reader, config, device) -> RunPrediction:
    S, L = config.calib.nsamples, config.calib.seqlen
    fwd = min(S, forward_windows(config.calib, L))
    H = int(reader.config.get("hidden_size") or 0)
    k = int(reader.config.get("num_experts_per_tok") or reader.config.get("moe_topk") or 1)
    per_layer, weights, hess = [], 0, 0
    budget = workspace_bytes(device)
    fp = fp_target_possible(config, reader)
    per_expert = 2 if fp else 1  # (K, K) matrices an expert holds in flight: H, and D with --fp-target
    two_streams = False  # --fp-target: after the first MoE layer, the unquantized stream runs every layer too
    for i in range(reader.num_layers):
        n = sum(reader.tensors[t].numel for t in reader.layer_keys(i))
        weights = max(weights, n * F32)
        if i in reader.moe_layers:
            per_layer.append((3 if config.router_bits else 2) + (1 if two_streams else 0))
            two_streams = fp
            if config.method != "rtn":
                E = reader.layer_num_experts(i)
                for K in {reader.expert_shapes(i)["gate"][1], reader.expert_shapes(i)["down"][1]}:
                    per = (2 + per_expert) * K * K * F32  # as passes.units.memory_chunks plans it
                    n_chunk = max(1, min(E, budget // per))
                    hess = max(hess, n_chunk * per_expert * K * K * F32)
        else:
            per_layer.append(2 if two_streams else 1)
    cache = S * L * (2 * H * F32 + k * (8 + F32))  # hidden states + MoE input + routing (int64 index, fp32 weight)
    if fp:
        cache += S * L * 2 * H * F32  # the unquantized hidden states and MoE input
    return RunPrediction(sum(per_layer), per_layer, fwd, weights, cache, hess, budget)
