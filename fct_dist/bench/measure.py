"""Measurement helpers of `fct bench`: CPU and memory of the whole process tree, steady rates of an
engine job, and the plain pyarrow loop and h's compute-only rate it is held against."""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import psutil
import torch

from .. import lake
from ..lake import LakeError
from ..config import Columns
from ..models import registry
from ..pipeline.backfill import TransformFn
from ..progress import rate
from ..storage import Store


def high_water_mark(p: psutil.Process, rss: int) -> int:
    """The process's peak RSS as the kernel counts it (VmHWM: no sampling can miss a spike), else `rss`."""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return rss


def reset_high_water_mark() -> None:
    """Start this process's VmHWM afresh (Linux: 5 > clear_refs), so its peak is this run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Usage:
    """Peak RSS and CPU-seconds of this process and all its descendants (Ray's daemons and
    workers), sampled; a process's CPU time counts from when it was first seen (or started). Also
    the peak RSS of this process (the driver) and of the largest engine worker (a Ray actor), from
    the kernel's high-water marks (the actors start with the run; the driver's mark is reset)."""

    def __init__(self, interval: float = 0.2):
        self.peak = self.driver_peak = self.worker_peak = 0
        self.interval, self._stop = interval, threading.Event()
        self._first: dict[tuple, float] = {}
        self._last: dict[tuple, float] = {}
        self._worker: dict[tuple, bool] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        me, rss = psutil.Process(), 0
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    key, cpu, mem = (p.pid, p.create_time()), sum(p.cpu_times()[:2]), p.memory_info().rss
                if not self._worker.get(key):  # a Ray worker takes its actor's title when the actor starts
                    self._worker[key] = "RayFileWorker" in " ".join(p.cmdline())
            except psutil.Error:
                continue
            rss += mem
            self._first.setdefault(key, cpu if initial else 0.0)
            self._last[key] = cpu
            if p.pid == me.pid:
                self.driver_peak = max(self.driver_peak, high_water_mark(p, mem))
            elif self._worker[key]:
                self.worker_peak = max(self.worker_peak, high_water_mark(p, mem))
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(initial=False)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._last[k] - self._first[k] for k in self._last)

    def __enter__(self) -> "Usage":
        reset_high_water_mark()
        self._sample(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(initial=False)


def measured(work: Callable[[], dict], gpus: float) -> dict:
    """Run `work` (-> {rows, bytes_in, items_per_second (steady), startup_seconds}) and add wall
    time, CPU- and GPU-seconds per million items, bytes read per item and peak RSS of the process
    tree."""
    t0 = time.time()
    with Usage() as u:
        r = work()
    seconds, rows = time.time() - t0, r["rows"]
    return r | {"seconds": round(seconds, 4), "wall_items_per_second": rate(rows, seconds), "gpus": gpus,
                "cpu_seconds": round(u.cpu_seconds, 4),
                "cpu_seconds_per_million": round(u.cpu_seconds / rows * 1e6, 1),
                "gpu_seconds_per_million": round(gpus * seconds / rows * 1e6, 1),
                "bytes_per_item": round(r["bytes_in"] / rows, 1), "peak_rss_gb": round(u.peak / 2**30, 3),
                "driver_peak_rss_gb": round(u.driver_peak / 2**30, 3), "worker_peak_rss_gb": round(u.worker_peak / 2**30, 3)}


class ZeroCost:
    """A batch function that costs nothing: the output vector is the stored `old` vector (production
    dims: 128 + 128 in, 128 out), so a backfill with it measures the engine's I/O path alone."""

    def __call__(self, rb: pa.RecordBatch):
        return np.zeros(rb.num_rows, bool), [], {"emb": lake.to_numpy(rb.column("old"))}


