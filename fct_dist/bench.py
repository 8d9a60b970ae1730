"""`fct bench`: what a backfill-free upgrade saves over full re-extraction, measured on this machine.

For each profile, on the same item ids:
  backfill       stored (old, side) rows -> h -> new lake        (`fct backfill`: Ray Data actor pool)
  re-extraction  image bytes -> decode -> backbone -> new lake    (`fct extract`: Ray Data actor pool)
and each again as a bare loop without Ray (the same batch functions, this process, every core), so
Ray's overhead shows as a ratio. Profiles:
  demo        the demo's architectures (models.*) on 28x28 PNG images
  production  FCT's reference sizes: ResNet-50 (128-d) at bench.image_size on ~100 KB JPEGs against
              the 128/128 -> 128 transformation (branch 256, hidden 2048)
Weights are random: throughput does not depend on them. Re-extraction covers the first
bench.{profile}_items ids of the backfilled lake and is reported as a rate. Then the production
backfill runs on lakes of growing size (rows/s and peak RSS of the process tree must stay flat), and
the measured per-item costs are projected to bench.projection.items on K GPUs.
"""
from __future__ import annotations

import copy
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
from .config import Actors, Config, Projection
from .datasets import synthetic
from .lake import LakeError
from .models import ResNet, Transformation, registry
from .pipeline import backfill, extract
from .pipeline.backfill import TransformFn
from .pipeline.extract import ExtractFn
from .runtime import gpus_available, init_ray
from .storage import Store

