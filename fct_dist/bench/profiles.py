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
import functools
import logging
import os
from typing import Callable

import numpy as np
import pyarrow as pa
import ray
import torch

from .. import lake, layout
from .report import IO_JOB, plot_by_size, plot_throughput, render, write
from ..config import Actors, Config
from . import tables
from .fixtures import IMAGE_SPLIT, Profile, bench_images, profiles, save_models, stored_lake
from ..layout import FCT, NEW, STORED
from .measure import (ZeroCost, compute_only, engine_result, measured, median_run, plain_copy, same_output,
                      same_output_as_old)
from ..pipeline import backfill, distribute, extract, filemap
from ..pipeline.filejob import FileJob
from .projection import project
from ..runtime import gpus_available, init_ray, machine
from ..storage import Store

log = logging.getLogger(__name__)
DISTRIBUTORS = ("local", "ray")


def on(cfg: Config, distributor: str) -> Config:
    """A copy of cfg whose extract and backfill run on `distributor` (local or ray)."""
    c = copy.deepcopy(cfg)
    c.backfill.distributor = c.extract.distributor = distributor
    return c


def engine_run(cfg: Config, job: FileJob) -> dict:
    """An engine job from scratch (its output cleared first): rows, bytes, steady rate, start-up."""
    job.store.delete(job.out_dir)
    m = filemap.run(job, distribute.of(cfg, job.actors))
    return engine_result(m, job.store.uri(job.out_dir)) | {"output": job.out_dir}


def pool_gpus(actors: Actors, gpu: bool) -> float:
    """GPUs an actor pool occupies (0 on a CPU run)."""
    return min(actors.num_actors * actors.gpus_per_actor, ray.cluster_resources().get("GPU", 0)) if gpu else 0.0


def profile_store(root: Store, p: Profile) -> Store:
    """Each profile lives in its own sub-root bench/{profile}."""
    return root.sub("bench", p.name)


def profile_jobs(cfg: Config, store: Store, p: Profile, split: str) -> dict[str, Callable[[Config, str], FileJob]]:
    """The profile's engine jobs: (config, distributor) -> the job, writing to its own output lake."""

    def backfill(c: Config, distributor: str) -> FileJob:
        return backfill_job(c, store, split, f"fct-{distributor}")

    def reextract(c: Config, distributor: str) -> FileJob:
        c.extract.batch_size = p.batch_size
        return extract.extract_job(c, store, IMAGE_SPLIT, {"emb": NEW}, f"new-{distributor}")

    def zero_cost(c: Config, distributor: str) -> FileJob:
        job = backfill_job(c, store, split, f"zero-cost-{distributor}")
        return dataclasses.replace(job, make_fn=ZeroCost, fingerprint=f"zero-cost-{job.fingerprint}")

    jobs = {"backfill": backfill, "re-extraction": reextract}
    return jobs | ({IO_JOB: zero_cost} if p.name == "production" else {})


def backfill_job(c: Config, store: Store, split: str, out_name: str) -> FileJob:
    """The backfill of the stored lake `split` by the profile's h into embeddings/{out_name}/{split}."""
    return backfill.backfill_job(c, store, FCT, split, input=store.uri(layout.embeddings(store, STORED, split)),
                                 output=store.uri(layout.embeddings(store, out_name, split)))


