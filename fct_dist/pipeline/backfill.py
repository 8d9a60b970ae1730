"""`fct backfill`: the stored lake (id, old, side) -> h on the workers' devices -> new lake (id, emb).

No image is read. See filemap.py for the exactly-once design."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pyarrow as pa
import torch

from .. import lake, layout, tables
from ..config import Columns, Config
from ..currency import digest
from ..lake import LakeError
from ..layout import FCT, STORED
from ..models import registry
from ..storage import Store
from . import distribute, filemap
from .device import place
from .filejob import FileJob


class TransformFn:
    """h on the actor's device; null, ragged (another length), NaN or inf vectors are invalid rows. An h
    with an uncertainty head also writes each row's log-variance (columns.uncertainty); the kept columns
    (columns.keep, {column: dim}) are copied as they are."""

    def __init__(self, store: Store, h_name: str, cols: Columns, precision: str, kept: dict[str, int] | None = None):
        module, meta = registry.load(store, h_name, {"kind": "transformation"})
        self.h, self.device, self.dtype = place(module, precision)
        self.inputs = {"old": cols.old} | ({"side": cols.side} if meta["arch"]["use_side"] else {})
        kept = kept or {}
        self.kept = {c: next((r for r, v in self.inputs.items() if v == c), f"keep:{c}") for c in kept}  # column -> role
        self.inputs |= {r: c for c, r in self.kept.items()}
        self.cols, self.dims = cols, meta["dims"] | {self.kept[c]: d for c, d in kept.items()}

    @torch.no_grad()
    def __call__(self, rb: pa.RecordBatch):
        x, invalid, why = {}, np.zeros(rb.num_rows, bool), {}  # why: row -> reason, for bad rows only
        for role, col in self.inputs.items():
            x[role], bad = lake.vectors(rb.column(col), self.dims[role])
            rows = np.flatnonzero(bad & ~invalid)
            why |= zip(rows.tolist(), lake.vector_problems(rb.column(col), col, self.dims[role], rows))
            invalid[rows] = True
            rows = np.flatnonzero(~np.isfinite(x[role]).all(1) & ~invalid)
            why |= dict.fromkeys(rows.tolist(), f"NaN/inf in {col}")
            invalid[rows] = True
        if invalid.any():  # boolean indexing copies: only when some rows must go
            x = {k: v[~invalid] for k, v in x.items()}
        to = functools.partial(torch.as_tensor, device=self.device, dtype=self.dtype)
        out = self.h(to(x["old"]), to(x["side"]) if "side" in x else None) if invalid.sum() < rb.num_rows \
            else torch.zeros(0, self.dims["new"], device=self.device, dtype=self.dtype)
        cols = {self.cols.out: out.float().cpu().numpy()}
        if self.h.log_var is not None:
            cols[self.cols.uncertainty] = self.h.log_variance(out).float().cpu().numpy()
        cols |= {c: x[r] for c, r in self.kept.items()}
        return invalid, [why[r] for r in np.flatnonzero(invalid).tolist()], cols


def backfill_job(cfg: Config, store: Store, h_name: str = FCT, split: str = "test", input: str | None = None,
                 output: str | None = None) -> FileJob:
    """The backfill of a stored lake (default embeddings/stored/{split}) by models/{h_name} into a new
    lake (default embeddings/{h_name}/{split}); `input` / `output` are URIs or paths on the store's
    storage, or Iceberg tables (iceberg://namespace.table: see `tables`), read and written with the `columns` names. A no-side transformation reads no side column.
    The output column records its lineage: the embedding space it is in (the version h was trained
    towards) and its input columns' entries as the input lake records them (an input that was itself
    backfilled carries its own). Verified: a tampered or mismatching artefact, or an input column in
    another embedding space than h was trained on, fails here, before any worker starts."""
    cols = cfg.columns
    in_dir = tables.locate(cfg, store, input) if input else layout.embeddings(store, STORED, split)
    out_dir = "" if tables.is_table(output) else store.resolve(output) if output else layout.embeddings(store, h_name, split)
    _, meta = registry.load(store, h_name)
    if meta.get("kind") != "transformation":
        raise LakeError(f"models/{h_name} is a {meta.get('kind')}, not a transformation")
    roles = {"old": cols.old} | ({"side": cols.side} if meta["arch"]["use_side"] else {})
    in_prod, kept = input_lineage(store, in_dir, cols.keep)
    producer = {cols.out: {"model": h_name, "version": meta["version"], "dim": meta["dims"]["new"],
                           "space": meta["producers"].get("new"),
                           "inputs": {r: in_prod.get(c, {"space": meta["producers"][r]}) for r, c in roles.items()}}}
    if meta["arch"].get("uncertainty"):
        producer[cols.uncertainty] = {"model": h_name, "version": meta["version"], "dim": 0,
                                      "what": "log-variance of the output (FastFill): higher = less sure"}
    producer |= {c: in_prod.get(c, {}) | {"dim": d, "kept": "copied unchanged from the input lake"}
                 for c, d in kept.items()}
    read = {c: meta["dims"][r] for r, c in roles.items()} | kept
    return FileJob(
        store=store, in_dir=in_dir, out_dir=out_dir, rejected_dir=f"{out_dir}.rejected" if output else layout.rejected(store, h_name, split),
        expected={cols.id: pa.int64()} | read, columns=[cols.id, *read],
        make_fn=functools.partial(TransformFn, store, h_name, cols, cfg.backfill.precision, kept), producer=producer,
        fingerprint=digest(producer, cfg.backfill.precision, cols.__dict__), actors=cfg.backfill, id_col=cols.id,
        name="backfill", expect_versions={c: meta["producers"][r] for r, c in roles.items()})


def chained(cfg: Config, store: Store, k: int, split: str = "test") -> dict:
    """The chained strategy to version k >= 3: h(v{k-1} -> vk) on the previous upgraded lake, whose `emb` is
    in v{k-1}'s space and which kept the side-info; its own lake keeps the side-info while a later version
    will read it. The direct strategy is a plain backfill by h(v1 -> vk)."""
    keep = [cfg.columns.side] if k < cfg.versions.last else []
    c = dataclasses.replace(cfg, columns=dataclasses.replace(cfg.columns, old=cfg.columns.out, keep=keep))
    return backfill(c, store, layout.chained(k), split, input=store.uri(layout.embeddings(store, layout.chained(k - 1), split)))


def input_lineage(store: Store, in_dir: str, keep: list[str]) -> tuple[dict, dict[str, int]]:
    """(the input lake's column entries as its first file records them, {kept column: dim}); a kept
    column the lake does not hold is refused here, naming the lake and the column."""
    try:
        first = lake.parts(store, in_dir)[0]
    except LakeError:
        if keep:
            raise
        return {}, {}  # the engine names an empty or missing input itself
    dims = lake.column_dims(store, in_dir, keep)
    for c, d in dims.items():
        if d is None:
            raise LakeError(f"{store.uri(in_dir)}: no vector column {c!r} to keep (columns.keep)")
    return lake.producer_of(lake.read_schema(store, first)), dims


def backfill(cfg: Config, store: Store, h_name: str = FCT, split: str = "test", input: str | None = None,
             output: str | None = None) -> dict:
    """Apply models/{h_name} to every row of the stored lake; writes the new lake (see backfill_job)."""
    return filemap.run_into(cfg, backfill_job(cfg, store, h_name, split, input, output), distribute.of(cfg, cfg.backfill),
                            output)
