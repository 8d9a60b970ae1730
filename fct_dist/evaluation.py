"""The evaluation of an upgrade: which lakes answer which queries (the compatibility matrix of fct's own
lakes, or of a features lake you bring), the share of the gap each closes, the backfill curve and the
recall of the indexes. The metrics themselves (CMC, mAP; FCT's protocol) are `ranking`'s.
"""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from . import currency, features, lake, layout, ranking
from .config import Config
from .layout import FCT, FCT_NOSIDE, NEW, OLD, REFILL, SIDE, STORED, chained, direct, version
from .pipeline import index, refill
from .storage import Store

log = logging.getLogger(__name__)

# The gallery / query sources of the matrix whose lake is not named after the model: model -> (lake, column).
SOURCES = {OLD: (STORED, "old"), SIDE: (STORED, "side")}
CASES = [("old", "old"), ("new", "new"), ("new", "fct"), ("new", "fct-noside"), ("bct", "old"),
         ("bct", "bct"), ("new", "old"), ("side", "side")]
LABELS = {"old": "old", "new": "new", "fct": "FCT (with side-info)", "fct-noside": "FCT (no side-info)",
          "bct": "BCT-new", "side": "side-info"}


def source(model: str) -> tuple[str, str]:
    """(embedding lake, column) of a model's vectors."""
    return SOURCES.get(model, (model, "emb"))


def strategies(k: int) -> dict[str, str]:
    """The two upgraded lakes of version k >= 3 and their strategy's name."""
    return {chained(k): "chained", direct(k): "direct"}


def cases(cfg: Config) -> list[tuple[str, str]]:
    """The matrix's (query, gallery) pairs: after side/side, each later version's queries against each state
    the gallery went through (its own, chained, direct, the previous upgraded lake, the stored one)."""
    later = [(version(k), g) for k in range(3, cfg.versions.last + 1)
             for g in (version(k), chained(k), direct(k), chained(k - 1), OLD)]
    return CASES + later


def labels(cfg: Config) -> dict[str, str]:
    """Each model's name in tables and plots."""
    out = dict(LABELS)
    for k in range(3, cfg.versions.last + 1):
        out |= {version(k): f"v{k}", chained(k): f"FCT chained ({' -> '.join(f'v{i}' for i in range(1, k + 1))})",
                direct(k): f"FCT direct (v1 -> v{k})"}
    return out


Source = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids (sorted), vectors, labels


def load_source(store: Store, model: str, split: str, truth: features.Truth) -> Source:
    """One model's embeddings of `split` with each row's label from `truth` (features.split_truth)."""
    name, col = source(model)
    directory = layout.embeddings(store, name, split)
    currency.manifest(store, directory)
    t = lake.read_lake(store, directory, {"id": pa.int64()}, columns=["id", col]).sort_by("id")
    ids = t["id"].to_numpy()
    labels = features.labels_of(ids, truth, store.uri(layout.images(store, split)), f"rows of {store.uri(directory)}")
    return ids, lake.to_numpy(t[col]), labels


