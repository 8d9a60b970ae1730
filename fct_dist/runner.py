"""`fct upgrade`: every stage in order on one config, then the report.

The whole flow is `run_once`, one visible step per stage; each step reads only what earlier steps
committed (`layout`) and is skipped when its output is current (`currency`), so a rerun is cheap.
With several seeds the training stages are repeated per seed in their own sub-root (seeds/seed-N)
and the report gives mean ± std."""
from __future__ import annotations

import copy
import dataclasses
from functools import partial
import logging
import time
from typing import Callable

from . import datasets, evaluation, layout, report, search
from .config import Config
from .layout import BCT, FCT, FCT_NOSIDE, NEW, OLD, SIDE
from .models import registry
from .pipeline import backfill, extract, index, refill
from .runtime import init_ray
from .storage import Store
from .train import stages

log = logging.getLogger(__name__)
MODELS = (OLD, SIDE, NEW, BCT, FCT, FCT_NOSIDE)


class Steps:
    """Runs named steps in order, logging each one and timing it."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.order: list[str] = []  # the steps as run (manifests store dicts with sorted keys)

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        t0 = time.time()
        log.info("=== %s ===", name)
        self.order.append(name)
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.time() - t0, 1)
        return out


def run_once(cfg: Config, store: Store, force: bool = False) -> dict:
    """All stages on one storage root; returns timings, model metas, index manifest and evaluation.
    `force` refills the image lake and retrains every model; the data-parallel stages (extract,
    backfill, index) rerun whenever their inputs changed, so they follow."""
    init_ray(cfg)
    step, split, last = Steps(), cfg.eval.split, cfg.versions.last
    step("data: fill the image lake", datasets.fill, cfg, store, force=force)
    step("train the old model", stages.train_old, cfg, store, force=force)
    step("train the side-info model", stages.train_side_info, cfg, store, force=force)
    step(f"extract the stored lake (old, side) of {split}", extract.stored, cfg, store, split)
    if stages.bct_needs_old_embeddings(store):
        step("extract the old model's embeddings of train (BCT's class means)", extract.reextract, cfg, store, OLD,
             "train")
    step("train the new model and BCT's (the baseline), side by side", stages.side_by_side, cfg,
         [partial(stages.train_new, store=store, bct=b, force=force) for b in (False, True)])
    for s, v in extract.feature_lakes(cfg):
        what = f"augmented view {v} of {s}" if v else s
        step(f"extract the transformation's features (old, side, new) of {what}", extract.features, cfg, store, s, v)
    step("train the transformation h, with and without side-info (side by side)", stages.side_by_side, cfg,
         [partial(stages.train_transformation, store=store, use_side=s, force=force) for s in (True, False)])
    # with a later version to come, the upgraded lake keeps the side-info for the next upgrade to read
    keep = dataclasses.replace(cfg, columns=dataclasses.replace(cfg.columns, keep=[cfg.columns.side]))
    step(f"backfill {split} with h: the upgraded lake", backfill.backfill, keep if last > 2 else cfg, store, FCT, split)
    step(f"backfill {split} with h without side-info", backfill.backfill, cfg, store, FCT_NOSIDE, split)
    step(f"re-extract {split} with the new model (the baseline a backfill avoids)", extract.reextract, cfg, store,
         NEW, split)
    step(f"re-extract {split} with BCT's model", extract.reextract, cfg, store, BCT, split)
    if cfg.models.transformation.uncertainty:
        step(f"refill {split}: re-extract the {cfg.refill.budget:.0%} h is least sure of", refill.refill, cfg, store,
             split=split)
    for k in range(3, last + 1):
        upgrade_to(cfg, store, step, force, k)
    idx = step("index the upgraded lake", index.build, cfg, store, FCT, split)
    for name, column in evaluation.searched_galleries(cfg, store):
        if name != FCT:
            step(f"index the {name} gallery (too large for exact ranking)", index.build, cfg, store, name, split, column)
    result = step("evaluate: the compatibility matrix and index recall", evaluation.matrix, cfg, store)
    for target, served in result.get("upgrades", {}).items():
        step(f"index the {target} gallery ({served['strategy']}: {served['why']})", index.build, cfg, store,
             served["lake"], split)
    models = MODELS + tuple(m for k in range(3, last + 1) for m in (layout.version(k), layout.chained(k), layout.direct(k)))
    return {"steps": step.order, "timings": step.timings, "models": {m: registry.read_meta(store, m) for m in models},
            "index": idx, "evaluation": result}


def upgrade_to(cfg: Config, store: Store, step: Steps, force: bool, k: int) -> None:
    """v{k-1} -> vk over the lakes the upgrades before wrote, both ways: chained (h(v{k-1} -> vk) on the
    previous upgraded lake) and direct (h(v1 -> vk) on the stored lake); no gallery image is read, except by
    vk's baseline."""
    split, target, before = cfg.eval.split, layout.version(k), layout.version(k - 1)
    known = cfg.versions.classes_of(k)
    step(f"train {target}: the next model version ({known or 'all'} classes)", stages.train_new, cfg, store, False,
         force, k)
    for s in layout.SPLITS:
        step(f"extract the upgrade to {target}'s features (old, side, {before}, {target}) of {s}",
             extract.version_features, cfg, store, s, k)
    ups = stages.upgrades_to(k)
    step(" and ".join(f"train {up.name}: h({up.roles['old']}, side) -> {target}" for up in ups) + " (side by side)",
         stages.side_by_side, cfg,
         [partial(stages.train_transformation, store=store, upgrade=up, force=force) for up in ups])
    step(f"backfill {split} chained: h(v{k - 1} -> v{k}) on the upgraded lake", backfill.chained, cfg, store, k, split)
    step(f"backfill {split} direct: h(v1 -> v{k}) on the stored lake", backfill.backfill, cfg, store,
         layout.direct(k), split)
    step(f"re-extract {split} with {target} (the baseline both avoid)", extract.reextract, cfg, store, target, split)


def with_seed(cfg: Config, seed: int) -> Config:
    out = copy.deepcopy(cfg)
    for section in (out.train.old, out.train.side, out.train.new, out.train.bct, out.train.transformation):
        section.seed = seed
    return out


def upgrade(cfg: Config, store: Store, seeds: int = 1, force: bool = False) -> str:
    """Run the upgrade (per seed) and write reports/{run}/; returns the report directory."""
    t0 = time.time()
    runs = []
    for s in range(seeds):
        sub = store if s == 0 else store.sub("seeds", f"seed-{s}")
        if seeds > 1:
            log.info("##### seed %d (%s) #####", s, store.uri(sub.root))
        runs.append(run_once(with_seed(cfg, cfg.train.old.seed + s) if s else cfg, sub, force))
    for r in runs:
        r["timings"]["total"] = round(sum(r["timings"].values()), 1)
    return report.write(store, runs, cfg.to_dict(), search_png=search_picture(cfg, store),
                        wall=round(time.time() - t0, 1))


def search_picture(cfg: Config, store: Store, queries: int = 5, k: int = 8) -> bytes:
    """Test images embedded by the new model, searched in the backfilled gallery's index, drawn."""
    split = cfg.eval.split
    q, d, i = search.query(store, NEW, FCT, split, search.spread_ids(store, split, queries), k, cfg.index.nprobe)
    return search.draw(store, split, q, d, i, "new-model queries / backfilled (FCT) gallery")
