"""Turning quantizer results into PackedTensors: integer codes at once, ternary codes per layer with the
sub1 dictionary shared across layers (`LayerEncoder`), and what a ternary result costs in bytes while
its threshold is searched (`_Sizer`, `EstimateSizer`)."""
from __future__ import annotations

import torch

from ..codecs import PackedTensor, QuantSpec, get_codec


class LayerEncoder:
    """Turns quantizer results into PackedTensors, holding what is shared across layers.

    Integer codes are packed at once. Ternary codes wait for the end of their layer: the first MoE layer's
    codes build the sub1 dictionary (QMoE's fixed dictionary, here fitted to the model's own statistics),
    which every later layer reuses; each tensor is then stored as "sub1" or dense "ternary", whichever is
    smaller. The dictionary is stored once, in the shard of the layer that built it (`take_shared`).
    """

    def __init__(self, num_moe_layers: int = 1, expert_params: int = 0):
        self.num_moe_layers = max(1, num_moe_layers)  # the dictionary's bytes are shared by all of them
        self.expert_params = expert_params  # every expert weight of the model: the dictionary's per-weight charge
        self.dictionary = None
        self._shared: dict[str, torch.Tensor] = {}
        self._pending: dict = {}
        self._written: set[str] = set()
        self.tally = dict.fromkeys(("weights", "zeros", "entropy_bits", "sub1_weights", "sub1_entropy_bits",
                                    "codeword_bits", "offset_bits", "sub1_tensors", "dense_tensors"), 0)

    def restore_from(self, directory: str) -> None:
        """--resume: pick the dictionary up from shards already written."""
        import glob
        import os

        from safetensors import safe_open
        for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            with safe_open(f, "pt") as t:
                for k in t.keys():
                    if k.startswith("moecompress.sub1_dictionary."):
                        self.dictionary = t.get_tensor(k)
                        self._written.add(k)
                        return

    def add(self, key, spec: QuantSpec, codes, scale, zero) -> PackedTensor | None:
        if spec.codec == "int":
            return get_codec("int").encode(codes, scale, zero, spec)
        if spec.codec == "ternary":  # dense ternary asked for: 5 trits per byte, no dictionary
            from ..codecs.ternary import encode_ternary
            return encode_ternary(codes, zero, scale, 0, None)
        self._pending[key] = (codes, zero, scale)  # ternary grids keep lo in zero and hi in scale
        return None

    def finish_layer(self) -> dict:
        from ..codecs.ternary import encode_ternary, split_shared
        if not self._pending:
            return {}
        if self.dictionary is None:
            from ..codecs.sub1_dict import build_dictionary
            self.dictionary = build_dictionary([c for c, _, _ in self._pending.values()],
                                               amortize=self.num_moe_layers)
        out = {}
        for key, (codes, lo, hi) in self._pending.items():
            pt, shared = split_shared(encode_ternary(codes, lo, hi, 0, self.dictionary))
            pt.attrs.pop("sizes", None)  # keep the manifest small: it counts in the size on disk
            self._count(codes, pt)
            for k, v in shared.items():
                self._shared.setdefault(k, v)
            out[key] = pt
        self._pending = {}
        return out

    def _count(self, codes: torch.Tensor, pt: PackedTensor) -> None:
        from ..codecs.sub1_dict import ZERO_TRIT, pair_entropy
        t, n = self.tally, codes.numel()
        ent = pair_entropy(codes) * n
        t["weights"] += n
        t["zeros"] += int((codes == ZERO_TRIT).sum())
        t["entropy_bits"] += ent
        if pt.codec == "sub1":
            t["sub1_tensors"] += 1
            t["sub1_weights"] += n
            t["sub1_entropy_bits"] += ent
            t["codeword_bits"] += 8 * pt.tensors["codewords"].numel()
            t["offset_bits"] += 8 * sum(pt.tensors[k].numel() * pt.tensors[k].element_size() for k in ("row_counts", "row_skip"))
        else:
            t["dense_tensors"] += 1

    def limits(self) -> dict | None:
        """The sub1 coder against its bound, over the ternary tensors this encoder packed (None if none):
        zero fraction, order-0 pair entropy (bits/weight), codeword bits/weight and their ratio, and the
        bits/weight with the per-row offsets (counts and skips) and the shared dictionary added."""
        t = self.tally
        if not t["weights"]:
            return None
        out = {"zero_fraction": round(t["zeros"] / t["weights"], 4),
               "pair_entropy_bpw": round(t["entropy_bits"] / t["weights"], 4),
               "sub1_tensors": t["sub1_tensors"], "dense_tensors": t["dense_tensors"]}
        if t["sub1_weights"]:
            w = t["sub1_weights"]
            dict_bits = 8 * (self.dictionary.numel() if self.dictionary is not None else 0)
            out.update({"sub1_pair_entropy_bpw": round(t["sub1_entropy_bits"] / w, 4),
                        "codeword_bpw": round(t["codeword_bits"] / w, 4),
                        "coder_over_entropy": round(t["codeword_bits"] / max(t["sub1_entropy_bits"], 1e-9), 4),
                        "with_offsets_and_dictionary_bpw": round((t["codeword_bits"] + t["offset_bits"] + dict_bits) / w, 4)})
        return out

    def sizer(self, spec: QuantSpec, rows: list[int]) -> "_Sizer | None":
        """For a sub1 spec with a bit budget (option target_bits): what a batch's result costs and may cost."""
        target = spec.option("target_bits", None)
        if spec.codec != "sub1" or target is None:
            return None
        return _Sizer(self, rows, float(target))

    def take_shared(self) -> dict[str, torch.Tensor]:
        """Shared tensors not yet stored (the dictionary, once): the caller writes them into its shard."""
        new = {k: v for k, v in self._shared.items() if k not in self._written}
        self._written |= set(new)
        return new


