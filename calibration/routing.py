"""Routing pass: which experts each calibration window reaches, without quantizing anything.

The windows run through the layer-streamed model (`LayerStreamer`: one decoder layer materialized at
a time, never the whole model); a `MoEExperts.observer` in every MoE layer counts, per window w, layer
l and expert e,

    n[w, l, e] = #{(t, j) : top_k_index[t, j] == e, t in window w}     (tokens routed)
    g[w, l, e] = sum of the gate weights of those (t, j)                 (summed gate weight)

so sum_e n[w, l, e] = seqlen * top_k. Per-window counts are what the balanced sampler selects on;
summed over windows they are the coverage statistics of a calibration set.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    layers: list[int]          # MoE decoder layers, in order
    tokens: torch.Tensor       # (W, len(layers), E) long: tokens routed per window, layer, expert
    gate_sum: torch.Tensor     # (W, len(layers), E) float64: summed gate weight


class WindowCounter:
    """`MoEExperts` observer: adds each routed (token, slot) pair to its row's counts.

    Rows are windows of `seqlen` tokens laid out as the MoE block flattens them, (B, L) -> (B*L,);
    `offset` is the first row of the current mini-batch.
    """

    def __init__(self, rows: int, num_experts: int, seqlen: int):
        self.seqlen, self.offset = seqlen, 0
        self.tokens = torch.zeros(rows, num_experts, dtype=torch.long)
        self.gate_sum = torch.zeros(rows, num_experts, dtype=torch.float64)

    def __call__(self, e: int, tok: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> None:
        row = (self.offset + tok // self.seqlen).cpu()  # (n,) row of each routed pair
        self.tokens[:, e].index_add_(0, row, torch.ones_like(row))
        self.gate_sum[:, e].index_add_(0, row, w.detach().double().cpu())


def num_experts_max(reader) -> int:
    return max(reader.layer_num_experts(i) for i in reader.moe_layers)


@torch.no_grad()
def route_windows(model, windows: torch.Tensor, batch_size: int = 8, progress=None, device="cpu") -> Routing:
    """Per-window routing counts of `windows` (W, L) token ids on checkpoint `model` (path or reader),
    run on `device` (auto|cpu|cuda|cuda:N)."""
    from ..checkpoint import CheckpointReader
    from ..device import resolve_device
    from ..layerwise import LayerStreamer, find_experts
    reader = model if isinstance(model, CheckpointReader) else CheckpointReader(model)
    streamer = LayerStreamer(reader, device=resolve_device(device))
    W, L = windows.shape
    bs = max(1, min(batch_size, W))
    kwargs = streamer.layer_kwargs(bs, L)
    hidden = torch.cat([streamer.embed(windows[s:s + bs]) for s in range(0, W, bs)])  # (W, L, H)
    E = num_experts_max(reader)
    moe = list(reader.moe_layers)
    tokens = torch.zeros(W, len(moe), E, dtype=torch.long)
    gate = torch.zeros(W, len(moe), E, dtype=torch.float64)
    last = moe[-1] if moe else -1
    for i in range(streamer.num_layers):
        if i > last:
            break  # nothing after the last MoE layer changes the routing
        layer = streamer.build_layer(i)
        if i in moe:
            _, ex = find_experts(layer)
            counter = WindowCounter(W, E, L)
            ex.observer = counter
            outs = []
            for s in range(0, W, bs):
                counter.offset = s
                outs.append(streamer.run_layer(layer, hidden[s:s + bs], kwargs[i], bs))
            ex.observer = None
            hidden = torch.cat(outs)
            j = moe.index(i)
            tokens[:, j], gate[:, j] = counter.tokens, counter.gate_sum
        else:
            hidden = streamer.run_layer(layer, hidden, kwargs[i], bs)
        del layer
        if progress is not None:
            progress.update(1)
    return Routing(moe, tokens, gate)
