"""`fct bench`: the backfill through Ray against the bare loop without Ray, on the same lake.

(a) plain loop: pyarrow read -> torch h (all cores) -> pyarrow write, one process, no Ray;
(b) `fct backfill`: the real pipeline (Ray Data actor pool, exactly-once commits, manifest).
Both use FCT's reference transformation (128/128 -> 128, branch 256, hidden 2048; random weights:
throughput does not depend on them). Then (b) on lakes of growing size: rows/s and peak memory of
the whole process tree (driver + Ray daemons + actors), which must stay flat if it streams.
"""
from __future__ import annotations

import copy
import os
import platform
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch

from . import lake
from .config import Config
from .models import Transformation, registry
from .pipeline import backfill
from .pipeline.device import place
from .runtime import gpus_available, init_ray
from .storage import Store

DIMS = {"old": 128, "side": 128, "new": 128}
H_NAME = "bench-h"


def reference_h(store: Store) -> dict:
    """A random-weight transformation of the reference size, saved as an artefact."""
    torch.manual_seed(0)
    h = Transformation(DIMS["old"], DIMS["side"], DIMS["new"], branch=256, hidden=2048)
    arch = {"old_dim": 128, "side_dim": 128, "new_dim": 128, "branch": 256, "hidden": 2048, "use_side": True}
    return registry.save(store, H_NAME, h.eval(), {"kind": "transformation", "arch": arch, "dims": DIMS,
                                                   "producers": {"old": "bench", "side": "bench"},
                                                   "metrics": {}, "fingerprint": "bench"})


def synthetic_lake(store: Store, directory: str, rows: int, rows_per_file: int) -> None:
    """A stored lake (id, old, side) of random vectors, written once per size and reused."""
    if store.has_manifest(directory) and store.manifest(directory)["rows"] == rows:
        return
    store.delete(directory)
    rng = np.random.default_rng(0)
    prod = {c: {"model": "bench", "version": "bench", "dim": DIMS[c]} for c in ("old", "side")}
    for k, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        vectors = {c: rng.standard_normal((n, DIMS[c]), np.float32) for c in ("old", "side")}
        lake.write_part(store, f"{directory}/{lake.part_name(k)}",
                        lake.embedding_table(np.arange(start, start + n), vectors, prod))
    store.write_manifest(directory, {"kind": "embeddings", "rows": rows, "producer": prod})


def plain_loop(store: Store, in_dir: str, out_dir: str, batch_size: int, precision: str) -> dict:
    """(a): the same work as `fct backfill` minus Ray, in this process with every core."""
    torch.set_num_threads(os.cpu_count() or 1)
    module, meta = registry.load(store, H_NAME)
    h, device, dtype = place(module, precision)
    store.delete(out_dir)
    t0, rows = time.time(), 0
    prod = {"emb": {"model": H_NAME, "version": meta["version"], "dim": DIMS["new"]}}
    for path in lake.parts(store, in_dir):
        outs = []
        with store.fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size):
                old, side = (torch.as_tensor(lake.to_numpy(rb.column(c)), device=device, dtype=dtype)
                             for c in ("old", "side"))
                with torch.no_grad():
                    outs.append((rb.column("id").to_numpy(), h(old, side).float().cpu().numpy()))
        ids, emb = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
        lake.write_part(store, f"{out_dir}/{path.rsplit('/', 1)[1]}", lake.embedding_table(ids, {"emb": emb}, prod))
        rows += len(ids)
    seconds = time.time() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1)}


class PeakMemory:
    """Peak RSS of this process and all its descendants (Ray's daemons and workers), sampled."""

    def __init__(self, interval: float = 0.2):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ray_backfill(cfg: Config, store: Store, in_dir: str, out_dir: str) -> dict:
    """(b): `fct backfill` end to end (fresh output), with its peak memory."""
    c = copy.deepcopy(cfg)
    c.backfill.input, c.backfill.output = in_dir, out_dir
    store.delete(out_dir)
    t0 = time.time()
    with PeakMemory() as mem:
        m = backfill.backfill(c, store, H_NAME)
    seconds = time.time() - t0
    rows = m["summary"]["rows_out"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds, 1),
            "peak_rss_gb": round(mem.peak / 2**30, 3), "ids_match_input": m["summary"]["rows_in"] == rows}


def machine() -> dict:
    import pyarrow
    import ray
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pyarrow.__version__, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def same_ids(store: Store, a: str, b: str) -> bool:
    def ids(d):
        return np.sort(np.concatenate([pq.read_table(store.fs.open_input_file(p), columns=["id"])["id"].to_numpy()
                                       for p in lake.parts(store, d)]))
    return bool(np.array_equal(ids(a), ids(b)))


