"""Helpers shared by the tests and the harness: configs, copies between stores, stored lakes written
by hand, outputs read back, h applied in plain torch."""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from fct_dist import config, currency, lake
from fct_dist.models import registry
from fct_dist.storage import Store


LOCAL = ("backfill.distributor=local",)
# The session's training (conftest's `trained`): epochs enough for every tiny model to learn
SESSION_EPOCHS = tuple(f"train.{m}.epochs={e}" for m, e in (("old", 20), ("side", 20), ("new", 10), ("bct", 10)))


def cli(root, *args: str, endpoint: str | None = None) -> list[str]:
    """`fct backfill` of the tiny preset on the local distributor, as a command line."""
    args = [sys.executable, "-m", "fct_dist.cli", "backfill", "--preset", "tiny", "--set", f"storage.root={root}",
            *(x for s in LOCAL for x in ("--set", s)), *args]
    return args + (["--set", f"storage.s3_endpoint={endpoint}"] if endpoint else [])


def holder(**kw) -> bytes:
    """A lease record of another run (on another host unless `host` says otherwise)."""
    rec = {"token": "t", "host": "elsewhere", "pid": 1, "pid_started": 0.0, "command": "fct backfill",
           "started": time.time(), "heartbeat": time.time(), "ttl": 30.0} | kw
    return json.dumps(rec).encode()


def make_cfg(root: str, *overrides: str, endpoint: str | None = None) -> config.Config:
    sets = [f"storage.root={root}", *overrides]
    if endpoint:  # a fresh bucket on the test's endpoint: its first write creates it
        sets += [f"storage.s3_endpoint={endpoint}", "storage.s3_create_bucket=true"]
    return config.load(None, sets, preset="tiny")


def copy_tree(src: Store, dst: Store, *parts: str) -> None:
    """Copy a sub-tree of one store into another (e.g. a trained local root into S3)."""
    dst.fs.create_dir(dst.path(*parts), recursive=True)
    pafs.copy_files(src.path(*parts), dst.path(*parts), source_filesystem=src.fs, destination_filesystem=dst.fs)


def moto_reset(endpoint: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))


def producers(meta: dict, version: str | None = None) -> dict:
    """The `fct` metadata of a stored lake made for the transformation `meta` (or by `version`)."""
    return {c: {"model": c, "version": version or meta["producers"][c], "dim": meta["dims"][c]} for c in ("old", "side")}


def write_stored(store: Store, directory: str, files: dict[str, dict], meta: dict, seed: int = 0) -> None:
    """Stored-lake files {name: {"ids": [...], "old": array, "side": ..., "drop": columns to leave out}}
    carrying h's producers (random vectors where none are given)."""
    rng = np.random.default_rng(seed)
    for name, f in files.items():
        n = len(f["ids"])
        vectors = {c: f.get(c, rng.random((n, meta["dims"][c]), np.float32)) for c in ("old", "side")
                   if c not in f.get("drop", ())}
        lake.write_part(store, f"{directory}/{name}", lake.embedding_table(np.asarray(f["ids"]), vectors, producers(meta)))


def id_lake(store: Store, directory: str, meta: dict, files: int, rows_per_file: int, seed: int = 0,
            first_id: int = 0) -> None:
    """A stored lake of `files` files holding ids first_id.. in order."""
    write_stored(store, directory, {lake.part_name(i): {"ids": list(range(first_id + i * rows_per_file,
                                                                           first_id + (i + 1) * rows_per_file))}
                                    for i in range(files)}, meta, seed)


def read_output(store: Store, directory: str, col: str = "emb") -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a finished lake, sorted by id (read_lake also refuses an id written twice)."""
    t = lake.read_lake(store, directory, {"id": pa.int64()}).sort_by("id")
    return t["id"].to_numpy(), lake.to_numpy(t[col])


def output_of(manifest: dict) -> dict[str, str]:
    """{input file name: its output file's name} of a finished lake (outputs are named `{input}.{run}-{rand}`)."""
    return {r["input"]["path"].rsplit("/", 1)[1]: r["output"] for r in manifest["per_file"]}


def committed(store: Store, directory: str) -> dict[str, bytes]:
    """The bytes a reader of the lake's current snapshot sees: its manifest and every file it lists."""
    m = currency.manifest(store, directory)
    return {"_manifest.json": store.read_bytes(f"{directory}/_manifest.json")} | {
        e["path"]: store.read_bytes(f"{directory}/{e['path']}") for e in m["files"]}


def all_ids(store: Store, directory: str) -> np.ndarray:
    """Every id in every Parquet file the lake's current snapshot lists, duplicates included (the manifest's
    JSON and plain pyarrow, none of fct's readers or checks)."""
    listed = json.loads(store.read_bytes(f"{directory}/_manifest.json"))["files"]
    paths = [f"{directory}/{e if isinstance(e, str) else e['path']}" for e in listed]
    return np.concatenate([pq.read_table(p, columns=["id"], filesystem=store.fs)["id"].to_numpy()
                           for p in paths] or [np.zeros(0, np.int64)])


def h_direct(store: Store, name: str, old: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The transformation applied in plain torch."""
    h, _ = registry.load(store, name)
    with torch.no_grad():
        return h(torch.from_numpy(np.array(old)), torch.from_numpy(np.array(side))).numpy()


def expected_backfill(store: Store, h_name: str, stored_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, h(old, side)) of every row of a stored lake, sorted by id."""
    t = lake.read_lake(store, stored_dir, {"id": pa.int64()}).sort_by("id")
    return t["id"].to_numpy(), h_direct(store, h_name, lake.to_numpy(t["old"]), lake.to_numpy(t["side"]))


TINY_DIMS = {"old": 8, "side": 8, "new": 16}


def tiny_transformations(store: Store, names: tuple[str, ...] = ("fct", "fct-b")) -> dict:
    """Random-weight transformations of the tiny preset's dims, one per name (different weights, so
    their outputs differ); all trained, as it were, on stored vectors of versions v-old / v-side.
    Returns the first one's meta."""
    from fct_dist.models import Transformation, TransformationConfig
    arch = TransformationConfig(old_dim=8, side_dim=8, new_dim=16, branch=16, hidden=32)
    for k, name in enumerate(names):
        torch.manual_seed(k)
        registry.save(store, name, Transformation(arch), {
            "kind": "transformation", "arch": arch, "dims": TINY_DIMS, "metrics": {},
            "producers": {"old": "v-old", "side": "v-side"}}, key="test")
    return registry.read_meta(store, names[0])


def registered_epoch(checkpoints: Path) -> int:
    """The last epoch whose checkpoint Ray Train's controller has registered under `checkpoints` (a
    state.pt on storage is not enough: a kill before registration makes a rerun start over)."""
    epoch = 0
    for f in checkpoints.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(f.read_text()).get("latest_checkpoint_result") or {}
        except json.JSONDecodeError:  # being rewritten
            continue
        epoch = max(epoch, latest.get("metrics", {}).get("epoch", 0))
    return epoch
