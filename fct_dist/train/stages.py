"""The training stages of FCT, each a library function: old, side-info, new (or BCT), transformation.

A stage is skipped when its artefact is current (`currency`: made for the same key, a digest of its
config sections and its inputs), so reruns are cheap; `force=True` retrains. Each stage reads only
finished artefacts of earlier stages (the transformation reads the feature lake that the extract
stage wrote) and starts no other stage.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import logging
import threading
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn as nn

from .. import currency, features as feature_lakes, image_lake, lake, layout
from ..config import Config, ConfigError
from ..currency import digest
from ..datasets import old_classes
from ..lake import LakeError
from ..layout import BCT, FCT, FCT_NOSIDE, NEW, OLD, SIDE
from ..models import ClassifierConfig, ResNetConfig, TransformationConfig, registry
from ..runtime import init_ray
from ..storage import Store
from .loop import BctTask, ClassifierTask, ImageTask, SimCLRTask, Task, TransformationTask
from .trainer import fit

log = logging.getLogger(__name__)


def data_version(store: Store, split: str = "train") -> str:
    return digest(image_lake.image_manifest(store, split))


_SHARED: dict[tuple, ray.ObjectRef] = {}
_SHARING = threading.Lock()


def shared_images(cfg: Config, store: Store, split: str = "train") -> ray.ObjectRef:
    """The split's decoded images (ids, images, labels), put in Ray's object store once per Ray session and
    image lake: each training stage's workers read them there instead of each decoding every image again
    (120k PNGs: ~10 s of every worker of every image stage on the demo)."""
    init_ray(cfg)
    ctx = ray.get_runtime_context()
    key = (ctx.get_node_id(), ctx.get_job_id(), store.uri(layout.images(store, split)), data_version(store, split))
    with _SHARING:  # stages side by side ask at once: one decodes, the other waits for its object
        if key not in _SHARED:
            for stale in [k for k in _SHARED if k[2] == key[2]]:  # an earlier session's or lake version's
                del _SHARED[stale]
            _SHARED[key] = ray.put(image_lake.read_images(store, split))
        return _SHARED[key]


def classes_of(cfg: Config, store: Store) -> tuple[list[int], list[int]]:
    """(all labels of the image lake, the old classes drawn from them)."""
    labels = image_lake.image_manifest(store, "train")["labels"]
    return labels, old_classes(labels, cfg.data.num_old_classes, cfg.data.old_classes_seed)


def classes_of_version(cfg: Config, store: Store, k: int) -> list[int]:
    """The classes version k is trained on (BCT's are the new model's, k = 2): the old ones for v1,
    versions.classes drawn the same way for the later ones (the same draw, so each a superset of the one
    before), all of them for null."""
    labels, old = classes_of(cfg, store)
    n = None if k == 1 else cfg.versions.classes_of(k)
    if k == 1 or n is None:
        return old if k == 1 else labels
    if n < cfg.data.num_old_classes:
        raise ConfigError(f"versions.classes: {layout.version(k)} on {n} classes; expected at least "
                          f"data.num_old_classes={cfg.data.num_old_classes}")
    return old_classes(labels, n, cfg.data.old_classes_seed)


def backbone_arch(cfg_model, store: Store, emb_dim: int | None = None) -> ResNetConfig:
    channels = image_lake.image_manifest(store, "train")["image_shape"][0]
    return ResNetConfig(in_channels=channels, width=cfg_model.width, blocks=list(cfg_model.blocks),
                        emb_dim=emb_dim or cfg_model.emb_dim)


@torch.no_grad()
def accuracy(model: nn.Module, cfg: Config, store: Store, classes: list[int]) -> float:
    """Top-1 classification accuracy on the test split's images of `classes`."""
    _, x, y = image_lake.select(ray.get(shared_images(cfg, store, "test")), classes)
    preds = np.concatenate([model(torch.from_numpy(x[i:i + 1024]))[1].argmax(1).numpy()
                            for i in range(0, len(x), 1024)])
    return float((np.asarray(classes)[preds] == y).mean())