def plain_copy(store: Store, in_dir: str, out_dir: str, batch_size: int) -> dict:
    """The plain pyarrow loop the I/O path is held against: each file read batch by batch (the
    columns a backfill reads: id, old, side) and id + old written (as id, emb) with the engine's
    Parquet layout; one thread, no engine."""
    store.delete(out_dir)
    rows, nbytes, t0 = 0, 0, time.time()
    for path in lake.parts(store, in_dir):
        sink = pa.BufferOutputStream()
        with store.fs.open_input_file(path) as f, pq.ParquetWriter(
                sink, pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), 128))]), **lake.write_options()) as w:
            nbytes += f.size()
            for rb in pq.ParquetFile(f).iter_batches(batch_size, columns=["id", "old", "side"]):
                w.write_batch(pa.record_batch([rb.column(0), rb.column(1)], names=["id", "emb"]))
                rows += rb.num_rows
        store.write_bytes(f"{out_dir}/{path.rsplit('/', 1)[1]}", sink.getvalue())
    return {"rows": rows, "bytes_in": nbytes, "output": out_dir, "items_per_second": rate(rows, time.time() - t0),
            "startup_seconds": 0.0}


def compute_only(store: Store, h_name: str, precision: str, batch_size: int, rows: int) -> dict:
    """h's forward passes alone, on tensors already on the device, with this process's threads."""
    fn = TransformFn(store, h_name, Columns(), precision)
    dims = registry.read_meta(store, h_name)["dims"]
    x = {c: torch.randn(batch_size, dims[c], device=fn.device, dtype=fn.dtype) for c in ("old", "side")}
    sync = torch.cuda.synchronize if fn.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(2):  # warm-up
            fn.h(x["old"], x["side"])
        sync()
        n, t0 = max(1, rows // batch_size), time.time()
        for _ in range(n):
            fn.h(x["old"], x["side"])
        sync()
    seconds = time.time() - t0
    return {"rows": n * batch_size, "items_per_second": rate(n * batch_size, seconds), "batch_size": batch_size,
            "threads": torch.get_num_threads(), "device": str(fn.device), "precision": precision}


def same_output(store: Store, a: str, b: str) -> bool:
    """Two output lakes hold the same ids with the same vectors (the same batch function ran)."""
    ta, tb = (lake.read_lake(store, d, {"id": pa.int64()}).sort_by("id") for d in (a, b))
    same = bool(np.array_equal(ta["id"].to_numpy(), tb["id"].to_numpy())
                and np.allclose(lake.to_numpy(ta["emb"]), lake.to_numpy(tb["emb"]), atol=1e-4))
    del ta, tb
    pa.default_memory_pool().release_unused()  # the driver's memory is measured by the next runs
    return same


def engine_result(manifest: dict, where: str) -> dict:
    """What `measured` needs of an engine run, from its manifest's summary; a rejected row fails the bench."""
    s = manifest["summary"]
    if s["rows_out"] != s["rows_in"]:
        raise LakeError(f"{where}: {s['rows_in'] - s['rows_out']} rows rejected in a bench lake")
    return {"rows": s["rows_out"], "bytes_in": s["bytes_in"], "items_per_second": s["rows_per_second"],
            "startup_seconds": s["startup_seconds"], "driver_seconds": s["driver_seconds"], "fn_busy": s["fn_busy"]}


def median_run(runs: list[dict]) -> dict:
    """The run with the median steady rate, with every run's rate beside it."""
    ordered = sorted(runs, key=lambda r: r["items_per_second"])
    return ordered[len(ordered) // 2] | {"repeats": [r["items_per_second"] for r in runs]}


def same_output_as_old(store: Store, out_dir: str, stored: str) -> bool:
    """The zero-cost backfill wrote every stored row's `old` vector as its output."""
    t = lake.read_lake(store, out_dir, {"id": pa.int64()}).sort_by("id")
    s = lake.read_lake(store, stored, {"id": pa.int64()}, columns=["id", "old"]).sort_by("id")
    same = bool(np.array_equal(t["id"].to_numpy(), s["id"].to_numpy())
                and np.array_equal(lake.to_numpy(t["emb"]), lake.to_numpy(s["old"])))
    del t, s
    pa.default_memory_pool().release_unused()
    return same
