"""Expert pruning and merging: pure tensor functions on small random experts."""
import math
import os

import pytest
import torch

from conftest import FAMILIES, write_tiny
from moecompress.config import CalibConfig
from moecompress.errors import MoeCompressError
from moecompress.merge import compute_layer_stats, reduce_layer
from moecompress.merge.align import align_expert, permute_expert
from moecompress.merge.counts import allocate_counts, routing_floor
from moecompress.merge.hcsmoe import average_linkage_clusters
from moecompress.merge.reduction import merge_groups
from moecompress.merge.refit import route
from moecompress.merge.router import merge_router
from moecompress.merge.stats import expert_forward

E, I, H, T, K_TOP = 6, 16, 12, 256, 2


def experts(seed=0, E=E):
    g = torch.Generator().manual_seed(seed)
    gu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    dn = torch.randn(E, H, I, generator=g) / I ** 0.5
    router = torch.randn(E, H, generator=g)
    x = torch.randn(T, H, generator=g)
    return gu, dn, router, x


def stats_for(gu, dn, router, x, top_k=K_TOP):
    logits = x @ router.T
    idx, w = route(x, router, None, top_k)
    return compute_layer_stats(x, logits, idx, w, gu, dn)


def moe_out(x, gu, dn, router, top_k=K_TOP):
    idx, w = route(x, router, None, top_k)
    y = torch.zeros_like(x)
    for j in range(top_k):
        for e in range(gu.shape[0]):
            m = idx[:, j] == e
            if m.any():
                y[m] += w[m, j, None] * expert_forward(x[m], gu[e], dn[e])
    return y


@pytest.mark.parametrize("match", ["weight", "activation"])
def test_alignment_recovers_a_known_permutation(match):
    gu, dn, _, x = experts()
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(3))
    gate, up = gu[0].split(I)
    pgu = torch.cat([gate[perm], up[perm]])  # permuted copy of expert 0
    pdn = dn[0][:, perm]
    assert torch.allclose(expert_forward(x, pgu, pdn), expert_forward(x, gu[0], dn[0]), atol=1e-5)
    al = align_expert(gu[0], dn[0], pgu, pdn, match=match, inputs=x)
    agu, adn = permute_expert(pgu, pdn, al.perm)
    assert torch.equal(agu, gu[0]) and torch.equal(adn, dn[0])  # gate, up and down all back in place
    assert al.score == pytest.approx(1.0, abs=1e-5)


def test_merging_identical_experts_keeps_the_function():
    gu, dn, router, x = experts()
    gu[1:3] = gu[0]
    dn[1:3] = dn[0]
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(5))
    gu[2], dn[2] = permute_expert(gu[0], dn[0], perm)  # same function, units shuffled
    st = stats_for(gu, dn, router, x)
    hc = reduce_layer("hcsmoe", gu, dn, router, None, st, 4, top_k=K_TOP, align="weight", refit=False)
    ms = merge_groups(gu, dn, router, None, [(0, 1, 2), (3,), (4,), (5,)], method="msmoe", stats=st,
                      weights=st.counts, align="weight")
    for red in (hc, ms):
        k = red.expert_map[0]
        assert red.expert_map[1] == red.expert_map[2] == k, red.groups  # identical outputs cluster first
        err = (expert_forward(x, red.gate_up[k], red.down[k]) - expert_forward(x, gu[0], dn[0])).abs().max()
        assert err < 1e-5, red.method


def test_alignment_is_what_makes_the_merge_work():
    gu, dn, router, x = experts()
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(7))
    gu[1], dn[1] = permute_expert(gu[0] + 0.05 * gu[1], dn[0] + 0.05 * dn[1], perm)  # near copy of 0
    st = stats_for(gu, dn, router, x)
    ref = expert_forward(x, gu[0], dn[0])
    errs = {}
    for al in (None, "weight"):
        red = merge_groups(gu, dn, router, None, [(0, 1), (2,), (3,), (4,), (5,)], method="msmoe", stats=st,
                           weights=None, align=al)
        k = red.expert_map[0]
        errs[al] = float((expert_forward(x, red.gate_up[k], red.down[k]) - ref).norm() / ref.norm())
    assert errs["weight"] < 0.1 < errs[None]


