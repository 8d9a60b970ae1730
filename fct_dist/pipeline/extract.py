"""`fct extract`: images -> one or more frozen models in one pass (decode once) -> embedding lake."""
from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import torch

from .. import image_lake, lake, layout, tables
from ..config import Columns, Config
from ..currency import digest
from ..datasets import folder
from ..lake import LakeError
from ..layout import NEW, OLD, SIDE, STORED
from ..models import registry
from ..train import augment
from ..storage import Store
from . import distribute, filemap
from .device import place
from .filejob import FileJob


class ExtractFn:
    """Decodes each image once and fits it for every model as its `preprocess` says (a team's model card:
    size, resize mode, interpolation, crop, draft; fct's own models: as stored), then embeds the batch with
    every model; an image that does not decode is an invalid row. With `view` > 0 every model sees the
    same augmented view of each image (the classifiers' shifts and flips, seeded by view and id)."""

    def __init__(self, store: Store, models: dict[str, str], precision: str, image_col: str = "image",
                 view: int = 0, id_col: str = "id"):
        self.models, self.dims, self.ways = {}, {}, {}
        for col, name in models.items():
            module, meta = registry.load(store, name)
            self.models[col], self.device, self.dtype = place(registry.embedder(meta["kind"], module), precision)
            self.dims[col] = meta["dims"]["emb"]
            self.ways[col] = preprocess_of(meta)
        self.distinct = sorted(set(self.ways.values()), key=repr)  # each way fitted once per image
        self.image_col, self.view, self.id_col = image_col, view, id_col

    @torch.no_grad()
    def __call__(self, rb: pa.RecordBatch):
        fitted, invalid, reasons = [], np.zeros(rb.num_rows, bool), []
        for i, b in enumerate(rb.column(self.image_col).to_pylist()):
            try:
                fitted.append([image_lake.as_chw(a) for a in image_lake.decode_ways(b, self.distinct)])
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt bytes
                invalid[i] = True
                reasons.append(f"image does not decode ({type(e).__name__}: {e})")
        if not fitted:
            return invalid, reasons, {c: np.zeros((0, d), np.float32) for c, d in self.dims.items()}
        # (refill's batches carry no ids: they are never views)
        seeds = [(self.view, int(i)) for i in rb.column(self.id_col).to_numpy()[~invalid]] if self.view else None
        out, batches = {}, {}  # batches: way -> (B, C, H, W), stacked (and shifted) once for its models
        for col, m in self.models.items():
            k = self.distinct.index(self.ways[col])
            shapes = {f[k].shape for f in fitted}
            if len(shapes) > 1:  # images as stored (fct's own models) must share one size
                raise LakeError(f"images of different sizes {sorted(shapes)} for model column {col!r}; expected one "
                                "size per lake (give the model a card with input_size)")
            if k not in batches:
                x = torch.from_numpy(np.stack([f[k] for f in fitted])).to(self.device)
                batches[k] = augment.shift_of(x, seeds) if seeds else x
            out[col] = m(batches[k]).float().cpu().numpy()
        return invalid, reasons, out


def preprocess_of(meta: dict) -> image_lake.Preprocess:
    """How a model's images are fitted: its card's fields (older cards: the defaults), or as stored."""
    return image_lake.Preprocess(**(meta.get("preprocess") or {}))