def case(cfg: Config, store: Store, query: str, gallery: str, sources: dict[str, Source]) -> dict:
    """One cell of the matrix: query-model / gallery-model, from sources loaded once per matrix."""
    split = cfg.eval.split
    (q_ids, q, q_lab), (g_ids, g, g_lab) = sources[query], sources[gallery]
    if len(g) <= cfg.eval.exact_max_gallery:
        r = ranking.exact_ranking(q, q_lab, q_ids, g, g_lab, g_ids, cfg.eval.max_rank, cfg.eval.block_size)
    else:
        name, column = source(gallery)
        if index.current(cfg, store, name, split, column) is None:
            raise lake.LakeError(f"gallery {gallery!r} has {len(g)} items (> eval.exact_max_gallery) and no current "
                                 f"index: build it first (fct index --lake {name} --column {column})")
        # dims as the exact path treats them: a zero-padded gallery ranks like the query cut to its dim
        qq = q[:, :g.shape[1]] if q.shape[1] > g.shape[1] else ranking.pad(q, g.shape[1])
        _, nbr = index.search(store, name, split, np.ascontiguousarray(qq), cfg.eval.search_k + 1, cfg.index.nprobe,
                              column)
        r = ranking.ranking_from_neighbours(nbr, q_lab, q_ids, g_lab, g_ids, cfg.eval.max_rank)
    name = labels(cfg)
    r |= {"query": query, "gallery": gallery, "label": f"{name.get(query, query)} / {name.get(gallery, gallery)}",
          "top1": r["cmc"][0], "top5": r["cmc"][min(4, len(r["cmc"]) - 1)], "dims": [q.shape[1], g.shape[1]]}
    if q.shape[1] != g.shape[1]:
        r["note"] = f"dims differ ({q.shape[1]} vs {g.shape[1]}): the smaller is zero-padded"
    return r


def gap_closed(cases: list[dict], gallery: str, query: str = NEW) -> dict:
    """(query/gallery - old/old) / (query/query - old/old) for top-1 and mAP: the share of the gap from the
    old model to the query's model that a backfilled gallery closes."""
    by = {(c["query"], c["gallery"]): c for c in cases}
    oo, nn, f = by.get(("old", "old")), by.get((query, query)), by.get((query, gallery))
    if not (oo and nn and f):
        return {}
    return {m: (f[m] - oo[m]) / (nn[m] - oo[m]) if nn[m] != oo[m] else None for m in ("top1", "top5", "map")}


def strategy_gaps(cases: list[dict], k: int) -> dict[str, dict]:
    """Each vk gallery's share of the v1/v1 -> vk/vk gap ({} when a case is missing or vk scores as v1)."""
    gaps = {s: gap_closed(cases, s, version(k)) for s in strategies(k)}
    return gaps if all(g and g["top1"] is not None for g in gaps.values()) else {}


def better(gaps: dict[str, dict]) -> str:
    """The strategy that closes more of the top-1 gap, then of the mAP gap."""
    return max(gaps, key=lambda s: (gaps[s]["top1"], gaps[s]["map"]))


def upgrade_to(cfg: Config, cases: list[dict], k: int) -> dict:
    """The two ways to version k >= 3 side by side (share of the v1/v1 -> vk/vk gap each closes) and the one
    served: versions.strategy, or with `auto` the better one."""
    gaps, named = strategy_gaps(cases, k), strategies(k)
    if not gaps:
        return {}
    if cfg.versions.strategy != "auto":
        chosen = {v: lake_ for lake_, v in named.items()}[cfg.versions.strategy]
        why = f"versions.strategy={cfg.versions.strategy}"
    else:
        chosen = better(gaps)
        other = next(s for s in gaps if s != chosen)
        why = (f"it closes {100 * gaps[chosen]['top1']:.1f} % of the v1 -> v{k} top-1 gap, {named[other]} "
               f"{100 * gaps[other]['top1']:.1f} %")
    return {"gap_closed": gaps, "strategy": named[chosen], "lake": chosen, "why": why}


def searched_galleries(cfg: Config, store: Store) -> list[tuple[str, str]]:
    """(lake, column) of the galleries too large for exact ranking: the matrix searches their index."""
    out = []
    for model in sorted({g for _, g in cases(cfg)}):
        name, column = source(model)
        directory = layout.embeddings(store, name, cfg.eval.split)
        if currency.has_manifest(store, directory) and currency.manifest(store, directory)["rows"] > cfg.eval.exact_max_gallery:
            out.append((name, column))
    return sorted(set(out))


