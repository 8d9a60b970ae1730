"""`fct bench`: what a backfill-free upgrade saves over full re-extraction, measured on this machine.

For each profile, on the same item ids:
  backfill       stored (old, side) rows -> h -> new lake        (`fct backfill`)
  re-extraction  image bytes -> decode -> backbone -> new lake    (`fct extract`)
each on both distributors of the one engine: `local` (this process, every core) and `ray` (an actor
pool), so Ray's overhead shows as a ratio of the same code. Profiles:
  demo        the demo's architectures (models.*) on 28x28 PNG images
  production  FCT's reference sizes: ResNet-50 (128-d) at bench.image_size on ~100 KB JPEGs against
              the 128/128 -> 128 transformation (branch 256, hidden 2048)
The production profile adds the engine's I/O path alone (the backfill with a zero-cost transform,
held against a plain pyarrow read -> write loop over the same files) and h's compute-only rate
(forward passes on tensors already in memory). Rates are steady-state (rows / mapping seconds, the
workers' start-up reported apart). Weights are random: throughput does not depend on them.
Re-extraction covers the first bench.{profile}_items ids of the backfilled lake (a rate). Then the
production backfill runs on lakes of growing size (rows/s and peak RSS must stay flat), and the
measured per-item costs are projected to bench.projection.items on K GPUs.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import psutil
import ray
import torch

from . import lake, report
from .config import Actors, Columns, Config, Projection
from .datasets import synthetic
from .lake import LakeError
from .models import ResNet, Transformation, registry
from .pipeline import backfill, distribute, extract, filemap
from .pipeline.backfill import TransformFn
from .runtime import gpus_available, init_ray
from .storage import Store

log = logging.getLogger(__name__)
DATA_VERSION = "bench"  # the producer version recorded in (and expected of) the synthetic stored lakes
IMAGE_SPLIT = "bench"
IO_JOB = "backfill, zero-cost transform"
DISTRIBUTORS = ("local", "ray")


@dataclass
class Profile:
    name: str
    encoder: dict  # ResNet arch of the re-extracting model
    input_size: int | None  # images resized to this side before the encoder (None: native size)
    dims: dict  # old, side, new
    branch: int
    hidden: int
    items: int  # items re-extracted (ids 0..items-1 of the backfilled lake)
    batch_size: int  # images per encoder forward pass
    images: Callable[[int], list[bytes]]  # n -> encoded images


def profiles(cfg: Config) -> list[Profile]:
    b, m = cfg.bench, cfg.models

    def demo_images(n: int) -> list[bytes]:
        return [lake.encode_png(x) for x in synthetic.generate(np.arange(n) % 20, 28, 1, seed=0)]

    demo = Profile("demo", {"in_channels": 1, "width": m.new.width, "blocks": m.new.blocks, "emb_dim": m.new.emb_dim},
                   None, {"old": m.old.emb_dim, "side": m.side.emb_dim, "new": m.new.emb_dim},
                   m.transformation.branch, m.transformation.hidden, b.demo_items, cfg.extract.batch_size,
                   demo_images)
    production = Profile("production", {"in_channels": 3, "width": 64, "blocks": [3, 4, 6, 3], "emb_dim": 128,
                                        "bottleneck": True, "imagenet": True},
                         b.image_size, {"old": 128, "side": 128, "new": 128}, 256, 2048, b.production_items,
                         b.production_batch_size, lambda n: synthetic.jpeg_photos(n, b.jpeg_height, seed=0))
    return [demo, production]


def save_models(store: Store, p: Profile) -> None:
    """Random-weight artefacts `new` (the encoder) and `fct` (h) of the profile's sizes."""
    torch.manual_seed(0)
    registry.save(store, "new", ResNet(**p.encoder), {"kind": "encoder", "arch": p.encoder,
                                                      "dims": {"emb": p.dims["new"]}, "input_size": p.input_size})
    arch = {"old_dim": p.dims["old"], "side_dim": p.dims["side"], "new_dim": p.dims["new"], "branch": p.branch,
            "hidden": p.hidden, "use_side": True}
    registry.save(store, "fct", Transformation(**arch), {
        "kind": "transformation", "arch": arch, "dims": p.dims, "metrics": {}, "fingerprint": DATA_VERSION,
        "producers": {"old": DATA_VERSION, "side": DATA_VERSION}})


