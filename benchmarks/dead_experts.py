"""Experts that no input reaches: routed tokens per layer and expert on every domain's text, on uniformly
random token ids, and on every vocabulary token after BOS; and for the experts at zero, the best router
margin seen (its logit minus the top-k-th largest logit; it is routed when the margin is >= 0).

    python benchmarks/dead_experts.py

(also routes the whole of `--whole` files: by default the prose calibration text and the C test text.)
"""
from __future__ import annotations

import argparse
import os
import sys

from common import DOMAINS, FIX, add_fixture_args, domain_texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap, calib=False)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per source")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--whole", nargs="*", default=[os.path.join(FIX, "text", f) for f in ("calib_prose.txt", "c_test.txt")],
                    help="text files routed whole (every full window), beside the per-domain samples")
    a = ap.parse_args(argv)

    import torch
    from moecompress.calibration import data
    from moecompress.checkpoint import CheckpointReader
    from moecompress.layerwise import LayerStreamer, find_experts
    from moecompress.passes.router import router_module

    reader = CheckpointReader(a.model)
    s = LayerStreamer(reader)
    tok = data.load_tokenizer(a.model)
    V = s.embed_weight.shape[0]
    n = a.tokens // a.seqlen
    sources = {d: data.tokenize(tok, data.read_source(path))[:n * a.seqlen].view(n, a.seqlen)
               for d, path in zip(DOMAINS, domain_texts())}
    for f in a.whole:
        ids = data.tokenize(tok, data.read_source(f))
        m = len(ids) // a.seqlen
        sources[f"{os.path.basename(f)} (all {m * a.seqlen})"] = ids[:m * a.seqlen].view(m, a.seqlen)
    sources["random ids"] = torch.randint(0, V, (n, a.seqlen), generator=torch.Generator().manual_seed(0))
    bos = reader.config.get("bos_token_id") or 0
    sources["vocab after BOS"] = torch.stack([torch.full((V,), bos), torch.arange(V)], 1)
    k = int(reader.config.get("num_experts_per_tok", 2))
    moe = list(reader.moe_layers)
    counts = {name: {} for name in sources}
    margin = {name: {} for name in sources}
    for name, ids in sources.items():
        bs = 64 if ids.shape[1] > 2 else 1024
        kw = s.layer_kwargs(bs, ids.shape[1])
        h = torch.cat([s.embed(ids[i:i + bs]) for i in range(0, len(ids), bs)])
        for i in range(s.num_layers):
            if i > moe[-1]:
                break
            layer = s.build_layer(i)
            if i in moe:
                router = router_module(layer, reader.arch)
                logits = []
                hook = router.register_forward_hook(
                    lambda m, inp, out: logits.append(torch.nn.functional.linear(inp[0], m.weight).reshape(-1, m.weight.shape[0])))
                _, ex = find_experts(layer)
                cnt = torch.zeros(ex.num_experts, dtype=torch.long)
                ex.observer = lambda e, t, x, hh, w: cnt.__setitem__(e, cnt[e] + t.numel())
                h = s.run_layer(layer, h, kw[i], bs)
                ex.observer = None
                hook.remove()
                lg = torch.cat(logits)
                kth = lg.topk(k, -1).values[:, -1:]
                counts[name][i] = cnt.tolist()
                margin[name][i] = (lg - kth).max(0).values.tolist()
            else:
                h = s.run_layer(layer, h, kw[i], bs)
    print(f"routed tokens per expert ({a.tokens} tokens per text source; vocab: {V} two-token windows)")
    for i in moe:
        print(f"\nlayer {i}")
        for name in sources:
            print(f"  {name:<30} {counts[name][i]}")
        dead = [e for e in range(len(counts['prose'][i])) if all(counts[nm][i][e] == 0 for nm in sources)]
        for e in dead:
            print(f"  expert {e}: no token from any source; best router margin to the top-{k} cut: "
                  + ", ".join(f"{nm} {margin[nm][i][e]:+.2f}" for nm in sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