def test_frequency_prune_drops_the_planted_expert():
    gu, dn, router, x = experts()
    logits = x @ router.T
    logits[:40, 4] += 50  # planted usage: expert 4 is chosen by 40 tokens only, every other expert by more
    logits[40:, 4] -= 50
    w, idx = logits.softmax(-1).topk(K_TOP, dim=-1)
    st = compute_layer_stats(x, logits, idx, w / w.sum(-1, keepdim=True), gu, dn)
    assert st.counts[4] == 40 == st.counts.min() and (st.counts > 40).sum() == E - 1
    red = reduce_layer("frequency", gu, dn, router, None, st, E - 1, top_k=K_TOP)
    assert red.dropped == (4,)
    assert red.expert_map == (0, 1, 2, 3, -1, 4)
    kept = [0, 1, 2, 3, 5]
    assert torch.equal(red.gate_up, gu[kept]) and torch.equal(red.router_weight, router[kept])


def test_reap_prefers_large_outputs_over_frequency():
    gu, dn, router, x = experts()
    dn[2] *= 1e-3  # expert 2 is routed as often as before, but contributes almost nothing
    st = stats_for(gu, dn, router, x)
    red = reduce_layer("reap", gu, dn, router, None, st, E - 1, top_k=K_TOP)
    assert red.dropped == (2,)
    exp = (st.reap_sum / st.counts)[2]
    assert st.reap[2] == pytest.approx(float(exp)) and st.reap[2] < 0.01 * st.reap.max()


def test_target_below_top_k_is_a_clear_error():
    gu, dn, router, x = experts()
    st = stats_for(gu, dn, router, x)
    for method in ("frequency", "reap", "average", "msmoe", "hcsmoe"):
        with pytest.raises(MoeCompressError, match="top-2"):
            reduce_layer(method, gu, dn, router, None, st, 1, top_k=K_TOP)
    with pytest.raises(MoeCompressError, match="--experts <= 6"):
        reduce_layer("reap", gu, dn, router, None, st, 7, top_k=K_TOP)
    red = reduce_layer("reap", gu, dn, router, None, st, K_TOP, top_k=K_TOP)
    assert red.num_experts == K_TOP and sorted(k for k in red.expert_map if k >= 0) == [0, 1]


def test_every_method_gives_a_consistent_reduction():
    gu, dn, router, x = experts()
    st = stats_for(gu, dn, router, x)
    for method in ("frequency", "reap", "average", "msmoe", "hcsmoe"):
        red = reduce_layer(method, gu, dn, router, None, st, 4, top_k=K_TOP)
        assert red.gate_up.shape == (4, 2 * I, H) and red.down.shape == (4, H, I) and red.router_weight.shape == (4, H)
        members = sorted(e for g in red.groups for e in g)
        if method in ("frequency", "reap"):
            assert len(members) == 4 and len(red.dropped) == 2
        else:
            assert members == list(range(E)) and red.dropped == ()
        assert torch.isfinite(red.gate_up).all() and torch.isfinite(red.down).all()
        assert red.record["experts_after"] == 4 and len(red.record["usage"]) == E


@pytest.mark.parametrize("method", ["msmoe", "reap"])
def test_refit_reduces_the_layer_error(method):
    gu, dn, router, x = experts()
    st = stats_for(gu, dn, router, x)
    y = moe_out(x, gu, dn, router)
    errs = {}
    for refit in (False, True):
        red = reduce_layer(method, gu, dn, router, None, st, 4, top_k=K_TOP, refit=refit)
        errs[refit] = float((moe_out(x, red.gate_up, red.down, red.router_weight) - y).norm() / y.norm())
    assert errs[True] < 0.9 * errs[False]