def plot(result: dict) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    m = result["main"]
    a.bar(["plain loop (no Ray)", "fct backfill (Ray)"], [m["plain"]["rows_per_second"], m["ray"]["rows_per_second"]],
          color=["#999", "#3572b0"])
    a.set(ylabel="rows / s", title=f"backfill, {m['rows']:,} rows, reference h")
    sizes = [s["rows"] for s in result["scale"]]
    b.plot(sizes, [s["rows_per_second"] for s in result["scale"]], "o-", label="rows/s")
    b.set(xscale="log", xlabel="lake rows", ylabel="rows / s", title="scaling")
    b.set_ylim(bottom=0)
    b2 = b.twinx()
    b2.plot(sizes, [s["peak_rss_gb"] for s in result["scale"]], "s--", color="#c44", label="peak RSS (GB)")
    b2.set_ylabel("peak RSS of the process tree (GB)")
    b2.set_ylim(bottom=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run(cfg: Config, store: Store) -> dict:
    """Run the benchmark and write reports/bench-{timestamp}/ (bench.md, bench.json, bench.png)."""
    init_ray(cfg)
    b = cfg.bench
    reference_h(store)
    base = store.path("bench")
    main_in = f"{base}/lake-{b.rows}"
    synthetic_lake(store, main_in, b.rows, b.rows_per_file)
    plain = plain_loop(store, main_in, f"{base}/out-plain", cfg.backfill.batch_size, cfg.backfill.precision)
    ray_run = ray_backfill(cfg, store, main_in, f"{base}/out-ray")
    main = {"rows": b.rows, "plain": plain, "ray": ray_run,
            "ratio_ray_over_plain": round(ray_run["rows_per_second"] / plain["rows_per_second"], 3),
            "same_ids": same_ids(store, f"{base}/out-plain", f"{base}/out-ray")}
    scale = []
    for rows in b.scale_rows:
        directory = f"{base}/lake-{rows}"
        synthetic_lake(store, directory, rows, b.rows_per_file)
        scale.append(ray_backfill(cfg, store, directory, f"{base}/out-scale"))
    mem = [s["peak_rss_gb"] for s in scale]
    result = {"machine": machine(), "gpu_used": gpus_available(), "main": main, "scale": scale,
              "peak_rss_growth": round(mem[-1] / mem[0] - 1, 3) if len(mem) > 1 else None,
              "settings": {"batch_size": cfg.backfill.batch_size, "num_actors": cfg.backfill.num_actors,
                           "cpus_per_actor": cfg.backfill.cpus_per_actor, "precision": cfg.backfill.precision,
                           "rows_per_file": b.rows_per_file}}
    directory = store.path("reports", time.strftime("bench-%Y%m%d-%H%M%S"))
    store.write_json(f"{directory}/bench.json", result)
    store.write_bytes(f"{directory}/bench.png", plot(result))
    md = render(result)
    store.write_bytes(f"{directory}/bench.md", md.encode())
    print(md)
    print(f"bench report: {store.uri(directory)}/bench.md")
    return result


def render(r: dict) -> str:
    m, mc = r["main"], r["machine"]
    lines = ["# fct bench: backfill", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gb']} GB, GPU: {mc['gpu'] or 'none'}; "
             f"torch {mc['torch']}, ray {mc['ray']}, pyarrow {mc['pyarrow']}", "",
             f"Reference transformation 128/128 -> 128 (branch 256, hidden 2048), {m['rows']:,} rows, "
             f"settings {r['settings']}", "",
             "| job | rows/s | seconds |", "|---|---|---|",
             f"| (a) plain loop, no Ray | {m['plain']['rows_per_second']:,.0f} | {m['plain']['seconds']} |",
             f"| (b) fct backfill (Ray Data) | {m['ray']['rows_per_second']:,.0f} | {m['ray']['seconds']} |", "",
             f"Ratio (b)/(a): **{m['ratio_ray_over_plain']}** (goal >= 0.7); both outputs hold the same ids: "
             f"{m['same_ids']}", "", "| lake rows | rows/s | peak RSS of the process tree (GB) |", "|---|---|---|"]
    lines += [f"| {s['rows']:,} | {s['rows_per_second']:,.0f} | {s['peak_rss_gb']} |" for s in r["scale"]]
    if r["peak_rss_growth"] is not None:
        lines += ["", f"Peak memory growth from the smallest to the largest lake: {100 * r['peak_rss_growth']:+.1f} % "
                  "(goal: within 10 %)"]
    return "\n".join(lines + ["", "![bench](bench.png)", ""])
