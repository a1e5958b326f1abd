"""Build a checkpoint's model one decoder layer at a time, with the architecture's own modules.

The model skeleton is created on the meta device (no memory, no init). Embeddings, rotary tables and
the per-layer keyword arguments (attention masks, position embeddings; sliding-window layers get their
own) come from running the model's own `forward` with the decoder layers swapped for recorders, so
attention, rotary and masking semantics are exactly transformers'. A decoder layer is then materialized
from the checkpoint when it is needed, its fused experts module replaced by `MoEExperts` over canonical
weights, and freed after use: peak memory is one layer plus the activations.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .arch import PROJS
from .checkpoint import CheckpointReader
from .errors import CheckpointError
from .experts import MoEExperts, make_glu


def hf_config(config_dict: dict, dtype=torch.float32):
    """A transformers config object from a config.json dict (quantization_config dropped)."""
    from transformers import AutoConfig
    d = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "moecompress")}
    mt = d.get("model_type")
    try:
        cls = AutoConfig.for_model(mt).__class__
    except (ValueError, KeyError):
        raise CheckpointError(f"transformers {__import__('transformers').__version__} does not know model_type {mt!r}") from None
    cfg = cls.from_dict(d)
    cfg.dtype = dtype
    return cfg


def meta_model(config):
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=config.dtype)


def find_experts(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """The fused experts module of a decoder layer, found by structure: 3D gate_up_proj and down_proj."""
    for name, mod in layer.named_modules():
        gu, dn = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if isinstance(gu, (nn.Parameter, torch.Tensor)) and isinstance(dn, (nn.Parameter, torch.Tensor)) and gu.dim() == 3:
            return name, mod
        if isinstance(mod, MoEExperts):
            return name, mod
    return None


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fresh_rotary(model) -> None:
    """Rotary tables are non-persistent buffers: rebuild them on the CPU after a meta init."""
    base = model.model
    rot = getattr(base, "rotary_emb", None)
    if rot is not None:
        base.rotary_emb = type(rot)(config=model.config)


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its keyword arguments and passes hidden states through."""

    def __init__(self, sink: list, index: int, layer_type=None):
        super().__init__()
        self.sink, self.index = sink, index
        self.attention_type = layer_type

    def forward(self, hidden_states, *args, **kwargs):
        self.sink.append((self.index, kwargs))
        return hidden_states