def test_lse_router_row_tracks_logsumexp_of_members():
    _, _, router, x = experts()
    r = merge_router(router, None, [(0, 1), (2,), (3,), (4,), (5,)], mode="lse", inputs=x)
    target = torch.logsumexp(x @ router[[0, 1]].T, dim=1)
    fit = x @ r.weight[0]
    mean = x @ router[[0, 1]].mean(0)
    dom = x @ router[0]
    err = (fit - target).pow(2).mean()  # a linear row cannot follow the convex lse exactly, but is the LS best
    assert err < 0.98 * (mean - target).pow(2).mean() and err < 0.98 * (dom - target).pow(2).mean()
    assert torch.equal(r.weight[1:], router[2:])  # singletons keep their rows exactly


def test_stats_accumulate_over_batches():
    gu, dn, router, x = experts()
    a = stats_for(gu, dn, router, x[:100]) + stats_for(gu, dn, router, x[100:])
    b = stats_for(gu, dn, router, x)
    assert torch.equal(a.counts, b.counts) and a.counts.sum() == T * K_TOP
    assert torch.allclose(a.reap_sum, b.reap_sum) and torch.allclose(a.logit_gram, b.logit_gram)
    assert torch.allclose(a.mean_output, b.mean_output, atol=1e-6)
    assert torch.allclose(a.logit_similarity().diagonal(), torch.ones(E, dtype=torch.float64))


def test_unrouted_experts_are_handled():
    gu, dn, router, x = experts()
    router[0] = -100 * x.mean(0)  # nobody picks 0 ...
    st = stats_for(gu, dn, router, x[:0])  # ... and no calibration tokens at all
    assert st.tokens == 0 and st.reap.sum() == 0
    for method in ("frequency", "reap", "average", "msmoe", "hcsmoe"):
        red = reduce_layer(method, gu, dn, router, None, st, 3, top_k=K_TOP)
        assert torch.isfinite(red.gate_up).all() and torch.isfinite(red.router_weight).all()


def test_average_linkage_clusters():
    f = torch.tensor([[0.0], [0.1], [5.0], [5.2], [20.0]])
    assert average_linkage_clusters(f, 3) == [[0, 1], [2, 3], [4]]
    assert average_linkage_clusters(f, 5) == [[0], [1], [2], [3], [4]]


def test_adaptive_counts():
    flat = torch.full((8,), 1 / 8)
    peaked = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01])
    counts = allocate_counts([flat, peaked], 0.75, 2)
    assert counts == [8, 4] and sum(counts) == 12
    assert allocate_counts([peaked, peaked], 0.25, 2) == [2, 2]
    with pytest.raises(MoeCompressError, match="--ratio"):
        allocate_counts([peaked, peaked], 0.1, 2)
    with pytest.raises(MoeCompressError, match="--ratio"):
        allocate_counts([peaked], 1.5, 2)


def test_adaptive_counts_in_expert_groups():
    """Group-limited routing: experts leave a layer n_group at a time, the cheapest pair over all layers first."""
    flat = torch.full((8,), 1 / 8)
    peaked = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01, 0.01])
    assert allocate_counts([flat, peaked], 0.75, 4, 2) == [8, 4]
    assert allocate_counts([flat, peaked], 0.75, 4, 4) == [8, 4]     # 12 kept: one unit of 4 from the peaked layer
    assert allocate_counts([flat, peaked], 0.6, 4, 4) == [4, 4]     # 9.6 rounds to 2 groups of 4: one from each
    counts = allocate_counts([flat, peaked, peaked], 0.55, 4, 2)
    assert all(c % 2 == 0 and c >= 4 for c in counts) and sum(counts) == 2 * round(0.55 * 24 / 2)
    with pytest.raises(MoeCompressError, match="multiples of 2"):
        allocate_counts([flat, peaked], 0.3, 6, 2)