def _run(cfg: Config, store: Store, name: str, key: str, task: Task, meta: dict, force: bool,
         finish=None, workers: int | None = None) -> dict:
    """Train `task` unless models/{name} is current for `key`; save the artefact with its metrics."""
    done = None if force else registry.current(store, name, key)
    if done:
        log.info("[%s] up to date (key %s): skipped", name, key)
        return done
    t0 = time.time()
    if isinstance(task, ImageTask):
        task = dataclasses.replace(task, images=shared_images(cfg, store))
    module, history = fit(task, name, f"{name}-{key}", cfg, store, workers)
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
    key = digest(cfg.fingerprint("models.old", "train.old", "train.precision"), old, data_version(store))
    task = ClassifierTask(opt=cfg.train.old, store=store, arch=arch.backbone, labels=old, num_classes=len(old))
    meta = {"kind": "classifier", "arch": arch, "classes": old, "dims": {"emb": arch.backbone.emb_dim},
            "data": data_version(store)}
    return _run(cfg, store, OLD, key, task, meta, force,
                lambda m: (m, {"test_accuracy_old_classes": accuracy(m, cfg, store, old)}))


def train_side_info(cfg: Config, store: Store, force: bool = False) -> dict:
    """The side-info encoder: SimCLR on the old classes' training images, labels unused."""
    _, old = classes_of(cfg, store)
    arch = backbone_arch(cfg.models.side, store)
    key = digest(cfg.fingerprint("models.side", "train.side", "train.precision"), old, data_version(store))
    task = SimCLRTask(opt=cfg.train.side, store=store, arch=arch, labels=old, proj_dim=cfg.models.side.proj_dim)
    meta = {"kind": "encoder", "arch": arch, "classes": old, "dims": {"emb": arch.emb_dim},
            "data": data_version(store)}
    return _run(cfg, store, SIDE, key, task, meta, force, lambda m: (m.backbone, {}))


def bct_needs_old_embeddings(store: Store) -> bool:
    """BCT with an old model without a classifier reads the old model's embeddings of the train split."""
    return registry.read_meta(store, OLD)["kind"] != "classifier"


def old_classifier(cfg: Config, store: Store) -> tuple[list[int], torch.Tensor, dict]:
    """(classes, weight (k, d), meta) of the old model's classifier, for BCT's influence loss. An old
    model without one (a team's exported embedder) gets the class means of its embeddings of the train
    split (embeddings/old/train, which the caller extracts first), BCT's own rule for the classes an old
    classifier lacks."""
    module, meta = registry.load(store, OLD)
    if meta["kind"] == "classifier":
        return meta["classes"], module.fc.weight.detach().clone(), meta
    log.warning("[bct] the old model %s has no classifier: BCT's influence loss uses the class means of its "
                "embeddings of the train split", meta.get("card", {}).get("name", OLD))
    directory = layout.embeddings(store, OLD, "train")
    if not currency.has_manifest(store, directory):
        raise LakeError(f"{store.uri(directory)}: BCT needs the old model's embeddings of the train split (the old "
                        f"model has no classifier); extract them first (fct extract --model emb=old --split train)")
    emb = lake.read_lake(store, directory, {"id": pa.int64()}).sort_by("id")
    y = feature_lakes.labels_of(emb["id"].to_numpy(), feature_lakes.split_truth(store, "train"),
                                store.uri(layout.images(store, "train")), f"rows of {store.uri(directory)}")
    classes, means = feature_lakes.class_means(lake.to_numpy(emb["emb"]), y)
    return classes, means, meta


