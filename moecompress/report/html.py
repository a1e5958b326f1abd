"""report.md and a self-contained report.html (plots embedded as data:image/png;base64) from report.json.

The HTML page is the template `reports/templates/report.html` (installed as package data under
moecompress/report/templates) with `$title` and `$body` filled in by `string.Template`; every value
from the report is HTML-escaped.
"""
from __future__ import annotations

import base64
import os
from html import escape
from string import Template

from .plots import mb

CAPTIONS = {
    "size.png": "Bytes on disk by component, original (top) and compressed (bottom).",
    "perplexity.png": "Perplexity per text; the percentage is the relative change (positive = worse).",
    "bits_heatmap.png": "Stored bits per expert parameter, scales and zeros included, per layer and expert.",
    "routing_heatmap.png": "Share of each layer's routed calibration tokens that went to each expert.",
    "merge_map.png": "Which original experts were kept, merged into another, or pruned.",
    "coverage.png": "Calibration tokens routed to each expert (log scale). Too few tokens = a poorly calibrated expert.",
    "timing.png": "Wall-clock seconds of each pass of the compression run.",
}


def template_text() -> str:
    from importlib import resources
    try:  # installed: moecompress/report/templates/report.html
        return (resources.files("moecompress.report.templates") / "report.html").read_text()
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):  # a source tree installed before the templates were mapped
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "..", "reports", "templates", "report.html")) as f:
            return f.read()


