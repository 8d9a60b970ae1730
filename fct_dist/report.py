"""reports/{run}/: report.md + metrics.json + plots (CMC curves) of an upgrade."""
from __future__ import annotations

import io
import logging
import time

import numpy as np

from . import layout
from .evaluation import LABELS, better, format_table, gap_closed, strategies, strategy_gaps
from .layout import FCT, FCT_NOSIDE, STORED
from .runtime import machine
from .storage import Store

log = logging.getLogger(__name__)

GOALS = ("FCT with side-info closes >= 95 % of the old->new gap in top-1 and >= 100 % in mAP",
         "side-info earns its storage: FCT with side-info beats FCT without by >= 2 top-1 points",
         "FCT beats BCT in top-1 and mAP (the paper's headline)",
         "re-extraction by uncertainty: its backfill curve's AUC is at least half-way from the random order's to "
         "the oracle's (top-1 and mAP)",
         "after {n} upgrades ({chain}) chained closes >= 90 % and direct >= 95 % of the v1/v1 -> v{k}/v{k} gap in "
         "top-1")
# FCT's published table (CVPR 2022, apple/ml-fct; ResNet-50-128): old/old, new/new, FCT with side-info, FCT
# without, as top-1 and mAP %; the goals' figures of ours are shown beside what these give.
ML_FCT = {"ImageNet-1k": {"top1": (46.4, 68.4, 65.1, 61.8), "map": (28.3, 45.6, 44.0, 39.9)},
          "CIFAR-100": {"top1": (34.2, 56.5, 50.2, 47.2), "map": (16.5, 36.3, 32.2, 25.8)}}


def reference() -> dict[str, str]:
    """FCT's published shares of the gap and side-info's top-1 points, as the goals' lines show them."""
    def share(t: tuple) -> float:
        return 100 * (t[2] - t[0]) / (t[1] - t[0])
    return {"gap": "; ".join(f"{d} {share(r['top1']):.0f} % / {share(r['map']):.0f} %" for d, r in ML_FCT.items()),
            "side": "; ".join(f"{d} {r['top1'][2] - r['top1'][3]:+.1f}" for d, r in ML_FCT.items())}


# FastFill's ImageNet-1k table (with side-info; Jaeckle et al., ICLR 2023): AUC of the backfill curve, %.
FASTFILL_IMAGENET = {"random": {"top1": 64.7, "map": 42.6}, "uncertainty": {"top1": 67.8, "map": 46.2},
                     "new/new": {"top1": 68.2, "map": 45.3}}


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
    gap, ref = gap_closed(cases, FCT), reference()
    closed = gap["top1"] is not None and gap["map"] is not None
    return [
        {"goal": GOALS[0], "met": closed and gap["top1"] >= 0.95 and gap["map"] >= 1.0,
         "measured": f"top-1 {100 * gap['top1']:.1f} %, mAP {100 * gap['map']:.1f} % (FCT's paper: {ref['gap']})"
         if closed else "old and new models score the same: no gap to close"},
        {"goal": GOALS[1], "met": f["top1"] - fn["top1"] >= 0.02,
         "measured": f"{100 * (f['top1'] - fn['top1']):+.2f} top-1 points (FCT's paper: {ref['side']})"},
        {"goal": GOALS[2], "met": f["top1"] > b["top1"] and f["map"] > b["map"],
         "measured": f"top-1 {100 * (f['top1'] - b['top1']):+.1f}, mAP {100 * (f['map'] - b['map']):+.1f} points "
                     "(new/FCT vs BCT-new/old)"},
    ]


def mean_curve(runs: list[dict]) -> dict | None:
    """The backfill curve averaged over seeds (None when a run has none)."""
    curves = [r["evaluation"].get("backfill_curve") for r in runs]
    if not all(curves):
        return None
    out = dict(curves[0]) | {"curves": {}}
    for o in curves[0]["curves"]:
        out["curves"][o] = {m: np.mean([c["curves"][o][m] for c in curves], axis=0).tolist()
                            for m in curves[0]["curves"][o]}
    if all("refill" in c for c in curves):
        out["refill"] = curves[0]["refill"] | {m: float(np.mean([c["refill"][m] for c in curves])) for m in ("top1", "map")}
    return out


def curve_goal(curve: dict | None) -> dict | None:
    """Uncertainty AUC >= random + (oracle - random) / 2, per metric (an oracle that does no better than
    random sets the bar below random)."""
    c = (curve or {}).get("curves", {})
    if not all(o in c for o in ("uncertainty", "random", "oracle")):
        return None
    auc = {o: {m: c[o][f"auc_{m}"] for m in ("top1", "map")} for o in ("uncertainty", "random", "oracle")}
    met = all(auc["uncertainty"][m] >= (auc["random"][m] + auc["oracle"][m]) / 2 for m in ("top1", "map"))

    def way(m: str) -> str:
        u, r, o = (100 * auc[x][m] for x in ("uncertainty", "random", "oracle"))
        # under 0.1 point between random and the oracle the share is noise over noise (2,000 queries)
        share = (f", {100 * (u - r) / (o - r):.0f} % of the way" if o - r >= 0.1
                 else ", the oracle within 0.1 point of random: nothing for an order to gain")
        return f"{'top-1' if m == 'top1' else 'mAP'} AUC uncertainty {u:.2f} / random {r:.2f} / oracle {o:.2f}{share}"

    return {"goal": GOALS[3], "met": met, "measured": "; ".join(way(m) for m in ("top1", "map"))}


