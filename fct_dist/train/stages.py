"""The training stages of FCT, each a library function: old, side-info, new (or BCT), transformation.

A stage is skipped when its artefact is current (`currency`: made for the same key, a digest of its
config sections and its inputs), so reruns are cheap; `force=True` retrains. Each stage reads only
finished artefacts of earlier stages (the transformation reads the feature lake that the extract
stage wrote) and starts no other stage.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from .. import lake, layout
from ..config import Config, digest
from ..datasets import old_classes
from ..lake import LakeError
from ..layout import BCT, FCT, FCT_NOSIDE, FEATURES, NEW, OLD, SIDE
from ..models import ClassifierConfig, ResNetConfig, TransformationConfig, registry
from ..storage import Store
from .loop import BctTask, ClassifierTask, SimCLRTask, Task, TransformationTask
from .trainer import fit

log = logging.getLogger(__name__)


def data_version(store: Store, split: str = "train") -> str:
    return digest(lake.image_manifest(store, split))


def classes_of(cfg: Config, store: Store) -> tuple[list[int], list[int]]:
    """(all labels of the image lake, the old classes drawn from them)."""
    labels = lake.image_manifest(store, "train")["labels"]
    return labels, old_classes(labels, cfg.data.num_old_classes, cfg.data.old_classes_seed)


def backbone_arch(cfg_model, store: Store, emb_dim: int | None = None) -> ResNetConfig:
    channels = lake.image_manifest(store, "train")["image_shape"][0]
    return ResNetConfig(in_channels=channels, width=cfg_model.width, blocks=list(cfg_model.blocks),
                        emb_dim=emb_dim or cfg_model.emb_dim)


@torch.no_grad()
def accuracy(model: nn.Module, store: Store, classes: list[int], split: str = "test") -> float:
    """Top-1 classification accuracy on the split's images of `classes`."""
    _, x, y = lake.read_images(store, split, classes)
    preds = np.concatenate([model(torch.from_numpy(x[i:i + 1024]))[1].argmax(1).numpy()
                            for i in range(0, len(x), 1024)])
    return float((np.asarray(classes)[preds] == y).mean())


def _run(cfg: Config, store: Store, name: str, key: str, task: Task, meta: dict, force: bool,
         finish=None) -> dict:
    """Train `task` unless models/{name} is current for `key`; save the artefact with its metrics."""
    done = None if force else registry.current(store, name, key)
    if done:
        log.info("[%s] up to date (key %s): skipped", name, key)
        return done
    t0 = time.time()
    module, history = fit(task, name, f"{name}-{key}", cfg, store)
    module, metrics = finish(module) if finish else (module, {})
    metrics |= {"train_seconds": round(time.time() - t0, 1), "history": history}
    meta = registry.save(store, name, module, meta | {"metrics": metrics}, key)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "history"}
    log.info("[%s] saved %s version %s: %s", name, store.uri(layout.model(store, name)), meta["version"], shown)
    return meta


def train_old(cfg: Config, store: Store, force: bool = False) -> dict:
    """The old model: a small ResNet classifier on the old classes only."""
    _, old = classes_of(cfg, store)
    arch = ClassifierConfig(backbone_arch(cfg.models.old, store), len(old))
    key = digest(cfg.fingerprint("models.old", "train.old"), old, data_version(store))
    task = ClassifierTask(opt=cfg.train.old, store=store, arch=arch.backbone, labels=old, num_classes=len(old))
    meta = {"kind": "classifier", "arch": arch, "classes": old, "dims": {"emb": arch.backbone.emb_dim},
            "data": data_version(store)}
    return _run(cfg, store, OLD, key, task, meta, force,
                lambda m: (m, {"test_accuracy_old_classes": accuracy(m, store, old)}))


def train_side_info(cfg: Config, store: Store, force: bool = False) -> dict:
    """The side-info encoder: SimCLR on the old classes' training images, labels unused."""
    _, old = classes_of(cfg, store)
    arch = backbone_arch(cfg.models.side, store)
    key = digest(cfg.fingerprint("models.side", "train.side"), old, data_version(store))
    task = SimCLRTask(opt=cfg.train.side, store=store, arch=arch, labels=old, proj_dim=cfg.models.side.proj_dim)
    meta = {"kind": "encoder", "arch": arch, "classes": old, "dims": {"emb": arch.emb_dim},
            "data": data_version(store)}
    return _run(cfg, store, SIDE, key, task, meta, force, lambda m: (m.backbone, {}))