def run_profile(cfg: Config, root: Store, p: Profile) -> dict:
    """Each job of the profile on the local distributor and on Ray, on the same files and ids."""
    b, store = cfg.bench, profile_store(root, p)
    gpu = gpus_available()
    log.info("=== bench profile %s: %s rows backfilled, %s items re-extracted ===", p.name, f"{b.rows:,}", f"{p.items:,}")
    save_models(store, p)
    split = f"n{b.rows}"
    stored = stored_lake(store, p.dims, b.rows, b.rows_per_file)
    bench_images(store, p, b.image_files)
    out: dict = {"items": {"backfill": b.rows, "re-extraction": p.items}, "input_size": p.input_size,
                 "encoder": p.encoder, "dims": p.dims}
    for job, make in profile_jobs(cfg, store, p, split).items():
        runs = {}
        for distributor in DISTRIBUTORS:
            c = on(cfg, distributor)
            actors = c.extract if job == "re-extraction" else c.backfill
            gpus = (1.0 if gpu else 0.0) if distributor == "local" else pool_gpus(actors, gpu)
            repeats = b.io_repeats if job == IO_JOB else 1  # a few seconds each, and noisy on a small machine
            runs[distributor] = median_run([measured(functools.partial(engine_run, c, make(c, distributor)), gpus)
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
        plain = functools.partial(plain_copy, store, stored, layout.embeddings(store, "plain", split),
                                  cfg.backfill.batch_size)
        out[IO_JOB]["plain_loop"] = median_run([measured(plain, 0.0) for _ in range(b.io_repeats)])
        out[IO_JOB]["output_is_old"] = same_output_as_old(store, out[IO_JOB]["ray"]["output"], stored)
        out["compute_only"] = compute_only(store, FCT, cfg.backfill.precision, cfg.backfill.batch_size, b.rows)
    return out


def scaling(cfg: Config, root: Store, p: Profile, main: dict) -> list[dict]:
    """The production backfill through Ray on lakes of growing size."""
    store, out = profile_store(root, p), []
    gpus = pool_gpus(cfg.backfill, gpus_available())
    for rows in cfg.bench.scale_rows:
        if rows == cfg.bench.rows:
            out.append(main["backfill"]["ray"])
            continue
        c = on(cfg, "ray")
        stored_lake(store, p.dims, rows, cfg.bench.rows_per_file)
        job = backfill_job(c, store, f"n{rows}", "fct-ray")
        out.append(measured(functools.partial(engine_run, c, job), gpus))
        store.delete(job.out_dir)
    return out


def gpu_sweep(cfg: Config, root: Store, p: Profile) -> list[dict]:
    """With GPUs: the production backfill through Ray with k actors sharing each GPU, rows/s per GPU."""
    store, gpus, out = profile_store(root, p), ray.cluster_resources().get("GPU", 0), []
    for k in cfg.bench.actors_per_gpu:
        c = on(cfg, "ray")
        c.backfill.num_actors, c.backfill.gpus_per_actor = int(k * gpus), 1.0 / k
        job = backfill_job(c, store, f"n{cfg.bench.rows}", f"fct-{k}-per-gpu")
        r = measured(functools.partial(engine_run, c, job), gpus)
        out.append(r | {"actors_per_gpu": k, "rows_per_second_per_gpu": round(r["items_per_second"] / gpus, 1)})
        store.delete(job.out_dir)
    return out


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
        ("speedup", "production speed-up, backfill / re-extraction (Ray) >= 1000 x", prod["speedup"]["ray"], 1000.0),
        ("iceberg", "production backfill from and into Iceberg tables, end to end >= 1 / 1.1 x the Parquet folder's "
                    "rate (the table path costs <= 10 % more)",
         1 / (1 + r["iceberg"]["table_cost_end_to_end"]), 1 / 1.1)]
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
    result["iceberg"] = tables.compare(cfg, profile_store(store, profs[-1]), f"n{cfg.bench.rows}")
    result["projection"] = project(cfg.bench.projection, production, result["gpu_used"])
    result["goals"] = goals(result)
    result["settings"] = {"backfill": {k: getattr(cfg.backfill, k) for k in ("num_actors", "cpus_per_actor",
                                                                             "files_in_flight", "batch_size", "precision")},
                          "extract": {k: getattr(cfg.extract, k) for k in ("num_actors", "cpus_per_actor",
                                                                           "files_in_flight", "precision")},
                          "bench": {k: v for k, v in cfg.to_dict()["bench"].items() if k != "projection"}}
    plots = {"throughput.png": plot_throughput(result), "scaling.png": plot_by_size(
        result["scale"], "production backfill (Ray) by lake size", {"peak_rss_gb": "peak RSS of the process tree"})}
    return result | {"report_dir": write(store, "bench", result, plots, render(result))}
