"""`fct extract`: images -> one or more frozen models in one pass (decode once) -> embedding lake."""
from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import torch

from .. import image_lake, layout
from ..config import Columns, Config
from ..currency import digest
from ..datasets import folder
from ..lake import LakeError
from ..layout import FEATURES, NEW, OLD, SIDE, STORED
from ..models import registry
from ..storage import Store
from . import distribute, filemap
from .device import place
from .filejob import FileJob


class ExtractFn:
    """Decodes an image batch once and embeds it with every model; undecodable images are invalid rows.

    Images are decoded as the models' `preprocess` says (a team's model card: size, resize, channels;
    our own models: native size); the models of one pass must agree on it."""

    def __init__(self, store: Store, models: dict[str, str], precision: str, image_col: str = "image"):
        self.models, self.dims, ways = {}, {}, set()
        for col, name in models.items():
            module, meta = registry.load(store, name)
            self.models[col], self.device, self.dtype = place(registry.embedder(meta["kind"], module), precision)
            self.dims[col] = meta["dims"]["emb"]
            ways.add(json.dumps(meta.get("preprocess"), sort_keys=True))
        if len(ways) > 1:
            raise LakeError(f"models {sorted(models.values())} decode images differently ({' vs '.join(sorted(ways))}); "
                            "extract them in separate passes")
        self.preprocess, self.image_col = json.loads(ways.pop()) or {}, image_col

    @torch.no_grad()
    def __call__(self, rb: pa.RecordBatch):
        images, invalid, reasons = [], np.zeros(rb.num_rows, bool), []
        for i, b in enumerate(rb.column(self.image_col).to_pylist()):
            try:
                images.append(image_lake.decode_images([b], **self.preprocess))
            except LakeError as e:
                invalid[i] = True
                reasons.append(f"image does not decode: {str(e).split('(', 1)[-1].rstrip(')')}")
        if not images:
            return invalid, reasons, {c: np.zeros((0, d), np.float32) for c, d in self.dims.items()}
        x = torch.from_numpy(np.concatenate(images)).to(self.device)
        return invalid, reasons, {c: m(x).float().cpu().numpy() for c, m in self.models.items()}


def extract_job(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str,
                input: str | None = None, output: str | None = None) -> FileJob:
    """The extraction of an image lake by `models` ({output column: artefact name}): images/{split} into
    embeddings/{out_name}/{split}, or the lake at `input` (Parquet with the `columns.id` and
    `columns.image` columns, or a folder of images named by id, packed first into OUTPUT.images) into
    `output` (URIs). The artefacts are verified here, before any worker starts."""
    cols = cfg.columns if input else Columns()
    out_dir = store.resolve(output) if output else layout.embeddings(store, out_name, split)
    in_dir = store.resolve(input) if input else layout.images(store, split)
    if input and folder.is_image_folder(store, in_dir):
        in_dir = f"{out_dir}.images"
        folder.pack(store, store.resolve(input), in_dir, cfg.data.rows_per_file, cols.id, cols.image)
    producer = {}
    for col, name in models.items():
        _, meta = registry.load(store, name)
        producer[col] = {"model": name, "version": meta["version"], "dim": meta["dims"]["emb"]}
    return FileJob(
        store=store, in_dir=in_dir, out_dir=out_dir,
        rejected_dir=f"{out_dir}.rejected" if output else layout.rejected(store, out_name, split),
        expected={cols.id: pa.int64(), cols.image: pa.binary()}, columns=[cols.id, cols.image],
        make_fn=functools.partial(ExtractFn, store, models, cfg.extract.precision, cols.image), producer=producer,
        fingerprint=digest(producer, cfg.extract.precision, cols.image), actors=cfg.extract, id_col=cols.id,
        name="extract")


def extract(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str,
            input: str | None = None, output: str | None = None) -> dict:
    """Embed an image lake with `models` ({output column: artefact name}); see extract_job."""
    return filemap.run(extract_job(cfg, store, split, models, out_name, input, output), distribute.of(cfg, cfg.extract))


def stored(cfg: Config, store: Store, split: str = "test") -> dict:
    """The lake kept at old-model time: id, old, side."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE}, STORED)


def features(cfg: Config, store: Store, split: str) -> dict:
    """The transformation's training features: id, old, side, new."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE, "new": NEW}, FEATURES)


def version_features(cfg: Config, store: Store, split: str, k: int) -> dict:
    """The upgrade to version k's training features: id, old (v1), side, v{k-1}, vk."""
    before, target = layout.version(k - 1), layout.version(k)
    return extract(cfg, store, split, {"old": OLD, "side": SIDE, before: before, target: target},
                   layout.version_features(k))


def reextract(cfg: Config, store: Store, model: str, split: str = "test") -> dict:
    """Full re-extraction: images through one model alone (the baseline a backfill avoids)."""
    return extract(cfg, store, split, {"emb": model}, model)
