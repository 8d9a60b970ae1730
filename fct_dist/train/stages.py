"""The training stages of FCT, each a library function: old, side-info, new (or BCT), transformation.

A stage is skipped when its artefact exists with the same fingerprint (its config sections and the
versions of its inputs), so reruns are cheap; `force=True` retrains.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from .. import lake
from ..config import Config, digest
from ..datasets import old_classes
from ..models import registry
from ..storage import Store
from .loop import BctTask, ClassifierTask, SimCLRTask, Task, TransformationTask
from .trainer import fit


def data_version(store: Store, split: str = "train") -> str:
    return digest(lake.image_manifest(store, split))


def classes_of(cfg: Config, store: Store) -> tuple[list[int], list[int]]:
    """(all labels of the image lake, the old classes drawn from them)."""
    labels = lake.image_manifest(store, "train")["labels"]
    return labels, old_classes(labels, cfg.data.num_old_classes, cfg.data.old_classes_seed)


def backbone_arch(cfg_model, store: Store, emb_dim: int | None = None) -> dict:
    channels = lake.image_manifest(store, "train")["image_shape"][0]
    return {"in_channels": channels, "width": cfg_model.width, "blocks": list(cfg_model.blocks),
            "emb_dim": emb_dim or cfg_model.emb_dim}


@torch.no_grad()
def accuracy(model: nn.Module, store: Store, classes: list[int], split: str = "test") -> float:
    """Top-1 classification accuracy on the split's images of `classes`."""
    _, x, y = lake.read_images(store, split, classes)
    preds = np.concatenate([model(torch.from_numpy(x[i:i + 1024]))[1].argmax(1).numpy()
                            for i in range(0, len(x), 1024)])
    return float((np.asarray(classes)[preds] == y).mean())


def _run(cfg: Config, store: Store, name: str, fingerprint: str, task: Task, meta: dict, force: bool,
         finish=None) -> dict:
    """Train `task` unless models/{name} is current; save the artefact with its metrics."""
    if not force and registry.exists(store, name) and registry.read_meta(store, name).get("fingerprint") == fingerprint:
        print(f"[{name}] up to date (fingerprint {fingerprint}): skipped")
        return registry.read_meta(store, name)
    t0 = time.time()
    module, history = fit(task, name, f"{name}-{fingerprint}", cfg, store)
    module, metrics = finish(module) if finish else (module, {})
    metrics |= {"train_seconds": round(time.time() - t0, 1), "history": history}
    meta = registry.save(store, name, module, meta | {"fingerprint": fingerprint, "metrics": metrics})
    shown = {k: v for k, v in metrics.items() if k != "history"}
    print(f"[{name}] saved {store.uri(store.path('models', name))} version {meta['version']}: {shown}")
    return meta


def train_old(cfg: Config, store: Store, force: bool = False) -> dict:
    """The old model: a small ResNet classifier on the old classes only."""
    _, old = classes_of(cfg, store)
    arch = backbone_arch(cfg.models.old, store)
    fp = digest(cfg.fingerprint("models.old", "train.old"), old, data_version(store))
    task = ClassifierTask(opt=dataclasses.asdict(cfg.train.old), store=store, arch=arch, labels=old,
                          num_classes=len(old))
    meta = {"kind": "classifier", "arch": {"backbone": arch, "num_classes": len(old)}, "classes": old,
            "dims": {"emb": arch["emb_dim"]}, "data": data_version(store)}
    return _run(cfg, store, "old", fp, task, meta, force,
                lambda m: (m, {"test_accuracy_old_classes": accuracy(m, store, old)}))


def train_side_info(cfg: Config, store: Store, force: bool = False) -> dict:
    """The side-info encoder: SimCLR on the old classes' training images, labels unused."""
    _, old = classes_of(cfg, store)
    arch = backbone_arch(cfg.models.side, store)
    fp = digest(cfg.fingerprint("models.side", "train.side"), old, data_version(store))
    task = SimCLRTask(opt=dataclasses.asdict(cfg.train.side) | {"augment": True}, store=store, arch=arch,
                      labels=old, proj_dim=cfg.models.side.proj_dim)
    meta = {"kind": "encoder", "arch": arch, "classes": old, "dims": {"emb": arch["emb_dim"]},
            "data": data_version(store)}
    return _run(cfg, store, "side", fp, task, meta, force, lambda m: (m.backbone, {}))