def train_new(cfg: Config, store: Store, bct: bool = False, force: bool = False, k: int = 2) -> dict:
    """The new model (or, with k >= 3, version k of the chain) on its classes; with `bct`, BCT's baseline
    (old dim + old classifier's influence)."""
    name, opt = (BCT, cfg.train.bct) if bct else (layout.version(k), cfg.train.new)
    labels = classes_of_version(cfg, store, k)
    subset = {"classes": labels, "model": name} if k > 2 or cfg.versions.classes_of(2) is not None else {}
    emb_dim, extra, compat = None, {}, {}
    if bct:
        old_classes, old_fc, old_meta = old_classifier(cfg, store)
        emb_dim = old_meta["dims"]["emb"]
        index = torch.full((len(labels),), -1, dtype=torch.long)  # target position -> old classifier output
        index[torch.from_numpy(np.searchsorted(labels, old_classes))] = torch.arange(len(old_classes))
        extra = {"old_fc": old_fc, "old_index": index}
        compat = {"compatible_with": {OLD: old_meta["version"]}}
    arch = ClassifierConfig(backbone_arch(cfg.models.new, store, emb_dim), len(labels))
    key = digest(cfg.fingerprint("models.new", f"train.{BCT if bct else NEW}", "train.precision"), data_version(store),
                 (compat | subset) or None)
    task = (BctTask if bct else ClassifierTask)(opt=opt, store=store, arch=arch.backbone, labels=labels if subset else None,
                                                num_classes=len(labels), **extra)
    meta = {"kind": "classifier", "arch": arch, "classes": labels, "dims": {"emb": arch.backbone.emb_dim},
            "data": data_version(store)} | compat
    return _run(cfg, store, name, key, task, meta, force,
                lambda m: (m, {"test_accuracy": accuracy(m, cfg, store, labels)}))


def transformation_name(use_side: bool) -> str:
    return FCT if use_side else FCT_NOSIDE


@dataclass(frozen=True)
class Upgrade:
    """A transformation between two versions other than old -> new: its artefact name, the features lake
    it learns from, which column plays which role there, and the model it learns to predict."""
    name: str
    features: str
    roles: dict  # role (old, side, new) -> column of the features lake
    target: str


def upgrades_to(k: int) -> list[Upgrade]:
    """The two transformations to version k >= 3, both learnt from its features lake (id, old, side,
    v{k-1}, vk): chained h(v{k-1} -> vk) and direct h(v1 -> vk)."""
    target, features = layout.version(k), layout.version_features(k)
    return [Upgrade(layout.chained(k), features, {"old": layout.version(k - 1), "side": "side", "new": target}, target),
            Upgrade(layout.direct(k), features, {"old": "old", "side": "side", "new": target}, target)]


def train_transformation(cfg: Config, store: Store, use_side: bool = True, force: bool = False,
                         features: str | None = None, upgrade: Upgrade | None = None) -> dict:
    """h(old, side) -> new on a features lake's train split (the extract stage's, or the one at the URI
    `features`); a lake without side-info gets the no-side transformation. `upgrade` names another
    pair of versions of fct's own lakes (upgrades_to)."""
    f = feature_lakes.open_lake(cfg, store, features, *((upgrade.features, upgrade.roles) if upgrade else ()))
    if use_side and "side" not in f.dims:
        log.warning("[h] %s has no side-info column %r: training FCT's no-side transformation (%s) instead",
                    store.uri(f.train), cfg.columns.side, FCT_NOSIDE)
        use_side = False
    name = upgrade.name if upgrade else transformation_name(use_side)
    columns = f.columns if use_side else {r: c for r, c in f.columns.items() if r != "side"}
    dims = {"old": f.dims["old"], "side": f.dims["side"] if use_side else 0, "new": f.dims["new"]}
    t = cfg.models.transformation
    arch = TransformationConfig(dims["old"], dims["side"], dims["new"], t.branch, t.hidden, use_side, t.uncertainty)
    classifier, labels, fc_version = new_classifier(cfg, store, f, upgrade.target if upgrade else NEW)
    views = view_lakes(cfg, store, f) if upgrade is None else []
    key = digest(cfg.fingerprint("models.transformation", "train.transformation", "train.precision"),
                 dataclasses.asdict(arch), f.key, fc_version, *[lake.identity(store, v) for v in views])
    task = TransformationTask(opt=cfg.train.transformation, store=store, features=f.train, columns=columns, arch=arch,
                              classifier=classifier, labels=labels, views=tuple(views))
    meta = {"kind": "transformation", "arch": arch, "dims": dims, "uses_side_info": use_side, "views": len(views),
            "producers": {r: f.versions.get(r) for r in ("old", "side", "new")}, "features": store.uri(f.train),
            "classifier": fc_version}
    return _run(cfg, store, name, key, task, meta, force,
                lambda m: (m, transformation_error(m, store, f.test, columns, dims)), cfg.train.transformation.num_workers)