def train_new(cfg: Config, store: Store, bct: bool = False, force: bool = False) -> dict:
    """The new model on all classes; with `bct`, BCT's baseline (old dim + old classifier's influence)."""
    labels, _ = classes_of(cfg, store)
    name, opt = (BCT, cfg.train.bct) if bct else (NEW, cfg.train.new)
    emb_dim, extra, compat = None, {}, {}
    if bct:
        old_model, old_meta = registry.load(store, OLD, {"kind": "classifier"})
        emb_dim = old_meta["dims"]["emb"]
        index = torch.full((len(labels),), -1, dtype=torch.long)  # target position -> old classifier output
        index[torch.from_numpy(np.searchsorted(labels, old_meta["classes"]))] = torch.arange(len(old_meta["classes"]))
        extra = {"old_fc": old_model.fc.weight.detach().clone(), "old_index": index}
        compat = {"compatible_with": {OLD: old_meta["version"]}}
    arch = ClassifierConfig(backbone_arch(cfg.models.new, store, emb_dim), len(labels))
    key = digest(cfg.fingerprint("models.new", f"train.{name}"), data_version(store), compat or None)
    task = (BctTask if bct else ClassifierTask)(opt=opt, store=store, arch=arch.backbone, labels=None,
                                                num_classes=len(labels), **extra)
    meta = {"kind": "classifier", "arch": arch, "classes": labels, "dims": {"emb": arch.backbone.emb_dim},
            "data": data_version(store)} | compat
    return _run(cfg, store, name, key, task, meta, force,
                lambda m: (m, {"test_accuracy": accuracy(m, store, labels)}))


def transformation_name(use_side: bool) -> str:
    return FCT if use_side else FCT_NOSIDE


def feature_lake(store: Store, split: str) -> tuple[str, dict]:
    """(directory, manifest) of the transformation's training features (id, old, side, new)."""
    directory = layout.embeddings(store, FEATURES, split)
    if not store.has_manifest(directory):
        raise LakeError(f"{store.uri(directory)}: no finished feature lake; extract it first "
                        f"(fct extract --model old --model side --model new --name {FEATURES} --split {split})")
    return directory, store.manifest(directory)


def train_transformation(cfg: Config, store: Store, use_side: bool = True, force: bool = False) -> dict:
    """h(old, side) -> new on the feature lake's train split (the extract stage's output)."""
    name = transformation_name(use_side)
    (train_dir, train), (test_dir, test) = feature_lake(store, "train"), feature_lake(store, "test")
    prod = train["producer"]
    dims = {c: prod[c]["dim"] for c in ("old", "side", "new")}
    t = cfg.models.transformation
    arch = TransformationConfig(dims["old"], dims["side"], dims["new"], t.branch, t.hidden, use_side)
    versions = {c: prod[c]["version"] for c in ("old", "side", "new")}
    key = digest(cfg.fingerprint("models.transformation", "train.transformation"), dataclasses.asdict(arch),
                 train["key"], test["key"])
    task = TransformationTask(opt=cfg.train.transformation, store=store, features=train_dir, arch=arch)
    meta = {"kind": "transformation", "arch": arch, "dims": dims, "producers": versions,
            "uses_side_info": use_side}
    return _run(cfg, store, name, key, task, meta, force, lambda m: (m, transformation_error(m, store, test_dir, dims)))


@torch.no_grad()
def transformation_error(h: nn.Module, store: Store, features: str, dims: dict) -> dict:
    """Test MSE of h against the new embeddings, and relative to their variance (1.0 = predicting the mean)."""
    t = lake.read_lake(store, features, {"id": pa.int64()} | dims)
    old, side, new = (torch.tensor(lake.to_numpy(t[c])) for c in ("old", "side", "new"))
    pred = torch.cat([h(old[i:i + 4096], side[i:i + 4096]) for i in range(0, len(old), 4096)])
    mse = float(((pred - new) ** 2).mean())
    return {"test_mse": mse, "test_mse_over_variance": mse / float(new.var(dim=0).mean())}
