"""Router quantization (optional, `--router-bits B`), as MoEQuant does: the router's weight (E, H) is
quantized by GPTQ on the Hessian of its own inputs, and routing is recomputed with it.

The router sees every token (not only the routed ones), so its Hessian is H = 2/n sum_t x_t x_t^T over
all calibration tokens of the layer, collected by a forward pre-hook while the layer runs once. The
quantized weight replaces the router's in the materialized layer before the experts are calibrated:
the experts' Hessians, the affinity weights, the fallback decisions and the activations handed to the
next layer all come from the quantized routing ("routing recomputed after it"). It is stored dense, in
the checkpoint's dtype (values on the b-bit grid; the router is E x H, well under 1% of an MoE
layer's bytes, so it is not packed), and the record keeps the relative logit error
tr(dW H dW^T) / tr(W H W^T) per layer.
"""
from __future__ import annotations

import torch

from ..errors import MoeCompressError
from ..quant.gptq import GPTQConfig, gptq, relative_output_error
from ..quant.grids import AsymmetricGrid


def router_module(layer, arch):
    try:
        router = layer.get_submodule(arch.router_mem)
    except AttributeError:
        raise MoeCompressError(f"{arch.family}: router {arch.router_mem!r} not found in the decoder layer") from None
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or router.weight.dim() != 2:
        raise MoeCompressError(f"{arch.family}: the router at {arch.router_mem!r} has no (experts, hidden) weight")
    return router


@torch.no_grad()
def quantize_router(streamer, layer, hidden, kwargs, arch, bits: int, group_size: int, gcfg: GPTQConfig,
                    batch_size: int) -> tuple[torch.Tensor, dict]:
    """GPTQ the router of a materialized layer in place; -> (its new weight, record)."""
    router = router_module(layer, arch)
    E, K = router.weight.shape
    acc = {"H": torch.zeros(K, K, dtype=torch.float64), "n": 0}

    def hook(mod, args, kwargs_=None):
        x = (args[0] if args else kwargs_["hidden_states"]).reshape(-1, K).double()  # (tokens, H)
        acc["H"] += x.T @ x
        acc["n"] += x.shape[0]
    h = router.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        streamer.run_layer(layer, hidden, kwargs, batch_size)
    finally:
        h.remove()
    if acc["n"] == 0:
        raise MoeCompressError("the router saw no calibration tokens; check --nsamples and --seqlen")
    H = (2 / acc["n"]) * acc["H"]
    W = router.weight.float()
    res = gptq(W[None], H.float()[None], AsymmetricGrid(bits), group_size, gcfg)
    Q = res.deq[0].to(router.weight.dtype)
    err = relative_output_error(W, Q.float(), H)
    router.weight.copy_(Q)
    return Q.clone(), {"bits": bits, "group_size": group_size, "tokens": acc["n"], "logit_rel_err": round(err, 8)}