def test_routing_floor():
    assert routing_floor({}, 2) == (2, 1)
    assert routing_floor({"n_group": 8, "topk_group": 4}, 8) == (16, 8)          # DeepSeek-V3: top-2 per group
    assert routing_floor({"n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy"}, 6) == (16, 8)
    assert routing_floor({"n_group": 4, "topk_group": 1, "topk_method": "group_limited_greedy"}, 2) == (8, 4)
    assert routing_floor({"n_group": 8, "topk_group": 3, "topk_method": "greedy"}, 6) == (6, 1)  # V2-Lite


def test_grouped_routing_merge_keeps_whole_groups(tmp_path, monkeypatch):
    """DeepSeek-V3 with 2 expert groups: every --ratio count is a multiple of 2, so the router's
    (tokens, groups, experts per group) view keeps each token's scores together (an odd count used to mix
    tokens silently: the first token's logits changed with the tokens after it)."""
    from moecompress.merge.pipeline import run_merge
    monkeypatch.setitem(FAMILIES, "DeepseekV3", {**FAMILIES["DeepseekV3"], "n_group": 2, "topk_group": 1})
    src = str(tmp_path / "src")
    write_tiny(src, "DeepseekV3", layers=4)
    with pytest.raises(MoeCompressError, match="expert groups"):
        run_merge(src, str(tmp_path / "odd"), experts=5, method="reap", calib=CalibConfig(nsamples=4, seqlen=32))
    out = str(tmp_path / "r")
    s = run_merge(src, out, ratio=0.6, method="reap", calib=CalibConfig(nsamples=4, seqlen=32), progress=False)
    assert all(k % 2 == 0 and k >= 4 for k in s["experts_per_layer"]) and sum(s["experts_per_layer"]) == 14
    from moecompress.evaluate import load_any
    m = load_any(out)
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        assert torch.allclose(m(ids[:, :1]).logits[0, 0], m(ids).logits[0, 0], atol=1e-5)


# -- the pipeline on tiny random checkpoints ---------------------------------------------------
# one per layout (per-expert Mixtral, fused Qwen3-MoE) and both shared-expert families (DeepSeek-V3, Qwen2-MoE)
@pytest.mark.parametrize("family,layout,method", [("Mixtral", "native", "msmoe"), ("Qwen3Moe", "fused", "reap"),
                                                  ("DeepseekV3", "native", "hcsmoe"), ("Qwen2Moe", "native", "frequency")])
def test_run_merge_writes_a_checkpoint_plain_transformers_loads(tiny_dir, tmp_path, family, layout, method):
    import json
    import os
    import transformers
    from moecompress.checkpoint import CheckpointReader
    from moecompress.merge.pipeline import run_merge

    src = tiny_dir(family, layout)
    E = CheckpointReader(src).num_experts
    K = E // 2
    out = str(tmp_path / "m")
    s = run_merge(src, out, experts=K, method=method, calib=CalibConfig(nsamples=4, seqlen=32), progress=False)
    r = CheckpointReader(out)
    assert all(r.layer_num_experts(i) == K for i in r.moe_layers)
    src_r = CheckpointReader(src)
    assert src_r.total_bytes - r.total_bytes == pytest.approx(src_r.expert_bytes * (E - K) / E, rel=0.01)
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = m(torch.arange(1, 17)[None]).logits
    assert torch.isfinite(logits).all()
    rec = json.load(open(os.path.join(out, "run", "merge_record.json")))
    assert len(rec["layers"]) == len(r.moe_layers) and all(l["experts_after"] == K for l in rec["layers"])
    assert s["experts_per_layer"] == [K] * len(r.moe_layers)
    cfg = json.load(open(os.path.join(out, "run", "run_config.json")))["calib"]  # the whole calibration recipe
    assert (cfg["sampler"], cfg["nsamples"], cfg["seqlen"], cfg["seed"]) == ("random", 4, 32, 0)


