"""`fct bench --profile scale`: the whole upgrade at tens of millions of rows on this machine.

Stored lakes with production bytes per row (id + 128-d old + 128-d side in, 128-d out) and cluster
structure (`fixtures.Clustered`, so that search quality means something) are backfilled through the
Ray engine at growing sizes: rows/s and the peak memory of the driver and of the largest worker must
stay flat; the driver's own time (listing, footer scans, manifest) is reported against the number of
files. The largest output is then indexed by `fct index` (IVF-PQ chosen for its size, the quantizer
trained once on a sample, shards added by Ray tasks) and searched through `IndexShards` at several
nprobe, with recall@k against exact k-NN streamed over the lake. h has the demo's widths at the
production dims: the point is that the engine, the driver and the index stay flat, not h's FLOPs.
"""
from __future__ import annotations

import functools
import gc
import logging
import shutil
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from .. import currency, lake, layout, report
from .profiles import backfill_job, engine_run, on, pool_gpus
from .report import legend, plot_by_size, write
from ..config import Config
from .fixtures import Clustered, save_transformation, stored_lake
from ..layout import FCT
from .measure import Usage, measured
from ..models import registry
from ..pipeline import index
from ..runtime import gpus_available, init_ray, machine
from ..layout import MANIFEST
from ..storage import Store

log = logging.getLogger(__name__)
DIMS = {"old": 128, "side": 128, "new": 128}  # production bytes per row
OUT = "fct-ray"  # the backfilled lakes: embeddings/fct-ray/c{rows}
QUERY_STREAM = 1 << 40  # the queries' random stream: never a file's


def backfill_at(cfg: Config, store: Store, rows: int) -> dict:
    """Backfill the stored lake c{rows} through Ray from scratch, measured."""
    gc.collect()
    pa.default_memory_pool().release_unused()  # what earlier work left in the driver is not this run's
    c = on(cfg, "ray")
    job = backfill_job(c, store, f"c{rows}", OUT)
    r = measured(functools.partial(engine_run, c, job), pool_gpus(c.backfill, gpus_available()))
    summary = currency.manifest(store, job.out_dir)["summary"]
    r |= {"files": summary["files"], "commit_seconds": summary["commit_seconds"],
          "manifest_bytes": len(store.read_bytes(f"{job.out_dir}/{MANIFEST}")), "bytes_out": summary["bytes_out"]}
    log.info("[scale] %s rows: %s rows/s steady, driver %.2f s, manifest %.0f KB, peak RSS driver %.2f GB, "
             "largest worker %.2f GB", f"{rows:,}", f"{r['items_per_second']:,.0f}", r["driver_seconds"],
             r["manifest_bytes"] / 1e3, r["driver_peak_rss_gb"], r["worker_peak_rss_gb"])
    return r


def build_index(cfg: Config, store: Store, split: str) -> dict:
    """`fct index` over embeddings/fct-ray/{split} from scratch, with its CPU-seconds."""
    store.delete(layout.index(store, OUT, split))
    with Usage() as u:
        m = index.build(cfg, store, OUT, split)
    return {k: m[k] for k in ("factory", "rows", "bytes", "build_seconds", "train_seconds", "rows_per_second",
                              "train_sample")} | {
        "shards": len(m["shards"]), "bytes_per_vector": round(m["bytes"] / m["rows"], 2),
        "cpu_seconds": round(u.cpu_seconds, 1), "cpu_seconds_per_million": round(u.cpu_seconds / m["rows"] * 1e6, 1)}


def queries(store: Store, structure: Clustered, n: int) -> np.ndarray:
    """n new rows of the lake's distribution (not in it), through h as the backfill would: (n, 128)."""
    h, _ = registry.load(store, FCT)
    x = structure.rows(DIMS, n, QUERY_STREAM)
    with torch.no_grad():
        return h(torch.from_numpy(x["old"]), torch.from_numpy(x["side"])).numpy()


def search_curve(cfg: Config, store: Store, split: str, q: np.ndarray) -> dict:
    """Load the shards (their memory), stream the exact k-NN, then queries/s and recall at each nprobe."""
    s = cfg.bench.scale
    rss0 = psutil.Process().memory_info().rss
    t0 = time.time()
    shards, manifest = index.load(store, OUT, split)
    loaded = {"load_seconds": round(time.time() - t0, 1),
              "memory_gb": round((psutil.Process().memory_info().rss - rss0) / 2**30, 3)}
    t0 = time.time()
    truth = index.exact_knn(store, lake.parts(store, layout.embeddings(store, OUT, split)), "emb", manifest["dim"], q, s.k)
    exact_seconds = time.time() - t0
    curve = []
    for nprobe in s.nprobe:
        index.search_shards(shards, q[:10], s.k, nprobe)  # warm-up
        t0 = time.time()
        _, found = index.search_shards(shards, q, s.k, nprobe)
        seconds = time.time() - t0
        curve.append({"nprobe": nprobe, "queries_per_second": round(len(q) / seconds, 1),
                      "recall": round(index.recall(truth, found), 4),
                      "nearest_in_top_k": round(float(np.mean([t[0] in f for t, f in zip(truth, found)])), 4)})
        log.info("[scale] nprobe %d: recall@%d %.3f, %s queries/s", nprobe, s.k, curve[-1]["recall"],
                 f"{curve[-1]['queries_per_second']:,.0f}")
    return {"loaded": loaded, "exact_seconds": round(exact_seconds, 1), "queries": len(q), "k": s.k, "curve": curve}