def versions_goal(cases: list[dict], runs: list[dict], k: int) -> tuple[dict | None, list[str]]:
    """The repeated-upgrade goal and report section of version k >= 3 (None, [] when its cases are missing):
    each strategy's share of the v1/v1 -> vk/vk gap, from the cases (the mean over seeds), and each seed's."""
    gaps, named = strategy_gaps(cases, k), strategies(k)
    if not gaps:
        return None, []
    best = better(gaps)
    per_seed = [strategy_gaps(r["evaluation"]["cases"], k) for r in runs]
    several = len(runs) > 1
    chain = " -> ".join(f"v{i}" for i in range(1, k + 1))

    def row(s: str, g: dict) -> str:
        cells = [named[s], *(f"{100 * g[m]:.1f}" for m in ("top1", "map"))]
        if several:  # each seed's share beside the mean's
            cells += [" / ".join(f"{100 * p[s][m]:.1f}" if s in p else "-" for p in per_seed) for m in ("top1", "map")]
        return "| " + " | ".join(cells) + " |"

    lines = [f"## Repeated upgrades ({chain.replace('v1', 'v1 = old', 1).replace('v2', 'v2 = new', 1)})", "",
             f"v{k} queries against the gallery in each state it went through (the rows v{k} / ... of the matrix). "
             f"Chained: h(v{k - 1} -> v{k}) applied to the previous upgraded lake's vectors (errors compound). Direct: "
             f"h(v1 -> v{k}) applied to the stored v1 vectors. Both read side-info extracted once at v1 time, and no "
             f"gallery image.", "", f"| strategy | share of the v1/v1 -> v{k}/v{k} gap, top-1 % | mAP % |"
             + (" per seed, top-1 % | mAP % |" if several else ""), "|---|---|---|" + ("---|---|" if several else "")]
    lines += [row(s, g) for s, g in gaps.items()]
    lines += ["", f"- Better here: {named[best]} (more of the top-1 gap, then of the mAP gap); `versions.strategy: "
              "auto` serves it. References for what successive compatibility costs: FCT's own chain of updates and "
              "BT^2 (ICCV 2023).", ""]
    want = {"chained": 0.90, "direct": 0.95}
    goal = {"goal": GOALS[4].format(n={2: "two", 3: "three"}.get(k - 1, k - 1), chain=chain, k=k),
            "met": all(g["top1"] >= want[named[s]] for s, g in gaps.items()),
            "measured": "; ".join(f"{named[s]}: top-1 {100 * g['top1']:.1f} %, mAP {100 * g['map']:.1f} %"
                                  for s, g in gaps.items())}
    return goal, lines


def curve_lines(curve: dict) -> list[str]:
    """The report's FastFill section: AUC per order, FastFill's own gains beside ours, the refill job."""
    c, fi = curve["curves"], FASTFILL_IMAGENET
    lines = ["## Partial re-extraction (FastFill)", "",
             f"New-model queries ({curve['queries']} sampled) against the backfilled gallery ({curve['gallery']} items) "
             f"with 0 .. 100 % of it re-extracted by the new model, in each order; AUC = the mean over the "
             f"{len(curve['fractions'])} points.", "",
             "| order | AUC top-1 % | AUC mAP % | top-1 % at 10 / 20 / 50 % re-extracted |", "|---|---|---|---|"]
    at = [min(range(len(curve["fractions"])), key=lambda i: abs(curve["fractions"][i] - f)) for f in (0.1, 0.2, 0.5)]
    for o, v in c.items():
        lines.append(f"| {o} | {100 * v['auc_top1']:.2f} | {100 * v['auc_map']:.2f} | "
                     + " / ".join(f"{100 * v['top1'][i]:.1f}" for i in at) + " |")
    if "uncertainty" in c and "random" in c:
        gain = {m: 100 * (c["uncertainty"][f"auc_{m}"] / c["random"][f"auc_{m}"] - 1) for m in ("top1", "map")}
        ref = {m: 100 * (fi["uncertainty"][m] / fi["random"][m] - 1) for m in ("top1", "map")}
        lines += ["", f"- Uncertainty order over random, relative AUC gain: top-1 {gain['top1']:+.1f} %, mAP "
                  f"{gain['map']:+.1f} % (FastFill on ImageNet-1k with side-info: top-1 {ref['top1']:+.1f} %, mAP "
                  f"{ref['map']:+.1f} %; AUC random {fi['random']['top1']} / {fi['random']['map']}, FastFill "
                  f"{fi['uncertainty']['top1']} / {fi['uncertainty']['map']}, new/new {fi['new/new']['top1']} / "
                  f"{fi['new/new']['map']})"]
    if "refill" in curve:
        r = curve["refill"]
        lines.append(f"- `fct refill --budget {r['budget']}` re-extracted {r['reextracted']} items: top-1 "
                     f"{100 * r['top1']:.1f} %, mAP {100 * r['map']:.1f} % with the same queries")
    return lines + ["", "![backfill curves](backfill.png)", ""]


