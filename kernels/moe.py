"""MoE experts forward on packed weights: tokens sorted and grouped by expert, one launch per format.

hidden: (T, H), top_k_index / top_k_weights: (T, k), experts[e] = {"gate": (I, H), "up": (I, H),
"down": (H, I)} PackedTensors (None = pruned expert, contributes nothing).

    y[t] = sum_j w[t, j] * down_e(glu(gate_e(x_t), up_e(x_t))),   e = top_k_index[t, j]

Routing (device-side, no host sync): the T*k (token, slot) pairs are sorted by expert and each
expert's run is padded to a multiple of the block size BM (vLLM `moe_align_block_size`). Every block
then belongs to one expert. The padded length is bounded from shapes alone (ceil(T k / BM) + E
blocks), counts come from a scatter-add (CUDA's bincount reads its maximum on the host), the expert
ids are range-checked with a device-side assertion, and each group's global -> local expert table is
made once per device and kept on the group: with prepared experts on the Triton path the forward
launches kernels and never waits for the GPU (tests/test_cuda.py checks it with
`torch.cuda.set_sync_debug_mode("error")`; the codecs were checked when the experts were prepared). Experts are grouped by (codec, bit width, group size, shape): each group's
weights are stacked into (E_g, N, .) tensors once (`prepare_experts`) and a single grouped launch
covers all blocks of the group's experts, so a mixed-precision layer costs one launch per format and
stage. Gate and up share one launch when their formats match (their packed rows are concatenated
into a (2I, H) matrix: the formats are row-wise, so concatenation is exact; sub1 is the exception, see
below). The activation `glu`
is an arbitrary torch callable, applied between the two stages.

Resident once: `_group` stacks each group's fields and the owner (`MoEExperts._adopt`) re-points its
per-expert buffers at views into the stacks (`ExpertGroup.views`), so the packed bytes are held once.
sub1's codeword streams are joined as they are stored: each member's bytes one after another (a member
starts at a byte boundary; the kernel gets each member's base bit in its row anchors, one int64 per 64
rows, `sub1_triton.row_anchors`), so each member's `codewords` is a byte range of the joined buffer. For
that its gate and up are launched as two groups (at column offsets 0 and I) rather than fused: a fused
member would be a re-packed copy of two streams.

Rotated layers (`quantize --rotate`, moecompress/quant/hadamard.py): `rotation` = (s_x (H,), s_h (I,)) int8
signs; the kernels decode the stored W' as for any layer, and the activations are rotated around them:
hidden once before stage 1 (x' = R_x x), the activation before stage 2 (h' = R_h h), both in float32 and
rounded to hidden's dtype (same in the reference).

Numerics (same in the reference): stage-1 outputs are rounded to hidden's dtype, the activation
runs in hidden's dtype, the down projection and the weighted sum accumulate in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from moecompress.codecs import PackedTensor, decode as reference_decode
from moecompress.errors import MoeCompressError
from moecompress.quant.hadamard import rotate

from .dispatch import _check_packed, _check_triton_device, backend, packed_linear

Glu = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GROUPED_CODECS = ("int", "ternary", "sub1")  # grouped Triton launch; others loop over experts (packed_linear each)
INFO_ATTRS = ("sizes",)  # informational attrs (sub1 vs ternary sizes) that do not change the format
SHARED_TENSORS = ("dictionary",)  # one tensor shared by every member (sub1's dictionary): never stacked


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass
class ExpertGroup:
    """Experts of one stage that share a format: weights stacked along a leading expert axis."""

    codec: str
    attrs: dict
    shape: tuple[int, int]  # (N, K) of one member
    col_off: int  # first output column this group writes
    experts: list[int]  # global expert ids, in stacking order
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (E_g, ...) stacked
    members: list[PackedTensor] = field(default_factory=list)  # per-expert packed (loop fallback)
    cw_offsets: list[int] = field(default_factory=list)  # sub1: member j's bytes are codewords[off[j]:off[j+1]]
    device_cache: dict = field(default_factory=dict, repr=False, compare=False)  # _local_ids: made once per device
    parts: list[tuple] = field(default_factory=list)  # per member: ((proj, first row, rows), ...) it is made of

    def views(self):
        """(expert, proj, {field: view}) of every matrix in the group as views into the stacked tensors: the
        row-wise fields by rows (all of int and ternary; sub1's lo, hi, row_counts, row_skip), sub1's codeword
        stream by its byte range. The owner re-points its per-expert buffers at them (resident once)."""
        alias = {"row_skip": "skips", "row_counts": "counts"} if self.codec == "sub1" else {}
        rowwise = [k for k in self.tensors if k not in ("codewords", "anchors", "dictionary", "skips", "counts")]
        rowwise += list(alias)
        for j, (e, parts) in enumerate(zip(self.experts, self.parts)):
            for proj, r0, n in parts:
                v = {k: self.tensors[alias.get(k, k)][j, r0:r0 + n] for k in rowwise}
                if self.codec == "sub1":  # one part per member (never fused): its whole stream
                    v["codewords"] = self.tensors["codewords"][self.cw_offsets[j]:self.cw_offsets[j + 1]]
                yield e, proj, v


class PreparedExperts(NamedTuple):
    num_experts: int
    hidden: int  # H
    inter: int  # I
    stage1: list[ExpertGroup]  # gate / up (fused into 2I columns where formats match)
    stage2: list[ExpertGroup]  # down
    bias1: torch.Tensor | None  # (E + 1, 2I), last row zeros (padding / pruned)
    bias2: torch.Tensor | None  # (E + 1, H)


def _fmt(p: PackedTensor) -> tuple:
    return (p.codec, tuple(sorted((k, v) for k, v in p.attrs.items() if k not in INFO_ATTRS)))


def _stack(codec: str, members: list[PackedTensor]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The group's tensors with a leading expert axis, and (sub1) the members' byte offsets in the joined
    codeword buffer. sub1 joins the members' codeword byte streams as stored ("codewords", each member from
    a byte boundary), stacks row_counts ("counts", (E_g, N)) and row_skip ("skips", (E_g, N)) and adds the
    row anchors ("anchors", (E_g, ceil(N / 64)) int64: bits in the joined buffer, `row_anchors`)."""
    first = members[0].tensors
    if codec != "sub1":
        return {k: torch.stack([m.tensors[k] for m in members]).contiguous() for k in first}, []
    from .sub1_triton import row_anchors
    streams = [m.tensors["codewords"].reshape(-1) for m in members]
    offsets = [0]
    for t in streams:
        offsets.append(offsets[-1] + t.numel())  # host ints from shapes: no sync
    counts = torch.stack([m.tensors["row_counts"] for m in members]).contiguous()  # (E_g, N)
    base = torch.tensor(offsets[:-1], dtype=torch.int64).mul_(8)  # (E_g,) first bit of each member
    return {"codewords": torch.cat(streams),
            "counts": counts,
            "anchors": row_anchors(counts, members[0].attrs["codeword_bits"], base),
            "skips": torch.stack([m.tensors["row_skip"] for m in members]).contiguous(),
            "lo": torch.stack([m.tensors["lo"] for m in members]).contiguous(),
            "hi": torch.stack([m.tensors["hi"] for m in members]).contiguous(),
            "dictionary": first["dictionary"]}, offsets


def _group(items: list[tuple]) -> list[ExpertGroup]:
    """items: (expert, column offset, PackedTensor, parts). Stacks each group, then rebuilds its members as
    views into the stacked tensors (the concatenated gate/up members and the originals are not kept)."""
    groups: dict[tuple, ExpertGroup] = {}
    for e, off, p, parts in items:
        key = (_fmt(p), tuple(p.shape), off)
        g = groups.get(key)
        if g is None:
            g = groups[key] = ExpertGroup(p.codec, dict(p.attrs), tuple(p.shape), off, [])
        g.experts.append(e)
        g.members.append(p)
        g.parts.append(parts)
    for g in groups.values():
        if g.codec in GROUPED_CODECS:
            g.tensors, g.cw_offsets = _stack(g.codec, g.members)
            if g.codec != "sub1":  # every field row-wise: member j is row block j of the stack
                g.members = [PackedTensor(m.codec, m.shape, {k: g.tensors[k][j] for k in m.tensors}, m.attrs)
                             for j, m in enumerate(g.members)]
            else:  # the grouped launch needs only the stack (members: views, MoEExperts._adopt)
                g.members = []
    return list(groups.values())


def _cat_rows(a: PackedTensor, b: PackedTensor) -> PackedTensor:
    # Row-wise formats: stacking the rows of two same-format matrices is the packed form of cat([A, B]).
    # A shared tensor (same id in both, _fmt checked it) is kept once; informational attrs are dropped.
    # Not for sub1 (its codeword streams are not row-wise; prepare_experts launches its gate and up apart).
    assert a.codec != "sub1", "sub1 gate and up are not fused"
    t = {k: a.tensors[k] if k in SHARED_TENSORS else torch.cat([a.tensors[k], b.tensors[k]]) for k in a.tensors}
    return PackedTensor(a.codec, (a.shape[0] + b.shape[0], a.shape[1]), t,
                        {k: v for k, v in a.attrs.items() if k not in INFO_ATTRS})


def _stack_bias(biases, live, E, width, parts, like) -> torch.Tensor | None:
    if biases is None or all(b is None for b in biases):
        return None
    out = torch.zeros((E + 1, width), dtype=torch.float32, device=like.device)
    for e, b in enumerate(biases):
        if b is None or e not in live:  # a pruned expert contributes nothing, bias included
            continue
        off = 0
        for name, n in parts:
            if b.get(name) is not None:
                out[e, off:off + n] = b[name].float()
            off += n
    return out


def prepare_experts(experts: list, biases: list | None = None) -> PreparedExperts:
    """Validate, group by format and stack the experts of one layer (do this once per layer)."""
    if isinstance(experts, PreparedExperts):
        return experts
    E = len(experts)
    live = [(e, x) for e, x in enumerate(experts) if x is not None]
    if not live:
        raise MoeCompressError("every expert of this layer is pruned; keep at least one expert per layer")
    I, H = live[0][1]["gate"].shape
    stage1, stage2 = [], []
    for e, ex in live:
        for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            p = ex.get(name)
            _check_packed(p)
            if tuple(p.shape) != shape:
                raise MoeCompressError(f"expert {e} {name} is {tuple(p.shape)}, expected {shape}: all experts of a "
                                       f"layer must share hidden {H} and expert width {I}")
        if _fmt(ex["gate"]) == _fmt(ex["up"]) and ex["gate"].codec != "sub1":  # sub1: see the module docstring
            stage1.append((e, 0, _cat_rows(ex["gate"], ex["up"]), (("gate", 0, I), ("up", I, I))))
        else:
            stage1 += [(e, 0, ex["gate"], (("gate", 0, I),)), (e, I, ex["up"], (("up", 0, I),))]
        stage2.append((e, 0, ex["down"], (("down", 0, H),)))
    if biases is not None and len(biases) != E:
        raise MoeCompressError(f"got {len(biases)} bias entries for {E} experts; give one (or None) per expert")
    live_ids = {e for e, _ in live}
    like = live[0][1]["gate"].tensors["scales"] if "scales" in live[0][1]["gate"].tensors else \
        next(iter(live[0][1]["gate"].tensors.values()))
    return PreparedExperts(E, H, I, _group(stage1), _group(stage2),
                           _stack_bias(biases, live_ids, E, 2 * I, (("gate", I), ("up", I)), like),
                           _stack_bias(biases, live_ids, E, H, (("down", H),), like))


class Routing(NamedTuple):
    block_m: int
    order: torch.Tensor  # (M,) slot ids t*k+j sorted by expert
    pos: torch.Tensor  # (M,) padded row of each sorted slot
    rows1: torch.Tensor  # (P,) int32 token row per padded row, -1 = padding
    rows2: torch.Tensor  # (P,) int32 padded row itself, -1 = padding
    block_expert: torch.Tensor  # (P // block_m,) global expert of each block, E = none
    row_expert: torch.Tensor  # (P,) global expert of each padded row, E = none


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """Sort the (token, slot) pairs by expert and pad every expert's run to a multiple of block_m."""
    T, k = top_k_index.shape
    E, BM = num_experts, block_m
    flat = top_k_index.reshape(-1).long()  # (T, k) -> (M,)
    M = flat.numel()
    dev = flat.device
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    padded = (counts + BM - 1) // BM * BM
    pend = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    se = flat[order]
    cstart = torch.cumsum(counts, 0) - counts
    pos = (pend - padded)[se] + (torch.arange(M, device=dev) - cstart[se])
    nblocks = (M + BM - 1) // BM + E  # upper bound on sum(ceil(count / BM)): no host sync needed
    P = nblocks * BM
    slot = torch.full((P,), -1, dtype=torch.long, device=dev)
    slot[pos] = order
    valid = slot >= 0
    rows1 = torch.where(valid, slot // k, -1).to(torch.int32)
    rows2 = torch.where(valid, torch.arange(P, device=dev), -1).to(torch.int32)
    block_expert = torch.searchsorted(pend, torch.arange(nblocks, device=dev) * BM, right=True)  # E past the end
    row_expert = block_expert.view(-1, 1).expand(-1, BM).reshape(-1)  # (nblocks,) -> (P,)
    return Routing(BM, order, pos, rows1, rows2, block_expert, row_expert)


def _block_m(M: int, E: int, on_gpu: bool) -> int:
    per = max(1, -(-M // E))  # mean (token, slot) pairs per expert
    bm = 1 << (per - 1).bit_length()
    if 8 < bm < 16:
        bm = 16
    return min(bm, 64 if on_gpu else 16)


def _local_ids(g: ExpertGroup, num_experts: int, device: torch.device) -> torch.Tensor:
    """(E + 1,) int32 global expert -> its index in the group, -1 for the others and for E (no expert);
    built on the host and copied once per device (kept in g.device_cache), never per call."""
    key = ("local_ids", num_experts, str(device))
    lut = g.device_cache.get(key)
    if lut is None:
        host = torch.full((num_experts + 1,), -1, dtype=torch.int32)
        host[torch.tensor(g.experts, dtype=torch.long)] = torch.arange(len(g.experts), dtype=torch.int32)
        lut = g.device_cache[key] = host.to(device)
    return lut


def _run_stage(groups: list[ExpertGroup], x: torch.Tensor, rows: torch.Tensor, r: Routing, out: torch.Tensor,
               num_experts: int) -> None:
    from .intq_triton import int_matmul
    from .sub1_triton import sub1_matmul
    from .ternary_triton import ternary_matmul
    for g in groups:
        N, K = g.shape
        blk = _local_ids(g, num_experts, x.device)[r.block_expert]  # (nblocks,) local expert or -1
        t, gs = g.tensors, g.attrs.get("group_size")
        grouped = dict(out=out, col_off=g.col_off, rows=rows, block_expert=blk, block_m=r.block_m)
        if g.codec == "int":
            int_matmul(x, t["qweight"], t["scales"], t["zeros"], N, K, g.attrs["bits"], gs, **grouped)
        elif g.codec == "ternary":
            ternary_matmul(x, t["trits"], t["lo"], t["hi"], N, K, gs, **grouped)
        elif g.codec == "sub1":
            sub1_matmul(x, t["codewords"], t["counts"], t["anchors"], t["skips"], t["dictionary"],
                        g.attrs["dictionary_id"], t["lo"], t["hi"], N, K, gs, g.attrs["codeword_bits"], **grouped)
        else:  # per-expert loop (one host sync per expert) for codecs without a grouped kernel yet
            row_blk = blk.view(-1, 1).expand(-1, r.block_m).reshape(-1)
            for j, p in enumerate(g.members):
                sel = torch.nonzero((row_blk == j) & (rows >= 0)).flatten()
                if sel.numel():
                    out[sel, g.col_off:g.col_off + N] = packed_linear(x[rows[sel].long()], p).to(out.dtype)


def moe_experts_forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                        experts, glu: Glu | None = None, biases: list | None = None, rotation=None) -> torch.Tensor:
    """Routed experts on packed weights: (T, H) -> (T, H) in hidden's dtype.

    experts: list of {"gate", "up", "down"} PackedTensor dicts (None = pruned) or `prepare_experts(...)`
    (prepare once per layer: the list form stacks the weights on every call). biases: optional list of
    {"gate": (I,), "up": (I,), "down": (H,)} per expert. rotation: (s_x, s_h) signs of a rotated layer, or None.
    """
    glu = glu or silu_glu
    _check_moe_inputs(hidden, top_k_index, top_k_weights, experts)
    if backend(hidden.device) == "torch":
        return moe_reference(hidden, top_k_index, top_k_weights, experts, glu, biases, rotation)
    _check_triton_device(hidden)
    px = prepare_experts(experts, biases)
    T, H = hidden.shape
    if T == 0:
        return hidden.new_zeros((0, H))
    I, E = px.inter, px.num_experts
    r = route(top_k_index, E, _block_m(top_k_index.numel(), E, hidden.is_cuda))
    P = r.rows1.numel()
    h = torch.zeros((P, 2 * I), dtype=hidden.dtype, device=hidden.device)
    x = hidden if rotation is None else rotate(hidden, rotation[0])  # x' = R_x x, once per layer
    _run_stage(px.stage1, x.contiguous(), r.rows1, r, h, E)
    if px.bias1 is not None:
        h += px.bias1[r.row_expert].to(h.dtype)
    act = glu(h[:, :I], h[:, I:]).contiguous()  # (P, 2I) -> (P, I)
    if rotation is not None:
        act = rotate(act, rotation[1])  # h' = R_h h, per routed row
    y = torch.zeros((P, H), dtype=torch.float32, device=hidden.device)
    _run_stage(px.stage2, act, r.rows2, r, y, E)
    if px.bias2 is not None:
        y += px.bias2[r.row_expert]
    w = top_k_weights.reshape(-1)[r.order].float()  # (M,) weights in sorted order
    out = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    out.index_add_(0, r.order // top_k_index.shape[1], y[r.pos] * w[:, None])
    return out.to(hidden.dtype)


def _check_moe_inputs(hidden, idx, w, experts) -> None:
    """Shapes on the host; the expert ids' range on the device (torch._assert_async): the CPU raises at
    once, CUDA reports a device-side assertion at the next sync instead of the forward waiting for it."""
    if hidden.dim() != 2 or idx.dim() != 2 or idx.shape != w.shape or idx.shape[0] != hidden.shape[0]:
        raise MoeCompressError(f"moe_experts_forward: want hidden (T, H), top_k_index and top_k_weights (T, k); got "
                               f"{tuple(hidden.shape)}, {tuple(idx.shape)}, {tuple(w.shape)}")
    E = experts.num_experts if isinstance(experts, PreparedExperts) else len(experts)
    if idx.numel():
        msg = f"top_k_index has expert ids outside [0, {E}); the router and the expert list disagree"
        ok = ((idx >= 0) & (idx < E)).all()
        if idx.device.type != "cpu":
            torch._assert_async(ok, msg)  # a device-side assertion: no host sync
            return
        try:  # on the CPU the same op checks at once (in C++: no Python-level .item())
            torch._assert_async(ok, msg)
        except RuntimeError:
            raise MoeCompressError(msg) from None


def moe_reference(hidden, top_k_index, top_k_weights, experts, glu: Glu | None = None, biases=None,
                  rotation=None) -> torch.Tensor:
    """Torch reference: decode each routed expert, matmul, gate-weighted sum with index_add."""
    glu = glu or silu_glu
    if isinstance(experts, PreparedExperts):
        raise MoeCompressError("moe_reference needs the list of expert dicts, not prepared experts")
    T, H = hidden.shape
    dt = hidden.dtype
    out = torch.zeros((T, H), dtype=torch.float32, device=hidden.device)
    for e in torch.unique(top_k_index).tolist():
        ex = experts[e]
        if ex is None:
            continue
        tok, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        x = hidden[tok] if rotation is None else rotate(hidden[tok], rotation[0])
        x = x.float()
        b = (biases[e] if biases is not None else None) or {}
        gate = (x @ reference_decode(ex["gate"]).to(x.device).T).to(dt)
        up = (x @ reference_decode(ex["up"]).to(x.device).T).to(dt)
        if b.get("gate") is not None:
            gate = gate + b["gate"].to(dt)
        if b.get("up") is not None:
            up = up + b["up"].to(dt)
        act = glu(gate, up) if rotation is None else rotate(glu(gate, up), rotation[1])
        y = act.float() @ reference_decode(ex["down"]).to(x.device).T
        if b.get("down") is not None:
            y = y + b["down"].float()
        out.index_add_(0, tok, y * top_k_weights[tok, slot, None].float())
    return out.to(dt)
