"""Write a reduced checkpoint in Hugging Face layout: the source's own tensor names, fewer experts.

One safetensors shard per decoder layer plus one for the global tensors, and a
model.safetensors.index.json, written into `.<out>.partial` and renamed into place at the end.
Non-expert tensors are copied unchanged except the router: its rows (weight, bias, and any other
per-expert router tensor such as DeepSeek-V3's score-correction bias) are the reduced ones.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from ..arch import PROJS
from ..checkpoint import MERGE_KEY  # read back by CheckpointReader.experts_per_layer
from .reduction import LayerReduction

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class MergedWriter:
    def __init__(self, reader, out: str):
        self.reader, self.out = reader, os.path.abspath(out)
        self.tmp = os.path.join(os.path.dirname(self.out), f".{os.path.basename(self.out)}.partial")
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.maps: dict[int, list[int]] = {}

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(self.tmp, name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total_bytes += v.numel() * v.element_size()

    def write_layer(self, i: int, red: LayerReduction | None) -> None:
        r, arch = self.reader, self.reader.arch
        router_prefix = f"{r.prefix}.{i}.{arch.router_mem}."
        tensors = {}
        for k in r.layer_keys(i):
            if r.is_expert_tensor(k):
                continue
            t = r.get(k)
            mem = arch.to_mem(k)
            if red is not None and mem.startswith(router_prefix):
                leaf = mem[len(router_prefix):]
                if leaf == "weight":
                    t = red.router_weight.to(device="cpu", dtype=t.dtype)
                elif leaf == "bias" and red.router_bias is not None:
                    t = red.router_bias.to(device="cpu", dtype=t.dtype)
                elif t.dim() >= 1 and t.shape[0] == len(red.expert_map):
                    t = t[[g[0] for g in red.groups]]  # per-expert router tensor: the representative's
            tensors[k] = t
        if red is not None:
            self.maps[i] = list(red.expert_map)
            keys = r.expert_keys_on_disk(i)
            dtype = DTYPES.get(r.tensors[keys[0]].dtype, torch.float32)
            I = red.down.shape[2]
            if r.layout(i) == "per_expert":
                for k in range(red.num_experts):
                    parts = {"gate": red.gate_up[k, :I], "up": red.gate_up[k, I:], "down": red.down[k]}
                    for p in PROJS:
                        tensors[arch.per_expert_key(i, k, p, r.prefix)] = parts[p].to(device="cpu", dtype=dtype)
            else:
                fk = arch.fused_keys(i, r.prefix)
                tensors[fk["gate_up"]] = red.gate_up.to(device="cpu", dtype=dtype)  # (K, 2I, H)
                tensors[fk["down"]] = red.down.to(device="cpu", dtype=dtype)  # (K, H, I)
        self._save(f"model-layer-{i:05d}.safetensors", tensors)

    def write_globals(self) -> None:
        r = self.reader
        self._save("model-globals.safetensors", {k: r.get(k) for k in r.global_keys()})

    def finish(self, counts: dict[int, int], records: list[dict], uniform: bool, run: dict) -> None:
        r = self.reader
        cfg = dict(r.config)
        cfg.pop("quantization_config", None)  # an FP8/MXFP4 source's: the tensors written here are dequantized
        cfg[r.arch.expert_count_key(cfg)] = max(counts.values())
        if not uniform:  # per-layer counts: only moecompress builds this (loader.load_merged)
            cfg[MERGE_KEY] = {"format_version": 1, "experts_per_layer": {str(i): k for i, k in counts.items()},
                              "expert_map": {str(i): m for i, m in self.maps.items()}}
        _dump(os.path.join(self.tmp, "config.json"), cfg)
        _dump(os.path.join(self.tmp, "model.safetensors.index.json"),
              {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))})
        for rel, obj in run.items():
            p = os.path.join(self.tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            _dump(p, obj)
        if os.path.isfile(os.path.join(r.path, "generation_config.json")):
            shutil.copy2(os.path.join(r.path, "generation_config.json"), self.tmp)
        os.replace(self.tmp, self.out)


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