def projection(r: dict, items: int) -> list[dict]:
    """Per-row costs measured at the largest size, times `items`."""
    big, ix = r["backfill"][-1], r["index"]
    per_row = [("stored bytes read (backfill)", big["bytes_per_item"], "TB", 1e12),
               ("bytes written (backfilled lake)", big["bytes_out"] / big["rows"], "TB", 1e12),
               ("backfill CPU-seconds (this machine's cores, demo-width h)", big["cpu_seconds_per_million"] / 1e6,
                "core-hours", 3600),
               ("index build CPU-seconds (train + add)", ix["cpu_seconds_per_million"] / 1e6, "core-hours", 3600),
               ("index bytes (IVF-PQ codes + ids, loaded for search)", ix["bytes_per_vector"], "GB", 1e9),
               ("manifest bytes", big["manifest_bytes"] / big["rows"], "MB", 1e6)]
    return [{"cost": name, "per_row": v, "total": round(v * items / div, 2), "unit": unit} for name, v, unit, div in per_row]


def run(cfg: Config, store: Store) -> dict:
    """Run the scale profile and write reports/bench-scale-{timestamp}/ (bench.md, bench.json, two plots)."""
    s = cfg.bench.scale
    init_ray(cfg)
    structure = Clustered(s.clusters, s.latent_dim, s.spread, s.noise)
    root = store.sub("bench", "scale")
    save_transformation(root, DIMS, cfg.models.transformation.branch, cfg.models.transformation.hidden)
    free0 = shutil.disk_usage(root.root).free if root.scheme == "file" else None
    sizes = sorted(s.rows)
    result: dict = {"machine": machine(), "gpu_used": gpus_available(), "dims": DIMS,
                    "h": {"branch": cfg.models.transformation.branch, "hidden": cfg.models.transformation.hidden},
                    "structure": structure.__dict__, "free_disk_gb_at_start": free0 and round(free0 / 1e9, 1),
                    "lake_seconds": {}, "backfill": []}
    for rows in sizes:  # every lake first, so that each backfill finds the driver in the same state
        t0 = time.time()
        stored_lake(root, DIMS, rows, s.rows_per_file, structure)
        result["lake_seconds"][rows] = round(time.time() - t0, 1)
    # On few cores Ray's own daemons are busy for a minute or so after it starts: a warm-up run of the
    # smallest lake goes first, unreported, so that no size pays for it
    backfill_at(cfg, root, sizes[0])
    for rows in sizes:
        result["backfill"].append(backfill_at(cfg, root, rows))
        if rows != sizes[-1]:
            root.delete(layout.embeddings(root, OUT, f"c{rows}"))  # only the largest output is indexed
    first, last = result["backfill"][0], result["backfill"][-1]
    result["growth"] = {k: round(last[k] / first[k] - 1, 3) for k in
                        ("items_per_second", "driver_peak_rss_gb", "worker_peak_rss_gb") if first[k]}
    split = f"c{sizes[-1]}"
    result["index"] = build_index(cfg, root, split)
    result["search"] = search_curve(cfg, root, split, queries(root, structure, s.queries))
    result |= {"nprobe": cfg.index.nprobe, "goal": s.recall_goal, "projection_items": cfg.bench.projection.items}
    result["projection"] = projection(result, cfg.bench.projection.items)
    result["disk_gb_used"] = round(sum(i.size for i in root.fs.get_file_info(
        pafs.FileSelector(root.root, recursive=True)) if i.type == pafs.FileType.File) / 1e9, 1)
    plots = {"scaling.png": plot_by_size(result["backfill"], "backfill through Ray by lake size", {
        "driver_peak_rss_gb": "driver peak RSS", "worker_peak_rss_gb": "largest worker peak RSS"}),
        "recall.png": plot_recall(result)}
    return result | {"report_dir": write(store, "bench-scale", result, plots, render(result))}


def plot_recall(r: dict) -> bytes:
    fig, ax = report.figure((6.5, 4))
    c, k = r["search"]["curve"], r["search"]["k"]
    probes = [p["nprobe"] for p in c]
    ax.plot(probes, [p["recall"] for p in c], "o-", label=f"recall@{k}")
    ax.plot(probes, [p["nearest_in_top_k"] for p in c], "s:", label=f"nearest in top {k}")
    ax.axhline(r["goal"], color="#999", lw=0.8)
    ax.set(xscale="log", xlabel="nprobe", ylabel="recall", ylim=(0, 1.02),
           title=f"{r['index']['factory']} over {r['index']['rows']:,} rows")
    ax2 = ax.twinx()
    ax2.plot(probes, [p["queries_per_second"] for p in c], "^--", color="#c44", label="queries/s")
    ax2.set(yscale="log", ylabel="queries / s")
    legend(ax, ax2, "lower left")
    return report.png(fig)