def index_recall(cfg: Config, store: Store, name: str, split: str, column: str = "emb", k: int = 10,
                 n_queries: int = 1000) -> float:
    """Recall@k of the index of embeddings/{name}/{split} (its `column`) against exact search, for
    `n_queries` vectors sampled from the lake. The exact neighbours stream over the lake file by file
    (faiss.contrib's knn_ground_truth), so no lake is too large for this check."""
    shards, manifest = index.load(store, name, split, column)
    files, d = lake.parts(store, layout.embeddings(store, name, split)), manifest["dim"]
    q = index.sample_vectors(store, files, column, d, n_queries, seed=1)
    return index.recall(index.exact_knn(store, files, column, d, q, k), index.search_shards(shards, q, k, cfg.index.nprobe)[1])


ORDERS = ("uncertainty", "random", "oracle")  # FastFill's order, and its two references


def backfill_orders(ids: np.ndarray, h: np.ndarray, new: np.ndarray, uncertainty: np.ndarray | None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Gallery positions in the order each strategy re-extracts them: by descending uncertainty (ties by
    id, as `fct refill` selects), at random, and the oracle's (descending true error |h - new|, which
    needs the new model's features: evaluation only)."""
    out = {"random": np.random.default_rng(seed).permutation(len(ids)),
           "oracle": np.lexsort((ids, -np.linalg.norm(h - new, axis=1)))}
    if uncertainty is not None:
        a, b = refill.keys(ids, uncertainty)
        out["uncertainty"] = np.lexsort((b, a))
    return {o: out[o] for o in ORDERS if o in out}


def mixed_gallery(h: np.ndarray, new: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """The gallery with its first `count` items in `order` re-extracted (new) and the rest h's."""
    g = h.copy()
    g[order[:count]] = new[order[:count]]
    return g


def backfill_curve(cfg: Config, store: Store, sources: dict[str, Source] | None = None,
                   truth: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FastFill's backfill curve: new-model queries (eval.curve_queries, a seeded sample) against the
    backfilled gallery with 0 .. 100 % of it re-extracted in each order; top-1 and mAP per point and
    their AUC (the mean over the points, as FastFill reports it). With `fct refill`'s lake present, the
    same queries against it too."""
    split = cfg.eval.split
    truth = truth or features.split_truth(store, split)
    sources = sources or {m: load_source(store, m, split, truth) for m in (NEW, FCT)}
    (ids, new, labels), (h_ids, h, _) = sources[NEW], sources[FCT]
    if not np.array_equal(ids, h_ids):
        raise lake.LakeError(f"the {NEW} and {FCT} galleries of {split} hold different ids: no curve")
    fct_dir = layout.embeddings(store, FCT, split)
    has_s = cfg.columns.uncertainty in currency.manifest(store, fct_dir).get("producer", {})
    s = (lake.read_lake(store, fct_dir, {"id": pa.int64()}, columns=["id", cfg.columns.uncertainty]).sort_by("id")
         [cfg.columns.uncertainty].to_numpy() if has_s else None)
    nq = len(ids) if cfg.eval.curve_queries is None else min(cfg.eval.curve_queries, len(ids))
    q = np.sort(np.random.default_rng(1).choice(len(ids), nq, replace=False))
    fractions = np.linspace(0.0, 1.0, cfg.eval.curve_points)

    def score(g: np.ndarray) -> dict:
        r = ranking.exact_ranking(new[q], labels[q], ids[q], g, labels, ids, 1, cfg.eval.block_size)
        return {"top1": r["cmc"][0], "map": r["map"]}

    ends = {0.0: score(h), 1.0: score(new)}  # the same in every order
    curves = {}
    for name, order in backfill_orders(ids, h, new, s).items():
        points = [ends[f] if f in ends else score(mixed_gallery(h, new, order, round(f * len(ids)))) for f in fractions]
        curves[name] = {m: [p[m] for p in points] for m in ("top1", "map")}
        curves[name] |= {f"auc_{m}": float(np.mean(curves[name][m])) for m in ("top1", "map")}
        log.info("backfill curve (%s order): AUC top-1 %.2f %%, mAP %.2f %%", name, 100 * curves[name]["auc_top1"],
                 100 * curves[name]["auc_map"])
    out = {"fractions": fractions.tolist(), "queries": nq, "gallery": len(ids), "curves": curves}
    refilled = layout.embeddings(store, REFILL, split)
    if currency.has_manifest(store, refilled):
        r_ids, r, _ = load_source(store, REFILL, split, truth)
        if np.array_equal(r_ids, ids):
            m = currency.manifest(store, refilled)
            out["refill"] = score(r) | {"budget": m["producer"]["emb"]["budget"],
                                        "reextracted": m["summary"]["true_rows"]["reextracted"]}
    return out


def format_table(cases: list[dict]) -> str:
    lines = ["| case (query / gallery) | top-1 % | top-5 % | mAP % |", "|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['label']} | {100 * c['top1']:.1f} | {100 * c['top5']:.1f} | {100 * c['map']:.1f} |")
    return "\n".join(lines)


def matrix(cfg: Config, store: Store) -> dict:
    """Every case whose embeddings exist, and the recall of every current index of the split;
    returns {"cases": [...], "gap_closed": {...}, "index_recall_at_10": {...}, "skipped": {case: why}}."""
    split, wanted = cfg.eval.split, cases(cfg)
    present = {m for pair in wanted for m in pair if currency.has_manifest(store, layout.embeddings(store, source(m)[0], split))}
    pairs = [(q, g) for q, g in wanted if q in present and g in present]
    truth = features.split_truth(store, split)
    sources = {m: load_source(store, m, split, truth) for m in {m for pair in pairs for m in pair}}
    done = [case(cfg, store, q, g, sources) for q, g in pairs]
    indexed = sorted({source(m)[0] for m in present if source(m)[1] == "emb"
                      and index.current(cfg, store, source(m)[0], split) is not None})
    out = {"cases": done, "gap_closed": {g: gap_closed(done, g) for g in (FCT, FCT_NOSIDE)},
           "index_recall_at_10": {name: index_recall(cfg, store, name, split) for name in indexed},
           "skipped": {f"{q}/{g}": "no finished lake " + " or ".join(
               store.uri(layout.embeddings(store, source(m)[0], split)) for m in (q, g) if m not in present)
               for q, g in wanted if (q, g) not in pairs},
           "upgrades": {}}
    for k in range(3, cfg.versions.last + 1):
        if {version(k), chained(k), direct(k)} <= present and (served := upgrade_to(cfg, done, k)):
            out["upgrades"][version(k)] = served
    if NEW in present and FCT in present:
        out["backfill_curve"] = backfill_curve(cfg, store, sources, truth)  # new/fct is a case: both are loaded
    log.info("%s", format_table(done))
    name = labels(cfg)
    for q, g in ((q, g) for q, g in wanted if (q, g) not in pairs):
        log.warning("skipped %s / %s: because there is %s", name.get(q, q), name.get(g, g), out["skipped"][f"{q}/{g}"])
    for g, v in out["gap_closed"].items():
        if v:
            log.info("gap closed by %s: top-1 %.0f %%, mAP %.0f %%", name[g], 100 * v["top1"], 100 * v["map"])
    for target, served in out["upgrades"].items():
        for g, v in served.get("gap_closed", {}).items():
            log.info("v1 -> %s gap closed by %s: top-1 %.0f %%, mAP %.0f %%", target, name[g], 100 * v["top1"],
                     100 * v["map"])
    for name, r in out["index_recall_at_10"].items():
        log.info("index %s: recall@10 against exact search %.3f", name, r)
    return out


def transformation_misfit(store: Store, name: str, f: features.Features, uri: str) -> str:
    """Why models/{name} cannot map this features lake's old (and side) vectors ("" when it can): missing,
    trained towards other model versions or dims, or, where the lake does not record its versions, on
    another lake."""
    train = f"train it on this lake: fct train-transformation --features {uri}" + (" --no-side" if name == FCT_NOSIDE else "")
    from .models import registry
    if not registry.exists(store, name):
        return f"there is no transformation models/{name}; {train}"
    meta = registry.read_meta(store, name)
    if name == FCT and "side" not in f.columns:
        return "the lake has no side-info column"
    roles = ("old", "side", "new") if name == FCT else ("old", "new")
    if any(meta["dims"][r] != f.dims[r] for r in roles):
        return (f"models/{name} maps dims {[meta['dims'][r] for r in roles]}, the lake's {', '.join(roles)} columns "
                f"have {[f.dims[r] for r in roles]}; {train}")
    ours, theirs = ({r: v.get(r) for r in roles} for v in (f.versions, meta["producers"]))
    if all(ours.values()) and all(theirs.values()):
        other = [f"{r}: {theirs[r]} vs the lake's {ours[r]}" for r in roles if theirs[r] != ours[r]]
        return f"models/{name} was trained on other model versions ({', '.join(other)}); {train}" if other else ""
    if meta.get("features") != store.uri(f.train):
        return (f"models/{name} was trained on {meta.get('features')}, and which model versions made its columns or "
                f"this lake's is not recorded; {train}")
    return ""


@torch.no_grad()
def features_matrix(cfg: Config, store: Store, uri: str) -> dict:
    """The compatibility matrix on a features lake you bring (its test split, with labels): old/old,
    new/new, and new queries against the old vectors transformed by each transformation artefact that
    fits the lake (with and without side-info); a case that cannot be computed is named with the reason.
    Above eval.exact_max_gallery items, a seeded sample of that many is ranked (said in the result)."""
    from .models import registry
    f = features.open_lake(cfg, store, uri)
    label = cfg.columns.label
    if not features.has_column(store, f.test, label):
        raise lake.LakeError(f"{store.uri(f.test)}: no label column {label!r}, and the evaluation needs each item's "
                             "class: name the lake's label column (--set columns.label=COLUMN), or extract the lake "
                             "from an image lake with labels (fct extract copies its columns.label)")
    x = features.read(store, f.test, f.columns, f.dims, with_ids=True, label=label)
    ids, labels = x["id"].numpy(), x["label"].numpy()
    keep = np.arange(len(ids))
    if len(ids) > cfg.eval.exact_max_gallery:
        keep = np.sort(np.random.default_rng(0).choice(len(ids), cfg.eval.exact_max_gallery, replace=False))
    sources, misfit = {OLD: x["old"].numpy(), NEW: x["new"].numpy()}, {}
    for name in (FCT, FCT_NOSIDE):
        if why := transformation_misfit(store, name, f, uri):
            misfit[name] = why
            continue
        h, _ = registry.load(store, name, {"kind": "transformation"})
        sources[name] = torch.cat([h(x["old"][i:i + 4096], x["side"][i:i + 4096])
                                   for i in range(0, len(ids), 4096)]).numpy()
    cases, skipped = [], {}
    for q, g in [(OLD, OLD), (NEW, NEW), (NEW, FCT), (NEW, FCT_NOSIDE), (NEW, OLD)]:
        if g in misfit:
            skipped[f"{LABELS[q]} / {LABELS[g]}"] = misfit[g]
            continue
        r = ranking.exact_ranking(sources[q][keep], labels[keep], ids[keep], sources[g][keep], labels[keep], ids[keep],
                          cfg.eval.max_rank, cfg.eval.block_size)
        cases.append(r | {"query": q, "gallery": g, "label": f"{LABELS[q]} / {LABELS[g]}", "top1": r["cmc"][0],
                          "top5": r["cmc"][min(4, len(r["cmc"]) - 1)]})
    out = {"cases": cases, "gap_closed": {g: gap_closed(cases, g) for g in (FCT, FCT_NOSIDE)},
           "items": len(keep), "sampled": len(keep) < len(ids), "lake": store.uri(f.test), "skipped": skipped}
    log.info("%s", format_table(cases))
    for case_, why in skipped.items():
        log.warning("skipped %s: because %s", case_, why)
    return out