@pytest.mark.parametrize("count", [{"experts": 4}, {"ratio": 7 / 16}])
def test_merge_then_quantize_then_load(tiny_dir, tmp_path, count):
    """Composition: a merged checkpoint (uniform K: plain HF; --ratio: per-layer counts through validation,
    layer streaming, the quantize pass, the packed config and runtime.load) quantizes at 3 bits, and the
    packed result loads, runs and scores a perplexity close to the merged model's."""
    from moecompress import api
    from moecompress.checkpoint import CheckpointReader
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.merge.pipeline import run_merge

    src = tiny_dir("Qwen3Moe", "native")  # 2 layers x 8 experts
    merged, packed = str(tmp_path / "m"), str(tmp_path / "q")
    s = run_merge(src, merged, method="msmoe", calib=CalibConfig(nsamples=4, seqlen=32), progress=False, **count)
    assert sum(s["experts_per_layer"]) == (8 if "experts" in count else 7) and min(s["experts_per_layer"]) >= 2
    assert s["uniform"] == ("experts" in count)
    from moecompress.evaluate import load_any
    ref = load_any(merged)  # plain HF (uniform K) or load_merged (--ratio)
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        want = ref(ids).logits
    q = api.quantize(merged, packed, QuantizeConfig(bits=3, group_size=16, calib=CalibConfig(nsamples=4, seqlen=32)),
                     progress=False)
    assert q["packed_bytes"] < CheckpointReader(merged).total_bytes
    m = api.load(packed)
    with torch.no_grad():
        got = m(ids).logits
    assert torch.isfinite(got).all()
    # 3-bit experts change the logits a little, not beyond recognition
    assert float((got - want).norm() / want.norm()) < 0.15  # measured 0.034 for both counts
    if "ratio" in count:  # the per-layer counts survive quantization: the packed routers keep K_l rows
        counts = dict(zip(CheckpointReader(merged).moe_layers, s["experts_per_layer"]))
        for i, k in counts.items():
            assert m.model.layers[i].mlp.gate.weight.shape[0] == k and len(m.model.layers[i].mlp.experts.weights) == k
    from moecompress.evaluate import perplexity
    ids = torch.randint(1, ref.config.vocab_size, (256,), generator=torch.Generator().manual_seed(0))
    ppl_ref, ppl_q = perplexity(ref, ids, seqlen=32)["perplexity"], perplexity(m, ids, seqlen=32)["perplexity"]
    # a random tiny model: perplexity near the vocabulary size, and 3 bits move it by < 1% (measured 0.02%)
    assert math.isfinite(ppl_q) and ppl_q < 2 * ref.config.vocab_size and abs(math.log(ppl_q / ppl_ref)) < 0.01
    on_disk = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    assert on_disk(packed) < on_disk(merged)