def render(r: dict) -> str:
    mc, ix, se = r["machine"], r["index"], r["search"]
    at = next(p for p in se["curve"] if p["nprobe"] == r["nprobe"]) if any(
        p["nprobe"] == r["nprobe"] for p in se["curve"]) else None
    lines = ["# fct bench --profile scale", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gb']} GB, GPU: {mc['gpu'] or 'none'} "
             f"({'used' if r['gpu_used'] else 'CPU run'}); python {mc['python']}, torch {mc['torch']}, ray {mc['ray']}, "
             f"pyarrow {mc['pyarrow']}, faiss {mc['faiss']}. Free disk at start: {r['free_disk_gb_at_start']} GB; "
             f"the run's lakes and index: {r['disk_gb_used']} GB.", "",
             f"Stored rows: id + 128-d old + 128-d side (float32), synthetic around {r['structure']['clusters']} "
             f"centres of a {r['structure']['latent']}-d latent space; h: production dims with the demo's widths "
             f"(branch {r['h']['branch']}, hidden {r['h']['hidden']}), random weights. Rates are steady-state "
             "(rows / mapping seconds); start-up and the driver's own time are given apart.", "",
             "## Backfill through Ray by lake size", "",
             "| lake rows | files | rows/s (steady) | start-up s | driver s (list, footers, plan) | commit s | "
             "manifest KB | peak RSS driver GB | peak RSS largest worker GB | CPU-s per M rows | stored lake written s (~0: reused) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b['rows']:,} | {b['files']} | {b['items_per_second']:,.0f} | {b['startup_seconds']:.1f} | "
              f"{b['driver_seconds']:.2f} | {b['commit_seconds']:.2f} | {b['manifest_bytes'] / 1e3:,.0f} | "
              f"{b['driver_peak_rss_gb']} | {b['worker_peak_rss_gb']} | {b['cpu_seconds_per_million']:,.0f} | "
              f"{r['lake_seconds'][b['rows']]:,.0f} |" for b in r["backfill"]]
    g = r["growth"]
    lines += ["", "From the smallest to the largest lake (goal: each within 10 %): " + ", ".join(
        f"{k.replace('_gb', '').replace('_', ' ')} {100 * v:+.1f} %" for k, v in g.items()), "",
        "## Index", "",
        f"`{ix['factory']}` over {ix['rows']:,} rows in {ix['shards']} shards (added in parallel by Ray tasks), "
        f"quantizer and codebooks trained once on {ix['train_sample']:,} sampled rows in {ix['train_seconds']:.0f} s; "
        f"build {ix['build_seconds']:.0f} s in all ({ix['rows_per_second']:,.0f} rows/s), {ix['cpu_seconds_per_million']:,.0f} "
        f"CPU-s per M rows; {ix['bytes_per_vector']} bytes per vector on storage ({ix['bytes'] / 1e9:.2f} GB); "
        f"{se['loaded']['memory_gb']} GB of memory when loaded ({se['loaded']['load_seconds']} s).", "",
        f"## Search ({se['queries']:,} queries of the same distribution, not in the lake, k = {se['k']})", "",
        f"Exact ground truth streamed over the lake file by file (faiss.contrib's knn_ground_truth): "
        f"{se['exact_seconds']:.0f} s. recall@{se['k']}: the share of the exact {se['k']} nearest found in the top "
        f"{se['k']}; nearest in top {se['k']}: the share of queries whose exact nearest is found.", "",
        f"| nprobe | recall@{se['k']} | nearest in top {se['k']} | queries/s |", "|---|---|---|---|"]
    lines += [f"| {p['nprobe']}{' (configured)' if p['nprobe'] == r['nprobe'] else ''} | {p['recall']:.3f} | "
              f"{p['nearest_in_top_k']:.3f} | {p['queries_per_second']:,.0f} |" for p in se["curve"]]
    reach = [p["nprobe"] for p in se["curve"] if p["recall"] >= r["goal"]]
    lines += ["", f"Goal recall@{se['k']} >= {r['goal']}: " + (
        f"{'met' if at and at['recall'] >= r['goal'] else '**not met**'} at the configured nprobe {r['nprobe']} "
        f"({at['recall']:.3f})" if at else f"nprobe {r['nprobe']} not on the curve") + (
        f"; first reached at nprobe {reach[0]}." if reach else "; not reached at any nprobe tried."), "",
        f"## Projection to {r['projection_items']:,} rows from the measured per-row costs", "",
        "| cost | per row (measured at the largest size) | total |", "|---|---|---|"]
    lines += [f"| {p['cost']} | {p['per_row']:.4g} | {p['total']:,} {p['unit']} |" for p in r["projection"]]
    return "\n".join(lines + ["", "![scaling](scaling.png) ![recall](recall.png)", ""])
