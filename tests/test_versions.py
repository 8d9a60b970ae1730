"""Repeated upgrades v1 -> v2 -> v3: the lake's lineage per vector column, the embedding-space check,
side-info kept from the first upgrade, and the chained and direct strategies against plain torch."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_dist import lake
from fct_dist.lake import LakeError
from fct_dist.models import Transformation, TransformationConfig, registry
from fct_dist.pipeline import backfill
from fct_dist.storage import open_store

from .support import id_lake

V1, V2, V3, SIDE = "v1-0000000000000", "v2-0000000000000", "v3-0000000000000", "side-00000000000"
DIMS = {"v1": 8, "v2": 8, "v3": 12, "side": 8}  # v1 and v2 of one dim: only the space tells them apart


def save_h(store, name: str, src: str, dst: str, seed: int) -> None:
    """An h(src, side) -> dst of the tiny sizes with seeded weights, trained (as it were) on features of
    those versions: what the stages record for a trained h."""
    arch = TransformationConfig(old_dim=DIMS[src], side_dim=8, new_dim=DIMS[dst], branch=16, hidden=32)
    torch.manual_seed(seed)
    h = Transformation(arch).eval()
    versions = {"v1": V1, "v2": V2, "v3": V3}
    registry.save(store, name, h, {"kind": "transformation", "arch": arch, "metrics": {},
                                   "dims": {"old": DIMS[src], "side": 8, "new": DIMS[dst]},
                                   "producers": {"old": versions[src], "side": SIDE, "new": versions[dst]}}, key=name)


def apply(store, name: str, old: np.ndarray, side: np.ndarray) -> np.ndarray:
    h, _ = registry.load(store, name)
    with torch.no_grad():
        return h(torch.from_numpy(old), torch.from_numpy(side)).numpy()


def rows(store, directory: str, *cols: str) -> list[np.ndarray]:
    t = lake.read_lake(store, directory, {"id": pa.int64()}).sort_by("id")
    return [t["id"].to_numpy()] + [lake.to_numpy(t[c]) for c in cols]


def test_chained_and_direct_upgrades_record_their_lineage(any_cfg, caplog):
    cfg = any_cfg("backfill.distributor=local")
    store = open_store(cfg.storage)
    save_h(store, "h12", "v1", "v2", 0)
    save_h(store, "h23", "v2", "v3", 1)
    save_h(store, "h13", "v1", "v3", 2)
    stored = store.path("embeddings", "stored", "test")  # v1 and side-info, as extracted at v1 time
    meta = {"dims": {"old": 8, "side": 8}, "producers": {"old": V1, "side": SIDE}}
    id_lake(store, stored, meta, files=3, rows_per_file=50)
    ids, old, side = rows(store, stored, "old", "side")

    # first upgrade v1 -> v2, keeping side-info for the next one
    keep = any_cfg("backfill.distributor=local", "columns.keep=[side]")
    v2 = store.path("embeddings", "v2", "test")
    backfill.backfill(keep, store, "h12", input=store.uri(stored), output=store.uri(v2))
    got_ids, emb2, side2 = rows(store, v2, "emb", "side")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(emb2, apply(store, "h12", old, side), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(side2, side)  # copied, not recomputed
    prod = store.manifest(v2)["producer"]
    assert prod["emb"]["space"] == V2 and prod["emb"]["inputs"]["old"]["version"] == V1
    assert lake.space_of(prod["side"]) == SIDE and prod["side"]["kept"]

    # chained v2 -> v3: h23 on the transformed v2 vectors (their space is v2, though h12 made them)
    chained = store.path("embeddings", "chained", "test")
    from_v2 = any_cfg("backfill.distributor=local", "columns.old=emb")
    backfill.backfill(from_v2, store, "h23", input=store.uri(v2), output=store.uri(chained))
    _, emb3c = rows(store, chained, "emb")
    np.testing.assert_allclose(emb3c, apply(store, "h23", apply(store, "h12", old, side), side), rtol=1e-4, atol=1e-5)
    lineage = store.manifest(chained)["producer"]["emb"]
    assert lineage["space"] == V3
    assert [lineage["inputs"]["old"]["space"], lineage["inputs"]["old"]["inputs"]["old"]["version"]] == [V2, V1]
    assert lake.space_of(lineage["inputs"]["side"]) == SIDE

    # direct v1 -> v3: h13 on the original v1 vectors the stored lake kept
    direct = store.path("embeddings", "direct", "test")
    backfill.backfill(cfg, store, "h13", input=store.uri(stored), output=store.uri(direct))
    _, emb3d = rows(store, direct, "emb")
    np.testing.assert_allclose(emb3d, apply(store, "h13", old, side), rtol=1e-5, atol=1e-6)
    assert store.manifest(direct)["producer"]["emb"]["inputs"]["old"]["version"] == V1
    assert np.abs(emb3c - emb3d).max() > 1e-2  # two strategies, two different lakes

    # an upgrade that already happened: a no-op that writes nothing
    before = {i.path: i.mtime_ns for i in store.list_info(chained, hidden=True)}
    with caplog.at_level("INFO", logger="fct_dist"):
        backfill.backfill(from_v2, store, "h23", input=store.uri(v2), output=store.uri(chained))
    assert "is complete and current: nothing to do" in caplog.text
    assert {i.path: i.mtime_ns for i in store.list_info(chained, hidden=True)} == before


def test_an_input_in_another_embedding_space_fails_before_any_work(local_cfg):
    cfg = local_cfg("backfill.distributor=local")
    store = open_store(cfg.storage)
    save_h(store, "h12", "v1", "v2", 0)
    save_h(store, "h23", "v2", "v3", 1)
    stored = store.path("embeddings", "stored", "test")
    id_lake(store, stored, {"dims": {"old": 8, "side": 8}, "producers": {"old": V1, "side": SIDE}}, files=2,
            rows_per_file=10)
    v2 = store.path("embeddings", "v2", "test")
    backfill.backfill(cfg, store, "h12", input=store.uri(stored), output=store.uri(v2))
    # h23 expects v2 vectors in `old`; v2's lake holds h12's output in `emb` but no side-info to read
    out = store.path("embeddings", "v3", "test")
    with pytest.raises(LakeError, match=r"no vector column 'side' to keep"):
        backfill.backfill(local_cfg("backfill.distributor=local", "columns.keep=[side]"), store, "h12",
                          input=store.uri(v2), output=store.uri(out))
    # the stored lake's `old` is in v1's space: h23 (trained on v2) refuses it, naming both versions
    with pytest.raises(LakeError, match=rf"column 'old' holds embeddings of model version '{V1}'; expected '{V2}'"):
        backfill.backfill(cfg, store, "h23", input=store.uri(stored), output=store.uri(out))
    assert not store.exists(out) or not store.list(out, ".parquet")
