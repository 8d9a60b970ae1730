"""Iceberg tables in and out, with a real SqlCatalog on sqlite and a local warehouse (and the moto S3
endpoint): a backfill reads one pinned snapshot and commits its output as one snapshot, exactly once."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

import fct_dist
from fct_dist import lake, tables
from fct_dist.bench.fixtures import save_transformation
from fct_dist.lake import LakeError
from fct_dist.models import registry
from fct_dist.pipeline import distribute, filemap
from fct_dist.pipeline.backfill import backfill_job
from fct_dist.storage import open_store

from .support import h_direct, producers

DIMS = {"old": 8, "side": 4, "new": 6}


def rows(meta: dict, ids: range, seed: int) -> pa.Table:
    """Stored rows as Iceberg holds them: list<float> vectors (no fixed-size list there)."""
    rng = np.random.default_rng(seed)
    t = lake.embedding_table(np.asarray(ids), {c: rng.random((len(ids), DIMS[c]), np.float32) for c in ("old", "side")},
                             producers(meta))
    return t.cast(tables.iceberg_schema(t.schema)).replace_schema_metadata(None)


def scan(t, snapshot_id: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(ids, {column: vectors}) of a table's snapshot read by plain pyiceberg, sorted by id."""
    a = t.scan(snapshot_id=snapshot_id).to_arrow().sort_by("id")
    return a["id"].to_numpy(), {c: np.stack(a[c].to_numpy(zero_copy_only=False)) for c in a.column_names if c != "id"}


@pytest.fixture
def session(any_cfg, tmp_path):
    """A random-weight h and a stored table ns.stored of two snapshots (an append each) made by plain pyiceberg."""
    cfg = any_cfg("backfill.distributor=local")
    store = open_store(cfg.storage, check=True)
    if store.scheme == "s3":  # the catalog's sqlite file is local; the warehouse is on the S3 endpoint
        cfg.tables.properties = {"uri": f"sqlite:///{tmp_path}/catalog.db"}
    save_transformation(store, DIMS, 16, 32)
    meta = registry.read_meta(store, "fct")
    cat = tables.catalog(cfg, store)
    cat.create_namespace_if_not_exists("ns")
    t = cat.create_table("ns.stored", schema=rows(meta, range(1), 0).schema)
    t.append(rows(meta, range(0, 60), 1))
    t.append(rows(meta, range(60, 100), 2))
    return cfg, store, meta, cat


def expected(store, t, snapshot_id=None) -> tuple[np.ndarray, np.ndarray]:
    ids, v = scan(t, snapshot_id)
    return ids, h_direct(store, "fct", v["old"], v["side"])