def _pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def _table(head: list[str], rows: list[list], left: int = 1, cls: dict | None = None) -> str:
    """An HTML table of already-escaped cells; the first `left` columns align left, cls: column -> class."""
    def c(i):
        return (cls or {}).get(i, "l" if i < left else "")
    th = "".join(f'<th class="{"l" if i < left else ""}">{escape(str(h))}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{c(i)}">{x}</td>' for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(out: str, name: str) -> str:
    with open(os.path.join(out, name), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    cap = CAPTIONS.get(name, "")
    return f'<img alt="{escape(name)}" src="data:image/png;base64,{data}"><p class="note">{escape(cap)}</p>'


def _change(b: int, c: int) -> str:
    if b == c:
        return "unchanged"
    if not c:
        return "removed"
    if not b or c > b:
        return f"+{mb(c - b)}"
    return f"{b / c:.2f}x smaller"


def size_rows(s: dict) -> list[list[str]]:
    rows = [[c, mb(v["baseline"]), mb(v["compressed"]), _change(v["baseline"], v["compressed"])]
            for c, v in s["components"].items()]
    rows.append(["total", mb(s["baseline_bytes"]), mb(s["compressed_bytes"]), f"{s['compression_ratio']:.2f}x smaller"])
    return rows


def ppl_rows(acc: dict) -> list[list[str]]:
    return [[os.path.basename(t), f"{v['baseline']['perplexity']:.3f}", f"{v['compressed']['perplexity']:.3f}",
             _pct(v["relative_change"]), str(v["baseline"]["tokens"])] for t, v in acc["texts"].items()]


def _gen_cell(g: dict, side: str) -> str:
    text = g[side]
    if g["diverges_at"] is None:
        return f'<span class="same">{escape(text)}</span>'
    common = g["common"]
    rest = text[len(common):] if text.startswith(common) else text
    return f'{escape(common)}<span class="div">{escape(rest)}</span>'


def write_html(r: dict, out: str, path: str) -> None:
    s, acc, ex, sm = r["size"], r["accuracy"], r["experts"], r["summary"]
    b = [f"<h1>Compression report: {escape(os.path.basename(r['compressed']))}</h1>",
         f'<div class="paths">compressed: {escape(r["compressed"])}<br>original: {escape(r["baseline"])}'
         f"<br>method: {escape(str(r['provenance']['method']))}, family: {escape(str(r['provenance']['family']))}</div>",
         '<div class="cards">',
         f'<div class="card saved"><h3>What was saved</h3><div class="big">{s["compression_ratio"]:.2f}x smaller</div>{escape(sm["saved"])}</div>',
         f'<div class="card lost"><h3>What was lost</h3><div class="big">{_worst(acc)}</div>{escape(sm["lost"])}</div>',
         "</div>"]
    if sm["watch"]:
        b.append(f'<div class="cards"><div class="card watch"><h3>Worth a look</h3>{escape(sm["watch"])}</div></div>')
    imgs = {p: _img(out, p) for p in r["plots"]}
    b += ["<h2>Size</h2>", imgs.get("size.png", ""),
          _table(["component", "original", "compressed", "change"], size_rows(s)),
          f'<p class="note">Parameters: {s["params"]:,} ({s["expert_params"]:,} in experts). Bits per parameter: '
          f'{s["baseline_bits_per_param"]:.2f} -> {s["bits_per_param"]:.2f} overall, {s["baseline_expert_bits_per_param"]:.2f} -> '
          f'{s["expert_bits_per_param"]:.3f} for expert weights. Metadata: safetensors headers, config, index and manifest.</p>']
    b += ["<h2>Accuracy</h2>", imgs.get("perplexity.png", ""),
          _table(["text", "original ppl", "compressed ppl", "change", "tokens"], ppl_rows(acc)),
          f'<p class="note">Non-overlapping windows of {acc["seqlen"]} tokens'
          + (f", first {acc['max_tokens']} tokens of each text" if acc["max_tokens"] else "")
          + " (the same numbers as <code>moecompress eval</code>).</p>"]
    if acc["generations"]:
        rows = []
        for g in acc["generations"]:
            where = ("identical" if g["diverges_at"] is None else
                     f"token {g['diverges_at']}: {escape(repr(g['baseline_token']))} vs {escape(repr(g['compressed_token']))}")
            rows.append([f"<b>{escape(g['text'])}</b><br>{escape(g['prompt'])}", _gen_cell(g, "baseline"),
                         _gen_cell(g, "compressed"), where])
        b += [f"<h3>Greedy generations ({acc['generations'][0]['new_tokens']} new tokens)</h3>",
              '<p class="note">Green: identical continuations. Red: the text after the first token where the two differ.</p>',
              _table(["prompt", "original", "compressed", "first divergence"], rows, left=4, cls={1: "gen", 2: "gen"})]
    b.append(_lm_eval_html(acc["lm_eval"]))
    b += ["<h2>Experts: layer x expert</h2>", '<div class="grid">',
          "<div>" + imgs.get("bits_heatmap.png", '<p class="note">no packed experts recorded</p>') + "</div>",
          "<div>" + imgs.get("routing_heatmap.png", '<p class="note">no calibration record (run/calibration.json)</p>') + "</div>",
          "</div>"]
    if "merge_map.png" in imgs:
        b.append(imgs["merge_map.png"])
    else:
        b.append(f'<p class="note"><b>Merging / pruning:</b> {escape(ex["merge_note"] or "")}.</p>')
    b += ["<h2>Calibration coverage</h2>", imgs.get("coverage.png", '<p class="note">no calibration record</p>'),
          f'<p class="note">{escape(_coverage_text(ex))}</p>',
          "<h2>Time per pass</h2>", imgs.get("timing.png", '<p class="note">no timing recorded (run/metrics.json)</p>')]
    page = Template(template_text()).safe_substitute(title=escape(f"moecompress report: {os.path.basename(r['compressed'])}"),
                                                     body="\n".join(b))
    with open(path, "w") as f:
        f.write(page)


def _worst(acc: dict) -> str:
    v = max(x["relative_change"] for x in acc["texts"].values())
    return f"perplexity {_pct(v)}"


def _coverage_text(ex: dict) -> str:
    c = ex.get("coverage")
    if not c:
        return "no calibration record"
    win = ex.get("calibration_windows")
    text = (f"{c['experts']} experts; tokens per expert min {c['min']}, median {c['median']}, max {c['max']}"
            + (f" from {win[0]} windows of {win[1]} tokens" if win else "") + ".")
    if c["zero_tokens"]:
        text += f" {len(c['zero_tokens'])} experts received no calibration token at all."
    if c["under_min_tokens"]:
        text += f" {len(c['under_min_tokens'])} are under --min-tokens {c['min_tokens']}."
    return text


def _lm_eval_html(lm: dict) -> str:
    out = ["<h3>Benchmark tasks (lm-eval)</h3>"]
    if lm["ran"]:
        rows = []
        for t, sides in lm["ran"].items():
            for k, v in sides.get("baseline", {}).items():
                c = sides.get("compressed", {}).get(k)
                rows.append([escape(t), escape(k), f"{v:.4f}", "-" if c is None else f"{c:.4f}"])
        out.append(_table(["task", "metric", "original", "compressed"], rows, left=2))
    for t, why in lm["skipped"].items():
        out.append(f'<p class="note skip">skipped {escape(t)}: {escape(why)}</p>')
    if lm.get("note") and not lm["skipped"]:
        out.append(f'<p class="note">{escape(lm["note"])}</p>')
    return "\n".join(out)


def write_markdown(r: dict, path: str) -> None:
    s, acc, ex, sm = r["size"], r["accuracy"], r["experts"], r["summary"]

    def table(head, rows):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows])

    lines = [f"# Compression report: {os.path.basename(r['compressed'])}", "",
             f"compressed: `{r['compressed']}`  ", f"original: `{r['baseline']}`", "",
             f"**Saved.** {sm['saved']}", "", f"**Lost.** {sm['lost']}", ""]
    if sm["watch"]:
        lines += [f"**Worth a look.** {sm['watch']}", ""]
    lines += ["## Size", "", "![size](size.png)", "", table(["component", "original", "compressed", "change"], size_rows(s)), "",
              "## Accuracy", "", "![perplexity](perplexity.png)", "",
              table(["text", "original ppl", "compressed ppl", "change", "tokens"], ppl_rows(acc)), "",
              f"Windows of {acc['seqlen']} tokens" + (f", first {acc['max_tokens']} tokens" if acc["max_tokens"] else "") + ".", ""]
    if acc["generations"]:
        rows = [[f"{g['text']}: {g['prompt']}", g["baseline"], g["compressed"],
                 "identical" if g["diverges_at"] is None else f"token {g['diverges_at']}: {g['baseline_token']!r} vs {g['compressed_token']!r}"]
                for g in acc["generations"]]
        lines += ["### Greedy generations", "", table(["prompt", "original", "compressed", "first divergence"], rows), ""]
    lm = acc["lm_eval"]
    lines += ["### Benchmark tasks (lm-eval)", ""]
    for t, sides in lm["ran"].items():
        for k, v in sides.get("baseline", {}).items():
            lines.append(f"- {t} {k}: {v:.4f} -> {sides.get('compressed', {}).get(k, float('nan')):.4f}")
    lines += [f"- skipped {t}: {why}" for t, why in lm["skipped"].items()] or [f"- {lm.get('note', '')}"]
    lines += ["", "## Experts", ""] + [f"![{p[:-4]}]({p})" for p in r["plots"] if p.endswith(("heatmap.png", "map.png"))]
    if not ex.get("merge"):
        lines += ["", f"Merging / pruning: {ex['merge_note']}."]
    lines += ["", "## Calibration coverage", "", "![coverage](coverage.png)" if "coverage.png" in r["plots"] else "",
              "", _coverage_text(ex), "", "## Time per pass", ""]
    if r["timing"]:
        lines += ["![timing](timing.png)", "", table(["pass", "seconds"], [[p["pass"], f"{p['seconds']:.1f}"] for p in r["timing"]["passes"]])]
    else:
        lines.append("no timing recorded")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
