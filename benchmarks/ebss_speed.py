"""EBSS's search step: candidates as query positions of their row's cache, against a cache copied per candidate.

At a search step each of R live beams proposes C candidate tokens. The naive step (this module's
earlier one) gives every candidate its own row: the beam's cached keys and values are gathered C times
(R*C*t rows per layer) and attention runs one query per row. EBSS's step now feeds a row's C candidates
as C query positions against the row's cache once, with a mask hiding its sibling candidates
(calibration/ebss.py: BeamCache, StreamedLM.step). Both run here side by side on the fixture, at several
cache lengths t, and must give the same hidden states; then one whole generate() is timed.

    python benchmarks/ebss_speed.py                  # about 2 min, one thread
"""
from __future__ import annotations

import argparse
import sys
import time

from common import add_fixture_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fixture_args(ap)
    ap.add_argument("--rows", type=int, default=128, help="live beams R (nsamples x beams)")
    ap.add_argument("--expand", type=int, default=8, help="candidates per beam C")
    ap.add_argument("--lengths", nargs="+", type=int, default=[32, 128, 255], help="cache lengths t")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--generate", default="32x256", help="nsamples x seqlen of the timed generate() ('' skips)")
    a = ap.parse_args(argv)

    import torch
    from moecompress.calibration import data, ebss

    class GatherCache(ebss.BeamCache):  # the naive step: one row per candidate, its beam's cache gathered
        parent = None

        def update(self, k, v, layer_idx, *args, **kwargs):
            self.new[layer_idx] = (k, v)
            pk, pv = self.k[layer_idx][self.parent], self.v[layer_idx][self.parent]
            return torch.cat([pk, k], 2), torch.cat([pv, v], 2)

    tok = data.load_tokenizer(a.model)
    pool = data.token_pool(tok, data.parse_sources([a.calib]))
    ids = torch.cat([t for t, _ in pool])
    lm = ebss.StreamedLM(a.model, 1 << 30)
    R, C = a.rows, a.expand
    g = torch.Generator().manual_seed(0)
    print(f"one search step, R = {R} beams x C = {C} candidates, seconds (best of {a.repeat}):")
    print(f"{'t':>6}{'gathered':>12}{'grouped':>12}{'speedup':>10}{'max |diff|':>12}")
    for t in a.lengths:
        prefix = ids[torch.randint(0, len(ids) - t, (R,), generator=g)[:, None] + torch.arange(t)]  # (R, t)
        cand = ids[torch.randint(0, len(ids), (R, C), generator=g)]
        base = ebss.BeamCache()  # the rows' cache of t tokens, built once: a step only reads it
        for p in range(t):
            lm.step(prefix[:, p], p, base)
            base.commit(torch.arange(R))
        caches = [GatherCache(), ebss.BeamCache()]
        for c in caches:
            c.k, c.v = base.k, base.v
        best, out = [], []
        for which, c in enumerate(caches):
            times = []
            for _ in range(a.repeat):
                c.new = {}
                t0 = time.perf_counter()
                if which == 0:
                    c.parent = torch.arange(R).repeat_interleave(C)
                    h, _ = lm.step(cand.reshape(-1), t, c)
                else:
                    h, _ = lm.step(cand, t, c)
                times.append(time.perf_counter() - t0)
                c.group = 0
            best.append(min(times))
            out.append(h)
        diff = (out[0] - out[1]).abs().max().item()
        print(f"{t:>6}{best[0]:>12.3f}{best[1]:>12.3f}{best[0] / best[1]:>9.2f}x{diff:>12.2e}")
    if a.generate:
        n, L = (int(v) for v in a.generate.split("x"))
        t0 = time.perf_counter()
        ebss.generate(a.model, pool, n, L, 0)
        print(f"generate {n} x {L} tokens (beams 4, expand 8): {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
