"""Architecture specs: one `ArchSpec` per MoE family, describing names, not classes.

A family's spec says where a decoder layer's experts live on disk (one tensor per expert, or fused 3D
tensors), how non-expert disk names map to the transformers v5 in-memory names, and which gated
activation the experts use. Everything downstream works on canonical expert weights addressed by
`ExpertKey(layer, expert, proj)` with proj in {"gate", "up", "down"}, each an (out, in) matrix:
gate (I, H), up (I, H), down (H, I); GPT-OSS's fused [E, H, 2I] interleaved layout and its biases are
converted at the boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import CheckpointError

PROJS = ("gate", "up", "down")


class ExpertKey(NamedTuple):
    layer: int
    expert: int
    proj: str  # "gate" | "up" | "down"


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    expert_count_keys: tuple[str, ...]      # config keys holding the routed expert count
    moe_disk: str = "mlp"                   # disk name of the MoE block inside a decoder layer
    router_mem: str = "mlp.gate"            # in-memory path of the router inside a decoder layer
    per_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # disk names of gate, up, down
    renames: tuple[tuple[str, str], ...] = ()  # (disk substring, in-memory substring), applied in order
    glu: str = "swiglu"                     # "swiglu" (act(gate) * up) or "gptoss" (clamped, biased)
    fused_on_disk: bool = False             # the family's own save format is fused (GPT-OSS)
    shared_expert_paths: tuple[str, ...] = field(default_factory=tuple)
    shared_gate_paths: tuple[str, ...] = field(default_factory=tuple)  # the sigmoid gate of each shared expert, if any
    router_score: str = "softmax"           # each expert's score before top-k, from the router's logits (all experts):
    # "softmax" over the logits, or "sigmoid_bias" (DeepSeek-V3: sigmoid(logit) + e_score_correction_bias, the
    # score its top-k selects on); passes/moe_cache.py `router_scores`, used by `--all-tokens`

    def num_experts(self, config: dict) -> int:
        for k in self.expert_count_keys:
            if config.get(k):
                return int(config[k])
        raise CheckpointError(f"config.json of this {self.family} model has none of {self.expert_count_keys}")

    def expert_count_key(self, config: dict) -> str:
        return next(k for k in self.expert_count_keys if config.get(k))

    def to_mem(self, disk_key: str) -> str:
        for a, b in self.renames:
            if a in disk_key:
                return disk_key.replace(a, b)
        return disk_key

    def to_disk(self, mem_key: str) -> str:
        for a, b in self.renames:
            if b in mem_key:
                return mem_key.replace(b, a)
        return mem_key

    def per_expert_key(self, layer: int, expert: int, proj: str, prefix: str = "model.layers") -> str:
        name = self.per_expert_names[PROJS.index(proj)]
        return f"{prefix}.{layer}.{self.moe_disk}.experts.{expert}.{name}.weight"

    def fused_keys(self, layer: int, prefix: str = "model.layers") -> dict[str, str]:
        base = f"{prefix}.{layer}.mlp.experts"
        keys = {"gate_up": f"{base}.gate_up_proj", "down": f"{base}.down_proj"}
        if self.glu == "gptoss":
            keys.update(gate_up_bias=f"{base}.gate_up_proj_bias", down_bias=f"{base}.down_proj_bias")
        return keys


_COUNT = ("num_local_experts", "num_experts", "n_routed_experts")
_MIXTRAL_RENAMES = (("block_sparse_moe.", "mlp."),)

ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    for t in spec.model_types:
        ARCHS[t] = spec
    return spec


register_arch(ArchSpec("Mixtral", ("mixtral", "minimax"), _COUNT, moe_disk="block_sparse_moe",
                       per_expert_names=("w1", "w3", "w2"), renames=_MIXTRAL_RENAMES))
register_arch(ArchSpec("Phi-MoE", ("phimoe",), _COUNT, moe_disk="block_sparse_moe",
                       router_mem="mlp.router", per_expert_names=("w1", "w3", "w2"),
                       renames=(("block_sparse_moe.gate.", "mlp.router."),) + _MIXTRAL_RENAMES))
register_arch(ArchSpec("Qwen2-MoE", ("qwen2_moe",), _COUNT, shared_expert_paths=("mlp.shared_expert",),
                       shared_gate_paths=("mlp.shared_expert_gate",)))
register_arch(ArchSpec("Qwen3-MoE", ("qwen3_moe",), _COUNT))
register_arch(ArchSpec("OLMoE", ("olmoe",), _COUNT))
register_arch(ArchSpec("DeepSeek-V2", ("deepseek_v2",), _COUNT, shared_expert_paths=("mlp.shared_experts",)))
register_arch(ArchSpec("DeepSeek-V3", ("deepseek_v3",), _COUNT, shared_expert_paths=("mlp.shared_experts",),
                       router_score="sigmoid_bias"))
register_arch(ArchSpec("GPT-OSS", ("gpt_oss",), _COUNT, router_mem="mlp.router", glu="gptoss",
                       fused_on_disk=True))


def arch_for(config: dict) -> ArchSpec:
    """The spec for a config.json dict, or a one-line error naming what was found."""
    mt = config.get("model_type")
    archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if mt in ARCHS:
        return ARCHS[mt]
    supported = sorted({s.family for s in ARCHS.values()})
    if not any(k in config for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")):
        raise CheckpointError(f"model_type {mt!r} ({archs}) is a dense model with no MoE experts; "
                              f"moecompress compresses Mixture-of-Experts models ({', '.join(supported)})")
    raise CheckpointError(f"unsupported MoE architecture: model_type {mt!r} ({archs}); supported: {', '.join(supported)}")