def curve_plot(curve: dict) -> bytes:
    fig, axes = figure((10, 4), 1, 2)
    x = [100 * f for f in curve["fractions"]]
    for ax, (m, name) in zip(axes, (("top1", "top-1"), ("map", "mAP"))):
        for o, v in curve["curves"].items():
            ax.plot(x, [100 * y for y in v[m]], marker=".", label=f"{o} (AUC {100 * v[f'auc_{m}']:.1f})")
        ax.set(xlabel="gallery re-extracted by the new model (%)", ylabel=f"{name} (%)", title=f"backfill curve: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png(fig)


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
    import matplotlib
    fig, ax = figure((9, 4.5))
    colours = matplotlib.colormaps["tab20"]  # 13 cases with a v3: the default cycle repeats at 10
    for i, c in enumerate(cases):
        ax.plot(range(1, len(c["cmc"]) + 1), [100 * v for v in c["cmc"]], marker=".", label=c["label"],
                color=colours(i % 20), linestyle="-" if c["query"] in LABELS else "--")  # dashed: later versions
    ax.set(xlabel="rank k", ylabel="CMC top-k (%)", title="CMC curves (query / gallery)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the curves, not over them
    return png(fig)


def write(store: Store, runs: list[dict], config: dict, run_name: str | None = None,
          search_png: bytes | None = None, wall: float | None = None) -> str:
    """Write the report of one or more seeds' runs (and the picture of a search, when given; `wall`: the
    whole run's seconds, default the sum of the seeds' stages); returns the report directory."""
    run_name = run_name or time.strftime("upgrade-%Y%m%d-%H%M%S")
    directory = layout.report(store, run_name)
    cases = aggregate(runs)
    curve = mean_curve(runs)
    later = [versions_goal(cases, runs, k) for k in range(3, len(config["versions"]["classes"]) + 2)]
    checks = goals(cases) + [g for g in [curve_goal(curve)] + [goal for goal, _ in later] if g]
    seeds = len(runs)
    table = format_table(cases) if seeds == 1 else _table_with_std(cases)
    gap = runs[0]["evaluation"]["gap_closed"] if seeds == 1 else _mean_gap(runs)
    models, mc = runs[0]["models"], machine()
    lines = [f"# fct-dist upgrade report: {run_name}", ""] + smoke_note(config) + [
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
    if curve:
        store.write_bytes(f"{directory}/backfill.png", curve_plot(curve))
        lines += [""] + curve_lines(curve)
    lines += [line for _, section in later for line in section]
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
    lines += ["", "## Where the results are", "",
              f"- the backfilled gallery (no image re-read): {store.uri(layout.embeddings(store, FCT, 'test'))}",
              f"- its FAISS index: {store.uri(layout.index(store, FCT, 'test'))}",
              f"- the stored (old, side-info) lake it came from: {store.uri(layout.embeddings(store, STORED, 'test'))}",
              f"- the models: {store.uri(store.path('models'))}",
              f"- this report, its plots and metrics.json: {store.uri(directory)}"]
    lines += ["", "## Stages", "", "Seconds per stage (0.0: current, skipped); the whole run took "
              f"{wall if wall is not None else round(sum(r['timings']['total'] for r in runs), 1)} s.", "",
              "| stage | " + " | ".join(f"seed {i}" for i in range(seeds)) + " |", "|---" * (seeds + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(str(r["timings"].get(k, "")) for r in runs) + " |" for k in runs[0]["timings"]]
    store.write_bytes(f"{directory}/cmc.png", cmc_plot(cases))
    store.write_json(f"{directory}/metrics.json", {"cases": cases, "goals": checks, "gap_closed": gap, "runs": runs,
                                                   "backfill_curve": curve, "config": config})
    store.write_bytes(f"{directory}/report.md", "\n".join(lines).encode() + b"\n")
    log.info("%s\nreport: %s/report.md", "\n".join(x for x in lines if x.startswith("- ")), store.uri(directory))
    return directory


def smoke_note(config: dict) -> list[str]:
    """On synthetic data (the tiny preset) the numbers say that every stage ran, not how good FCT is."""
    if config["data"]["source"] != "synthetic":
        return []
    return ["> **Smoke run** on synthetic data (the `tiny` preset: a few hundred 16-px images, models of a few "
            "thousand parameters). It shows that every stage ran end to end; its accuracies and gap shares are too "
            "noisy to mean anything (a negative share is no failure here). `make demo` gives the numbers that "
            "do.", ""]


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
