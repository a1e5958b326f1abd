"""Perplexity over non-overlapping windows (the GPTQ papers' protocol).

The text is tokenized whole (no special tokens), cut to `max_tokens`, split into windows of `seqlen`
tokens (a short tail is dropped), and perplexity = exp(mean next-token NLL over all predicted tokens).
"""
from __future__ import annotations

import math
import os

import torch

from .errors import MoeCompressError


def load_any(path: str, dtype=torch.float32, device="cpu"):
    """A packed directory through moecompress.load, an original checkpoint through transformers, on `device`
    (auto|cpu|cuda|cuda:N)."""
    from .device import resolve_device
    from .packed import MANIFEST
    device = resolve_device(device)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        from .runtime import load
        return load(path, device=str(device), dtype=dtype)
    from .checkpoint import CheckpointReader
    from .merge.loader import is_merged, load_merged
    reader = CheckpointReader(path)  # validates (missing shards, truncation, pickles) with a clear error
    if is_merged(reader.config) or reader.quantized_source:  # --ratio output: per-layer expert counts; FP8 or
        return load_merged(path, dtype).to(device)  # MXFP4 source: dequantized by the reader (transformers' CPU path fails on both)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 256, batch_size: int = 8, progress=None) -> dict:
    n = len(ids) // seqlen
    if n < 1:
        raise MoeCompressError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)  # (tokens,) -> (n, seqlen)
    nll, count = 0.0, 0
    for s in range(0, n, batch_size):
        x = windows[s:s + batch_size].to(model.device)
        logits = model(x).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        count += x[:, 1:].numel()
        if progress:
            progress.update(len(x))
    if not math.isfinite(nll):
        raise MoeCompressError("the model produced non-finite log-probabilities")
    return {"perplexity": math.exp(nll / count), "tokens": n * seqlen, "seqlen": seqlen, "windows": n}
