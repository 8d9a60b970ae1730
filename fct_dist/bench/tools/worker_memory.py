"""Does an engine worker's memory creep over a long backfill? The backfill of one of `fct bench
--profile scale`'s stored lakes through Ray, with the largest worker's RSS sampled every 0.5 s: its
median per tenth of the run (flat if nothing accumulates) and its kernel high-water mark at the end
of each tenth (steps up when a file's working set is larger than any before).

    .venv/bin/python -m fct_dist.bench.tools.worker_memory [--lake c25000000]     # after `make scale`
"""
from __future__ import annotations

import argparse
import json
import threading

import numpy as np
import psutil

from fct_dist import config
from fct_dist.bench.profiles import backfill_job, engine_run, on
from fct_dist.bench.measure import high_water_mark
from fct_dist.runtime import init_ray, setup_logging
from fct_dist.storage import open_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", default="c25000000", help="a stored lake under fct-data/bench/scale/embeddings/stored")
    a = ap.parse_args()
    setup_logging(20)
    cfg = config.load("config.yaml", ["storage.root=fct-data/bench/scale"])
    store = open_store(cfg.storage)
    init_ray(cfg)
    c = on(cfg, "ray")
    job = backfill_job(c, store, a.lake, "fct-memory")
    stop, samples = threading.Event(), []

    def sample() -> None:
        me = psutil.Process()
        while not stop.wait(0.5):
            workers = [p for p in me.children(recursive=True) if "RayFileWorker" in " ".join(p.cmdline())]
            if workers:
                samples.append((max(p.memory_info().rss for p in workers) / 2**30,
                                max(high_water_mark(p, 0) for p in workers) / 2**30))

    threading.Thread(target=sample, daemon=True).start()
    r = engine_run(c, job)
    stop.set()
    tenths = np.array_split(np.array(samples), 10)
    print(json.dumps({"lake": a.lake, "rows": r["rows"], "rows_per_second": r["items_per_second"],
                      "median_rss_gb_by_tenth": [round(float(np.median(t[:, 0])), 3) for t in tenths],
                      "high_water_mark_gb_by_tenth": [round(float(t[-1, 1]), 3) for t in tenths]}))
    store.delete(job.out_dir)


if __name__ == "__main__":
    main()