def stored_lake(store: Store, p: Profile, rows: int, rows_per_file: int) -> str:
    """embeddings/stored/n{rows}: random (old, side) rows with ids 0..rows-1; written once per size."""
    directory = store.path("embeddings", "stored", f"n{rows}")
    layout = {"rows": rows, "rows_per_file": rows_per_file, "writer": lake.write_options()}
    if store.has_manifest(directory) and store.manifest(directory).get("layout") == layout:
        return directory
    store.delete(directory)
    rng = np.random.default_rng(0)
    prod = {c: {"model": DATA_VERSION, "version": DATA_VERSION, "dim": p.dims[c]} for c in ("old", "side")}
    for k, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        vectors = {c: rng.standard_normal((n, p.dims[c]), np.float32) for c in ("old", "side")}
        lake.write_part(store, f"{directory}/{lake.part_name(k)}",
                        lake.embedding_table(np.arange(start, start + n), vectors, prod))
    store.write_manifest(directory, {"kind": "embeddings", "rows": rows, "producer": prod, "layout": layout})
    return directory


def image_lake(store: Store, p: Profile, files: int) -> str:
    """images/bench: the profile's first `items` ids as encoded images; written once per setting."""
    directory = store.path("images", IMAGE_SPLIT)
    source = {"source": "bench", "profile": p.name, "input_size": p.input_size}
    if store.has_manifest(directory):
        m = store.manifest(directory)
        if m["rows"] == p.items and m["producer"] == source and len(m["files"]) == min(files, p.items):
            return directory
    lake.write_image_split(store, IMAGE_SPLIT, np.arange(p.items), p.images(p.items), np.zeros(p.items, np.int32),
                           math.ceil(p.items / files), source)
    return directory


