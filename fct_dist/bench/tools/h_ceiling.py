"""Where does h's top-1 go? Diagnostics on a finished `make demo` root's test features, printed as one
JSON line (new-model queries, exact ranking, own item left out, as the evaluation does):

- `trained`: the gallery h(old, side) of the root's trained h (the evaluation's new/FCT);
- `same_error_shuffled`: the new embeddings plus h's own test errors given to other items (the same
  error sizes, no longer pointed at each item's neighbours);
- `fit_on_test`: h fit (plain torch, MSE, same architecture) to the test items themselves, the gallery
  it is evaluated on: no generalisation needed, so what (old, side) can carry at this h size at best.

    .venv/bin/python -m fct_dist.bench.tools.h_ceiling --root ./fct-data [--epochs 60] [--hidden 512]
"""
from __future__ import annotations

import argparse
import json
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from fct_dist import config, features, ranking
from fct_dist.models import registry
from fct_dist.models.transformation import Transformation, TransformationConfig
from fct_dist.storage import open_store


def fit(x: dict[str, torch.Tensor], hidden: int, branch: int, epochs: int, batch: int = 256) -> Transformation:
    """h fit to x's old, side -> new by MSE with Adam and a cosine schedule."""
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(x["old"].shape[1], x["side"].shape[1], x["new"].shape[1], branch, hidden))
    opt = torch.optim.Adam(h.parameters(), 1e-3, weight_decay=3e-5)
    steps = epochs * math.ceil(len(x["new"]) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for i in torch.randperm(len(x["new"])).split(batch):
            loss = F.mse_loss(h(x["old"][i], x["side"][i]), x["new"][i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return h.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="./fct-data", help="a root `make demo` finished in")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--hidden", type=int, default=512)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = config.load("config.yaml", [f"storage.root={a.root}"])
    store = open_store(cfg.storage)
    f = features.open_lake(cfg, store)
    x = features.read(store, f.test, f.columns, f.dims, with_ids=True)
    ids, new = x["id"].numpy(), x["new"].numpy()
    truth = features.split_truth(store, "test")
    labels = truth[1][np.searchsorted(truth[0], ids)]

    def top1_map(gallery: torch.Tensor) -> list[float]:
        r = ranking.exact_ranking(new, labels, ids, gallery.numpy(), labels, ids, 1, cfg.eval.block_size)
        return [round(100 * float(r["cmc"][0]), 2), round(100 * float(r["map"]), 2)]

    def error(gallery: torch.Tensor) -> float:
        """Squared error over the new embeddings' total variance (1.0 = predicting their mean)."""
        return round(float((gallery - x["new"]).pow(2).sum() / (x["new"] - x["new"].mean(0)).pow(2).sum()), 4)

    with torch.no_grad():
        h = registry.load(store, "fct")[0].eval()
        g = h(x["old"], x["side"])
        err = g - x["new"]
        out = {"root": a.root, "new_new": top1_map(x["new"]), "trained": top1_map(g),
               "same_error_shuffled": top1_map(x["new"] + err[torch.randperm(len(err), generator=torch.Generator().manual_seed(0))]),
               "trained_mse_over_variance": error(g)}
    fitted = fit(x, a.hidden, 256, a.epochs)
    with torch.no_grad():
        g = fitted(x["old"], x["side"])
        out |= {"fit_on_test": top1_map(g), "fit_on_test_hidden": a.hidden, "fit_on_test_epochs": a.epochs,
                "fit_mse_over_variance": error(g)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
