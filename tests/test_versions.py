"""Repeated upgrades v1 -> v2 -> v3: the lake's lineage per vector column, the embedding-space check,
side-info kept from the first upgrade, and the chained and direct strategies against plain torch."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_dist import currency, lake, layout
from fct_dist.lake import LakeError
from fct_dist.layout import FCT, NEW, OLD, SIDE
from fct_dist.models import Transformation, TransformationConfig, registry
from fct_dist.pipeline import backfill, index
from fct_dist.storage import open_store

from .support import copy_tree, id_lake

V3, CHAINED, DIRECT = layout.version(3), layout.chained(3), layout.direct(3)  # the session's last version
VER1, VER2, VER3, VSIDE = "v1-0000000000000", "v2-0000000000000", "v3-0000000000000", "side-00000000000"
DIMS = {"v1": 8, "v2": 8, "v3": 12, "side": 8}  # v1 and v2 of one dim: only the space tells them apart


def save_h(store, name: str, src: str, dst: str, seed: int) -> None:
    """An h(src, side) -> dst of the tiny sizes with seeded weights, trained (as it were) on features of
    those versions: what the stages record for a trained h."""
    arch = TransformationConfig(old_dim=DIMS[src], side_dim=8, new_dim=DIMS[dst], branch=16, hidden=32)
    torch.manual_seed(seed)
    h = Transformation(arch).eval()
    versions = {"v1": VER1, "v2": VER2, "v3": VER3}
    registry.save(store, name, h, {"kind": "transformation", "arch": arch, "metrics": {},
                                   "dims": {"old": DIMS[src], "side": 8, "new": DIMS[dst]},
                                   "producers": {"old": versions[src], "side": VSIDE, "new": versions[dst]}}, key=name)


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
    meta = {"dims": {"old": 8, "side": 8}, "producers": {"old": VER1, "side": VSIDE}}
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
    prod = currency.manifest(store, v2)["producer"]
    assert prod["emb"]["space"] == VER2 and prod["emb"]["inputs"]["old"]["version"] == VER1
    assert lake.space_of(prod["side"]) == VSIDE and prod["side"]["kept"]

    # chained v2 -> v3: h23 on the transformed v2 vectors (their space is v2, though h12 made them)
    chained = store.path("embeddings", "chained", "test")
    from_v2 = any_cfg("backfill.distributor=local", "columns.old=emb")
    backfill.backfill(from_v2, store, "h23", input=store.uri(v2), output=store.uri(chained))
    _, emb3c = rows(store, chained, "emb")
    np.testing.assert_allclose(emb3c, apply(store, "h23", apply(store, "h12", old, side), side), rtol=1e-4, atol=1e-5)
    lineage = currency.manifest(store, chained)["producer"]["emb"]
    assert lineage["space"] == VER3
    assert [lineage["inputs"]["old"]["space"], lineage["inputs"]["old"]["inputs"]["old"]["version"]] == [VER2, VER1]
    assert lake.space_of(lineage["inputs"]["side"]) == VSIDE

    # direct v1 -> v3: h13 on the original v1 vectors the stored lake kept
    direct = store.path("embeddings", "direct", "test")
    backfill.backfill(cfg, store, "h13", input=store.uri(stored), output=store.uri(direct))
    _, emb3d = rows(store, direct, "emb")
    np.testing.assert_allclose(emb3d, apply(store, "h13", old, side), rtol=1e-5, atol=1e-6)
    assert currency.manifest(store, direct)["producer"]["emb"]["inputs"]["old"]["version"] == VER1
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
    id_lake(store, stored, {"dims": {"old": 8, "side": 8}, "producers": {"old": VER1, "side": VSIDE}}, files=2,
            rows_per_file=10)
    v2 = store.path("embeddings", "v2", "test")
    backfill.backfill(cfg, store, "h12", input=store.uri(stored), output=store.uri(v2))
    # h23 expects v2 vectors in `old`; v2's lake holds h12's output in `emb` but no side-info to read
    out = store.path("embeddings", "v3", "test")
    with pytest.raises(LakeError, match=r"no vector column 'side' to keep"):
        backfill.backfill(local_cfg("backfill.distributor=local", "columns.keep=[side]"), store, "h12",
                          input=store.uri(v2), output=store.uri(out))
    # the stored lake's `old` is in v1's space: h23 (trained on v2) refuses it, naming both versions
    with pytest.raises(LakeError, match=rf"column 'old' holds embeddings of model version '{VER1}'; expected '{VER2}'"):
        backfill.backfill(cfg, store, "h23", input=store.uri(stored), output=store.uri(out))
    assert not store.exists(out) or not store.list(out, ".parquet")


def test_three_versions_end_to_end_local_and_s3(trained, s3_cfg):
    """`fct upgrade` through v1 -> v2 -> v3 (the session's tiny run): nested classes, each v3 gallery's
    lineage back to v1, its rows equal to the transformations applied in plain torch, both strategies
    in the report; then the second upgrade again on a copy in S3, to the same lineage and vectors."""
    cfg, store, report_dir = trained
    meta = {m: registry.read_meta(store, m) for m in (OLD, SIDE, NEW, V3, FCT, CHAINED, DIRECT)}
    assert set(meta[OLD]["classes"]) < set(meta[NEW]["classes"]) < set(meta[V3]["classes"])
    assert len(meta[NEW]["classes"]) == 6 and len(meta[V3]["classes"]) == 8
    assert meta[CHAINED]["producers"] == {"old": meta[NEW]["version"], "side": meta[SIDE]["version"],
                                          "new": meta[V3]["version"]}
    assert meta[DIRECT]["producers"]["old"] == meta[OLD]["version"]

    def lineage(s, lake_name):
        return currency.manifest(s, layout.embeddings(s, lake_name, "test"))["producer"]["emb"]

    chained, direct = lineage(store, CHAINED), lineage(store, DIRECT)
    assert chained["version"] == meta[CHAINED]["version"] and chained["space"] == meta[V3]["version"]
    first = chained["inputs"]["old"]  # the upgraded lake's column, with its own lineage
    assert (first["model"], first["version"], first["space"]) == (FCT, meta[FCT]["version"], meta[NEW]["version"])
    assert first["inputs"]["old"]["version"] == meta[OLD]["version"]
    assert chained["inputs"]["side"]["version"] == meta[SIDE]["version"]  # kept from v1 time
    assert direct["space"] == meta[V3]["version"] and direct["inputs"]["old"]["version"] == meta[OLD]["version"]

    ids, old, side = rows(store, layout.embeddings(store, "stored", "test"), "old", "side")
    got_c, got_d = (rows(store, layout.embeddings(store, n, "test"), "emb") for n in (CHAINED, DIRECT))
    np.testing.assert_array_equal(got_c[0], ids)
    np.testing.assert_allclose(got_c[1], apply(store, CHAINED, apply(store, FCT, old, side), side), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_d[1], apply(store, DIRECT, old, side), rtol=1e-4, atol=1e-5)
    assert np.abs(got_c[1] - got_d[1]).max() > 1e-3

    m = store.read_json(f"{report_dir}/metrics.json")
    served = m["runs"][0]["evaluation"]["upgrades"][V3]
    gaps = served["gap_closed"]
    better = max(gaps, key=lambda s: (gaps[s]["top1"], gaps[s]["map"]))
    assert served["lake"] == better and index.current(cfg, store, better, "test") is not None
    report = store.read_bytes(f"{report_dir}/report.md").decode()
    assert "## Repeated upgrades" in report and "| chained |" in report and "| direct |" in report

    s3 = s3_cfg("backfill.distributor=local")
    remote = open_store(s3.storage)
    copy_tree(store, remote, "models")
    for name in ("stored", FCT):
        copy_tree(store, remote, "embeddings", name, "test")
    backfill.chained(s3, remote, 3, "test")
    backfill.backfill(s3, remote, DIRECT, "test")
    for name in (CHAINED, DIRECT):
        assert lineage(remote, name) == lineage(store, name)
        np.testing.assert_array_equal(rows(remote, layout.embeddings(remote, name, "test"), "emb")[1],
                                      rows(store, layout.embeddings(store, name, "test"), "emb")[1])