class Usage:
    """Peak RSS and CPU-seconds of this process and all its descendants (Ray's daemons and
    workers), sampled; a process's CPU time counts from when it was first seen (or started). Also
    the peak RSS of this process (the driver) and of the largest engine worker (a Ray actor)."""

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
                self.driver_peak = max(self.driver_peak, mem)
            elif self._worker[key]:
                self.worker_peak = max(self.worker_peak, mem)
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(initial=False)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._last[k] - self._first[k] for k in self._last)

    def __enter__(self) -> "Usage":
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
    return r | {"seconds": round(seconds, 4), "wall_items_per_second": round(rows / seconds, 2), "gpus": gpus,
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


def on(cfg: Config, distributor: str) -> Config:
    """A copy of cfg whose extract and backfill run on `distributor` (local or ray)."""
    c = copy.deepcopy(cfg)
    c.backfill.distributor = c.extract.distributor = distributor
    return c


def engine_run(cfg: Config, job: filemap.FileJob) -> dict:
    """An engine job from scratch (its output cleared first): rows, bytes, steady rate, start-up."""
    job.store.delete(job.out_dir)
    s = distribute.run(cfg, job)["summary"]
    if s["rows_out"] != s["rows_in"]:
        raise LakeError(f"{job.store.uri(job.out_dir)}: {s['rows_in'] - s['rows_out']} rows rejected in a bench lake")
    return {"rows": s["rows_out"], "bytes_in": s["bytes_in"], "output": job.out_dir,
            "items_per_second": s["rows_per_second"], "startup_seconds": s["startup_seconds"],
            "driver_seconds": s["driver_seconds"], "fn_busy": s["fn_busy"]}


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
    return {"rows": rows, "bytes_in": nbytes, "output": out_dir, "items_per_second": round(rows / (time.time() - t0), 1),
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
    return {"rows": n * batch_size, "items_per_second": round(n * batch_size / seconds, 1), "batch_size": batch_size,
            "threads": torch.get_num_threads(), "device": str(fn.device), "precision": precision}


def same_output(store: Store, a: str, b: str) -> bool:
    """Two output lakes hold the same ids with the same vectors (the same batch function ran)."""
    ta, tb = (lake.read_lake(store, d, {"id": pa.int64()}).sort_by("id") for d in (a, b))
    same = bool(np.array_equal(ta["id"].to_numpy(), tb["id"].to_numpy())
                and np.allclose(lake.to_numpy(ta["emb"]), lake.to_numpy(tb["emb"]), atol=1e-4))
    del ta, tb
    pa.default_memory_pool().release_unused()  # the driver's memory is measured by the next runs
    return same


def pool_gpus(actors: Actors, gpu: bool) -> float:
    """GPUs an actor pool occupies (0 on a CPU run)."""
    return min(actors.num_actors * actors.gpus_per_actor, ray.cluster_resources().get("GPU", 0)) if gpu else 0.0


def profile_store(root: Store, p: Profile) -> Store:
    """Each profile lives in its own sub-root bench/{profile}."""
    return root.sub("bench", p.name)


def profile_jobs(cfg: Config, store: Store, p: Profile, split: str) -> dict[str, Callable[[Config, str], filemap.FileJob]]:
    """The profile's engine jobs: (config, distributor) -> the job, writing to its own output lake."""

    def backfill(c: Config, distributor: str) -> filemap.FileJob:
        return backfill_job(c, store, split, f"fct-{distributor}")

    def reextract(c: Config, distributor: str) -> filemap.FileJob:
        c.extract.batch_size = p.batch_size
        return extract.extract_job(c, store, IMAGE_SPLIT, {"emb": "new"}, f"new-{distributor}")

    def zero_cost(c: Config, distributor: str) -> filemap.FileJob:
        job = backfill_job(c, store, split, f"zero-cost-{distributor}")
        return dataclasses.replace(job, make_fn=ZeroCost, fingerprint=f"zero-cost-{job.fingerprint}")

    jobs = {"backfill": backfill, "re-extraction": reextract}
    return jobs | ({IO_JOB: zero_cost} if p.name == "production" else {})


def backfill_job(c: Config, store: Store, split: str, out_name: str) -> filemap.FileJob:
    """The backfill of the stored lake `split` by the profile's h into embeddings/{out_name}/{split}."""
    c.backfill.input = store.path("embeddings", "stored", split)
    c.backfill.output = store.path("embeddings", out_name, split)
    return backfill.backfill_job(c, store, "fct", split)


def run_profile(cfg: Config, root: Store, p: Profile) -> dict:
    """Each job of the profile on the local distributor and on Ray, on the same files and ids."""
    b, store = cfg.bench, profile_store(root, p)
    gpu = gpus_available()
    log.info("=== bench profile %s: %s rows backfilled, %s items re-extracted ===", p.name, f"{b.rows:,}", f"{p.items:,}")
    save_models(store, p)
    split = f"n{b.rows}"
    stored = stored_lake(store, p, b.rows, b.rows_per_file)
    image_lake(store, p, b.image_files)
    out: dict = {"items": {"backfill": b.rows, "re-extraction": p.items}, "input_size": p.input_size,
                 "encoder": p.encoder, "dims": p.dims}
    for job, make in profile_jobs(cfg, store, p, split).items():
        runs = {}
        for distributor in DISTRIBUTORS:
            c = on(cfg, distributor)
            actors = c.extract if job == "re-extraction" else c.backfill
            gpus = (1.0 if gpu else 0.0) if distributor == "local" else pool_gpus(actors, gpu)
            repeats = b.io_repeats if job == IO_JOB else 1  # a few seconds each, and noisy on a small machine
            runs[distributor] = median_run([measured(lambda: engine_run(c, make(c, distributor)), gpus)
                                            for _ in range(repeats)])
        local, via_ray = runs["local"], runs["ray"]
        out[job] = {"local": local, "ray": via_ray, "same_output": same_output(store, local["output"], via_ray["output"]),
                    "ray_over_local": round(via_ray["items_per_second"] / local["items_per_second"], 3)}
        log.info("[bench] %s %s: local %s items/s, Ray %s items/s (steady; start-up %.1f s / %.1f s)", p.name, job,
                 f"{local['items_per_second']:,.1f}", f"{via_ray['items_per_second']:,.1f}", local["startup_seconds"],
                 via_ray["startup_seconds"])
    bf, ex = out["backfill"], out["re-extraction"]
    ids = [lake.read_lake(store, r["output"], {"id": pa.int64()}, columns=["id"])["id"].to_numpy()
           for r in (bf["ray"], ex["ray"])]
    out["reextracted_ids_are_backfilled_ids"] = bool(np.isin(ids[1], ids[0]).all())
    out["speedup"] = {
        "ray": round(bf["ray"]["items_per_second"] / ex["ray"]["items_per_second"], 1),
        "local": round(bf["local"]["items_per_second"] / ex["local"]["items_per_second"], 1),
        "cpu_seconds": round(ex["ray"]["cpu_seconds_per_million"] / bf["ray"]["cpu_seconds_per_million"], 1)}
    if IO_JOB in out:
        out[IO_JOB]["plain_loop"] = median_run([measured(lambda: plain_copy(
            store, stored, store.path("embeddings", "plain", split), cfg.backfill.batch_size), 0.0)
            for _ in range(b.io_repeats)])
        out[IO_JOB]["output_is_old"] = same_output_as_old(store, out[IO_JOB]["ray"]["output"], stored)
        out["compute_only"] = compute_only(store, "fct", cfg.backfill.precision, cfg.backfill.batch_size, b.rows)
    return out


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


def scaling(cfg: Config, root: Store, p: Profile, main: dict) -> list[dict]:
    """The production backfill through Ray on lakes of growing size."""
    store, out = profile_store(root, p), []
    gpus = pool_gpus(cfg.backfill, gpus_available())
    for rows in cfg.bench.scale_rows:
        if rows == cfg.bench.rows:
            out.append(main["backfill"]["ray"])
            continue
        c = on(cfg, "ray")
        stored_lake(store, p, rows, cfg.bench.rows_per_file)
        job = backfill_job(c, store, f"n{rows}", "fct-ray")
        out.append(measured(lambda: engine_run(c, job), gpus))
        store.delete(job.out_dir)
    return out


def gpu_sweep(cfg: Config, root: Store, p: Profile) -> list[dict]:
    """With GPUs: the production backfill through Ray with k actors sharing each GPU, rows/s per GPU."""
    store, gpus, out = profile_store(root, p), ray.cluster_resources().get("GPU", 0), []
    for k in cfg.bench.actors_per_gpu:
        c = on(cfg, "ray")
        c.backfill.num_actors, c.backfill.gpus_per_actor = int(k * gpus), 1.0 / k
        job = backfill_job(c, store, f"n{cfg.bench.rows}", f"fct-{k}-per-gpu")
        r = measured(lambda: engine_run(c, job), gpus)
        out.append(r | {"actors_per_gpu": k, "rows_per_second_per_gpu": round(r["items_per_second"] / gpus, 1)})
        store.delete(job.out_dir)
    return out


def project(pc: Projection, production: dict, gpu: bool) -> dict:
    """Wall time and GPU-hours for pc.items on K GPUs: per-GPU rates (measured here when a GPU ran,
    else pc's assumptions), object-storage bandwidth as a second limit, bytes per item as measured."""
    rows = []
    for job, rate_key in (("backfill", "gpu_backfill_rows_per_s"), ("re-extraction", "gpu_extract_images_per_s")):
        r = production[job]["ray"]
        rate = r["items_per_second"] / r["gpus"] if gpu else getattr(pc, rate_key)
        for k in pc.gpus:
            compute_h = pc.items / (k * rate) / 3600
            storage_h = pc.items * r["bytes_per_item"] * 8 / (pc.storage_gbps * 1e9) / 3600
            wall_h = max(compute_h, storage_h)
            rows.append({"job": job, "gpus": k, "per_gpu_rate": rate, "rate_source": "measured" if gpu else "assumed",
                         "bytes_per_item": r["bytes_per_item"], "wall_hours": round(wall_h, 3),
                         "gpu_hours": round(k * wall_h, 2), "bound": "GPU" if compute_h >= storage_h else "storage",
                         "cpu_core_hours_at_measured_rate": round(pc.items * r["cpu_seconds_per_million"] / 1e6 / 3600, 1)})
    return {"items": pc.items, "storage_gbps": pc.storage_gbps, "rows": rows}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import faiss
    import pyarrow
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "faiss": faiss.__version__, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def goals(r: dict) -> list[dict]:
    """The benchmark's goals, each with its measured ratio."""
    prod, demo = r["profiles"]["production"], r["profiles"]["demo"]
    io, big = prod[IO_JOB], max(r["scale"], key=lambda s: s["rows"])  # the largest lake: the least tail of the last files
    ratios = [
        ("io", "I/O path (zero-cost transform) through Ray >= 0.8 x a plain pyarrow read -> write loop",
         io["ray"]["items_per_second"] / io["plain_loop"]["items_per_second"], 0.8),
        ("h", f"production h through Ray ({big['rows']:,} rows) >= 0.9 x h's compute-only rate",
         big["items_per_second"] / prod["compute_only"]["items_per_second"], 0.9),
        ("h_busy", f"production h through Ray ({big['rows']:,} rows): the actors spend >= 0.9 of their mapping "
                   "time in h", big["fn_busy"], 0.9),
        ("reextraction", "demo re-extraction through Ray >= 0.7 x the local distributor",
         demo["re-extraction"]["ray_over_local"], 0.7),
        ("speedup", "production speed-up, backfill / re-extraction (Ray) >= 1000 x", prod["speedup"]["ray"], 1000.0)]
    return [{"id": i, "goal": g, "measured": round(v, 3), "met": v >= want} for i, g, v, want in ratios]


def run(cfg: Config, store: Store) -> dict:
    """Run the benchmark and write reports/bench-{timestamp}/ (bench.md, bench.json, two plots)."""
    init_ray(cfg)
    torch.set_num_threads(os.cpu_count() or 1)  # the local distributor and the compute-only rate use every core
    result: dict = {"machine": machine(), "gpu_used": gpus_available(), "profiles": {}}
    profs = profiles(cfg)
    for p in profs:
        result["profiles"][p.name] = run_profile(cfg, store, p)
    production = result["profiles"]["production"]
    io = production[IO_JOB]["ray"]
    result["io_rows_per_second_per_core"] = round(io["items_per_second"] / result["machine"]["cores"], 1)
    result["scale"] = scaling(cfg, store, profs[-1], production)
    result["gpu_sweep"] = gpu_sweep(cfg, store, profs[-1]) if result["gpu_used"] else []
    result["peak_rss_growth"] = {k: round(result["scale"][-1][k] / result["scale"][0][k] - 1, 3)
                                 for k in ("driver_peak_rss_gb", "worker_peak_rss_gb", "peak_rss_gb")
                                 if len(result["scale"]) > 1 and result["scale"][0][k] > 0}
    result["projection"] = project(cfg.bench.projection, production, result["gpu_used"])
    result["goals"] = goals(result)
    result["settings"] = {"backfill": {k: getattr(cfg.backfill, k) for k in ("num_actors", "cpus_per_actor",
                                                                             "files_in_flight", "batch_size", "precision")},
                          "extract": {k: getattr(cfg.extract, k) for k in ("num_actors", "cpus_per_actor",
                                                                           "files_in_flight", "precision")},
                          "bench": {k: v for k, v in cfg.to_dict()["bench"].items() if k != "projection"}}
    directory = store.path("reports", time.strftime("bench-%Y%m%d-%H%M%S"))
    store.write_json(f"{directory}/bench.json", result)
    store.write_bytes(f"{directory}/throughput.png", plot_throughput(result))
    store.write_bytes(f"{directory}/scaling.png", plot_scaling(result))
    md = render(result)
    store.write_bytes(f"{directory}/bench.md", md.encode())
    log.info("%s\nbench report: %s/bench.md", md, store.uri(directory))
    return result | {"report_dir": directory}


def plot_throughput(r: dict) -> bytes:
    fig, ax = report.figure((10, 4.5))
    labels, x = [], 0
    for name, prof in r["profiles"].items():
        for job in [j for j in ("backfill", IO_JOB, "re-extraction") if j in prof]:
            for k, (kind, color) in enumerate((("local", "#999"), ("ray", "#3572b0"))):
                v = prof[job][kind]["items_per_second"]
                ax.bar(x + (k - 0.5) * 0.38, v, 0.38, color=color, label=("local distributor", "Ray")[k] if x == 0 else None)
                ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.1f}", (x + (k - 0.5) * 0.38, v), ha="center",
                            va="bottom", fontsize=7)
            labels.append(f"{name}\n{job.replace(', ', chr(10))}")
            x += 1
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set(yscale="log", ylabel="items / s, steady state (log)",
           title=f"backfill vs re-extraction, {r['machine']['cores']} cores"
           + (f", {r['machine']['gpu']}" if r["gpu_used"] else ", CPU only"))
    ax.legend()
    return report.png(fig)


