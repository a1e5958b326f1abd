"""`moecompress report`: json/md/html/png of a tiny packed model against its original, numbers checked
against `moecompress eval` and the files on disk, and the html rendered by headless Chromium."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess

import pytest

from moecompress.cli import main
from moecompress.errors import MoeCompressError
from moecompress.report import records
from moecompress.report.accuracy import first_divergence
from moecompress.report.sizes import classify

ARGS = ["--seqlen", "64", "--max-tokens", "640", "--prompts", "2", "--new-tokens", "8"]
PLOT_BLUE = (76, 114, 176)  # plots.COMP_C, the compressed model's colour in every plot


@pytest.fixture(scope="module")
def made(tiny_dir, tmp_path_factory):
    """(original, packed, text, report dir, report dict): a tiny Mixtral, RTN 4-bit, reported."""
    from moecompress import api
    from moecompress.config import CalibConfig, QuantizeConfig
    root = tmp_path_factory.mktemp("report")
    orig = str(root / "orig")
    shutil.copytree(tiny_dir("Mixtral"), orig)
    demo = api.builtin_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(orig, f)):
            shutil.copy(os.path.join(demo, f), orig)
    text = str(root / "text.txt")
    from moecompress.calibration.data import builtin_text_path
    with open(builtin_text_path()) as f:
        body = f.read()
    with open(text, "w") as f:
        f.write(body[len(body) // 2: len(body) // 2 + 40000])
    packed = str(root / "q4")
    api.quantize(orig, packed, QuantizeConfig(bits=4, method="rtn", calib=CalibConfig((text,), nsamples=4, seqlen=64)),
                 progress=False)
    out = str(root / "rep")
    assert main(["-q", "report", packed, "--baseline", orig, "--text", text, "--out", out, *ARGS]) == 0
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    return orig, packed, text, out, rep


def test_report_perplexity_equals_eval(made, tmp_path):
    orig, packed, text, out, rep = made
    for side, path in (("baseline", orig), ("compressed", packed)):
        j = str(tmp_path / f"{side}.json")
        assert main(["-q", "eval", path, "--text", text, "--seqlen", "64", "--max-tokens", "640", "--json", j]) == 0
        with open(j) as f:
            ev = json.load(f)
        got = rep["accuracy"]["texts"][text][side]
        assert got["perplexity"] == ev["perplexity"] and got["tokens"] == ev["tokens"] == 640
    t = rep["accuracy"]["texts"][text]
    b, c = t["baseline"]["perplexity"], t["compressed"]["perplexity"]
    assert t["relative_change"] == pytest.approx((c - b) / b, rel=1e-12)
    assert 1 < b < 1e5 and c != b  # a random model, quantized: a finite, changed perplexity


def test_report_sizes_count_the_files(made):
    orig, packed, _, _, rep = made
    s = rep["size"]
    with open(os.path.join(packed, "moecompress.json")) as f:
        man = json.load(f)
    shards = sum(os.path.getsize(p) for p in glob.glob(os.path.join(packed, "*.safetensors")))
    meta = sum(os.path.getsize(os.path.join(packed, f)) for f in ("config.json", "model.safetensors.index.json", "moecompress.json"))
    assert s["compressed_bytes"] == shards + meta
    assert sum(v["compressed"] for v in s["components"].values()) == s["compressed_bytes"]
    # the expert part agrees with what quantize recorded, scales included (int4, group 64: 4 + 2*16/64 = 4.5 bits)
    assert s["expert_bits_per_param"] == pytest.approx(man["expert_bits_per_param"], abs=1e-4)
    assert s["expert_bits_per_param"] == pytest.approx(4.5, abs=1e-6)
    assert s["components"]["experts"]["compressed"] * 8 == 4 * s["expert_params"]  # codes alone: exactly 4 bits
    assert s["components"]["attention"]["baseline"] == s["components"]["attention"]["compressed"] > 0
    assert s["compression_ratio"] == pytest.approx(s["baseline_bytes"] / s["compressed_bytes"], abs=1e-4)
    assert s["baseline_expert_bits_per_param"] in (16.0, 32.0)  # bf16 or fp32 weights, no metadata counted there


def test_report_expert_grids_and_records(made):
    _, packed, _, out, rep = made
    ex = rep["experts"]
    assert ex["layers"] == [0, 1] and ex["num_experts"] == 4
    assert all(v == pytest.approx(4.5) for row in ex["bits"] for v in row)
    # every calibration token is routed to top-2 experts: 4 windows x 64 tokens x 2 per layer
    assert [sum(row) for row in ex["tokens"]] == [4 * 64 * 2] * 2
    assert all(sum(row) == pytest.approx(1.0, abs=1e-5) for row in ex["share"])
    assert ex["merge"] is None and ex["merge_note"] == "no merge/prune recorded"
    assert [p["pass"] for p in rep["timing"]["passes"]][:2] == ["calibrate + quantize layer 0", "calibrate + quantize layer 1"]
    assert {"size.png", "perplexity.png", "bits_heatmap.png", "routing_heatmap.png", "coverage.png", "timing.png"} <= set(rep["plots"])
    for p in rep["plots"]:
        with open(os.path.join(out, p), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    html = open(os.path.join(out, "report.html")).read()
    assert html.count("data:image/png;base64,") == len(rep["plots"]) and "no merge/prune recorded" in html
    md = open(os.path.join(out, "report.md")).read()
    assert "## Size" in md and "## Accuracy" in md and "![size](size.png)" in md
    gens = rep["accuracy"]["generations"]
    assert len(gens) == 2 and all(len(g["baseline_ids"]) == 8 for g in gens)
    for g in gens:
        assert g["diverges_at"] == first_divergence(g["baseline_ids"], g["compressed_ids"]).index
    lm = rep["accuracy"]["lm_eval"]
    import importlib.util
    if importlib.util.find_spec("lm_eval") is None:
        assert set(lm["skipped"]) == {"arc_easy", "hellaswag", "piqa"} and "not installed" in lm["skipped"]["piqa"]


def _screenshot(html: str, png: str):
    import numpy as np
    from PIL import Image
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
                    "--window-size=1200,3000", "file://" + html], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int32)  # (H, W, 3)


def _plot_pixels(img) -> int:
    import numpy as np
    return int((np.abs(img - np.array(PLOT_BLUE)).sum(-1) < 24).sum())


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="chromium is not installed (apt-get install -y chromium)")
def test_report_html_renders_in_chromium(made, tmp_path):
    pytest.importorskip("PIL")
    _, _, _, out, _ = made
    img = _screenshot(os.path.join(out, "report.html"), str(tmp_path / "shot.png"))
    assert img.std() > 30  # not blank
    drawn = _plot_pixels(img)
    # the same page with its images removed: only the headings' thin rules keep that colour
    html = open(os.path.join(out, "report.html")).read()
    stripped = str(tmp_path / "noimg.html")
    with open(stripped, "w") as f:
        f.write(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA"))
    bare = _plot_pixels(_screenshot(stripped, str(tmp_path / "noimg.png")))
    assert drawn > 20000 and drawn > 5 * bare, (drawn, bare)


def test_report_refuses_bad_input(made, tmp_path):
    orig, packed, text, _, _ = made
    from moecompress import api
    with pytest.raises(MoeCompressError, match="packed checkpoint"):
        api.report(orig, packed, [text], str(tmp_path / "r"))
    with pytest.raises(MoeCompressError, match="same directory"):
        api.report(packed, packed, [text], str(tmp_path / "r"))
    with pytest.raises(MoeCompressError, match="less than one window"):
        api.report(packed, orig, [text], str(tmp_path / "r"), seqlen=64, max_tokens=10)
    assert main(["report", packed, "--baseline", orig, "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")]) == 2


def test_classify_and_merge_map(tmp_path):
    assert classify("model.layers.0.block_sparse_moe.experts.3.w1.weight") == "experts"
    assert classify("model.layers.0.block_sparse_moe.gate.weight") == "norms/router"
    assert classify("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert classify("model.layers.0.mlp.shared_expert.gate_proj.weight") == "dense MLP/shared experts"
    assert classify("model.layers.0.mlp.shared_expert_gate.weight") == "norms/router"
    assert classify("lm_head.weight") == classify("model.embed_tokens.weight") == "embeddings/head"
    rec = {"layers": [{"layer": 1, "experts_before": 4, "experts_after": 2, "groups": [[0, 2], [1]], "dropped": [3],
                       "method": "msmoe"}]}
    os.makedirs(tmp_path / "run")
    (tmp_path / "run" / "merge_record.json").write_text(json.dumps(rec))
    path, found = records.find_merge_record(None, str(tmp_path))
    m = records.merge_map(found, [0, 1], 4)
    assert m["state"] == [[None] * 4, ["merged", "kept", "merged", "pruned"]]
    assert m["target"][1] == [0, 1, 0, -1]
    assert m["summary"]["1"].startswith("4 -> 2 experts (1 merged away, 1 pruned")
    assert first_divergence([1, 2, 3], [1, 2, 4]) == (2, 2) and first_divergence([1, 2], [1, 2]).index is None
