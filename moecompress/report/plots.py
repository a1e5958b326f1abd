"""The report's plots: matplotlib (Agg backend), one function per figure, data in, PNG file out.

Each function takes plain numbers from report.json (never a model) and writes `<out>/<name>.png`;
it returns the file name, or None when there is nothing to draw.
"""
from __future__ import annotations

import os

COLORS = {"experts": "#4c72b0", "expert scales": "#8fb0e0", "attention": "#dd8452", "embeddings/head": "#55a868",
          "norms/router": "#c44e52", "dense MLP/shared experts": "#8172b3", "other": "#937860", "metadata": "#7f7f7f"}
BASE_C, COMP_C = "#7f7f7f", "#4c72b0"
DPI = 110


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=DPI, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return name


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def size_plot(size: dict, out: str) -> str:
    """Stacked bars, original above compressed, one colour per component."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 2.9))
    rows = [("original", "baseline"), ("compressed", "compressed")]
    for y, (label, side) in enumerate(reversed(rows)):
        left = 0
        for comp, v in size["components"].items():
            w = v[side] / 1e6
            if not w:
                continue
            ax.barh(y, w, left=left, color=COLORS.get(comp, "#cccccc"), edgecolor="white", height=0.6,
                    label=comp if y == 0 else None)
            if w > 0.06 * size["baseline_bytes"] / 1e6:
                ax.text(left + w / 2, y, f"{comp}\n{w:.2f} MB", ha="center", va="center", fontsize=7.5, color="white")
            left += w
        extra = f"  ({100 * size['saved_bytes'] / size['baseline_bytes']:.0f}% saved)" if side == "compressed" else ""
        ax.text(left, y, f"  {left:.2f} MB{extra}", va="center", fontsize=9, fontweight="bold")
    ax.set_yticks([0, 1], ["compressed", "original"])
    ax.set_xlim(0, size["baseline_bytes"] / 1e6 * 1.25)
    ax.set_xlabel("MB on disk (tensors, safetensors headers, config and manifest)")
    ax.set_title(f"Size: {mb(size['baseline_bytes'])} -> {mb(size['compressed_bytes'])}  "
                 f"({size['compression_ratio']:.2f}x smaller; experts {size['baseline_expert_bits_per_param']:.1f} -> "
                 f"{size['expert_bits_per_param']:.2f} bits/param)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=4, fontsize=8, frameon=False)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _save(fig, out, "size.png")


def perplexity_plot(texts: dict, out: str) -> str | None:
    """Grouped bars per text: original vs compressed perplexity, the relative change above."""
    if not texts:
        return None
    plt = _plt()
    names = [os.path.basename(t) for t in texts]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(names) + 2), 3.4))
    w = 0.38
    top = 0
    for k, (t, r) in enumerate(texts.items()):
        b, c = r["baseline"]["perplexity"], r["compressed"]["perplexity"]
        ax.bar(k - w / 2, b, w, color=BASE_C, label="original" if k == 0 else None)
        ax.bar(k + w / 2, c, w, color=COMP_C, label="compressed" if k == 0 else None)
        ax.text(k - w / 2, b * 0.97, f"{b:.2f}", ha="center", va="top", fontsize=8, color="white")
        ax.text(k + w / 2, c * 0.97, f"{c:.2f}", ha="center", va="top", fontsize=8, color="white")
        top = max(top, b, c)
    for k, r in enumerate(texts.values()):  # the change, on one line above every pair
        ch = 100 * r["relative_change"]
        ax.text(k, top * 1.06, f"{ch:+.1f}%", ha="center", fontsize=10, fontweight="bold",
                color="#c44e52" if ch > 0.5 else "#2e7d32")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, top * 1.18)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Accuracy: perplexity on held-out text", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _save(fig, out, "perplexity.png")


def _heatmap(grid, layers, title, cbar, fmt, out, name, cmap="viridis", marks=(), vmin=None, vmax=None, note=None,
             labels=None):
    import numpy as np
    plt = _plt()
    a = np.array([[np.nan if v is None else float(v) for v in row] for row in grid])  # (layers, experts)
    E = a.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.62 * E + 2.2), max(2.2, 0.5 * len(layers) + 1.3)))
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    lo, hi = im.get_clim()
    if E <= 32 and len(layers) <= 48:
        for r in range(a.shape[0]):
            for e in range(E):
                if np.isnan(a[r, e]):
                    continue
                frac = (a[r, e] - lo) / (hi - lo) if hi > lo else 0.5
                text = fmt(a[r, e]) + (f"\n{labels[r][e]}" if labels and labels[r][e] else "")
                ax.text(e, r, text, ha="center", va="center", fontsize=7.5 if not labels else 6.5,
                        color="black" if frac > 0.55 else "white")
    for r, row in enumerate(labels or []):  # pruned experts (quantize with the prune candidate): grey, "pruned"
        for e, lab in enumerate(row):
            if lab == "pruned":
                ax.add_patch(plt.Rectangle((e - 0.5, r - 0.5), 1, 1, color="#bbbbbb", hatch="xx", ec="#888888"))
                ax.text(e, r, "pruned", ha="center", va="center", fontsize=6.5, color="black")
    for i, e in marks:  # outlined cells (fallback experts)
        if i in layers:
            ax.add_patch(plt.Rectangle((e - 0.5, layers.index(i) - 0.5), 1, 1, fill=False, ec="#e41a1c", lw=2))
    ax.set_xticks(range(E), [str(e) for e in range(E)] if E <= 64 else None)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar, fraction=0.05, pad=0.02)
    if note:
        fig.text(0.01, -0.02, note, fontsize=8, color="#444444", ha="left", va="top")
    return _save(fig, out, name)


def bits_heatmap(experts: dict, out: str) -> str | None:
    if not any(v is not None for row in experts["bits"] for v in row):
        return None
    import math
    vals = [v for row in experts["bits"] for v in row if v is not None]
    lo, hi = math.floor(min(vals)) - 0.5, math.ceil(max(vals)) + 0.5
    note = "red outline: too few calibration tokens, quantized by round-to-nearest" if experts["fallback"] else None
    if any(x == "pruned" for row in experts["labels"] for x in row):
        note = ((note + "; ") if note else "") + "grey: pruned (0 bytes; router row removed)"
    title = "Bits stored per expert weight (scales and zeros included)"
    if max(vals) - min(vals) < 1e-9:
        title += f": all {vals[0]:.2f}"
    return _heatmap(experts["bits"], experts["layers"], title, "bits / parameter", lambda v: f"{v:.2f}", out,
                    "bits_heatmap.png", cmap="viridis", marks=experts["fallback"], vmin=lo, vmax=hi, note=note,
                    labels=experts["labels"] if len({x for row in experts["labels"] for x in row if x}) > 1 else None)


def routing_heatmap(experts: dict, out: str) -> str | None:
    if not experts.get("share"):
        return None
    E = experts["num_experts"]
    pct = [[None if v is None else 100 * v for v in row] for row in experts["share"]]
    return _heatmap(pct, experts["layers"], f"Routing frequency on the calibration set (uniform = {100 / E:.1f}%)",
                    "% of the layer's routed tokens", lambda v: f"{v:.1f}", out, "routing_heatmap.png", cmap="magma",
                    vmin=0, note="bright: busy expert; black: (almost) never chosen, so (almost) uncalibrated")


def merge_map_plot(merge: dict, out: str) -> str | None:
    import numpy as np
    from matplotlib.colors import ListedColormap
    if not merge or not merge.get("state"):
        return None
    plt = _plt()
    code = {"kept": 0, "merged": 1, "pruned": 2}
    a = np.array([[np.nan if s is None else code[s] for s in row] for row in merge["state"]])  # (layers, experts)
    layers = merge["layers"]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.62 * a.shape[1] + 2.2), max(2.2, 0.5 * len(layers) + 1.3)))
    ax.imshow(np.ma.masked_invalid(a), cmap=ListedColormap(["#55a868", "#dd8452", "#c44e52"]), vmin=0, vmax=2,
              aspect="auto")
    for r, row in enumerate(merge["target"]):
        for e, k in enumerate(row):
            if k is not None:
                ax.text(e, r, "x" if k < 0 else f"->{k}", ha="center", va="center", fontsize=7.5, color="white")
    ax.set_xticks(range(a.shape[1]))
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("original expert (label: new expert index, x = dropped)")
    ax.set_ylabel("layer")
    ax.set_title("Experts kept (green), merged (orange), pruned (red)", fontsize=10)
    return _save(fig, out, "merge_map.png")


def coverage_plot(experts: dict, out: str) -> str | None:
    """Calibration tokens per expert, one group of bars per layer, log scale, min_tokens marked."""
    if not experts.get("tokens"):
        return None
    plt = _plt()
    E, layers = experts["num_experts"], experts["layers"]
    thr = experts.get("min_tokens")
    fb = {tuple(x) for x in experts["fallback"]}
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.22 * E * len(layers) + 2)), 3.2))
    xs, ys, cs, ticks = [], [], [], []
    for r, (i, row) in enumerate(zip(layers, experts["tokens"])):
        base = r * (E + 1)
        ticks.append(base + (E - 1) / 2)
        for e, n in enumerate(row):
            if n is None:
                continue
            xs.append(base + e)
            ys.append(max(n, 0.8))  # zero tokens still get a visible stub on the log axis
            low = (i, e) in fb or (thr is not None and n < thr)
            cs.append("#c44e52" if low else COMP_C)
    ax.bar(xs, ys, color=cs, width=0.85)
    ax.set_yscale("log")
    if thr:
        ax.axhline(thr, color="#c44e52", ls="--", lw=1)
        ax.text(1.005, thr, f"--min-tokens {thr}", transform=ax.get_yaxis_transform(), va="center", ha="left",
                fontsize=8, color="#c44e52")
    for x, y, c in zip(xs, ys, cs):
        if c != COMP_C:
            ax.text(x, y * 1.1, f"{int(y) if y >= 1 else 0}", ha="center", va="bottom", fontsize=7, color="#c44e52")
    ax.set_xticks(ticks, [f"layer {i}" for i in layers])
    ax.set_ylabel("calibration tokens routed")
    ax.set_title("Calibration coverage: tokens each expert saw (red: too few, fell back to round-to-nearest)",
                 fontsize=10)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _save(fig, out, "coverage.png")


def timing_plot(timing: dict | None, out: str) -> str | None:
    if not timing:
        return None
    plt = _plt()
    rows = timing["passes"]
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(rows) + 1.3))
    ys = range(len(rows))[::-1]
    ax.barh(list(ys), [r["seconds"] for r in rows], color=COMP_C)
    for y, r in zip(ys, rows):
        ax.text(r["seconds"], y, f" {r['seconds']:.1f} s", va="center", fontsize=8)
    ax.set_yticks(list(ys), [r["pass"] for r in rows], fontsize=8)
    ax.set_xlim(0, max(r["seconds"] for r in rows) * 1.2 or 1)
    ax.set_xlabel("seconds")
    ax.set_title(f"Time per pass (total {timing['total_seconds']:.1f} s)", fontsize=10)
    for s in ("top", "right"):
        ax.spines[s].set_visible(False)
    return _save(fig, out, "timing.png")
