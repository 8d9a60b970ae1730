"""How long does the evaluation's exact ranking take? `ranking.exact_ranking` of n queries against the same
n gallery items (query = gallery, own item excluded, as the demo's matrix does), on seeded random data of
`classes` Gaussian clusters, timed after a warm-up; prints one JSON line with the seconds and the metrics
(so two versions of ranking.py can be compared for speed and equality).

    .venv/bin/python -m fct_dist.bench.tools.ranking_speed [--n 20000] [--dim 128] [--classes 20]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from fct_dist import ranking


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--block-size", type=int, default=1024)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, a.classes, a.n)
    centers = rng.normal(size=(a.classes, a.dim)).astype(np.float32)
    x = centers[labels] + 1.5 * rng.normal(size=(a.n, a.dim)).astype(np.float32)  # float32 throughout
    ids = np.arange(a.n)
    ranking.exact_ranking(x[:500], labels[:500], ids[:500], x, labels, ids, 20, a.block_size)  # warm-up
    t0 = time.perf_counter()
    r = ranking.exact_ranking(x, labels, ids, x, labels, ids, 20, a.block_size)
    print(json.dumps({"n": a.n, "dim": a.dim, "classes": a.classes, "seconds": round(time.perf_counter() - t0, 2),
                      "top1": r["cmc"][0], "map": r["map"]}))


if __name__ == "__main__":
    main()