def train_new(cfg: Config, store: Store, bct: bool = False, force: bool = False) -> dict:
    """The new model on all classes; with `bct`, BCT's baseline (old dim + old classifier's influence)."""
    labels, _ = classes_of(cfg, store)
    name, opt = ("bct", cfg.train.bct) if bct else ("new", cfg.train.new)
    emb_dim, extra, compat = None, {}, {}
    if bct:
        old_model, old_meta = registry.load(store, "old", {"kind": "classifier"})
        emb_dim = old_meta["dims"]["emb"]
        index = torch.full((len(labels),), -1, dtype=torch.long)  # target position -> old classifier output
        index[torch.from_numpy(np.searchsorted(labels, old_meta["classes"]))] = torch.arange(len(old_meta["classes"]))
        extra = {"old_fc": old_model.fc.weight.detach().clone(), "old_index": index}
        compat = {"compatible_with": {"old": old_meta["version"]}}
    arch = backbone_arch(cfg.models.new, store, emb_dim)
    fp = digest(cfg.fingerprint("models.new", f"train.{name}"), data_version(store), compat or None)
    task = (BctTask if bct else ClassifierTask)(opt=dataclasses.asdict(opt), store=store, arch=arch,
                                                labels=None, num_classes=len(labels), **extra)
    meta = {"kind": "classifier", "arch": {"backbone": arch, "num_classes": len(labels)}, "classes": labels,
            "dims": {"emb": arch["emb_dim"]}, "data": data_version(store)} | compat
    return _run(cfg, store, name, fp, task, meta, force,
                lambda m: (m, {"test_accuracy": accuracy(m, store, labels)}))


def transformation_name(use_side: bool) -> str:
    return "fct" if use_side else "fct-noside"


def train_transformation(cfg: Config, store: Store, use_side: bool = True, force: bool = False) -> dict:
    """h(old, side) -> new on the train split's features (extracted once, through the extract pipeline)."""
    from ..pipeline.extract import features  # the feature lake is the extract stage's output

    name = transformation_name(use_side)
    fmeta = {split: features(cfg, store, split) for split in ("train", "test")}
    prod = fmeta["train"]["producer"]
    dims = {c: prod[c]["dim"] for c in ("old", "side", "new")}
    arch = {"old_dim": dims["old"], "side_dim": dims["side"], "new_dim": dims["new"],
            "branch": cfg.models.transformation.branch, "hidden": cfg.models.transformation.hidden,
            "use_side": use_side}
    versions = {c: prod[c]["version"] for c in ("old", "side", "new")}
    fp = digest(cfg.fingerprint("models.transformation", "train.transformation"), arch, versions,
                fmeta["train"]["rows"])
    task = TransformationTask(opt=dataclasses.asdict(cfg.train.transformation), store=store,
                              features=store.path("embeddings", "features", "train"), arch=arch)
    meta = {"kind": "transformation", "arch": arch, "dims": dims, "producers": versions,
            "uses_side_info": use_side}
    return _run(cfg, store, name, fp, task, meta, force, lambda m: (m, transformation_error(m, store, dims)))


@torch.no_grad()
def transformation_error(h: nn.Module, store: Store, dims: dict) -> dict:
    """Test MSE of h against the new embeddings, and relative to their variance (1.0 = predicting the mean)."""
    t = lake.read_lake(store, store.path("embeddings", "features", "test"), {"id": pa.int64()} | dims)
    old, side, new = (torch.tensor(lake.to_numpy(t[c])) for c in ("old", "side", "new"))
    pred = torch.cat([h(old[i:i + 4096], side[i:i + 4096]) for i in range(0, len(old), 4096)])
    mse = float(((pred - new) ** 2).mean())
    return {"test_mse": mse, "test_mse_over_variance": mse / float(new.var(dim=0).mean())}
