"""The MoE cache: what a decoder layer's MoE block hands its experts, recorded once per layer.

Calibrating a MoE layer needs, per expert, the inputs routed to it (gate/up Hessians) and the
intermediate activations of its quantized gate/up (down Hessians). None of that depends on the other
experts, so the decoder layer runs once over the calibration windows with its experts replaced by a
recorder (`capture`), which keeps for every accumulation chunk c (a fixed number of windows):

    X_c (T_c, H)   the experts' input (the MoE block's normalized hidden states)
    idx_c, w_c     (T_c, k) the routing: top-k expert indices and gate weights
    S_c            the shared experts' input, when it is not X_c itself
    s_c (T_c, E)   with `--all-tokens` only: every expert's router score before top-k selection, by the
                   family's rule (`router_scores`), for the all-token Hessians (passes/calibrate.py)

and every later step reads the cache instead of re-running attention: a chunk of experts gathers its
tokens (`replay`), an expert's down-projection inputs are recomputed from its own quantized gate/up.
Replay visits the chunks in window order and, within a chunk, the experts in index order with their
tokens in position order: exactly the order in which one process's forward would have fed an observer,
so Hessians are summed in the same order whatever the number of expert chunks or ranks. `replay_all`
visits every token of every chunk for each expert, in the same chunk and expert order.

Router scores (`router_scores`, the rule named by `ArchSpec.router_score`), from the router's own logits z_t:
    softmax       s_t = softmax(z_t) over all E experts (Mixtral, Qwen2/3-MoE, OLMoE, Phi-MoE, DeepSeek-V2,
                  and GPT-OSS, whose router takes the softmax over the top-k logits only: the score here is
                  the pre-top-k softmax over all of them, same ranking, and every expert gets one)
    sigmoid_bias  s_t = max(0, sigmoid(z_t) + b) with b the router's e_score_correction_bias (DeepSeek-V3):
                  the score its top-k selection ranks experts by (its gate weight is sigmoid(z) alone,
                  renormalized over the top k); clamped at 0 so it can weight a Hessian
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import MoeCompressError

ALL_TOKEN_ROWS = 2048  # rows per step of `replay_all` (bounds the (rows, I) intermediate activations of one expert)


def router_scores(rule: str, logits: torch.Tensor, router=None) -> torch.Tensor:
    """(T, E) float32: every expert's score before top-k selection (module docstring), from (..., E) logits."""
    z = logits.reshape(-1, logits.shape[-1]).float()
    if rule == "softmax":
        return torch.softmax(z, dim=-1)
    if rule == "sigmoid_bias":
        s = torch.sigmoid(z)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            s = s + bias.to(s.device, torch.float32)
        return s.clamp(min=0)
    raise MoeCompressError(f"unknown router score rule {rule!r}")


@dataclass
class CacheChunk:
    x: torch.Tensor                      # (T_c, H) experts' input
    idx: torch.Tensor                    # (T_c, k) routed experts
    w: torch.Tensor                      # (T_c, k) gate weights
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # shared expert path -> its input, if not x
    s: torch.Tensor | None = None        # (T_c, E) router scores before top-k (--all-tokens only)
    xf: torch.Tensor | None = None       # (T_c, H) the unquantized model's x at the same positions (--fp-target)
    shared_fp: dict | None = None        # --fp-target: the unquantized model's shared-expert inputs, if not xf

    @property
    def nbytes(self) -> int:
        ts = (self.x, self.idx, self.w, *self.shared.values()) + (() if self.s is None else (self.s,)) + (
            () if self.xf is None or self.xf is self.x else (self.xf,)) + tuple(
            t for p, t in (self.shared_fp or {}).items() if t is not self.shared.get(p))
        return sum(t.numel() * t.element_size() for t in ts)

    def to_tensors(self, j: int) -> dict[str, torch.Tensor]:
        d = {f"{j}.x": self.x, f"{j}.idx": self.idx, f"{j}.w": self.w}
        d.update({f"{j}.shared.{p}": t for p, t in self.shared.items()})
        if self.s is not None:
            d[f"{j}.s"] = self.s
        return d

    @staticmethod
    def from_tensors(d: dict[str, torch.Tensor], j: int) -> "CacheChunk":
        pre = f"{j}.shared."
        return CacheChunk(d[f"{j}.x"], d[f"{j}.idx"], d[f"{j}.w"],
                          {k[len(pre):]: v for k, v in d.items() if k.startswith(pre)}, d.get(f"{j}.s"))