DATA_VERSION = "bench"  # the producer version recorded in (and expected of) the synthetic stored lakes
IMAGE_SPLIT = "bench"


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
    if store.has_manifest(directory) and store.manifest(directory)["rows"] == rows:
        return directory
    store.delete(directory)
    rng = np.random.default_rng(0)
    prod = {c: {"model": DATA_VERSION, "version": DATA_VERSION, "dim": p.dims[c]} for c in ("old", "side")}
    for k, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        vectors = {c: rng.standard_normal((n, p.dims[c]), np.float32) for c in ("old", "side")}
        lake.write_part(store, f"{directory}/{lake.part_name(k)}",
                        lake.embedding_table(np.arange(start, start + n), vectors, prod))
    store.write_manifest(directory, {"kind": "embeddings", "rows": rows, "producer": prod})
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
    workers), sampled; a process's CPU time counts from when it was first seen (or started)."""

    def __init__(self, interval: float = 0.2):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._first: dict[tuple, float] = {}
        self._last: dict[tuple, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        me, rss = psutil.Process(), 0
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    key, cpu, mem = (p.pid, p.create_time()), sum(p.cpu_times()[:2]), p.memory_info().rss
            except psutil.Error:
                continue
            rss += mem
            self._first.setdefault(key, cpu if initial else 0.0)
            self._last[key] = cpu
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
    """Run `work` (-> {rows, bytes_in}) and add wall time, items/s, CPU- and GPU-seconds per million
    items, bytes read per item and peak RSS of the process tree."""
    t0 = time.time()
    with Usage() as u:
        r = work()
    seconds, rows = time.time() - t0, r["rows"]
    return r | {"seconds": round(seconds, 4), "items_per_second": round(rows / seconds, 2), "gpus": gpus,
                "cpu_seconds": round(u.cpu_seconds, 4),
                "cpu_seconds_per_million": round(u.cpu_seconds / rows * 1e6, 1),
                "gpu_seconds_per_million": round(gpus * seconds / rows * 1e6, 1),
                "bytes_per_item": round(r["bytes_in"] / rows, 1), "peak_rss_gb": round(u.peak / 2**30, 3)}


def bare_loop(fn: Callable, store: Store, inputs: list[str], columns: list[str], batch_size: int, out_dir: str,
              producer: dict) -> dict:
    """The job without Ray: read each file batch by batch -> the job's own batch function -> write."""
    store.delete(out_dir)
    rows = nbytes = 0
    for path in inputs:
        outs = []
        with store.fs.open_input_file(path) as f:
            nbytes += f.size()
            for rb in pq.ParquetFile(f).iter_batches(batch_size, columns=columns):
                invalid, reasons, vectors = fn(rb)
                if invalid.any():
                    raise LakeError(f"{store.uri(path)}: {int(invalid.sum())} bad rows ({reasons[0]}) in a bench lake")
                outs.append(lake.embedding_table(rb.column("id").to_numpy(), vectors, producer))
        table = pa.concat_tables(outs)
        lake.write_part(store, f"{out_dir}/{path.rsplit('/', 1)[1]}", table)
        rows += table.num_rows
    return {"rows": rows, "bytes_in": nbytes, "output": out_dir}


def ray_job(run_stage: Callable[[], dict], store: Store, out_dir: str) -> dict:
    """A pipeline stage from scratch (its output cleared first); rows and bytes from its manifest."""
    store.delete(out_dir)
    s = run_stage()["summary"]
    if s["rows_out"] != s["rows_in"]:
        raise LakeError(f"{store.uri(out_dir)}: {s['rows_in'] - s['rows_out']} rows rejected in a bench lake")
    return {"rows": s["rows_out"], "bytes_in": s["bytes_in"], "output": out_dir}


def ids_of(store: Store, directory: str) -> np.ndarray:
    """The sorted ids of an output lake (read_lake also refuses an id written twice)."""
    return np.sort(lake.read_lake(store, directory, {"id": pa.int64()}, columns=["id"])["id"].to_numpy())


def pool_gpus(actors: Actors, gpu: bool) -> float:
    """GPUs an actor pool occupies (0 on a CPU run)."""
    return min(actors.num_actors * actors.gpus_per_actor, ray.cluster_resources().get("GPU", 0)) if gpu else 0.0


def profile_store(root: Store, p: Profile) -> Store:
    """Each profile lives in its own sub-root bench/{profile}."""
    return root.sub("bench", p.name)


def run_profile(cfg: Config, root: Store, p: Profile) -> dict:
    """Both jobs, each bare and through Ray, on one profile's lakes; with the id bookkeeping."""
    b, store = cfg.bench, profile_store(root, p)
    gpu = gpus_available()
    print(f"\n=== bench profile {p.name}: {b.rows:,} rows backfilled, {p.items:,} items re-extracted ===", flush=True)
    save_models(store, p)
    split = f"n{b.rows}"
    stored = stored_lake(store, p, b.rows, b.rows_per_file)
    images = image_lake(store, p, b.image_files)
    c = copy.deepcopy(cfg)
    c.backfill.input = c.backfill.output = None
    c.extract.batch_size = p.batch_size
    h_meta, enc_meta = registry.read_meta(store, "fct"), registry.read_meta(store, "new")

    def producer(name: str, meta: dict) -> dict:
        return {"emb": {"model": name, "version": meta["version"], "dim": p.dims["new"]}}

    jobs = {
        "backfill": {
            "bare": lambda: bare_loop(TransformFn(store, "fct", c.backfill.columns, c.backfill.precision), store,
                                      lake.parts(store, stored), ["id", "old", "side"], c.backfill.batch_size,
                                      store.path("embeddings", "bare-fct", split), producer("fct", h_meta)),
            "ray": lambda: ray_job(lambda: backfill.backfill(c, store, "fct", split), store,
                                   store.path("embeddings", "fct", split))},
        "re-extraction": {
            "bare": lambda: bare_loop(ExtractFn(store, {"emb": "new"}, c.extract.precision), store,
                                      lake.parts(store, images), ["id", "image"], p.batch_size,
                                      store.path("embeddings", "bare-new", IMAGE_SPLIT), producer("new", enc_meta)),
            "ray": lambda: ray_job(lambda: extract.reextract(c, store, "new", IMAGE_SPLIT), store,
                                   store.path("embeddings", "new", IMAGE_SPLIT))}}
    out: dict = {"items": {"backfill": b.rows, "re-extraction": p.items},
                 "input_size": p.input_size, "encoder": p.encoder, "dims": p.dims}
    for job, runs in jobs.items():
        actors = c.backfill if job == "backfill" else c.extract
        bare = measured(runs["bare"], 1.0 if gpu else 0.0)
        via_ray = measured(runs["ray"], pool_gpus(actors, gpu))
        ids = [ids_of(store, r["output"]) for r in (bare, via_ray)]
        out[job] = {"bare": bare, "ray": via_ray, "same_ids": bool(np.array_equal(*ids)), "ids": ids[0],
                    "ray_over_bare": round(via_ray["items_per_second"] / bare["items_per_second"], 3)}
        print(f"[bench] {p.name} {job}: bare {bare['items_per_second']:,.1f} items/s, "
              f"Ray {via_ray['items_per_second']:,.1f} items/s", flush=True)
    bf, ex = out["backfill"], out["re-extraction"]
    out["reextracted_ids_are_backfilled_ids"] = bool(np.isin(ex.pop("ids"), bf.pop("ids")).all())
    out["speedup"] = {
        "ray": round(bf["ray"]["items_per_second"] / ex["ray"]["items_per_second"], 1),
        "bare": round(bf["bare"]["items_per_second"] / ex["bare"]["items_per_second"], 1),
        "cpu_seconds": round(ex["ray"]["cpu_seconds_per_million"] / bf["ray"]["cpu_seconds_per_million"], 1)}
    return out


def scaling(cfg: Config, root: Store, p: Profile, main: dict) -> list[dict]:
    """The production backfill through Ray on lakes of growing size."""
    store, out = profile_store(root, p), []
    gpus = pool_gpus(cfg.backfill, gpus_available())
    for rows in cfg.bench.scale_rows:
        if rows == cfg.bench.rows:
            out.append(main["backfill"]["ray"])
            continue
        split = f"n{rows}"
        stored_lake(store, p, rows, cfg.bench.rows_per_file)
        out.append(measured(lambda: ray_job(lambda: backfill.backfill(cfg, store, "fct", split), store,
                                            store.path("embeddings", "fct", split)), gpus))
        store.delete(store.path("embeddings", "fct", split))
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


def run(cfg: Config, store: Store) -> dict:
    """Run the benchmark and write reports/bench-{timestamp}/ (bench.md, bench.json, two plots)."""
    init_ray(cfg)
    torch.set_num_threads(os.cpu_count() or 1)  # the bare loops use every core
    result: dict = {"machine": machine(), "gpu_used": gpus_available(), "profiles": {}}
    profs = profiles(cfg)
    for p in profs:
        result["profiles"][p.name] = run_profile(cfg, store, p)
    production = result["profiles"]["production"]
    result["scale"] = scaling(cfg, store, profs[-1], production)
    mem = [s["peak_rss_gb"] for s in result["scale"]]
    result["peak_rss_growth"] = round(mem[-1] / mem[0] - 1, 3) if len(mem) > 1 else None
    result["projection"] = project(cfg.bench.projection, production, result["gpu_used"])
    result["settings"] = {"backfill": {k: getattr(cfg.backfill, k) for k in ("num_actors", "cpus_per_actor",
                                                                             "batch_size", "precision")},
                          "extract": {k: getattr(cfg.extract, k) for k in ("num_actors", "cpus_per_actor",
                                                                           "precision")},
                          "bench": {k: v for k, v in cfg.to_dict()["bench"].items() if k != "projection"}}
    directory = store.path("reports", time.strftime("bench-%Y%m%d-%H%M%S"))
    store.write_json(f"{directory}/bench.json", result)
    store.write_bytes(f"{directory}/throughput.png", plot_throughput(result))
    store.write_bytes(f"{directory}/scaling.png", plot_scaling(result))
    md = render(result)
    store.write_bytes(f"{directory}/bench.md", md.encode())
    print(md)
    print(f"bench report: {store.uri(directory)}/bench.md")
    return result | {"report_dir": directory}


def plot_throughput(r: dict) -> bytes:
    fig, ax = report.figure((9, 4.5))
    labels, x = [], 0
    for name, prof in r["profiles"].items():
        for job in ("backfill", "re-extraction"):
            for k, (kind, color) in enumerate((("bare", "#999"), ("ray", "#3572b0"))):
                v = prof[job][kind]["items_per_second"]
                ax.bar(x + (k - 0.5) * 0.38, v, 0.38, color=color, label=("bare loop (no Ray)", "Ray")[k] if x == 0 else None)
                ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.1f}", (x + (k - 0.5) * 0.38, v), ha="center",
                            va="bottom", fontsize=7)
            labels.append(f"{name}\n{job}")
            x += 1
    ax.set_xticks(range(len(labels)), labels)
    ax.set(yscale="log", ylabel="items / s (log)", title=f"backfill vs re-extraction, {r['machine']['cores']} cores"
           + (f", {r['machine']['gpu']}" if r["gpu_used"] else ", CPU only"))
    ax.legend()
    return report.png(fig)


