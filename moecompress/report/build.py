"""`build_report`: one compressed checkpoint against its original, written as json, md, html and png.

Sections (report.json keys): summary (what was saved, what was lost, in sentences), size (bytes by
component, bits per parameter, compression ratio), accuracy (perplexity per text, greedy generations,
lm-eval tasks or why they were skipped), experts (layer x expert grids: bits, routing, coverage,
merge map), timing (seconds per pass), plots (the PNG files). Every number comes from the files of the
two directories or from evaluating them; nothing is estimated.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..errors import MoeCompressError
from . import accuracy, plots, records
from .sizes import compare_sizes, size_breakdown

FORMAT_VERSION = 1
DEFAULT_TASKS = ("arc_easy", "hellaswag", "piqa")


@dataclass(frozen=True)
class ReportConfig:
    texts: tuple[str, ...]
    seqlen: int = 256                  # perplexity window (as `moecompress eval --seqlen`)
    max_tokens: int | None = None      # evaluate on the first N tokens of each text (as `eval --max-tokens`)
    prompts: int = 4                   # greedy generations side by side
    new_tokens: int = 32               # tokens generated per prompt
    tasks: tuple[str, ...] = DEFAULT_TASKS   # lm-eval tasks, run only when lm-eval and their data are present
    lm_eval_limit: int | None = 200    # examples per lm-eval task
    format_version: int = FORMAT_VERSION
    device: str = "auto"               # where both models run (auto|cpu|cuda|cuda:N)

    def __post_init__(self):
        if not self.texts:
            raise MoeCompressError("report needs at least one --text file to measure perplexity on")
        for t in self.texts:
            if not os.path.exists(t):
                raise MoeCompressError(f"--text {t} does not exist")
        if self.seqlen < 8:
            raise MoeCompressError(f"--seqlen must be at least 8, got {self.seqlen}")
        if self.max_tokens is not None and self.max_tokens < self.seqlen:
            raise MoeCompressError(f"--max-tokens {self.max_tokens} is less than one window (--seqlen {self.seqlen})")
        if self.prompts < 0 or self.new_tokens < 0:
            raise MoeCompressError("--prompts and --new-tokens must be >= 0")


def _run_records(path: str) -> dict:
    run = os.path.join(path, "run")
    return {k: records.read_json(os.path.join(run, f"{k}.json")) for k in ("calibration", "metrics", "run_config", "plan")}


def _check_dirs(compressed: str, baseline: str) -> dict | None:
    from ..packed import MANIFEST, read_manifest
    for what, p in (("compressed checkpoint", compressed), ("--baseline", baseline)):
        if not os.path.isdir(p):
            raise MoeCompressError(f"{what} {p} is not a directory")
    if os.path.abspath(compressed) == os.path.abspath(baseline):
        raise MoeCompressError("the compressed checkpoint and --baseline are the same directory: pass the original as --baseline")
    if os.path.isfile(os.path.join(baseline, MANIFEST)):
        raise MoeCompressError(f"--baseline {baseline} is a packed checkpoint: pass the original checkpoint")
    return read_manifest(compressed) if os.path.isfile(os.path.join(compressed, MANIFEST)) else None


def build_report(compressed: str, baseline: str, config: ReportConfig, out: str, *, progress: bool = False) -> dict:
    """Write report.json, report.md, report.html and the PNG plots into `out`; returns the report dict."""
    from ..checkpoint import CheckpointReader
    manifest = _check_dirs(compressed, baseline)
    base_reader = CheckpointReader(baseline)
    os.makedirs(out, exist_ok=True)

    comp_sizes = size_breakdown(compressed, manifest)
    size = compare_sizes(size_breakdown(baseline), comp_sizes)
    run = _run_records(compressed)
    source_model = (run["run_config"] or {}).get("model") or (run["run_config"] or {}).get("source")
    src_fp = ((manifest or {}).get("source") or {}).get("fingerprint")
    grids = records.expert_grids(comp_sizes.expert_grid, run["calibration"], manifest, run["run_config"])
    merged_cfg = (records.read_json(os.path.join(compressed, "config.json")) or {}).get("moecompress_merge")
    if manifest and isinstance(merged_cfg, dict) and merged_cfg.get("expert_map"):  # pruned then packed: original indices
        grids = records.to_original_experts(grids, merged_cfg["expert_map"])
    found = records.find_merge_record(compressed, baseline, source_model if isinstance(source_model, str) else None)
    merge = None
    if found:
        merge = {"record": found[0], **records.merge_map(found[1], grids.layers or base_reader.moe_layers,
                                                         grids.num_experts or base_reader.num_experts)}
        merge_metrics = records.read_json(os.path.join(os.path.dirname(found[0]), "metrics.json"))
    else:
        merge_metrics = None

    texts = list(config.texts)
    ppl = accuracy.perplexities(baseline, compressed, texts, config.seqlen, config.max_tokens, progress, config.device)
    prompts = accuracy.pick_prompts(texts, config.prompts)
    gens = accuracy.generations(baseline, compressed, prompts, config.new_tokens, config.device)
    lm = accuracy.lm_eval_tasks(baseline, compressed, list(config.tasks), config.lm_eval_limit, config.device)

    report = {
        "format_version": FORMAT_VERSION,
        "compressed": os.path.abspath(compressed), "baseline": os.path.abspath(baseline),
        "config": asdict(config),
        "provenance": {"method": (manifest or {}).get("method"), "family": (manifest or {}).get("family", base_reader.arch.family),
                       "source_model": source_model, "source_fingerprint": src_fp,
                       "baseline_fingerprint": base_reader.fingerprint,
                       "baseline_is_source": src_fp == base_reader.fingerprint if src_fp else None,
                       "run_config": (run["run_config"] or {}).get("config")},
        "size": size,
        "accuracy": {"seqlen": config.seqlen, "max_tokens": config.max_tokens, "texts": ppl, "generations": gens,
                     "lm_eval": lm},
        "experts": {**grids._asdict(), "coverage": records.coverage(grids),
                    "calibration_windows": (run["calibration"] or {}).get("windows"),
                    "merge": merge, "merge_note": None if merge else "no merge/prune recorded"},
        "timing": records.timing(run["calibration"], run["metrics"], merge_metrics),
        "missing_records": [f"run/{k}.json" for k in ("calibration", "metrics", "run_config") if run[k] is None],
    }
    report["summary"] = summarize(report)
    return render(report, out)


def render(report: dict, out: str) -> dict:
    """Plots, report.json, report.md and report.html from a report dict (also re-renders a saved report.json)."""
    from .html import write_html, write_markdown
    os.makedirs(out, exist_ok=True)
    ex = report["experts"]
    made = [plots.size_plot(report["size"], out), plots.perplexity_plot(report["accuracy"]["texts"], out),
            plots.bits_heatmap(ex, out), plots.routing_heatmap(ex, out), plots.merge_map_plot(ex["merge"], out),
            plots.coverage_plot(ex, out), plots.timing_plot(report["timing"], out)]
    report["plots"] = [p for p in made if p]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    write_markdown(report, os.path.join(out, "report.md"))
    write_html(report, out, os.path.join(out, "report.html"))
    return report


def summarize(r: dict) -> dict:
    """Plain sentences: what was saved, what was lost, what to watch."""
    s, acc, ex = r["size"], r["accuracy"], r["experts"]
    saved = (f"{plots.mb(s['baseline_bytes'])} -> {plots.mb(s['compressed_bytes'])} on disk: "
             f"{s['compression_ratio']:.2f}x smaller ({100 * s['saved_bytes'] / s['baseline_bytes']:.0f}% saved). "
             f"Expert weights went from {s['baseline_expert_bits_per_param']:.1f} to {s['expert_bits_per_param']:.2f} "
             f"bits per parameter (scales included); the whole model from {s['baseline_bits_per_param']:.1f} to "
             f"{s['bits_per_param']:.2f}.")
    ch = {os.path.basename(t): v["relative_change"] for t, v in acc["texts"].items()}
    worst = max(ch, key=ch.get)
    lost = [f"Perplexity changed by {', '.join(f'{100 * v:+.2f}% on {k}' for k, v in ch.items())} "
            f"(worst: {worst}, {100 * ch[worst]:+.2f}%)."]
    gens = acc["generations"]
    if gens:
        same = sum(g["diverges_at"] is None for g in gens)
        div = [g["diverges_at"] for g in gens if g["diverges_at"] is not None]
        lost.append(f"Greedy generations: {same} of {len(gens)} prompts identical for {gens[0]['new_tokens']} tokens"
                    + (f"; the others diverge after {min(div)}-{max(div)} identical tokens." if div else "."))
    watch = []
    if ex["fallback"]:
        watch.append(f"{len(ex['fallback'])} experts got too few calibration tokens and were rounded to nearest "
                     f"(layer.expert: {', '.join(f'{a}.{b}' for a, b in ex['fallback'][:8])}).")
    if ex.get("merge"):
        watch.append("Experts were merged or pruned: " + "; ".join(f"layer {k}: {v}" for k, v in ex["merge"]["summary"].items()) + ".")
    if r["provenance"]["baseline_is_source"] is False and not ex.get("merge"):
        watch.append("--baseline is not the checkpoint this run was made from (fingerprints differ).")
    if r["missing_records"]:
        watch.append(f"Missing run records: {', '.join(r['missing_records'])}.")
    return {"saved": saved, "lost": " ".join(lost), "watch": " ".join(watch)}
