"""The bad-input table: every case the pipeline must meet with a clear error or a quarantine, never a
silent drop. Shared by tests/test_bad_inputs.py (one parametrised test) and `make chaos` (a summary).

Each case builds its input in a fresh local root holding random-weight tiny artefacts (`new`, an
encoder, and `fct`, a transformation: see fixtures.save_models), runs the real stage, and reports what
happened; `handled` says whether that is what the case expects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fct_dist import config, image_lake
from fct_dist.bench import fixtures
from fct_dist.config import Config
from fct_dist.models import registry
from fct_dist.pipeline import backfill, extract
from fct_dist.storage import Store, open_store

from ..support import write_stored

@dataclass
class Ctx:
    cfg: Config
    store: Store

    def stored(self, files: dict[str, dict], version: str = fixtures.DATA_VERSION, dims: dict | None = None) -> None:
        """Write the stored lake in/ (see write_stored), as made by `version`."""
        dims = dims or registry.read_meta(self.store, "fct")["dims"]
        write_stored(self.store, self.store.path("in"), files, {"dims": dims,
                                                                 "producers": {"old": version, "side": version}})

    def images(self, blobs: list[bytes]) -> None:
        image_lake.write_image_split(self.store, "test", np.arange(len(blobs)), blobs, np.zeros(len(blobs), np.int32), 100, {}, "test")


@dataclass
class Case:
    name: str
    expected: str  # in words, for the summary
    expect: str  # regex over "error: <message>" or "ok: <summary>"
    run: Callable[[Ctx], dict | None]  # builds the input and runs the stage; a manifest when it finishes
    sets: tuple[str, ...] = ()


def make_ctx(root: Path, *sets: str) -> Ctx:
    cfg = config.load(None, [f"storage.root={root}", "backfill.distributor=local", "extract.distributor=local", *sets],
                      preset="tiny")
    store = open_store(cfg.storage)
    fixtures.save_models(store, fixtures.profiles(cfg)[0])
    return Ctx(cfg, store)


def run_backfill(ctx: Ctx) -> dict:
    return backfill.backfill(ctx.cfg, ctx.store, "fct", input=ctx.store.path("in"))


def good(n: int, start: int = 0) -> dict:
    return {"ids": list(range(start, start + n))}


def truncated(ctx: Ctx) -> dict:
    ctx.stored({"part-00000.parquet": good(5), "part-00001.parquet": good(5, 5)})
    path = ctx.store.path("in", "part-00001.parquet")
    ctx.store.write_bytes(path, ctx.store.read_bytes(path)[:200])
    return run_backfill(ctx)


def nan_rows(ctx: Ctx) -> dict:
    old = np.ones((4, registry.read_meta(ctx.store, "fct")["dims"]["old"]), np.float32)
    old[1, 0], old[3, 2] = np.nan, np.inf
    ctx.stored({"part-00000.parquet": {"ids": [0, 1, 2, 3], "old": old}})
    return run_backfill(ctx)


def tamper(ctx: Ctx) -> dict:
    path = ctx.store.path("models", "fct", "model.pt")
    data = bytearray(ctx.store.read_bytes(path))
    data[-10] ^= 0xFF
    ctx.store.write_bytes(path, bytes(data))
    ctx.stored({"part-00000.parquet": good(3)})
    return run_backfill(ctx)


def mismatched_artefact(ctx: Ctx) -> dict:
    meta_path = ctx.store.path("models", "fct", "meta.json")
    meta = ctx.store.read_json(meta_path)
    meta["arch"]["hidden"] += 1
    ctx.store.write_json(meta_path, meta)
    ctx.stored({"part-00000.parquet": good(3)})
    return run_backfill(ctx)


def bad_image(ctx: Ctx) -> dict:
    png = image_lake.encode_png(np.zeros((28, 28), np.uint8))
    ctx.images([png, b"\x89PNG broken", png])
    return extract.extract(ctx.cfg, ctx.store, "test", {"emb": "new"}, "probe")


def config_error(*sets: str) -> Callable[[Ctx], dict]:
    def run(ctx: Ctx) -> dict:
        config.load(None, list(sets))
        return {}
    return run


def unreachable(ctx: Ctx) -> dict:
    cfg = config.load(None, ["storage.root=s3://bucket/lake", "storage.s3_endpoint=http://127.0.0.1:9",
                             "storage.s3_max_attempts=2"], preset="tiny")
    return backfill.backfill(cfg, open_store(cfg.storage), "fct")


QUARANTINE = ("backfill.on_bad_input=quarantine", "extract.on_bad_input=quarantine")
CASES = [
    Case("truncated Parquet", "fails naming the file", r"^error: .*part-00001\.parquet: (unreadable|not a readable)", truncated),
    Case("truncated Parquet, quarantine", "file quarantined, counted", r"^ok: .*files_quarantined=1", truncated, QUARANTINE),
    Case("wrong schema (no side column)", "fails before work, names file and column",
         r"^error: .*part-00000\.parquet: missing column 'side'",
         lambda c: (c.stored({"part-00000.parquet": good(3) | {"drop": ("side",)}}), run_backfill(c))[1]),
    Case("wrong dims", "fails before work, names column and dims", r"^error: .*column 'old' has dim 9; expected 8",
         lambda c: (c.stored({"part-00000.parquet": good(3)}, dims={"old": 9, "side": 8}), run_backfill(c))[1]),
    Case("NaN/inf vectors", "fails naming file and id", r"^error: .*part-00000\.parquet: id 1: NaN/inf in old", nan_rows),
    Case("NaN/inf vectors, quarantine", "2 rows to rejected/ with a reason", r"^ok: .*rows_rejected=2\b", nan_rows, QUARANTINE),
    Case("duplicate id in a file", "fails naming file and id", r"^error: .*id 2: duplicate id \(repeated in this file\)",
         lambda c: (c.stored({"part-00000.parquet": {"ids": [1, 2, 2]}}), run_backfill(c))[1]),
    Case("duplicate id across files", "fails naming both", r"^error: .*part-00001\.parquet: duplicate ids \[4\] also in an earlier",
         lambda c: (c.stored({"part-00000.parquet": good(5), "part-00001.parquet": good(3, 4)}), run_backfill(c))[1]),
    Case("empty lake", "fails naming the directory", r"^error: .*/in: no Parquet files \(empty lake\)", run_backfill),
    Case("zero-row shard", "accepted: an empty output file for it", r"^ok: rows_in=3 rows_out=3 rows_rejected=0 files=2\b",
         lambda c: (c.stored({"part-00000.parquet": good(3), "part-00001.parquet": good(0)}), run_backfill(c))[1]),
    Case("undecodable image", "fails naming the id", r"^error: .*id 1: image does not decode", bad_image),
    Case("undecodable image, quarantine", "1 row to rejected/", r"^ok: rows_in=3 rows_out=2 rows_rejected=1\b", bad_image, QUARANTINE),
    Case("lake from another model version", "fails naming column and versions",
         r"^error: .*column 'old' holds embeddings of model version 'other'",
         lambda c: (c.stored({"part-00000.parquet": good(3)}, version="other"), run_backfill(c))[1]),
    Case("artefact with mismatched dims", "refused before use", r"^error: .*weights do not fit the recorded architecture",
         mismatched_artefact),
    Case("tampered artefact", "refused: hash mismatch", r"^error: .*model\.pt: hash does not match", tamper),
    Case("config: unknown key", "rejected, names the key", r"^error: unknown key train\.epochz",
         config_error("train.epochz=3")),
    Case("config: wrong type", "rejected, names key and type", r"^error: train\.num_workers: 'two' has type str; expected int",
         config_error("train.num_workers=two")),
    Case("unreachable endpoint", "fails naming the object", r"^error: cannot stat s3://bucket/lake/models/fct/meta\.json: .*connect",
         unreachable),
]


def attempt(case: Case, root: Path) -> dict:
    """Run one case in a fresh root: what happened, the row accounting, and whether it was expected
    (an error must also leave no output marked done)."""
    ctx, s = make_ctx(root, *case.sets), {}
    try:
        s = (case.run(ctx) or {}).get("summary", {})
        observed = "ok: " + " ".join(f"{k}={s[k]}" for k in ("rows_in", "rows_out", "rows_rejected", "files",
                                                               "files_quarantined") if k in s)
    except Exception as e:  # the stage's own error, possibly wrapped by Ray
        observed = f"error: {' '.join(str(getattr(e, 'cause', None) or e).split())}"
    balanced = s.get("rows_in", 0) == s.get("rows_out", 0) + s.get("rows_rejected", 0)
    marked_done = observed.startswith("error") and any((root / "embeddings").rglob("_manifest.json"))
    return {"case": case.name, "expected": case.expected, "observed": observed, "balanced": balanced,
            "rows": (s.get("rows_in", 0), s.get("rows_out", 0), s.get("rows_rejected", 0)),
            "handled": bool(re.search(case.expect, observed)) and balanced and not marked_done}
