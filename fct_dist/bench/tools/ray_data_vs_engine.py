"""The measurement behind the engine decision in docs/ARCHITECTURE.md: Ray Data's own pipeline
(read_parquet -> map_batches on an actor pool -> write_parquet), without and with its row-id
checkpointing, against fct-dist's per-file engine on Ray, on the same stored lake, with the same
zero-cost transform (so the I/O paths are compared, not h).

    .venv/bin/python -m fct_dist.bench.tools.ray_data_vs_engine [--rows 1000000] [--root /tmp/rd-vs-engine]
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.checkpoint import CheckpointConfig

from fct_dist import config
from fct_dist.bench import fixtures, measure, profiles as bench
from fct_dist.pipeline import distribute, filemap
from fct_dist.storage import open_store


class ZeroCostTable:
    """Ray Data's side of the zero-cost transform: id and the stored `old` vector as `emb`."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"id": batch["id"], "emb": batch["old"]})


def ray_data(files: list[str], out: str, checkpoint: str | None) -> float:
    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = (CheckpointConfig(id_column="id", checkpoint_path=checkpoint, delete_checkpoint_on_success=False)
                             if checkpoint else None)
    t0 = time.time()
    (ray.data.read_parquet(files, override_num_blocks=len(files))
     .map_batches(ZeroCostTable, batch_format="pyarrow", batch_size=8192, compute=ray.data.ActorPoolStrategy(size=2),
                  num_cpus=0.5)
     .write_parquet(out))
    seconds = time.time() - t0
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in glob.glob(f"{out}/*.parquet"))
    return rows / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--root", default="/tmp/rd-vs-engine")
    a = ap.parse_args()
    cfg = config.load(None, [f"storage.root={a.root}"])
    store = open_store(cfg.storage)
    p = fixtures.profiles(cfg)[1]  # production dims: 128 + 128 in, 128 out
    fixtures.save_models(store, p)
    stored = fixtures.stored_lake(store, p.dims, a.rows, 100_000)
    files = store.list(stored, ".parquet")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    for rep in range(2):  # the first round warms the page cache and the worker pool
        for name in ("ray-data", "ray-data+checkpoint", "engine"):
            out = f"{a.root}/out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{a.root}/ck", ignore_errors=True)
            if name == "engine":
                job = bench.backfill_job(cfg, store, f"n{a.rows}", "engine")
                job = dataclasses.replace(job, make_fn=measure.ZeroCost, out_dir=out)
                t0 = time.time()
                s = filemap.run(job, distribute.of(cfg, job.actors))["summary"]
                wall = a.rows / (time.time() - t0)
                print(f"round {rep}: {name:20s} {wall:10,.0f} rows/s wall, {s['rows_per_second']:10,.0f} steady", flush=True)
            else:
                rate = ray_data(files, out, f"{a.root}/ck" if "checkpoint" in name else None)
                print(f"round {rep}: {name:20s} {rate:10,.0f} rows/s wall", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
