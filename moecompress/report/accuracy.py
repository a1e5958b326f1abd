"""Accuracy side by side: perplexity, greedy generations and (when available) lm-eval tasks.

Perplexity comes from `moecompress.api.evaluate`, the function behind `moecompress eval`, so the
report's numbers are the same numbers for the same --seqlen/--max-tokens. Relative change is
(ppl_compressed - ppl_baseline) / ppl_baseline.

Perplexity averages over every token and can hide a broken expert, so the report also decodes a few
prompts greedily (argmax, no sampling, KV cache) with both models and reports the first generated
token where they diverge: identical continuations mean the compressed model makes the same top-1
choice at every step of that continuation.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
from typing import NamedTuple

import torch


def perplexities(baseline: str, compressed: str, texts: list[str], seqlen: int, max_tokens: int | None,
                 progress: bool = False, device: str = "auto") -> dict:
    """{text: {"baseline": eval result, "compressed": eval result, "relative_change": float}}."""
    from .. import api
    base = api.evaluate(baseline, texts, seqlen=seqlen, max_tokens=max_tokens, progress=progress, device=device)
    comp = api.evaluate(compressed, texts, seqlen=seqlen, max_tokens=max_tokens, progress=progress, device=device)
    out = {}
    for t in texts:
        b, c = base[t]["perplexity"], comp[t]["perplexity"]
        out[t] = {"baseline": base[t], "compressed": comp[t], "relative_change": (c - b) / b}
    return out


def pick_prompts(texts: list[str], count: int, max_chars: int = 64) -> list[dict]:
    """`count` prompts taken from the texts, round-robin: evenly spaced lines of >= 40 characters,
    cut to `max_chars` at a word boundary."""
    from ..calibration.data import read_source
    per_text = []
    for t in texts:
        lines = [ln.strip() for ln in read_source(t).splitlines()]
        lines = [ln for ln in lines if len(ln) >= 40 and not ln.startswith(("=", "#", "//", "/*", "*"))]
        per_text.append((t, lines))
    prompts = []
    n_each = [count // len(texts) + (1 if i < count % len(texts) else 0) for i in range(len(texts))]
    for (t, lines), n in zip(per_text, n_each):
        for j in range(n):
            if not lines:
                break
            ln = lines[(2 * j + 1) * len(lines) // (2 * n)]  # evenly spaced, away from the ends
            cut = ln[:max_chars]
            if len(ln) > max_chars and " " in cut:
                cut = cut[: cut.rindex(" ")]
            prompts.append({"text": os.path.basename(t), "prompt": cut})
    return prompts


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation of prompt ids (1-D) for `new_tokens` steps (stops after an EOS token)."""
    from transformers import DynamicCache
    # transformers 5.24 names the argument `cache` (older: `past_key_values`); the cache updates in place
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    out, x = [], ids[None].to(model.device)  # (T,) -> (1, T)
    for _ in range(new_tokens):
        res = model(input_ids=x, use_cache=True, **{kw: cache})
        nxt = int(res.logits[0, -1].float().argmax())
        out.append(nxt)
        if nxt in eos:
            break
        x = torch.tensor([[nxt]])
    return out


class Divergence(NamedTuple):
    index: int | None     # first generated position where the two differ (None: identical)
    matched: int          # tokens equal before it


def first_divergence(a: list[int], b: list[int]) -> Divergence:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return Divergence(i, i)
    if len(a) != len(b):
        return Divergence(min(len(a), len(b)), min(len(a), len(b)))
    return Divergence(None, len(a))


def _eos(model) -> set[int]:
    e = getattr(model.config, "eos_token_id", None)
    return set(e) if isinstance(e, (list, tuple)) else ({e} if e is not None else set())


def generations(baseline: str, compressed: str, prompts: list[dict], new_tokens: int, device: str = "auto") -> list[dict]:
    """Each prompt decoded greedily by both models, with the first token where they diverge."""
    from ..calibration.data import load_tokenizer, tokenize
    from ..evaluate import load_any
    if not prompts or new_tokens < 1:
        return []
    tok = load_tokenizer(baseline)
    ids = [tokenize(tok, p["prompt"]) for p in prompts]
    conts = {}
    for side, path in (("baseline", baseline), ("compressed", compressed)):
        model = load_any(path, device=device)
        conts[side] = [greedy(model, x, new_tokens, _eos(model)) for x in ids]
        del model
    rows = []
    for p, b, c in zip(prompts, conts["baseline"], conts["compressed"]):
        d = first_divergence(b, c)
        row = {**p, "new_tokens": new_tokens, "baseline": tok.decode(b), "compressed": tok.decode(c),
               "baseline_ids": b, "compressed_ids": c, "diverges_at": d.index, "matched_tokens": d.matched,
               "common": tok.decode(b[: d.matched])}
        if d.index is not None:
            row["baseline_token"] = tok.decode(b[d.index:d.index + 1]) if d.index < len(b) else "<end>"
            row["compressed_token"] = tok.decode(c[d.index:d.index + 1]) if d.index < len(c) else "<end>"
        rows.append(row)
    return rows


def lm_eval_tasks(baseline: str, compressed: str, tasks: list[str], limit: int | None, device: str = "auto") -> dict:
    """lm-eval tasks on both models when lm-eval is installed and each task's data is on this machine.

    Never downloads: the Hugging Face hub and datasets run offline, so a task whose data is not cached
    locally is listed as skipped with the reason.
    """
    if not tasks:
        return {"ran": {}, "skipped": {}, "note": "no lm-eval tasks requested (--tasks)"}
    if importlib.util.find_spec("lm_eval") is None:
        return {"ran": {}, "skipped": {t: "lm-eval is not installed (pip install lm-eval)" for t in tasks},
                "note": "lm-eval is not installed: task accuracies skipped"}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..calibration.data import load_tokenizer
    from ..evaluate import load_any
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except Exception as e:  # an lm-eval too old or too new for this API
        return {"ran": {}, "skipped": {t: f"lm-eval import failed: {e}" for t in tasks}, "note": "lm-eval unusable"}
    ran, skipped = {}, {}
    tok = load_tokenizer(baseline)
    for side, path in (("baseline", baseline), ("compressed", compressed)):
        lm = HFLM(pretrained=load_any(path, device=device), tokenizer=tok, batch_size=8)
        for t in tasks:
            if t in skipped:
                continue
            try:
                res = simple_evaluate(model=lm, tasks=[t], limit=limit, log_samples=False)["results"]
            except Exception as e:  # task data not cached locally, unknown task, ...
                skipped[t] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                continue
            for name, metrics in res.items():
                nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
                ran.setdefault(name, {})[side] = nums
    return {"ran": ran, "skipped": skipped, "limit": limit,
            "note": "" if ran else "no lm-eval task could run with the data on this machine"}
