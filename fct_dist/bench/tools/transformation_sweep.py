"""How does a transformation or side-info setting change quality? h trained with `--set` overrides on
the demo's features (a copy of the models, images and features of a finished `make demo` root, so that
root is untouched; overrides of models.old / train.old or models.side / train.side retrain that model and
re-extract the features first, the stages skipping what they leave current), then new/FCT, side/side,
old/old and new/new top-1 and mAP
over all test queries (new/new and new/FCT top-1 also for the queries of the old model's classes and of
the others) and the backfill curve's AUC per order (eval.curve_queries queries), printed as
one JSON line.

    .venv/bin/python -m fct_dist.bench.tools.transformation_sweep w003 train.transformation.classification_weight=0.03 \\
        [--root ./fct-data] [--work /tmp/sweep]
    .venv/bin/python -m fct_dist.bench.tools.transformation_sweep side16 models.side.width=16
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

import numpy as np
import torch

from fct_dist import config, evaluation, features, ranking
from fct_dist.models import registry
from fct_dist.pipeline import extract
from fct_dist.runtime import init_ray
from fct_dist.storage import open_store
from fct_dist.train import stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("sets", nargs="*", help="config overrides, key=value")
    p.add_argument("--root", default="./fct-data", help="a root `make demo` finished in")
    p.add_argument("--work", default="/tmp/sweep", help="where each variant's copy lives")
    p.add_argument("--noside", action="store_true", help="also train h without side-info: side-info's contribution")
    p.add_argument("--curve", action=argparse.BooleanOptionalAction, default=True, help="the backfill curve's AUCs")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = f"{a.work}/{a.name}"
    if not os.path.exists(root):
        views = [f"embeddings/{d}" for d in os.listdir(f"{a.root}/embeddings") if d.startswith("features-view")]
        for part in ("models", "images", "embeddings/features", *views):  # features: re-extracted when missing
            if os.path.exists(f"{a.root}/{part}"):
                shutil.copytree(f"{a.root}/{part}", f"{root}/{part}")
        for m in ("fct", "fct-noside"):
            shutil.rmtree(f"{root}/models/{m}", ignore_errors=True)
    cfg = config.load("config.yaml", [f"storage.root={root}", *a.sets])
    store = open_store(cfg.storage)
    init_ray(cfg)
    t0 = time.time()
    stages.train_old(cfg, store)
    stages.train_side_info(cfg, store)
    for split, view in extract.feature_lakes(cfg):
        extract.features(cfg, store, split, view)
    t1 = time.time()
    stages.train_transformation(cfg, store)
    seconds = time.time() - t1
    f = features.open_lake(cfg, store)
    x = features.read(store, f.test, f.columns, f.dims, with_ids=True)

    @torch.no_grad()
    def gallery(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        h = registry.load(store, name)[0]
        g = torch.cat([h(x["old"][i:i + 4096], x["side"][i:i + 4096]) for i in range(0, len(x["old"]), 4096)])
        return g.numpy(), h.log_variance(g).numpy() if h.log_var is not None else None

    g, s = gallery("fct")
    ids, new = x["id"].numpy(), x["new"].numpy()
    truth = features.split_truth(store, "test")
    labels = truth[1][np.searchsorted(truth[0], ids)]

    def rank_with(query: np.ndarray, gallery: np.ndarray, q=slice(None)) -> tuple[float, float]:
        r = ranking.exact_ranking(query[q], labels[q], ids[q], gallery, labels, ids, 1, cfg.eval.block_size)
        return r["cmc"][0], r["map"]

    def rank(gallery: np.ndarray, q=slice(None)) -> tuple[float, float]:
        return rank_with(new, gallery, q)

    side = x["side"].numpy()
    out = {"name": a.name, "sets": a.sets, "side_and_features_seconds": round(t1 - t0), "train_seconds": round(seconds),
           "new_fct_top1_map": rank(g), "side_side_top1_map": rank_with(side, side),
           "old_old_top1_map": rank_with(x["old"].numpy(), x["old"].numpy()), "new_new_top1_map": rank(new)}
    h = registry.load(store, "fct")[0]  # its error on the data it saw and on the test split
    out["train_test_mse_over_variance"] = [stages.transformation_error(h, store, d, f.columns, f.dims)["test_mse_over_variance"]
                                           for d in (f.train, f.test)]
    # where h loses: queries of the old model's classes and of the others, against the whole gallery
    old_classes = np.isin(labels, stages.classes_of(cfg, store)[1])
    for part, q in (("old_classes", old_classes), ("other_classes", ~old_classes)):
        out[f"{part}_new_new_vs_new_fct_top1"] = [rank(new, q)[0], rank(g, q)[0]]
    if a.noside:
        t2 = time.time()
        stages.train_transformation(cfg, store, use_side=False)
        out |= {"noside_train_seconds": round(time.time() - t2), "new_noside_top1_map": rank(gallery("fct-noside")[0])}
    if not a.curve:
        print(json.dumps(out), flush=True)
        return
    q = np.sort(np.random.default_rng(1).choice(len(ids), min(cfg.eval.curve_queries or len(ids), len(ids)),
                                                replace=False))
    for order_name, order in evaluation.backfill_orders(ids, g, new, s).items():
        points = [rank(evaluation.mixed_gallery(g, new, order, round(fr * len(ids))), q)
                  for fr in np.linspace(0, 1, cfg.eval.curve_points)]
        out[f"auc_{order_name}_top1_map"] = [float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points]))]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
