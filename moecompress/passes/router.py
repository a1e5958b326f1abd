"""Router quantization (optional, `--router-bits B`), as MoEQuant does: the router's weight (E, H) is
quantized by GPTQ on the Hessian of its own inputs, and routing is recomputed with it.

The router sees every token (not only the routed ones), so its Hessian is H = 2/n sum_t x_t x_t^T over
all calibration tokens of the layer, summed from the layer's MoE cache (passes/moe_cache.py). The
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
def quantize_router(layer, cache, arch, bits: int, group_size: int, gcfg: GPTQConfig) -> tuple[torch.Tensor, dict]:
    """GPTQ the router of a materialized layer in place, on the Hessian of its inputs (the MoE block's
    input, read from the layer's MoE cache); -> (its new weight, record). The caller recaptures the cache,
    so the experts see the quantized routing."""
    router = router_module(layer, arch)
    E, K = router.weight.shape
    H = torch.zeros(K, K, dtype=torch.float64, device=cache.device)
    n = 0
    for c in cache.chunks:
        x = c.x.to(cache.device).reshape(-1, K).double()  # (tokens, H)
        H += x.T @ x
        n += x.shape[0]
    if n == 0:
        raise MoeCompressError("the router saw no calibration tokens; check --nsamples and --seqlen")
    H = (2 / n) * H
    W = router.weight.float()
    res = gptq(W[None], H.float()[None], AsymmetricGrid(bits), group_size, gcfg)
    Q = res.deq[0].to(router.weight.dtype)
    err = relative_output_error(W, Q.float(), H)
    router.weight.copy_(Q)
    return Q.clone(), {"bits": bits, "group_size": group_size, "tokens": n, "logit_rel_err": round(err, 8)}