class _Sizer:
    """Real encoded bytes of a batch's ternary result (see passes/ternary_budget.py) and its budget."""

    def __init__(self, encoder: "LayerEncoder | None", rows: list[int], target_bits: float):
        self.encoder, self.rows, self.target = encoder, rows, target_bits

    def budget(self, shape: tuple[int, int, int]) -> float:
        from .ternary_budget import budget_bytes
        G, N, K = shape  # (experts, rows of the batch's projections, K)
        return budget_bytes(G * N * K, G * len(self.rows), self.target, 0.0)

    def tensors(self, res):
        """(codes, lo, hi) of every packed tensor of the batch: each expert's rows split by projection."""
        for j in range(res.codes.shape[0]):
            r0 = 0
            for n in self.rows:
                yield res.codes[j, r0:r0 + n], res.zero[j, r0:r0 + n], res.scale[j, r0:r0 + n]
                r0 += n

    def nbytes(self, res) -> int:
        from ..codecs.sub1_dict import build_dictionary
        from ..codecs.ternary import encode_ternary, encoded_nbytes
        G, N, K = res.codes.shape  # (experts, rows of the batch's projections, K)
        d = self.encoder.dictionary
        if d is None:  # first MoE layer, no dictionary yet: one from this candidate's codes (a row sample:
            # the final dictionary is built from the whole layer at its end, see finish_layer)
            d = build_dictionary(list(res.codes), amortize=self.encoder.num_moe_layers, max_rows=2048)
        total = sum(encoded_nbytes(encode_ternary(c, lo, hi, 0, d)) for c, lo, hi in self.tensors(res))
        if self.encoder.expert_params:
            total += d.numel() * G * N * K / self.encoder.expert_params  # the dictionary's share
        return int(total)


class EstimateSizer(_Sizer):
    """_Sizer's estimate for when no dictionary exists yet (the allocation's sensitivity pass): a tensor's
    sub1 bytes are its order-0 pair entropy x CODER_OVERHEAD in codewords, plus row counts, skips and
    fp16 levels, capped by the dense ternary size (the codec falls back to it)."""

    def __init__(self, spec: QuantSpec, rows: list[int]):
        super().__init__(None, rows, float(spec.option("target_bits")))

    def nbytes(self, res) -> int:
        import math
        from ..codecs.sub1_dict import pair_entropy
        from ..codecs.ternary import CODER_OVERHEAD, count_dtype
        K = res.codes.shape[2]
        total = 0.0
        for c, _, _ in self.tensors(res):
            n = c.shape[0]
            sub1 = pair_entropy(c) * c.numel() * CODER_OVERHEAD / 8 + n * (count_dtype(K).itemsize + 1)
            total += min(sub1, n * math.ceil(K / 5)) + 4 * n  # + fp16 lo, hi per row
        return int(total)