class LayerStreamer:
    """A checkpoint's model as a sequence of decoder layers materialized on demand."""

    def __init__(self, reader: CheckpointReader, dtype=torch.float32, device=None):
        self.reader = reader
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.config = hf_config(reader.config, dtype)
        self.model = meta_model(self.config)
        self.glu = make_glu(reader.arch.glu, self.config)
        fresh_rotary(self.model)
        rot = getattr(self.model.model, "rotary_emb", None)
        if rot is not None:
            rot.to(self.device)
        emb_key = f"{reader.prefix.rsplit('.', 1)[0]}.embed_tokens.weight"
        if emb_key not in reader.tensors:
            raise CheckpointError(f"no embedding table {emb_key!r} in the checkpoint")
        self.embed_weight = reader.get(emb_key).to(device=self.device, dtype=dtype)
        self.layers = self.model.model.layers
        self.num_layers = len(self.layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(S, L) token ids -> (S, L, H) inputs of layer 0."""
        emb = self.model.model.embed_tokens
        x = nn.functional.embedding(ids.to(self.device), self.embed_weight)
        scale = getattr(emb, "embed_scale", None)  # some families scale embeddings
        return x * scale if isinstance(scale, (int, float)) else x

    def layer_kwargs(self, batch: int, seqlen: int) -> list[dict]:
        """Keyword arguments transformers passes to each decoder layer for a (batch, seqlen) input."""
        sink: list = []
        real = list(self.layers)
        types = getattr(self.config, "layer_types", None)
        for i in range(self.num_layers):
            self.layers[i] = _Recorder(sink, i, types[i] if types else None)
        try:
            x = torch.zeros(batch, seqlen, self.config.hidden_size, dtype=self.dtype, device=self.device)
            base = self.model.model
            norm = base.norm
            base.norm = nn.Identity()
            try:
                base(inputs_embeds=x, use_cache=False)
            finally:
                base.norm = norm
        finally:
            for i in range(self.num_layers):
                self.layers[i] = real[i]
        out = [None] * self.num_layers
        for i, kw in sink:
            kw = dict(kw)
            kw.pop("cache", None)
            kw.pop("past_key_values", None)
            kw["use_cache"] = False
            out[i] = kw
        return out

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Non-expert tensors of decoder layer i, keyed by their in-memory names relative to the layer."""
        r = self.reader
        p = f"{r.prefix}.{i}."
        return {r.arch.to_mem(k)[len(p):]: r.get(k) for k in r.layer_keys(i) if not r.is_expert_tensor(k)}

    def build_layer(self, i: int, experts: list[dict] | None = None, biases=None, only=None) -> nn.Module:
        """Materialize decoder layer i on the streamer's device. MoE layers get `MoEExperts` over `experts` (canonical
        per-expert weights; read from the checkpoint when None: with `only`, a set of experts, the others get
        shape-only meta placeholders until the caller sets them, and are not read)."""
        layer = copy.deepcopy(self.layers[i])  # meta: free
        found = find_experts(layer)
        r = self.reader
        moe = found is not None and r.layout(i) is not None
        if moe:
            set_submodule(layer, found[0], nn.Module())  # placeholder: materialize the rest first
        state = self.layer_state(i)
        if moe and r.config_num_experts(i) != r.num_experts:  # reduced checkpoint (`merge --ratio`): K_l experts here
            from .merge.loader import resize_router
            pre = f"{r.arch.router_mem}."
            resize_router(layer.get_submodule(r.arch.router_mem),
                          {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}, r.config_num_experts(i))
        layer.to_empty(device=self.device)
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"layer {i}: checkpoint tensors do not match the {r.arch.family} module "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        layer = layer.to(self.dtype)
        if moe:
            if experts is None:
                # one tensor per expert and projection (not views of a stacked copy): each is freed as soon as
                # the quantize pass replaces it, so a layer's experts are never held twice
                from .arch import ExpertKey
                shapes = r.expert_shapes(i)
                experts = [{p: r.expert(ExpertKey(i, e, p)).to(device=self.device, dtype=self.dtype)
                            if only is None or e in only else torch.empty(shapes[p], device="meta", dtype=self.dtype)
                            for p in PROJS} for e in range(r.layer_num_experts(i))]
                b = r.layer_expert_biases(i, self.dtype)
                b = None if b is None else {p: t.to(self.device) for p, t in b.items()}
                biases = None if b is None else [{p: b[p][e] for p in PROJS} for e in range(len(experts))]
            set_submodule(layer, found[0], MoEExperts(experts, self.glu, biases))
        return layer.eval()

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
        """hidden: (S, L, H) -> layer output (S, L, H), in mini-batches (kwargs built for batch_size rows)."""
        outs = []
        with torch.no_grad():
            for s in range(0, hidden.shape[0], batch_size):
                x = hidden[s:s + batch_size].to(self.device, non_blocking=True)
                kw = _fit_batch(kwargs, x.shape[0])
                y = layer(x, **kw)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return torch.cat(outs)


def _fit_batch(kwargs: dict, n: int) -> dict:
    """Slice batch-shaped tensors (masks, position embeddings) of a recorded kwargs dict to n rows."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] > n:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        if isinstance(v, dict):
            return {k: cut(t) for k, t in v.items()}
        return v
    return {k: cut(v) for k, v in kwargs.items()}


def tokenizer_files(src: str) -> list[str]:
    """The files beside the weights that an output keeps from its source: tokenizer, generation config."""
    return [f for f in sorted(os.listdir(src))
            if (f.startswith("tokenizer") or f in ("special_tokens_map.json", "generation_config.json", "vocab.json",
                                                    "merges.txt", "chat_template.jinja", "added_tokens.json")
                or f.endswith(".model")) and os.path.isfile(os.path.join(src, f))]


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    import shutil
    done = tokenizer_files(src)
    for f in done:
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return done
