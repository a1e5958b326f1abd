"""Calibration text: sources, tokenization and windows.

Sources are text files, JSONL files (a "text" field per line), directories of such files, and weighted
mixes written `PATH:WEIGHT` (a weight scales how many windows a source contributes). With no source
the built-in mixed-domain text shipped with the package is used. Windows are `seqlen` tokens cut at
seeded random offsets (GPTQ's calibration recipe), spread over sources by weight.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

import torch

from ..errors import MoeCompressError

TEXT_EXTS = (".txt", ".md", ".py", ".c", ".h", ".rst", ".json", ".jsonl", ".text")


def builtin_text_path() -> str:
    return str(resources.files("moecompress.data") / "text" / "calib_mix.txt")


@dataclass(frozen=True)
class Source:
    path: str
    weight: float = 1.0


def parse_sources(specs: list[str] | None) -> list[Source]:
    if not specs:
        return [Source(builtin_text_path())]
    out = []
    for s in specs:
        path, weight = s, 1.0
        head, sep, tail = s.rpartition(":")
        if sep and head and not os.path.exists(s):
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass
        if not os.path.exists(path):
            raise MoeCompressError(f"calibration source not found: {path}")
        if weight <= 0:
            raise MoeCompressError(f"calibration weight must be positive: {s}")
        out.append(Source(path, weight))
    return out


def read_source(path: str) -> str:
    """All the text of a file, a JSONL file's "text" fields, or a directory's text files (sorted)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(path) for f in fs if f.endswith(TEXT_EXTS))
        if not files:
            raise MoeCompressError(f"calibration directory {path} has no text files ({', '.join(TEXT_EXTS)})")
        return "\n\n".join(read_source(f) for f in files)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            data = f.read()
    except OSError as e:
        raise MoeCompressError(f"cannot read calibration file {path}: {e.strerror}") from None
    if path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise MoeCompressError(f"{path}:{n}: not a JSON line") from None
            t = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(t, str):
                raise MoeCompressError(f"{path}:{n}: no string field \"text\"")
            texts.append(t)
        data = "\n\n".join(texts)
    if not data.strip():
        raise MoeCompressError(f"calibration source {path} is empty")
    return data


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception as e:
        raise MoeCompressError(f"cannot load the tokenizer from {model_path}: {str(e).splitlines()[0][:200]}") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_pool(tokenizer, sources: list[Source]) -> list[tuple[torch.Tensor, float]]:
    return [(tokenize(tokenizer, read_source(s.path)), s.weight) for s in sources]


def random_windows(pool: list[tuple[torch.Tensor, float]], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) windows at seeded random offsets, split over sources by weight."""
    if nsamples < 1 or seqlen < 2:
        raise MoeCompressError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    short = [len(ids) for ids, _ in pool if len(ids) <= seqlen]
    if short:
        raise MoeCompressError(f"calibration text too short: {short[0]} tokens, need more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    total = sum(w for _, w in pool)
    counts = [int(nsamples * w / total) for _, w in pool]
    for i in range(nsamples - sum(counts)):  # hand out the remainder in order
        counts[i % len(counts)] += 1
    rows = []
    for (ids, _), n in zip(pool, counts):
        starts = torch.randint(0, len(ids) - seqlen, (n,), generator=g)
        rows += [ids[s:s + seqlen] for s in starts.tolist()]
    return torch.stack(rows)
