"""Load a reduced checkpoint whose MoE layers keep different numbers of experts (`--ratio R`).

Such a directory is a Hugging Face checkpoint (source tensor names, per-layer expert counts) whose
config.json carries a "moecompress_merge" entry; plain transformers cannot build it because its
modules assume one expert count. The skeleton is built on the meta device, each MoE layer's experts
module is replaced by `MoEExperts` over that layer's K_l experts and its router weight by a (K_l, H)
parameter, and every other tensor is loaded as stored. Uniform outputs (`--experts K`) need none of
this: `transformers.AutoModelForCausalLM.from_pretrained` loads them.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from .writer import MERGE_KEY


def is_merged(config: dict) -> bool:
    return isinstance(config.get(MERGE_KEY), dict)


def resize_router(router: torch.nn.Module, params: dict[str, torch.Tensor], num_experts: int) -> None:
    """Give a (meta) router module the per-layer expert count of a reduced checkpoint: every direct
    parameter whose stored shape differs (weight (K_l, H), bias (K_l,)) becomes a meta parameter of the
    stored shape, and so does every such buffer (DeepSeek-V3's score-correction bias (K_l,)); the
    num_experts / n_routed_experts attributes are set to K_l."""
    for name, p in list(router.named_parameters(recurse=False)):
        if name in params and params[name].shape != p.shape:
            setattr(router, name, torch.nn.Parameter(torch.empty(params[name].shape, device="meta"), requires_grad=False))
    for name, b in list(router.named_buffers(recurse=False)):
        if b is not None and name in params and params[name].shape != b.shape:
            setattr(router, name, torch.empty(params[name].shape, device="meta", dtype=b.dtype))
    for attr in ("num_experts", "n_routed_experts"):
        if hasattr(router, attr):
            setattr(router, attr, num_experts)


def load_merged(path: str, dtype=torch.float32):
    """A model from a reduced checkpoint with per-layer expert counts, or from a quantized source (FP8, MXFP4)
    as the reader dequantizes it (CPU, eval mode)."""
    from ..arch import PROJS
    from ..checkpoint import CheckpointReader
    from ..experts import MoEExperts, make_glu
    from ..layerwise import find_experts, fresh_rotary, hf_config, meta_model, set_submodule

    reader = CheckpointReader(path)
    arch, cfg = reader.arch, reader.config
    if arch.glu != "swiglu" and is_merged(cfg):
        raise CheckpointError(f"{arch.family}: reduced checkpoints of this family are not supported")
    config = hf_config({k: v for k, v in cfg.items() if k != MERGE_KEY}, dtype)
    model = meta_model(config)
    glu = make_glu(arch.glu, config)
    layers = model.model.layers
    experts = {}
    for i in reader.moe_layers:
        found = find_experts(layers[i])
        if found is None:
            raise CheckpointError(f"layer {i} has expert tensors but no MoE block in this config")
        st = reader.layer_experts(i, dtype)  # {"gate": (K, I, H), "up": (K, I, H), "down": (K, H, I)}
        b = reader.layer_expert_biases(i, dtype)  # GPT-OSS (a quantized source, evaluate.load_any), else None
        experts[i] = (found[0], [{p: st[p][k] for p in PROJS} for k in range(st["gate"].shape[0])],
                      None if b is None else [{p: b[p][k] for p in PROJS} for k in range(b["gate"].shape[0])])
        set_submodule(layers[i], found[0], torch.nn.Module())
    state = {arch.to_mem(k): reader.get(k).to(dtype) for k in reader.tensors if not reader.is_expert_tensor(k)}
    for i in experts:  # router rows: (K_l, H) instead of the config's count
        pre = f"{reader.prefix}.{i}.{arch.router_mem}."
        resize_router(layers[i].get_submodule(arch.router_mem),
                      {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}, len(experts[i][1]))
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [m for m in missing if not (tied and m.startswith("lm_head."))]
    if missing or unexpected:
        raise CheckpointError(f"reduced checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()
    fresh_rotary(model)
    model = model.to(dtype)
    for i, (p, w, b) in experts.items():
        set_submodule(layers[i], p, MoEExperts(w, glu, b))
    return model.eval()
