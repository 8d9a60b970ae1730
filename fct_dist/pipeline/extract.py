"""`fct extract`: images -> one or more frozen models in one pass (decode once) -> embedding lake."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch

from .. import lake, layout
from ..config import Config, digest
from ..lake import LakeError
from ..layout import FEATURES, NEW, OLD, SIDE, STORED
from ..models import registry
from ..storage import Store
from . import filemap
from .device import place
from .distribute import run


class ExtractFn:
    """Decodes an image batch once and embeds it with every model; undecodable images are invalid rows.

    Models whose meta names an `input_size` get images resized and centre-cropped to it (all models
    of one pass share it)."""

    def __init__(self, store: Store, models: dict[str, str], precision: str):
        self.models, self.dims, sizes = {}, {}, set()
        for col, name in models.items():
            module, meta = registry.load(store, name)
            self.models[col], self.device, self.dtype = place(registry.embedder(meta["kind"], module), precision)
            self.dims[col] = meta["dims"]["emb"]
            sizes.add(meta.get("input_size"))
        if len(sizes) > 1:
            raise LakeError(f"models {sorted(models.values())} expect different input sizes {sorted(map(str, sizes))}; "
                            "extract them in separate passes")
        self.size = sizes.pop()

    @torch.no_grad()
    def __call__(self, rb: pa.RecordBatch):
        images, invalid, reasons = [], np.zeros(rb.num_rows, bool), []
        for i, b in enumerate(rb.column("image").to_pylist()):
            try:
                images.append(lake.decode_images([b], size=self.size))
            except LakeError as e:
                invalid[i] = True
                reasons.append(f"image does not decode: {str(e).split('(', 1)[-1].rstrip(')')}")
        if not images:
            return invalid, reasons, {c: np.zeros((0, d), np.float32) for c, d in self.dims.items()}
        x = torch.from_numpy(np.concatenate(images)).to(self.device)
        return invalid, reasons, {c: m(x).float().cpu().numpy() for c, m in self.models.items()}


def extract_job(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str) -> filemap.FileJob:
    """The extraction of images/{split} by `models` ({output column: artefact name}) into
    embeddings/{out_name}/{split}; the artefacts are verified here, before any worker starts."""
    producer = {}
    for col, name in models.items():
        _, meta = registry.load(store, name)
        producer[col] = {"model": name, "version": meta["version"], "dim": meta["dims"]["emb"]}
    return filemap.FileJob(
        store=store, in_dir=layout.images(store, split), out_dir=layout.embeddings(store, out_name, split),
        rejected_dir=layout.rejected(store, out_name, split),
        expected={"id": pa.int64(), "image": pa.binary()}, columns=["id", "image"],
        make_fn=functools.partial(ExtractFn, store, models, cfg.extract.precision), producer=producer,
        fingerprint=digest(producer, cfg.extract.precision), actors=cfg.extract, name="extract")


def extract(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str) -> dict:
    """Embed images/{split} with `models` ({output column: artefact name}) into embeddings/{out_name}/{split}."""
    return run(cfg, extract_job(cfg, store, split, models, out_name))


def stored(cfg: Config, store: Store, split: str = "test") -> dict:
    """The lake kept at old-model time: id, old, side."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE}, STORED)


def features(cfg: Config, store: Store, split: str) -> dict:
    """The transformation's training features: id, old, side, new."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE, "new": NEW}, FEATURES)


def reextract(cfg: Config, store: Store, model: str, split: str = "test") -> dict:
    """Full re-extraction: images through one model alone (the baseline a backfill avoids)."""
    return extract(cfg, store, split, {"emb": model}, model)