class MoECache:
    """Chunks in window order (see the module docstring)."""

    def __init__(self, chunks: list[CacheChunk], device: torch.device):
        self.chunks = chunks
        self.device = device
        self.fp_is_self = False  # --fp-target: the unquantized inputs are these very ones (no layer quantized yet)
        self.fp_attached = False  # --fp-target: attach_fp was called

    @property
    def tokens(self) -> int:
        return sum(c.x.shape[0] for c in self.chunks)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def attach_fp(self, fp: "MoECache") -> None:
        """--fp-target: chunk by chunk, the unquantized model's experts' input at the same token positions (the
        cache of the same layer run on the unquantized hidden states; the routing stays this cache's)."""
        self.fp_is_self = fp is self
        self.fp_attached = True
        if len(fp.chunks) != len(self.chunks):
            raise MoeCompressError(f"--fp-target: {len(fp.chunks)} unquantized cache chunks for {len(self.chunks)}")
        for c, f in zip(self.chunks, fp.chunks):
            if f.x.shape != c.x.shape:
                raise MoeCompressError(f"--fp-target: cache chunk shapes differ: {tuple(f.x.shape)} against {tuple(c.x.shape)}")
            c.xf = f.x
            c.shared_fp = f.shared

    def shared_input(self, c: CacheChunk, path: str) -> torch.Tensor:
        return c.shared.get(path, c.x).to(self.device, non_blocking=True)

    def shared_input_fp(self, c: CacheChunk, path: str) -> torch.Tensor:
        """--fp-target: the unquantized model's input of the shared expert at `path` (attach_fp)."""
        if c.xf is None:
            raise MoeCompressError("--fp-target: the MoE cache holds no unquantized inputs")
        return (c.shared_fp or {}).get(path, c.xf).to(self.device, non_blocking=True)

    def replay(self, num_experts: int, observer, compute_h=None, h_for=None, only=None) -> None:
        """Feed `observer(e, tok, x, h, w)` as `MoEExperts.forward` would, chunk by chunk, for the experts
        in `only` (None: all).

        tok: positions of expert e's tokens within the chunk, x: their inputs, w: their gate weights,
        h: compute_h(e, x) for experts in `h_for` (the down projections' inputs), else None.
        An observer with `wants_fp` set also gets xf=, the unquantized model's inputs of those tokens."""
        want = set(h_for or ())
        wants_fp = getattr(observer, "wants_fp", False)
        only = None if only is None else set(only)
        for c in self.chunks:
            X = c.x.to(self.device, non_blocking=True)
            idx = c.idx.to(self.device, non_blocking=True)
            w = c.w.to(self.device, non_blocking=True)
            k = idx.shape[1]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, positions ascending
            counts = torch.bincount(flat.clamp(0, num_experts), minlength=num_experts + 1)
            start = 0
            wf = w.reshape(-1)
            for e, n in enumerate(counts.tolist()[:num_experts]):
                if n == 0:
                    continue
                sel = order[start:start + n]
                start += n
                if only is not None and e not in only:
                    continue
                tok = sel // k
                xe = X[tok]
                h = compute_h(e, xe) if compute_h is not None and e in want else None
                if wants_fp:
                    if c.xf is None:
                        raise MoeCompressError("--fp-target: the MoE cache holds no unquantized inputs")
                    observer(e, tok, xe, h, wf[sel], xf=c.xf.to(self.device, non_blocking=True)[tok])
                else:
                    observer(e, tok, xe, h, wf[sel])

    def replay_all(self, experts, observer, compute_h=None) -> None:
        """Feed `observer(e, v, s)` every calibration token for each expert in `experts` (index order), chunk by
        chunk in window order, in fixed steps of ALL_TOKEN_ROWS rows: v the inputs x, or compute_h(e, x)
        (the down projection's input) when given, s (rows,) the tokens' router scores for e."""
        for c in self.chunks:
            if c.s is None:
                raise MoeCompressError("the MoE cache holds no router scores: it was captured without --all-tokens")
            X = c.x.to(self.device, non_blocking=True)
            S = c.s.to(self.device, non_blocking=True)
            for e in sorted(experts):
                for r in range(0, X.shape[0], ALL_TOKEN_ROWS):
                    x = X[r:r + ALL_TOKEN_ROWS]
                    observer(e, x if compute_h is None else compute_h(e, x), S[r:r + ALL_TOKEN_ROWS, e])


class Capture:
    """Records what the experts module of a layer receives; installed as `MoEExperts.capture`.

    A forward micro-batch of several accumulation chunks is split back into chunks of `chunk_tokens`
    rows (windows are contiguous in the flattened (B*L, H) hidden states)."""

    def __init__(self, chunk_tokens: int, store):
        self.chunk_tokens = chunk_tokens
        self.store = store  # tensor -> where the cache keeps it (device or pinned host memory)
        self.chunks: list[CacheChunk] = []
        self._shared: dict[str, torch.Tensor] = {}
        self._routed = None
        self._scores: torch.Tensor | None = None
        self.compute_outputs = False  # True: the experts still compute (the layer's output is wanted too)

    def router_hook(self, rule: str):
        """A forward hook for the layer's router (--all-tokens): its logits (output[0]) -> every expert's score."""
        def hook(mod, args, out):
            logits = out[0] if isinstance(out, (tuple, list)) else out
            self._scores = router_scores(rule, logits, mod)
        return hook

    def shared_hook(self, path: str):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._shared[path] = x.reshape(-1, x.shape[-1])
        return hook

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        self._routed = (x, idx, w)

    def end_batch(self) -> None:
        """After each forward micro-batch: split what the block saw into accumulation chunks."""
        x, idx, w = self._routed
        shared = {p: s for p, s in self._shared.items()  # a shared expert fed the experts' own input: no copy
                  if not (s.data_ptr() == x.data_ptr() and s.shape == x.shape)}
        scores = self._scores
        if scores is not None and scores.shape[0] != x.shape[0]:
            raise MoeCompressError(f"the router scored {scores.shape[0]} tokens but the experts received {x.shape[0]}")
        self._routed, self._shared, self._scores = None, {}, None
        n = self.chunk_tokens
        for s in range(0, x.shape[0], n):
            self.chunks.append(CacheChunk(self.store(x[s:s + n].clone()), self.store(idx[s:s + n].clone()),
                                          self.store(w[s:s + n].clone()),
                                          {p: self.store(t[s:s + n].clone()) for p, t in shared.items()},
                                          None if scores is None else self.store(scores[s:s + n].clone())))
