"""Versioned model artefacts: models/{name}/model.pt (state_dict) + meta.json.

The version is the SHA-256 of model.pt; loading verifies it, loads with `weights_only=True`, and
refuses an artefact whose meta does not match what the caller expects."""
from __future__ import annotations

import hashlib
import io
import time

import torch
import torch.nn as nn

from ..storage import Store
from .backbone import Classifier, ResNet
from .transformation import Transformation


class ArtefactError(ValueError):
    """A missing, tampered or mismatching model artefact."""


def build(kind: str, arch: dict) -> nn.Module:
    """Rebuild an untrained module from the `kind` and `arch` recorded in meta.json."""
    if kind == "classifier":
        return Classifier(ResNet(**arch["backbone"]), arch["backbone"]["emb_dim"], arch["num_classes"])
    if kind == "encoder":
        return ResNet(**arch)
    if kind == "transformation":
        return Transformation(**arch)
    raise ArtefactError(f"unknown artefact kind {kind!r}; expected classifier, encoder or transformation")


def embedder(kind: str, module: nn.Module) -> nn.Module:
    """The part of an artefact that maps images to embeddings."""
    return module.backbone if kind == "classifier" else module


def exists(store: Store, name: str) -> bool:
    return store.exists(store.path("models", name, "meta.json"))


def save(store: Store, name: str, module: nn.Module, meta: dict) -> dict:
    """Write model.pt, then meta.json (its presence marks the artefact complete); returns the meta."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    data = buf.getvalue()
    meta = meta | {"name": name, "version": hashlib.sha256(data).hexdigest()[:16],
                   "params": sum(p.numel() for p in module.parameters()),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_bytes(store.path("models", name, "model.pt"), data)
    store.write_json(store.path("models", name, "meta.json"), meta)
    return meta


def read_meta(store: Store, name: str) -> dict:
    path = store.path("models", name, "meta.json")
    if not store.exists(path):
        raise ArtefactError(f"model artefact {store.uri(store.path('models', name))} not found: "
                            f"train it first (fct train-...)")
    return store.read_json(path)


def check(meta: dict, expect: dict, where: str) -> None:
    """Each key of `expect` must equal the meta's value (dotted keys reach into nested dicts)."""
    for key, want in expect.items():
        got = meta
        for k in key.split("."):
            got = got.get(k) if isinstance(got, dict) else None
        if got != want:
            raise ArtefactError(f"{where}: meta {key} is {got!r}; expected {want!r}")


def load(store: Store, name: str, expect: dict | None = None) -> tuple[nn.Module, dict]:
    """Load models/{name}: verify its hash and expected meta, rebuild it, load weights (weights_only)."""
    meta = read_meta(store, name)
    where = store.uri(store.path("models", name))
    check(meta, expect or {}, where)
    data = store.read_bytes(store.path("models", name, "model.pt"))
    if hashlib.sha256(data).hexdigest()[:16] != meta["version"]:
        raise ArtefactError(f"{where}/model.pt: hash does not match meta version {meta['version']} "
                            "(tampered or partly written artefact)")
    module = build(meta["kind"], meta["arch"])
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # shapes or names that do not match the recorded arch
        raise ArtefactError(f"{where}/model.pt: weights do not fit the recorded architecture {meta['arch']} "
                            f"({str(e).splitlines()[0]})") from None
    return module.eval(), meta
