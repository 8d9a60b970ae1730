"""`fct upgrade`: every stage in order on one config, then the report.

Stages whose artefacts exist and match the config are skipped (each stage checks its own
fingerprint), so a rerun is cheap. With several seeds the training stages are repeated per seed in
their own sub-root (seeds/seed-N) and the report gives mean ± std."""
from __future__ import annotations

import copy
import time

from . import datasets, evaluate, report
from .config import Config
from .models import registry
from .pipeline import backfill, extract, index
from .runtime import init_ray
from .storage import Store
from .train import stages

MODELS = ("old", "side", "new", "bct", "fct", "fct-noside")


def run_once(cfg: Config, store: Store, force: bool = False) -> dict:
    """All stages on one storage root; returns timings, model metas, index manifest and evaluation."""
    init_ray(cfg)
    timings: dict[str, float] = {}

    def step(name: str, fn, *args, **kwargs):
        t0 = time.time()
        print(f"\n=== {name} ===", flush=True)
        out = fn(*args, **kwargs)
        timings[name] = round(time.time() - t0, 1)
        return out

    split = cfg.eval.split
    if force or not datasets.is_current(cfg, store):
        step("data", datasets.fill, cfg, store)
    else:
        print("=== data === image lake is current: skipped")
    step("train-old", stages.train_old, cfg, store, force=force)
    step("train-side-info", stages.train_side_info, cfg, store, force=force)
    step("extract stored lake (old, side)", extract.stored, cfg, store, split)
    step("train-new", stages.train_new, cfg, store, force=force)
    step("train-new --bct", stages.train_new, cfg, store, bct=True, force=force)
    step("train-transformation", stages.train_transformation, cfg, store, force=force)
    step("train-transformation --no-side", stages.train_transformation, cfg, store, use_side=False, force=force)
    step("backfill (fct)", backfill.backfill, cfg, store, "fct", split)
    step("backfill (fct-noside)", backfill.backfill, cfg, store, "fct-noside", split)
    step("re-extract (new)", extract.reextract, cfg, store, "new", split)
    step("re-extract (bct)", extract.reextract, cfg, store, "bct", split)
    idx = step("index (fct)", index.build, cfg, store, "fct", split)
    evaluation = step("evaluate", evaluate.matrix, cfg, store)
    return {"timings": timings, "models": {m: registry.read_meta(store, m) for m in MODELS},
            "index": idx, "evaluation": evaluation}


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
            print(f"\n##### seed {s} ({store.uri(sub.root)}) #####")
        runs.append(run_once(with_seed(cfg, cfg.train.old.seed + s) if s else cfg, sub, force))
    for r in runs:
        r["timings"]["total"] = round(time.time() - t0, 1)
    return report.write(store, runs, cfg.to_dict())