def plot_scaling(r: dict) -> bytes:
    fig, ax = report.figure((6, 4))
    sizes = [s["rows"] for s in r["scale"]]
    ax.plot(sizes, [s["items_per_second"] for s in r["scale"]], "o-", label="rows/s (steady)")
    ax.set(xscale="log", xlabel="lake rows", ylabel="rows / s", title="production backfill (Ray) by lake size")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(sizes, [s["peak_rss_gb"] for s in r["scale"]], "s--", color="#c44", label="peak RSS (GB)")
    ax2.set_ylabel("peak RSS of the process tree (GB)")
    ax2.set_ylim(bottom=0)
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    return report.png(fig)


def render(r: dict) -> str:
    mc = r["machine"]
    lines = ["# fct bench: backfill vs full re-extraction", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gb']} GB, GPU: {mc['gpu'] or 'none'} "
             f"({'used' if r['gpu_used'] else 'CPU run'}); python {mc['python']}, torch {mc['torch']}, ray {mc['ray']}, "
             f"pyarrow {mc['pyarrow']}, faiss {mc['faiss']}", "",
             "Same item ids in both jobs; re-extraction covers the first N ids of the backfilled lake (a rate). "
             "Random weights (throughput does not depend on them). Both distributors run the same engine code: "
             "local = this process, every core; Ray = the actor pool. Items/s are steady-state (rows / mapping "
             "seconds); the workers' start-up is given apart.", "",
             "| profile | job | items | items/s local | items/s Ray | Ray / local | start-up s local / Ray | "
             "CPU-s per M items (Ray) | GPU-s per M | bytes read / item | local = Ray output |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in r["profiles"].items():
        for job in [j for j in ("backfill", IO_JOB, "re-extraction") if j in p]:
            j = p[job]
            lines.append(f"| {name} | {job} | {j['ray']['rows']:,} | {j['local']['items_per_second']:,.1f} | "
                         f"{j['ray']['items_per_second']:,.1f} | {j['ray_over_local']} | "
                         f"{j['local']['startup_seconds']:.1f} / {j['ray']['startup_seconds']:.1f} | "
                         f"{j['ray']['cpu_seconds_per_million']:,.0f} | {j['ray']['gpu_seconds_per_million']:,.0f} | "
                         f"{j['ray']['bytes_per_item']:,.0f} | {j['same_output']} |")
    prod = r["profiles"]["production"]
    io, co = prod[IO_JOB], prod["compute_only"]
    lines += ["", f"I/O path: {r['io_rows_per_second_per_core']:,.0f} rows/s per core through Ray; the plain pyarrow "
              f"loop over the same files: {io['plain_loop']['items_per_second']:,.0f} rows/s (one thread). "
              f"h compute-only: {co['items_per_second']:,.0f} rows/s ({co['device']}, {co['threads']} threads, "
              f"batch {co['batch_size']}, {co['precision']}).", "",
              "| profile | speed-up backfill / re-extraction (Ray) | (local) | CPU-seconds saved (×) |", "|---|---|---|---|"]
    lines += [f"| {name} | **{p['speedup']['ray']:,.0f}×** | {p['speedup']['local']:,.0f}× | "
              f"{p['speedup']['cpu_seconds']:,.0f}× |" for name, p in r["profiles"].items()]
    lines += ["", "## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {g['goal']} | {g['measured']:,} | {'yes' if g['met'] else '**no**'} |" for g in r["goals"]]
    lines += ["", f"Production profile: ResNet-50 (128-d) at {prod['input_size']} px on JPEGs of "
              f"{prod['re-extraction']['ray']['bytes_per_item'] / 1e3:,.0f} KB per item (Parquet bytes) vs the "
              "reference h.", "", "## Backfill by lake size (production profile, Ray)", "",
              "| lake rows | rows/s (steady) | start-up s | h busy | peak RSS driver (GB) | peak RSS largest worker (GB) "
              "| peak RSS process tree (GB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['rows']:,} | {s['items_per_second']:,.0f} | {s['startup_seconds']:.1f} | {s['fn_busy']} | "
              f"{s['driver_peak_rss_gb']} | {s['worker_peak_rss_gb']} | {s['peak_rss_gb']} |" for s in r["scale"]]
    if r["peak_rss_growth"]:
        lines += ["", "Peak memory growth from the smallest to the largest lake (goal: within 10 %): " + ", ".join(
            f"{k.replace('_peak_rss_gb', '').replace('peak_rss_gb', 'process tree')} {100 * v:+.1f} %"
            for k, v in r["peak_rss_growth"].items())]
    if r["gpu_sweep"]:
        lines += ["", "## Production backfill per GPU by actors sharing a GPU (Ray)", "",
                  f"Beside: local distributor {prod['backfill']['local']['items_per_second']:,.0f} rows/s, h compute-only "
                  f"{co['items_per_second']:,.0f} rows/s. Goal: >= 1M rows/s per GPU node from local Parquet.", "",
                  "| actors per GPU | rows/s per GPU (steady) | start-up s |", "|---|---|---|"]
        lines += [f"| {g['actors_per_gpu']} | {g['rows_per_second_per_gpu']:,.0f} | {g['startup_seconds']:.1f} |"
                  for g in r["gpu_sweep"]]
    pj = r["projection"]
    lines += ["", f"## Projection: {pj['items']:,} items (production profile)", "",
              f"Per-GPU rates: {'measured here' if r['gpu_used'] else 'assumed (no GPU here): see bench.projection'}; "
              f"object-storage read bandwidth {pj['storage_gbps']} Gbit/s (assumed); bytes per item as measured.", "",
              "| job | GPUs | per-GPU items/s | wall hours | GPU-hours | bound by | CPU core-hours at this machine's rate |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['job']} | {x['gpus']} | {x['per_gpu_rate']:,.0f} ({x['rate_source']}) | {x['wall_hours']:,.2f} | "
              f"{x['gpu_hours']:,.1f} | {x['bound']} | {x['cpu_core_hours_at_measured_rate']:,.0f} |" for x in pj["rows"]]
    return "\n".join(lines + ["", "![throughput](throughput.png) ![scaling](scaling.png)", ""])