def extract_job(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str,
                input: str | None = None, output: str | None = None, view: int = 0) -> FileJob:
    """The extraction of an image lake by `models` ({output column: artefact name}): images/{split} into
    embeddings/{out_name}/{split}, or the lake at `input` (Parquet with the `columns.id` and
    `columns.image` columns, or a folder of images named by id, packed first into OUTPUT.images) into
    `output` (URIs); with `view` > 0, that augmented view of every image (ExtractFn). The artefacts are
    verified here, before any worker starts."""
    cols = cfg.columns if input else Columns()
    out_dir = "" if tables.is_table(output) else store.resolve(output) if output else layout.embeddings(store, out_name, split)
    in_dir = tables.locate(cfg, store, input) if input else layout.images(store, split)
    if input and folder.is_image_folder(store, in_dir):
        in_dir = f"{out_dir}.images"
        folder.pack(store, store.resolve(input), in_dir, cfg.data.rows_per_file, cols.id, cols.image)
    producer = {}
    for col, name in models.items():
        _, meta = registry.load(store, name)
        producer[col] = {"model": name, "version": meta["version"], "dim": meta["dims"]["emb"]}
    carried = carried_columns(store, in_dir, cols, cfg.columns.carry if input else [], [cols.id, *producer])
    producer |= {c: {"dim": 0, "type": str(t), "kept": "copied unchanged from the input lake"} for c, t in carried.items()}
    return FileJob(
        store=store, in_dir=in_dir, out_dir=out_dir,
        rejected_dir=f"{out_dir}.rejected" if output else layout.rejected(store, out_name, split),
        expected={cols.id: pa.int64(), cols.image: pa.binary()} | carried, columns=[cols.id, cols.image, *carried],
        make_fn=functools.partial(ExtractFn, store, models, cfg.extract.precision, cols.image, view, cols.id),
        producer=producer, fingerprint=digest(producer, cfg.extract.precision, cols.image, *([view] if view else [])),
        actors=cfg.extract, id_col=cols.id,
        name="extract", carry=list(carried))


def carried_columns(store: Store, in_dir: str, cols: Columns, named: list[str], taken: list[str]) -> dict[str, pa.DataType]:
    """{column: type} an extraction copies from its image lake: the label column when the lake has one, and
    the `named` ones (columns.carry), read from its first file's schema (the plan checks every file)."""
    first = lake.parts(store, in_dir)[0]
    schema, where = lake.read_schema(store, first), store.uri(first)
    out = {}
    for c in ([cols.label] if cols.label in schema.names and cols.label not in named else []) + named:
        if c not in schema.names:
            raise LakeError(f"{where}: no column {c!r} to carry (columns.carry); columns present: {', '.join(schema.names)}")
        if c in taken:
            raise LakeError(f"columns.carry: {c!r} is also an output column of this extraction ({', '.join(taken)})")
        t = schema.field(c).type
        try:
            pa.type_for_alias(str(t))
        except ValueError:
            raise LakeError(f"{where}: column {c!r} has type {t}; only scalar columns (numbers, strings, dates) can be "
                            "carried") from None
        out[c] = t
    return out


def extract(cfg: Config, store: Store, split: str, models: dict[str, str], out_name: str,
            input: str | None = None, output: str | None = None, view: int = 0) -> dict:
    """Embed an image lake with `models` ({output column: artefact name}); see extract_job."""
    return filemap.run_into(cfg, extract_job(cfg, store, split, models, out_name, input, output, view),
                            distribute.of(cfg, cfg.extract), output)


def stored(cfg: Config, store: Store, split: str = "test") -> dict:
    """The lake kept at old-model time: id, old, side."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE}, STORED)


def features(cfg: Config, store: Store, split: str, view: int = 0) -> dict:
    """The transformation's training features: id, old, side, new; with `view` > 0, of that augmented
    view of the images (train.transformation.views)."""
    return extract(cfg, store, split, {"old": OLD, "side": SIDE, "new": NEW}, layout.features_view(view), view=view)


def feature_lakes(cfg: Config) -> list[tuple[str, int]]:
    """(split, view) of every features lake h learns from and is tested on: both splits as stored, then
    the train split's augmented views (train.transformation.views)."""
    return [(s, 0) for s in layout.SPLITS] + [("train", v) for v in range(1, cfg.train.transformation.views + 1)]


def version_features(cfg: Config, store: Store, split: str, k: int) -> dict:
    """The upgrade to version k's training features: id, old (v1), side, v{k-1}, vk."""
    before, target = layout.version(k - 1), layout.version(k)
    return extract(cfg, store, split, {"old": OLD, "side": SIDE, before: before, target: target},
                   layout.version_features(k))


def reextract(cfg: Config, store: Store, model: str, split: str = "test") -> dict:
    """Full re-extraction: images through one model alone (the baseline a backfill avoids)."""
    return extract(cfg, store, split, {"emb": model}, model)
