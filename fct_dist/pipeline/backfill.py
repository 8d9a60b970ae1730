"""`fct backfill`: the stored lake (id, old, side) -> h on the workers' devices -> new lake (id, emb).

No image is read. See filemap.py for the exactly-once design."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import lake, layout
from ..config import Columns, Config, digest
from ..lake import LakeError
from ..layout import FCT, STORED
from ..models import registry
from ..storage import Store
from . import filemap
from .device import place
from .distribute import run


# Arrow's buffers are read-only and h only reads them: torch's warning about that is noise
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class TransformFn:
    """h on the actor's device; rows with null, NaN or inf vectors are invalid."""

    def __init__(self, store: Store, h_name: str, cols: Columns, precision: str):
        module, meta = registry.load(store, h_name, {"kind": "transformation"})
        self.h, self.device, self.dtype = place(module, precision)
        self.cols, self.new_dim = cols, meta["dims"]["new"]

    @torch.no_grad()
    def __call__(self, rb: pa.RecordBatch):
        c = self.cols
        old, side = lake.to_numpy(rb.column(c.old)), lake.to_numpy(rb.column(c.side))
        null = pc.or_(rb.column(c.old).is_null(), rb.column(c.side).is_null()).to_numpy(zero_copy_only=False)
        ok_old, ok_side = np.isfinite(old).all(1), np.isfinite(side).all(1)
        invalid = null | ~ok_old | ~ok_side
        reasons = ["null vector" if n else f"NaN/inf in {c.old if not o else c.side}"
                   for n, o in zip(null[invalid], ok_old[invalid])]
        if invalid.any():  # boolean indexing copies: only when some rows must go
            old, side = old[~invalid], side[~invalid]
        to = functools.partial(torch.as_tensor, device=self.device, dtype=self.dtype)
        out = self.h(to(old), to(side)) if len(old) else torch.zeros(0, self.new_dim)
        return invalid, reasons, {c.out: out.float().cpu().numpy()}


def backfill_job(cfg: Config, store: Store, h_name: str = FCT, split: str = "test", input: str | None = None,
                 output: str | None = None) -> filemap.FileJob:
    """The backfill of a stored lake (default embeddings/stored/{split}) by models/{h_name} into a new
    lake (default embeddings/{h_name}/{split}); `input` / `output` are URIs or paths on the store's
    storage. Verified: a tampered or mismatching artefact fails here, before any worker starts."""
    b, cols = cfg.backfill, cfg.backfill.columns
    in_dir = store.resolve(input) if input else layout.embeddings(store, STORED, split)
    out_dir = store.resolve(output) if output else layout.embeddings(store, h_name, split)
    _, meta = registry.load(store, h_name)
    if meta.get("kind") != "transformation":
        raise LakeError(f"models/{h_name} is a {meta.get('kind')}, not a transformation")
    producer = {cols.out: {
        "model": h_name, "version": meta["version"], "dim": meta["dims"]["new"],
        "inputs": {"old": meta["producers"]["old"], "side": meta["producers"]["side"]}}}
    return filemap.FileJob(
        store=store, in_dir=in_dir, out_dir=out_dir, rejected_dir=f"{out_dir}.rejected" if output else layout.rejected(store, h_name, split),
        expected={cols.id: pa.int64(), cols.old: meta["dims"]["old"], cols.side: meta["dims"]["side"]},
        columns=[cols.id, cols.old, cols.side],
        make_fn=functools.partial(TransformFn, store, h_name, cols, b.precision), producer=producer,
        fingerprint=digest(producer, b.precision, cols.__dict__), actors=b, id_col=cols.id, name="backfill",
        expect_versions={cols.old: meta["producers"]["old"], cols.side: meta["producers"]["side"]})


def backfill(cfg: Config, store: Store, h_name: str = FCT, split: str = "test", input: str | None = None,
             output: str | None = None) -> dict:
    """Apply models/{h_name} to every row of the stored lake; writes the new lake (see backfill_job)."""
    return run(cfg, backfill_job(cfg, store, h_name, split, input, output))