def view_lakes(cfg: Config, store: Store, f: feature_lakes.Features) -> list[str]:
    """The train splits of the augmented views of fct's own features (train.transformation.views), each
    extracted first; a lake you bring has none (its images are not here)."""
    n = cfg.train.transformation.views
    if n and not f.own:
        log.warning("[h] train.transformation.views=%d needs the images: %s is trained on its rows as stored", n,
                    store.uri(f.train))
        return []
    out = [layout.embeddings(store, layout.features_view(v), "train") for v in range(1, n + 1)]
    for v, d in enumerate(out, 1):
        if not currency.has_manifest(store, d):
            raise LakeError(f"{store.uri(d)}: no finished view {v} of the train features (train.transformation.views="
                            f"{n}); extract it first (fct upgrade does)")
    return out


def share(cfg: Config, runs: int) -> Config:
    """The config of one of `runs` stages side by side: an equal share of the training workers (at least one
    each) and of their CPUs, the CPUs all handed out."""
    t = cfg.train
    workers = max(1, t.num_workers // runs)
    return dataclasses.replace(cfg, train=dataclasses.replace(
        t, num_workers=workers, cpus_per_worker=t.cpus_per_worker * t.num_workers / (runs * workers)))


def side_by_side(cfg: Config, runs: list[Callable[[Config], dict]]) -> list[dict]:
    """Several training stages at once (each a stage function of the config it is given), each on its share
    of the training workers and CPUs: on CPUs a stage's DDP workers wait on each other's steps and
    all-reduces, so two stages of one worker each finish sooner than one after the other on two (measured
    for h and for the ResNets: docs/ARCHITECTURE.md). In the driver (train.num_workers=0) one after the other."""
    if cfg.train.num_workers == 0 or len(runs) < 2:
        return [run(cfg) for run in runs]
    mine = share(cfg, len(runs))
    with ThreadPoolExecutor(len(runs)) as pool:
        return [f.result() for f in [pool.submit(run, mine) for run in runs]]


def new_classifier(cfg: Config, store: Store, f: feature_lakes.Features, target: str = NEW
                   ) -> tuple[torch.Tensor | None, feature_lakes.Labels | None, str | None]:
    """(weight, labels, version) of the frozen classifier of models/{target} for FastFill's classification
    term, or Nones (MSE only) when its weight is 0, there is no classifier of the features' new version, or
    no labels. Images of classes that classifier was not trained on count by MSE only."""
    if not cfg.train.transformation.classification_weight:
        return None, None, None
    meta = registry.read_meta(store, target) if registry.exists(store, target) else {}
    if meta.get("kind") != "classifier" or f.versions.get("new") != meta["version"]:
        log.warning("[h] no classifier of the new model that made %s: training by MSE only", store.uri(f.train))
        return None, None, None
    labels = feature_lakes.train_labels(cfg, store, f, meta["classes"])
    if labels is None:
        log.warning("[h] %s has no label column %r: training by MSE only", store.uri(f.train), cfg.columns.label)
        return None, None, None
    module, _ = registry.load(store, target, {"kind": "classifier"})
    return module.fc.weight.detach().clone(), labels, meta["version"]


@torch.no_grad()
def transformation_error(h: nn.Module, store: Store, features: str, columns: dict, dims: dict) -> dict:
    """Test MSE of h against the new embeddings, and relative to their variance (1.0 = predicting the mean)."""
    x = feature_lakes.read(store, features, columns, dims)
    old, side, new = x["old"], x["side"], x["new"]
    pred = torch.cat([h(old[i:i + 4096], side[i:i + 4096]) for i in range(0, len(old), 4096)])
    mse = float(((pred - new) ** 2).mean())
    return {"test_mse": mse, "test_mse_over_variance": mse / float(new.var(dim=0).mean())}
