"""Versioned model artefacts: models/{name}/model.pt (state_dict) + meta.json.

The version is the SHA-256 of model.pt; loading verifies it, loads with `weights_only=True`, and
refuses an artefact whose meta does not match what the caller expects. meta.json records the
artefact's kind and its typed architecture config (as a dict), from which `build` rebuilds it.
A model a team brings (kind `exported`, see exported.py) is its torch.export program, model.pt2, and its
card; it is hash-verified the same way."""
from __future__ import annotations

import dataclasses
import io

import torch
import torch.nn as nn

from .. import currency, layout
from ..storage import Store
from . import exported
from .artefact import META, ArtefactError, read_meta, read_verified, save_bytes
from .backbone import Classifier, ClassifierConfig, ResNet, ResNetConfig
from .transformation import Transformation, TransformationConfig

def arch_config(kind: str, arch: dict) -> ClassifierConfig | ResNetConfig | TransformationConfig:
    """The typed config of the `arch` recorded in meta.json for an artefact of this kind."""
    try:
        if kind == "classifier":
            return ClassifierConfig(ResNetConfig(**arch["backbone"]), arch["num_classes"])
        if kind == "encoder":
            return ResNetConfig(**arch)
        if kind == "transformation":
            return TransformationConfig(**arch)
    except (TypeError, KeyError) as e:
        raise ArtefactError(f"{kind} arch {arch} does not match its config ({e})") from None
    raise ArtefactError(f"unknown artefact kind {kind!r}; expected classifier, encoder or transformation")


def build(kind: str, arch: dict) -> nn.Module:
    """Rebuild an untrained module from the `kind` and `arch` recorded in meta.json."""
    c = arch_config(kind, arch)
    return {"classifier": Classifier, "encoder": ResNet, "transformation": Transformation}[kind](c)


def embedder(kind: str, module: nn.Module) -> nn.Module:
    """The part of an artefact that maps images to embeddings."""
    return module.backbone if kind == "classifier" else module


def exists(store: Store, name: str) -> bool:
    return store.exists(f"{layout.model(store, name)}/{META}")


def current(store: Store, name: str, key: str) -> dict | None:
    """The meta of models/{name} when it was made for `key`, else None."""
    return currency.current(store, layout.model(store, name), key, META)


def save(store: Store, name: str, module: nn.Module, meta: dict, key: str) -> dict:
    """Write model.pt, then meta.json (its presence marks the artefact complete); returns the meta.
    `meta["arch"]` is the module's typed config."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return save_bytes(store, name, buf.getvalue(), meta | {
        "arch": dataclasses.asdict(meta["arch"]), "params": sum(p.numel() for p in module.parameters())}, key)


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
    check(meta, expect or {}, store.uri(layout.model(store, name)))
    data, where = read_verified(store, name, meta)
    if meta["kind"] == "exported":  # a team's exported model
        card = exported.ModelCard(**meta["card"])
        return exported.module(data, card, f"{where} ({card.name} {card.version})"), meta
    module = build(meta["kind"], meta["arch"])
    state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:  # shapes or names that do not match the recorded arch
        raise ArtefactError(f"{where}: weights do not fit the recorded architecture {meta['arch']} "
                            f"({str(e).splitlines()[0]})") from None
    return module.eval(), meta
