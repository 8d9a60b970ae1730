"""reports/{run}/: report.md + metrics.json + plots (CMC curves) of an upgrade."""
from __future__ import annotations

import io
import logging
import time

import numpy as np

from . import layout
from .evaluate import LABELS, format_table, gap_closed
from .layout import FCT, FCT_NOSIDE
from .runtime import machine
from .storage import Store

log = logging.getLogger(__name__)

GOALS = ("FCT with side-info closes >= 95 % of the old->new gap (top-1 and mAP)",
         "side-info earns its storage: FCT with side-info beats FCT without by >= 1.5 top-1 points",
         "FCT beats BCT in top-1 and mAP (the paper's headline)")


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds of every case's metrics (std is 0 for a single seed)."""
    out = []
    for i, c in enumerate(runs[0]["evaluation"]["cases"]):
        vals = {m: np.array([r["evaluation"]["cases"][i][m] for r in runs]) for m in ("top1", "top5", "map")}
        cmc = np.mean([r["evaluation"]["cases"][i]["cmc"] for r in runs], axis=0).tolist()
        out.append({k: c[k] for k in ("query", "gallery", "label", "method")} | {"cmc": cmc}
                   | {m: float(v.mean()) for m, v in vals.items()} | {f"{m}_std": float(v.std()) for m, v in vals.items()})
    return out


def goals(cases: list[dict]) -> list[dict]:
    by = {(c["query"], c["gallery"]): c for c in cases}
    need = [("old", "old"), ("new", "new"), ("new", "fct"), ("new", "fct-noside"), ("bct", "old")]
    if not all(k in by for k in need):
        return []
    oo, nn, f, fn, b = (by[k] for k in need)
    gap = gap_closed(cases, FCT)
    closed = gap["top1"] is not None and gap["map"] is not None
    return [
        {"goal": GOALS[0], "met": closed and gap["top1"] >= 0.95 and gap["map"] >= 0.95,
         "measured": f"top-1 {100 * gap['top1']:.1f} %, mAP {100 * gap['map']:.1f} %" if closed
         else "old and new models score the same: no gap to close"},
        {"goal": GOALS[1], "met": f["top1"] - fn["top1"] >= 0.015,
         "measured": f"{100 * (f['top1'] - fn['top1']):+.2f} top-1 points"},
        {"goal": GOALS[2], "met": f["top1"] > b["top1"] and f["map"] > b["map"],
         "measured": f"top-1 {100 * (f['top1'] - b['top1']):+.1f}, mAP {100 * (f['map'] - b['map']):+.1f} points "
                     "(new/FCT vs BCT-new/old)"},
    ]


def figure(figsize: tuple[float, float], rows: int = 1, cols: int = 1):
    """(fig, ax or axes) on the non-interactive backend: reports are written by jobs without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, cols, figsize=figsize)


def png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def cmc_plot(cases: list[dict]) -> bytes:
    fig, ax = figure((7, 4.5))
    for c in cases:
        ax.plot(range(1, len(c["cmc"]) + 1), [100 * v for v in c["cmc"]], marker=".", label=c["label"])
    ax.set(xlabel="rank k", ylabel="CMC top-k (%)", title="CMC curves (query / gallery)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png(fig)


def write(store: Store, runs: list[dict], config: dict, run_name: str | None = None,
          search_png: bytes | None = None) -> str:
    """Write the report of one or more seeds' runs (and the picture of a search, when given);
    returns the report directory."""
    run_name = run_name or time.strftime("upgrade-%Y%m%d-%H%M%S")
    directory = layout.report(store, run_name)
    cases = aggregate(runs)
    checks = goals(cases)
    seeds = len(runs)
    table = format_table(cases) if seeds == 1 else _table_with_std(cases)
    gap = runs[0]["evaluation"]["gap_closed"] if seeds == 1 else _mean_gap(runs)
    models, mc = runs[0]["models"], machine()
    lines = [f"# fct-dist upgrade report: {run_name}", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gb']} GB, GPU: {mc['gpu'] or 'none'}; "
             f"python {mc['python']}, torch {mc['torch']}, ray {mc['ray']}, pyarrow {mc['pyarrow']}, faiss {mc['faiss']}; "
             f"seeds: {seeds}; storage: {store.uri(store.root)}", "",
             "## Compatibility matrix (FCT protocol: query = gallery = test split, own item excluded, L2)", "",
             table, ""]
    for g in (FCT, FCT_NOSIDE):
        if gap.get(g) and gap[g]["top1"] is not None:
            lines.append(f"- Share of the old->new gap closed by {LABELS[g]}: top-1 {100 * gap[g]['top1']:.1f} %, "
                         f"mAP {100 * gap[g]['map']:.1f} %")
    lines += ["", f"Ranking method: {', '.join(sorted({c['method'] for c in cases}))}. "
              "The new/old case compares dims that differ by zero-padding the old vectors (incompatible: "
              "expected near chance).", "", "![CMC curves](cmc.png)", "", "## Goals", ""]
    lines += [f"- [{'x' if c['met'] else ' '}] {c['goal']}: {c['measured']}{'' if c['met'] else ' (MISSED)'}"
              for c in checks] or ["- not all cases were run"]
    lines += ["", "## Models", "", "| model | version | metrics |", "|---|---|---|"]
    for name, meta in models.items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in meta["metrics"].items() if k != "history"}
        lines.append(f"| {name} | {meta['version']} | {shown} |")
    idx = runs[0].get("index")
    if idx:
        recall = runs[0]["evaluation"].get("index_recall_at_10", {}).get(FCT)
        lines += ["", "## Index", "", f"{idx['factory']} over {idx['rows']} rows in {len(idx['shards'])} shards, "
                  f"{idx['bytes'] / 1e6:.1f} MB, built at {idx['rows_per_second']:.0f} rows/s, recall@10 vs "
                  f"exact {'not measured' if recall is None else round(recall, 4)} (nprobe {idx['nprobe']})"]
    if search_png:
        store.write_bytes(f"{directory}/search.png", search_png)
        lines += ["", "## Search", "", "Test images embedded by the new model, answered by the backfilled gallery's "
                  "index (green: same label as the query).", "", "![search](search.png)"]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in runs[0]["timings"].items()]
    store.write_bytes(f"{directory}/cmc.png", cmc_plot(cases))
    store.write_json(f"{directory}/metrics.json", {"cases": cases, "goals": checks, "gap_closed": gap, "runs": runs,
                                                   "config": config})
    store.write_bytes(f"{directory}/report.md", "\n".join(lines).encode() + b"\n")
    log.info("%s\nreport: %s/report.md", "\n".join(x for x in lines if x.startswith("- ")), store.uri(directory))
    return directory


def _table_with_std(cases: list[dict]) -> str:
    lines = ["| case (query / gallery) | top-1 % | top-5 % | mAP % |", "|---|---|---|---|"]
    for c in cases:
        cells = [f"{100 * c[m]:.1f} ± {100 * c[m + '_std']:.1f}" for m in ("top1", "top5", "map")]
        lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_gap(runs: list[dict]) -> dict:
    out = {}
    for g in (FCT, FCT_NOSIDE):
        vals = [r["evaluation"]["gap_closed"].get(g) for r in runs]
        if all(v and None not in v.values() for v in vals):
            out[g] = {m: float(np.mean([v[m] for v in vals])) for m in ("top1", "top5", "map")}
    return out
