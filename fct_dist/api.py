"""fct-dist from Python: the stages as functions with the CLI's parameters, and h as a callable for Ray Data.

    import fct_dist
    fct_dist.backfill(input="s3://bucket/stored", output="s3://bucket/emb_v2", cfg="team.yaml")
    ds = ray.data.read_parquet("s3://bucket/stored")
    ds.map_batches(fct_dist.Transformation, fn_constructor_kwargs={"uri": "s3://bucket/fct/models/fct"},
                   concurrency=4, num_gpus=1).write_parquet("s3://bucket/emb_v2")

Every function takes `cfg` (a Config, a YAML path, or None for the embedded defaults) and `set`
(`key=value` overrides, as the CLI's --set), checks the storage first as the CLI does, and returns what
its stage returns (a manifest or a result dict). Errors are the same clear errors the CLI prints.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import pyarrow as pa

from . import config as config_mod
from . import lake
from .config import Config
from .lake import LakeError
from .storage import Store, open_store

Settings = Config | str | os.PathLike | None


def session(cfg: Settings = None, set: Sequence[str] = ()) -> tuple[Config, Store]:
    """(config, its checked store): a Config (with `set` applied to a copy), or one loaded from a YAML path or
    the embedded defaults."""
    if isinstance(cfg, Config):
        cfg = config_mod.load(None, list(set), base=cfg) if set else cfg
    else:
        cfg = config_mod.load(cfg, list(set))
    return cfg, open_store(cfg.storage, check=True)


def extract(models: dict[str, str], input: str | None = None, output: str | None = None, *, split: str = "test",
            name: str | None = None, carry: Sequence[str] = (), cfg: Settings = None, set: Sequence[str] = ()) -> dict:
    """`fct extract`: images through the models {output column: artefact name} in one pass."""
    from .pipeline import extract as stage
    cfg, store = session(cfg, set)
    cfg.columns.carry = [*cfg.columns.carry, *(c for c in carry if c not in cfg.columns.carry)]
    return stage.extract(cfg, store, split, dict(models), name or "-".join(models.values()), input, output)


def import_model(name: str, file: str, card: str | None = None, *, cfg: Settings = None,
                 set: Sequence[str] = ()) -> dict:
    """`fct import-model`: register an exported program (.pt2) and its card; returns its meta."""
    from .models import exported
    _, store = session(cfg, set)
    return exported.import_model(store, name, file, card)


def train_transformation(features: str | None = None, *, no_side: bool = False, force: bool = False,
                         cfg: Settings = None, set: Sequence[str] = ()) -> dict:
    """`fct train-transformation`: h(old, side) -> new on a features lake (fct's own, extracted first, or
    the one at `features`); returns the artefact's meta."""
    cfg, store = session(cfg, set)
    return fit_transformation(cfg, store, features, no_side, force)


def fit_transformation(cfg: Config, store: Store, features: str | None, no_side: bool, force: bool) -> dict:
    from .pipeline import extract as stage
    from .train import stages
    if not features:  # h's training data: the features extracted by the current models
        for split, view in stage.feature_lakes(cfg):
            stage.features(cfg, store, split, view)
    return stages.train_transformation(cfg, store, use_side=not no_side, force=force, features=features)


def backfill(input: str | None = None, output: str | None = None, *, model: str = "fct", split: str = "test",
             cfg: Settings = None, set: Sequence[str] = ()) -> dict:
    """`fct backfill`: the stored (old, side) lake through h into the new lake; returns its manifest."""
    from .pipeline import backfill as stage
    cfg, store = session(cfg, set)
    return stage.backfill(cfg, store, model, split, input, output)


def index(input: str | None = None, output: str | None = None, *, lake: str = "fct", split: str = "test",
          column: str = "emb", cfg: Settings = None, set: Sequence[str] = ()) -> dict:
    """`fct index`: a sharded FAISS index of an embedding lake; returns its manifest."""
    from .pipeline import index as stage
    cfg, store = session(cfg, set)
    return stage.build(cfg, store, lake, split, column, input, output)


def evaluate(features: str | None = None, *, cfg: Settings = None, set: Sequence[str] = ()) -> dict:
    """`fct evaluate`: the compatibility matrix of fct's own lakes, or of the features lake at `features`."""
    from . import evaluation as stage
    cfg, store = session(cfg, set)
    return stage.features_matrix(cfg, store, features) if features else stage.matrix(cfg, store)


def upgrade(*, seeds: int = 1, force: bool = False, cfg: Settings = None, set: Sequence[str] = ()) -> str:
    """`fct upgrade`: every stage in order and the report; returns the report's directory."""
    from . import runner as stage
    cfg, store = session(cfg, set)
    return stage.upgrade(cfg, store, seeds=seeds, force=force)


class Transformation:
    """h as a Ray Data `map_batches` callable (a class, so each actor loads the model once, onto its GPU
    when Ray gives it one): a batch of the stored lake (a dict of numpy arrays or a pyarrow Table with the
    old and side columns) -> the same batch plus the new column (and h's uncertainty column when it has
    that head). A null, ragged, NaN or inf vector raises an error naming the row's id and the reason;
    what `fct backfill` would set aside under `on_bad_input: quarantine`."""

    def __init__(self, uri: str, *, cfg: Settings = None, set: Sequence[str] = (), precision: str = "fp32"):
        """`uri`: the artefact, ROOT/models/NAME (the storage settings other than the root come from cfg)."""
        from .pipeline.backfill import TransformFn
        root, sep, name = uri.rstrip("/").rpartition("/models/")
        if not sep or not name:
            raise LakeError(f"{uri}: expected the URI of a model artefact, STORAGE_ROOT/models/NAME")
        cfg, _ = session(cfg, set)
        store = open_store(dataclasses.replace(cfg.storage, root=root), check=True)
        self.columns = cfg.columns
        self.fn = TransformFn(store, name, cfg.columns, precision)

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> dict[str, np.ndarray] | pa.Table:
        table = batch if isinstance(batch, pa.Table) else pa.table(
            {k: _arrow(v) for k, v in batch.items()})
        invalid, reasons, out = self.fn(table.combine_chunks().to_batches()[0] if table.num_rows else
                                         pa.RecordBatch.from_pylist([], table.schema))
        if invalid.any():
            first = int(np.flatnonzero(invalid)[0])
            who = f"id {table[self.columns.id][first].as_py()}" if self.columns.id in table.column_names else f"row {first}"
            raise LakeError(f"{who}: {reasons[0]} ({int(invalid.sum())} bad rows in this batch)")
        if isinstance(batch, pa.Table):
            for c, v in out.items():
                batch = batch.append_column(c, _arrow(v))
            return batch
        return dict(batch) | out


def _arrow(x: np.ndarray) -> pa.Array:
    """A numpy column of a Ray Data batch -> Arrow: an object array of per-row arrays (ragged, or with
    nulls) as a list column, (n, d) as float32 vectors, a scalar column as it is."""
    if x.dtype == object:
        return pa.array([None if v is None else np.asarray(v).tolist() for v in x])
    return lake.to_arrow(x)