def plot_scaling(r: dict) -> bytes:
    fig, ax = report.figure((6, 4))
    sizes = [s["rows"] for s in r["scale"]]
    ax.plot(sizes, [s["items_per_second"] for s in r["scale"]], "o-", label="rows/s")
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
             "Random weights (throughput does not depend on them). Bare = the same batch functions in one "
             "process without Ray, every core.", "",
             "| profile | job | items | items/s bare | items/s Ray | Ray / bare | CPU-s per M items (Ray) | "
             "GPU-s per M | bytes read / item | same ids bare = Ray |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in r["profiles"].items():
        for job in ("backfill", "re-extraction"):
            j = p[job]
            lines.append(f"| {name} | {job} | {j['ray']['rows']:,} | {j['bare']['items_per_second']:,.1f} | "
                         f"{j['ray']['items_per_second']:,.1f} | {j['ray_over_bare']} | "
                         f"{j['ray']['cpu_seconds_per_million']:,.0f} | {j['ray']['gpu_seconds_per_million']:,.0f} | "
                         f"{j['ray']['bytes_per_item']:,.0f} | {j['same_ids']} |")
    lines += ["", "| profile | speed-up backfill / re-extraction (Ray) | (bare) | CPU-seconds saved (×) |",
              "|---|---|---|---|"]
    lines += [f"| {name} | **{p['speedup']['ray']:,.0f}×** | {p['speedup']['bare']:,.0f}× | "
              f"{p['speedup']['cpu_seconds']:,.0f}× |" for name, p in r["profiles"].items()]
    prod = r["profiles"]["production"]
    lines += ["", f"Production profile: ResNet-50 (128-d) at {prod['input_size']} px on JPEGs of "
              f"{prod['re-extraction']['ray']['bytes_per_item'] / 1e3:,.0f} KB per item (Parquet bytes) vs the "
              "reference h. Goals: speed-up >= 1000× end to end; Ray / bare >= 0.7 for both jobs.", "",
              "## Backfill by lake size (production profile, Ray)", "",
              "| lake rows | rows/s | peak RSS of the process tree (GB) |", "|---|---|---|"]
    lines += [f"| {s['rows']:,} | {s['items_per_second']:,.0f} | {s['peak_rss_gb']} |" for s in r["scale"]]
    if r["peak_rss_growth"] is not None:
        lines += ["", f"Peak memory growth from the smallest to the largest lake: {100 * r['peak_rss_growth']:+.1f} % "
                  "(goal: within 10 %)"]
    pj = r["projection"]
    lines += ["", f"## Projection: {pj['items']:,} items (production profile)", "",
              f"Per-GPU rates: {'measured here' if r['gpu_used'] else 'assumed (no GPU here): see bench.projection'}; "
              f"object-storage read bandwidth {pj['storage_gbps']} Gbit/s (assumed); bytes per item as measured.", "",
              "| job | GPUs | per-GPU items/s | wall hours | GPU-hours | bound by | CPU core-hours at this machine's rate |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['job']} | {x['gpus']} | {x['per_gpu_rate']:,.0f} ({x['rate_source']}) | {x['wall_hours']:,.2f} | "
              f"{x['gpu_hours']:,.1f} | {x['bound']} | {x['cpu_core_hours_at_measured_rate']:,.0f} |" for x in pj["rows"]]
    return "\n".join(lines + ["", "![throughput](throughput.png) ![scaling](scaling.png)", ""])
