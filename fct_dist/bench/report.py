"""The benchmark's report: bench.md and its two plots (throughput by job, backfill by lake size)."""
from __future__ import annotations

import logging
import time

from .. import layout, report as reports
from ..storage import Store

log = logging.getLogger(__name__)

IO_JOB = "backfill, zero-cost transform"


def plot_throughput(r: dict) -> bytes:
    fig, ax = reports.figure((10, 4.5))
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
    return reports.png(fig)


def plot_by_size(runs: list[dict], title: str, memory: dict[str, str]) -> bytes:
    """Steady rows/s and peak memory (GB) by lake size; `memory` maps a run's key to its label."""
    fig, ax = reports.figure((6.5, 4))
    sizes = [r["rows"] for r in runs]
    ax.plot(sizes, [r["items_per_second"] for r in runs], "o-", label="rows/s (steady)")
    ax.set(xscale="log", xlabel="lake rows", ylabel="rows / s", title=title)
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    for (key, label), style, color in zip(memory.items(), ("s--", "^--"), ("#c44", "#e80")):
        ax2.plot(sizes, [r[key] for r in runs], style, color=color, label=label)
    ax2.set(ylabel="GB")
    ax2.set_ylim(bottom=0)
    legend(ax, ax2, "lower right")
    return reports.png(fig)


def legend(ax, ax2, loc: str) -> None:
    """One legend for a plot with a twin axis, inside the axes."""
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc=loc, fontsize=8)


def write(store: Store, run: str, result: dict, plots: dict[str, bytes], md: str) -> str:
    """reports/{run}-{timestamp}/: bench.json, the plots (name -> PNG) and bench.md; returns the folder."""
    directory = layout.report(store, time.strftime(f"{run}-%Y%m%d-%H%M%S"))
    store.write_json(f"{directory}/bench.json", result)
    for name, png in plots.items():
        store.write_bytes(f"{directory}/{name}", png)
    store.write_bytes(f"{directory}/bench.md", md.encode())
    log.info("%s\n%s report: %s/bench.md", md, run, store.uri(directory))
    return directory


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
    ib = r["iceberg"]
    lines += ["", "## The production backfill from and into Iceberg tables (Ray)", "",
              "The same stored lake and h: folder -> folder, and table -> table (the stored files registered in place; "
              "the snapshot pinned; the output committed as one snapshot), alternating; median of each.", "",
              "| path | rows/s (steady) | end-to-end s (pin, plan, map, commit) | start-up s |", "|---|---|---|---|"]
    lines += [f"| {k} | {ib[k]['items_per_second']:,.0f} | {ib[k]['end_to_end_seconds']:.1f} | "
              f"{ib[k]['startup_seconds']:.1f} |" for k in ("folder", "table")]
    lines += ["", f"The table path costs {100 * ib['table_cost_steady']:+.1f} % steady, "
              f"{100 * ib['table_cost_end_to_end']:+.1f} % end to end."]
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
