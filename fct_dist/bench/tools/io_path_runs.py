"""The engine's I/O path alone, run a few times: the benchmark's zero-cost job (the production backfill
with a transform that writes each row's stored `old` vector) through Ray on the production stored lake
a `fct bench` run left under its root. Used to weigh the levers on the commit's cost (the fsync of each
output file): run it, change the code, run it again.

    .venv/bin/python -m fct_dist.bench.tools.io_path_runs --root /tmp/bench-new --rows 500000 --rows-per-file 50000
"""
from __future__ import annotations

import argparse
import logging
import statistics

from fct_dist import config
from fct_dist.bench import fixtures, profiles as bench
from fct_dist.bench.report import IO_JOB
from fct_dist.runtime import init_ray, setup_logging
from fct_dist.storage import open_store

log = logging.getLogger("fct_dist")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the storage.root of a finished `fct bench` run")
    ap.add_argument("--rows", type=int, default=1_000_000, help="its bench.rows")
    ap.add_argument("--rows-per-file", type=int, default=100_000, help="its bench.rows_per_file")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    setup_logging(logging.WARNING)
    cfg = config.load("config.yaml", [f"storage.root={a.root}", f"bench.rows={a.rows}",
                                      f"bench.rows_per_file={a.rows_per_file}"])
    p = fixtures.profiles(cfg)[-1]  # production
    store = bench.profile_store(open_store(cfg.storage), p)
    init_ray(cfg)
    c = bench.on(cfg, "ray")
    make = bench.profile_jobs(cfg, store, p, f"n{a.rows}")[IO_JOB]
    rates = [bench.engine_run(c, make(c, "ray"))["items_per_second"] for _ in range(a.runs)]
    log.warning("zero-cost job through Ray: %s rows/s, median %.0f", [round(r) for r in rates], statistics.median(rates))


if __name__ == "__main__":
    main()
