"""Shared experts: quantized beside the routed ones (Qwen2-MoE's `shared_expert`, DeepSeek's `shared_experts`).

Every token goes through a shared expert, a gated MLP (gate_proj, up_proj, down_proj) next to the
routed experts. It is quantized as the routed experts are: GPTQ on the Hessian of its own inputs, gate
and up first, then down on the activations of the quantized gate/up (true-sequential), the dequantized
weights put back so that the next layer is calibrated on the quantized layer. Its width is the run's
integer width (`--shared-bits`, see `shared_spec`).

AGQ (`--affinity`): each token's term is weighted by the shared expert's own gate where the family has
one. Qwen2-MoE scales the shared expert's output by s_t = sigmoid(shared_expert_gate(x_t)), so

    H = sum_t s_t v_t v_t^T       (v_t: the projection's input for token t)

as the routed experts weight theirs by the router's gate weight; DeepSeek's shared experts have no gate
(s_t = 1, the plain Hessian).

With `--fp-target` (quant/target.py) each projection is aimed at what the unquantized shared expert computes
on the unquantized model's input of the same token: a copy of the module keeps the original weights, runs
on the cached unquantized inputs beside the quantized one, and the cross term D = sum_t s_t (u_t - v_t) v_t^T
of their projection inputs moves GPTQ's target to W + A W D H^-1.

The packed weights are stored under the Linear's name (`...shared_expert.gate_proj.qweight`, ...), with a
manifest entry that names the module instead of an (expert, proj); `moecompress.load` puts a
`PackedLinear` in its place.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..codecs import PackedTensor, QuantSpec, get_codec
from ..errors import MoeCompressError
from ..quant.gptq import GPTQConfig, gptq, relative_output_error, rtn
from ..quant.grids import int_grid, int_options

log = logging.getLogger("moecompress")
LINEARS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_BITS = 4  # width when the run's own is not an integer width (--allocation lp, ternary)


def shared_spec(config, group_size: int) -> QuantSpec:
    """The shared experts' spec for a run: --shared-bits, else the run's width when it is a uniform integer
    width, else DEFAULT_BITS (--shared-bits 0, dense, is handled by the caller: no spec)."""
    from ..codecs.intq import INT_BITS
    bits = config.shared_bits
    if bits is None:
        uniform_int = config.allocation == "uniform" and config.method in ("gptq", "rtn") and config.bits in INT_BITS
        bits = int(config.bits) if uniform_int else DEFAULT_BITS
    return QuantSpec("int", int(bits), group_size, int_options(getattr(config, "symmetric", False),
                                                            getattr(config, "grid", "minmax")))


def shared_experts(layer: nn.Module, arch) -> list[tuple[str, nn.Module, nn.Module | None]]:
    """(path, module, gate or None) of each shared expert of a materialized decoder layer."""
    out = []
    for j, path in enumerate(arch.shared_expert_paths):
        try:
            mod = layer.get_submodule(path)
        except AttributeError:
            continue
        if not all(isinstance(getattr(mod, n, None), nn.Linear) for n in LINEARS):
            raise MoeCompressError(f"{arch.family}: the shared expert at {path!r} is not a gate/up/down MLP")
        gate = None
        if j < len(arch.shared_gate_paths):
            try:
                gate = layer.get_submodule(arch.shared_gate_paths[j])
            except AttributeError:
                gate = None
        out.append((path, mod, gate))
    return out


@torch.no_grad()
def _hessian(cache, path: str, mod, gate, target: nn.Linear, affinity: bool, fp=None):
    """H = sum_t s_t v_t v_t^T over the inputs v_t of `target` (a Linear of `mod`) -> (H, tokens, mean s, D),
    with the shared expert run on its cached inputs, chunk by chunk in window order. fp = (the unquantized
    module, its Linear of the same name) under --fp-target: it runs on the cached unquantized inputs and
    D = sum_t s_t (u_t - v_t) v_t^T (u_t its Linear's input) comes back too (else None)."""
    K = target.in_features
    acc = {"H": torch.zeros(K, K, dtype=torch.float32, device=cache.device), "n": 0, "s": 0.0}
    if fp is not None:
        acc["D"] = torch.zeros(K, K, dtype=torch.float32, device=cache.device)
    state: dict = {}

    def on_linear(m, args):
        v = args[0].reshape(-1, K).float()
        s = state.get("s")
        if s is not None:
            acc["s"] += float(s.sum())
            v = v * s.sqrt()[:, None]
        else:
            acc["s"] += v.shape[0]
        acc["H"].addmm_(v.t(), v)
        acc["n"] += v.shape[0]
        state["v"] = v

    def on_fp_linear(m, args):
        u = args[0].reshape(-1, K).float()
        s = state.get("s")
        if s is not None:
            u = u * s.sqrt()[:, None]
        acc["D"].addmm_((u - state["v"]).t(), state["v"])
    hooks = [target.register_forward_pre_hook(on_linear)]
    if fp is not None:
        hooks.append(fp[1].register_forward_pre_hook(on_fp_linear))
    try:
        for c in cache.chunks:
            x = cache.shared_input(c, path)
            if affinity and gate is not None:  # the shared expert's gate weight per token
                state["s"] = torch.sigmoid(gate(x).float()).reshape(-1)
            mod(x)
            if fp is not None:
                fp[0](cache.shared_input_fp(c, path))
            state.pop("v", None)
    finally:
        for h in hooks:
            h.remove()
    return acc["H"], acc["n"], acc["s"] / max(acc["n"], 1), acc.get("D")


@torch.no_grad()
def quantize_shared_experts(layer, cache, *, arch, layer_idx: int, prefix: str, spec: QuantSpec, method: str,
                            gcfg: GPTQConfig, affinity: bool, min_tokens: int, dist=None,
                            fp_target: float = 0.0) -> tuple[dict[str, PackedTensor], list[dict]]:
    """Quantize the shared experts of a materialized MoE layer in place, from the layer's MoE cache.

    -> ({module name (prefix.layer.path.linear): PackedTensor}, [record per shared expert]). With several
    ranks the last rank quantizes them and sends codes, weights and records to the others. fp_target = A > 0
    (--fp-target): each projection aimed at the unquantized shared expert's outputs (module docstring)."""
    import copy
    import json

    from ..quant.target import move_target
    codec = get_codec("int")
    packed, records = {}, []
    found = shared_experts(layer, arch)
    owner = dist.world - 1 if dist is not None and dist.active else None
    mine = owner is None or dist.rank == owner
    out: dict[str, torch.Tensor] = {}
    for path, mod, gate in found if mine else ():
        t0 = time.time()
        rec = {"path": path, "bits": spec.bits, "group_size": spec.group_size, "gated": gate is not None}
        cross = fp_target > 0 and method != "rtn"
        original = copy.deepcopy(mod) if cross else None  # the unquantized shared expert, for the targets' inputs
        if cross:
            rec["fp_target"] = fp_target
        for names in (("gate_proj", "up_proj"), ("down_proj",)):
            lins = [getattr(mod, n) for n in names]
            W = torch.cat([lin.weight for lin in lins]).float()[None]  # (1, N, K)
            grid = int_grid(spec)
            fp = (original, getattr(original, names[0])) if cross else None
            H, n, s_mean, D = _hessian(cache, path, mod, gate, lins[0], affinity, fp)
            rec["tokens"], rec["mean_gate"] = n, round(s_mean, 6)
            if method == "rtn" or n < min_tokens:
                res = rtn(W, grid, spec.group_size)
            else:
                W_target = W
                if D is not None:
                    W_target = W.clone()
                    if move_target(W_target, H[None], D[None], gcfg.percdamp, fp_target):
                        rec["fp_target_kept"] = rec.get("fp_target_kept", []) + [names[0]]
                        log.warning("layer %d %s: --fp-target left the target at W (damped Hessian not positive "
                                    "definite)", layer_idx, path)
                res = gptq(W_target, H[None], grid, spec.group_size, gcfg)
                del W_target
                # output error relative to the weight's, on the calibration inputs
                rec[f"{names[0]}_rel_err"] = round(relative_output_error(W[0], res.deq[0], H), 8)
            r0 = 0
            for name, lin in zip(names, lins):
                sl = slice(r0, r0 + lin.out_features)
                r0 += lin.out_features
                key = f"{prefix}.{layer_idx}.{path}.{name}"
                part = {"codes": res.codes[0, sl].clone(), "scale": res.scale[0, sl].clone(),
                        "zero": res.zero[0, sl].clone()}
                packed[key] = codec.encode(part["codes"], part["scale"], part["zero"], spec)
                lin.weight.copy_(res.deq[0, sl].to(lin.weight.dtype))
                out.update({f"{key}.{f}": t for f, t in part.items()})
                out[f"{key}.weight"] = lin.weight
        rec["seconds"] = round(time.time() - t0, 3)
        records.append(rec)
    if owner is not None and found:
        if mine:
            out["records"] = torch.frombuffer(bytearray(json.dumps(records).encode()), dtype=torch.uint8)
        got = dist.broadcast_tensors(out if mine else None, owner)
        if not mine:
            records = json.loads(bytes(got.pop("records").numpy()).decode())
            for path, mod, _ in found:
                for name in LINEARS:
                    key = f"{prefix}.{layer_idx}.{path}.{name}"
                    lin = getattr(mod, name)
                    packed[key] = codec.encode(got[f"{key}.codes"], got[f"{key}.scale"], got[f"{key}.zero"], spec)
                    lin.weight.copy_(got[f"{key}.weight"].to(lin.weight.device))
    return packed, records