def test_ratio_counts_are_checked_before_work(tiny_dir, tmp_path):
    """The per-layer counts of a --ratio output are checked against the tensors by validate (before a
    quantize starts) and against the packed tensors by runtime.load, with messages that say the fix."""
    import json
    import shutil

    from moecompress import api
    from moecompress.config import CalibConfig, QuantizeConfig
    from moecompress.errors import PackedFormatError
    from moecompress.merge.pipeline import run_merge
    from moecompress.validate import validate_checkpoint

    merged, packed = str(tmp_path / "m"), str(tmp_path / "q")
    s = run_merge(tiny_dir("Qwen3Moe", "native"), merged, ratio=7 / 16, method="reap", calib=CalibConfig(nsamples=4, seqlen=32),
                  progress=False)
    assert validate_checkpoint(merged, check_values=False).ok
    api.quantize(merged, packed, QuantizeConfig(bits=3, group_size=16, calib=CalibConfig(nsamples=4, seqlen=32)),
                 progress=False)
    small = s["experts_per_layer"].index(min(s["experts_per_layer"]))  # layer index == MoE index here

    def tampered(src, name, edit):
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        cfg = json.load(open(os.path.join(dst, "config.json")))
        edit(cfg["moecompress_merge"])
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
        return dst

    def bump(m):
        m["experts_per_layer"][str(small)] += 1

    rep = validate_checkpoint(tampered(merged, "m1", bump), check_values=False)
    assert rep.problems == (f"layer {small} has {min(s['experts_per_layer'])} experts but config.json says "
                            f"{min(s['experts_per_layer']) + 1}",)
    rep = validate_checkpoint(tampered(merged, "m2", lambda m: m.update(experts_per_layer={"0": 1, "1": 2, "5": 3})),
                              check_values=False)
    assert any("fewer than num_experts_per_tok=2" in p for p in rep.problems)
    assert any("layer 5, which hold no experts" in p for p in rep.problems)
    with pytest.raises(MoeCompressError, match="experts_per_layer"):
        api.quantize(tampered(merged, "m3", lambda m: m.pop("experts_per_layer")), str(tmp_path / "x"), progress=False)
    with pytest.raises(PackedFormatError, match=f"model.layers.{small}.mlp.gate.weight has shape"):
        api.load(tampered(packed, "q1", bump))
    with pytest.raises(PackedFormatError, match="moecompress_merge gives layer"):
        api.load(tampered(packed, "q2", lambda m: m["experts_per_layer"].update({str(small): 99})))


def test_resize_router_resizes_per_expert_buffers():
    """DeepSeek-V3's router keeps a per-expert score-correction buffer: a K_l-expert layer needs it K_l long."""
    import transformers as tf
    from moecompress.merge.loader import resize_router
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = tf.DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1)
    with torch.device("meta"):
        router = DeepseekV3TopkRouter(cfg)
    resize_router(router, {"weight": torch.empty(3, 16), "e_score_correction_bias": torch.empty(3)}, 3)
    assert router.weight.shape == (3, 16) and router.e_score_correction_bias.shape == (3,) and router.num_experts == 3
    assert "e_score_correction_bias" in router.state_dict()  # still a persistent buffer, loaded from the checkpoint


def test_run_merge_rejects_bad_counts(tiny_dir, tmp_path):
    from moecompress.merge.pipeline import run_merge

    src = tiny_dir("Qwen3Moe", "native")
    with pytest.raises(MoeCompressError, match="exactly one"):
        run_merge(src, str(tmp_path / "x"), method="reap")
    with pytest.raises(MoeCompressError, match="top-2"):
        run_merge(src, str(tmp_path / "x"), experts=1, method="reap")


def test_layer_streamer_builds_per_layer_routers(tiny_dir, tmp_path):
    """A --ratio output (7 of 16 experts: the layers differ) streams layer by layer, as quantize does."""
    from moecompress.checkpoint import CheckpointReader
    from moecompress.evaluate import load_any
    from moecompress.layerwise import LayerStreamer, find_experts
    from moecompress.merge.pipeline import run_merge

    out = str(tmp_path / "r")
    s = run_merge(tiny_dir("Qwen3Moe", "native"), out, ratio=7 / 16, method="reap", calib=CalibConfig(nsamples=4, seqlen=32), progress=False)
    counts = s["experts_per_layer"]
    assert sum(counts) == 7 and len(set(counts)) == 2 and min(counts) >= 2
    reader = CheckpointReader(out)
    st = LayerStreamer(reader)
    ids = torch.arange(1, 17)[None]
    h = st.embed(ids)
    kw = st.layer_kwargs(1, 16)
    for i in range(st.num_layers):
        layer = st.build_layer(i)
        if i in reader.moe_layers:
            k = counts[reader.moe_layers.index(i)]
            assert layer.mlp.gate.weight.shape[0] == k and len(find_experts(layer)[1].weights) == k
        h = st.run_layer(layer, h, kw[i], 1)
    m = load_any(out)  # the streamed layers compute what the loaded model computes
    with torch.no_grad():
        want = m.model(ids).last_hidden_state
    assert torch.allclose(m.model.norm(h), want, atol=1e-4)