def test_a_backfill_reads_a_pinned_snapshot_and_commits_one_snapshot_exactly_once(session, ray_local):
    cfg, store, meta, cat = session
    src = cat.load_table("ns.stored")
    m = fct_dist.backfill(input="iceberg://ns.stored", output="iceberg://ns.emb", cfg=cfg)
    out = cat.load_table("ns.emb")
    snap = out.current_snapshot()
    assert m["source"] == f"iceberg://ns.stored@{src.current_snapshot().snapshot_id}"
    assert snap.summary.get(tables.JOB_KEY) == m["key"] and m["table"] == f"iceberg://ns.emb@{snap.snapshot_id}"
    ids, want = expected(store, src)
    got_ids, got = scan(out)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got["emb"], want, rtol=0, atol=1e-6)
    assert len(out.snapshots()) == 1 and len(list(out.scan().plan_files())) == 2  # one snapshot, a file per input file
    ray_rows = ray.data.read_iceberg(table_identifier="ns.emb", catalog_kwargs=tables.catalog_kwargs(cfg, store)).take_all()
    ray_rows.sort(key=lambda r: r["id"])
    np.testing.assert_array_equal([r["id"] for r in ray_rows], ids)
    np.testing.assert_allclose(np.stack([r["emb"] for r in ray_rows]), want, rtol=0, atol=1e-6)

    again = fct_dist.backfill(input="iceberg://ns.stored", output="iceberg://ns.emb", cfg=cfg)
    assert again["key"] == m["key"] and [s.snapshot_id for s in cat.load_table("ns.emb").snapshots()] == [snap.snapshot_id]

    # someone appends to the input: a new job (the snapshot is in its key) in a folder of its own, so that the first
    # commit's files stay readable (time travel) whatever the engine's GC does
    src.append(rows(meta, range(100, 120), 3))
    src = cat.load_table("ns.stored")
    m2 = fct_dist.backfill(input="iceberg://ns.stored", output="iceberg://ns.emb", cfg=cfg)
    assert m2["key"] != m["key"] and m2["summary"]["files_mapped_this_run"] == 3
    out = cat.load_table("ns.emb")
    assert len(out.snapshots()) == 2 and out.current_snapshot().summary.get(tables.JOB_KEY) == m2["key"]
    ids, want = expected(store, src)
    got_ids, got = scan(out)
    np.testing.assert_array_equal(got_ids, ids)  # replaced, not appended: every id once
    np.testing.assert_allclose(got["emb"], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(scan(out, snap.snapshot_id)[0], np.arange(100))  # the first commit, still readable

    # an earlier snapshot, named: its rows only
    first = src.snapshots()[0].snapshot_id
    m3 = fct_dist.backfill(input=f"iceberg://ns.stored@{first}", output=store.uri(store.path("at-first")), cfg=cfg)
    assert m3["rows"] == 60 and m3["source"] == f"iceberg://ns.stored@{first}"


def test_a_stale_writer_cannot_add_a_second_copy(session):
    """Run A finds the table, then pauses (here: its engine run waits) while run B does the same job and commits;
    A's commit must fail, not be retried on fresh metadata into a second copy of every row."""
    cfg, store, meta, cat = session
    job = backfill_job(cfg, store, input="iceberg://ns.stored", output="iceberg://ns.emb")
    landed = []

    def paused(j):
        landed.append(fct_dist.backfill(input="iceberg://ns.stored", output="iceberg://ns.emb", cfg=cfg))  # run B
        assert cat.load_table("ns.emb").current_snapshot() is not None  # B's commit landed inside A's run
        return filemap.run(j, distribute.of(cfg, cfg.backfill))

    with pytest.raises(tables.TableMoved, match="someone committed to the table while this run was working"):
        tables.publish(cfg, store, "iceberg://ns.emb", job, paused)
    out = cat.load_table("ns.emb")
    assert len(out.snapshots()) == 1 and out.current_snapshot().summary.get(tables.JOB_KEY) == landed[0]["key"]
    ids, _ = scan(out)
    np.testing.assert_array_equal(ids, np.arange(100))  # every row once


@pytest.mark.parametrize("any_cfg", ["local"], indirect=True)  # the catalog on S3: the test above
def test_a_snapshot_with_delete_files_is_refused_by_name(session):
    cfg, store, meta, cat = session
    t = cat.load_table("ns.stored")
    data = sorted(task.file.file_path for task in t.scan().plan_files())[0]
    where = store.resolve(t.location()) + "/data/deletes.parquet"
    with store.fs.open_output_stream(where) as f:
        pq.write_table(pa.table({"file_path": [data], "pos": pa.array([3], pa.int64())}), f)
    add_position_deletes(t, tables.file_uri(store, where), rows=1)
    t = cat.load_table("ns.stored")
    assert len(t.scan().to_arrow()) == 99  # the delete is real: plain pyiceberg serves 99 rows
    with pytest.raises(LakeError, match=r"iceberg://ns.stored@\d+: 1 delete files remove rows .*deletes.parquet"):
        fct_dist.backfill(input="iceberg://ns.stored", output=store.uri(store.path("out")), cfg=cfg)


@pytest.mark.parametrize("any_cfg", ["local"], indirect=True)
def test_index_of_an_iceberg_output_and_bad_table_names(session, ray_local):
    cfg, store, meta, cat = session
    fct_dist.backfill(input="iceberg://ns.stored", output="iceberg://ns.emb", cfg=cfg)
    m = fct_dist.index(input="iceberg://ns.emb", output=store.uri(store.path("emb.index")), cfg=cfg,
                       set=["index.num_shards=2", "index.factory=Flat"])
    assert m["rows"] == 100
    from fct_dist.pipeline import index
    ids, vectors = scan(cat.load_table("ns.emb"))
    _, found = index.search(store, "fct", "test", vectors["emb"][:5], 1, 1, directory=store.path("emb.index"))
    np.testing.assert_array_equal(found[:, 0], ids[:5])  # each vector finds itself
    with pytest.raises(LakeError, match="iceberg://ns.nope: no such table in Iceberg catalog 'fct'"):
        fct_dist.backfill(input="iceberg://ns.nope", cfg=cfg)
    with pytest.raises(LakeError, match="expected iceberg://namespace.table"):
        fct_dist.backfill(input="iceberg://stored@x", cfg=cfg)


def add_position_deletes(t, path: str, rows: int) -> None:
    """Commit a position-delete file with plain pyiceberg (0.12 writes none itself: a delete manifest by hand)."""
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat, ManifestContent, ManifestWriterV2
    from pyiceberg.table.snapshots import Operation
    from pyiceberg.table.update.snapshot import _FastAppendFiles
    from pyiceberg.typedef import Record

    class DeleteManifest(ManifestWriterV2):
        def content(self):
            return ManifestContent.DELETES

        @property
        def _meta(self):
            return {**super()._meta, "content": "deletes"}

    class AddDeletes(_FastAppendFiles):
        def new_manifest_writer(self, spec):
            return DeleteManifest(spec, self._transaction.table_metadata.schema(), self.new_manifest_output(),
                                  self._snapshot_id, self._compression)

    size = t.io.new_input(path).__len__()
    f = DataFile.from_args(content=DataFileContent.POSITION_DELETES, file_path=path, file_format=FileFormat.PARQUET,
                           partition=Record(), record_count=rows, file_size_in_bytes=size, spec_id=0)
    with t.transaction() as tx:
        with AddDeletes(Operation.DELETE, tx, t.io) as p:
            p.append_data_file(f)
