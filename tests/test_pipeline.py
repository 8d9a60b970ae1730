"""extract and backfill end to end on trained models: through a real local Ray on a local folder and
on a moto S3 endpoint; bad input, quarantine and a killed driver on the local distributor."""
from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_dist import currency, image_lake, lake
from fct_dist.config import Storage
from fct_dist.lake import LakeError
from fct_dist.models import registry
from fct_dist.pipeline import backfill, extract
from fct_dist.storage import open_store

from .support import copy_tree, expected_backfill, id_lake, make_cfg, read_output, write_stored, output_of
from .harness.kill import kill_session


@pytest.fixture
def stage_store(trained, any_cfg):
    """A fresh root (local or S3) holding the trained models and the stored lake of the session."""
    _, src, _ = trained
    cfg = any_cfg("backfill.num_actors=2", "extract.num_actors=2")
    store = open_store(cfg.storage)
    for part in ("models", "images", "embeddings/stored"):
        copy_tree(src, store, part)
    return cfg, store


def test_backfill_equals_h_applied_directly(ray_local, stage_store):
    cfg, store = stage_store
    m = backfill.backfill(cfg, store, "fct", "test")
    ids, emb = read_output(store, store.path("embeddings", "fct", "test"))
    want_ids, want = expected_backfill(store, "fct", store.path("embeddings", "stored", "test"))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(emb, want, atol=1e-5)
    s = m["summary"]
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (len(ids), len(ids), 0)
    inputs = [p.rsplit("/", 1)[1] for p in store.list(store.path("embeddings", "stored", "test"), ".parquet")]
    assert sorted(output_of(m)) == inputs and [e["path"] for e in m["files"]] == list(output_of(m).values())
    assert s["files"] == len(m["files"]) and s["bytes_out"] > 0 and s["rows_per_second"] > 0
    assert m["producer"]["emb"]["version"] == registry.read_meta(store, "fct")["version"]


def test_extract_equals_models_applied_directly(ray_local, stage_store):
    cfg, store = stage_store
    extract.extract(cfg, store, "test", {"old": "old", "side": "side"}, "again")
    ids, x, _ = image_lake.read_images(store, "test")
    out = lake.read_lake(store, store.path("embeddings", "again", "test"), {"id": pa.int64()}).sort_by("id")
    np.testing.assert_array_equal(out["id"].to_numpy(), np.sort(ids))
    order = np.argsort(ids)
    for col in ("old", "side"):
        module, meta = registry.load(store, col)
        with torch.no_grad():
            direct = registry.embedder(meta["kind"], module)(torch.from_numpy(x[order])).numpy()
        np.testing.assert_allclose(lake.to_numpy(out[col]), direct, atol=1e-5)


def test_output_is_readable_without_ray(trained):
    """Plain pyarrow in a fresh interpreter: fixed_size_list<float32>[d] vectors, no Ray imported."""
    _, store, _ = trained
    path = store.list(store.path("embeddings", "fct", "test"), ".parquet")[0]
    code = ("import sys, pyarrow.parquet as pq; t = pq.read_table(sys.argv[1]); "
            "print(t.schema.field('emb').type, t.num_rows, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["fixed_size_list<element:", "float>[16]", "100", "False"]


def bad_lake(store, meta):
    d_old = meta["dims"]["old"]
    nan = np.ones((3, d_old), np.float32)
    nan[1, 0] = np.nan
    directory = store.path("bad", "stored")
    write_stored(store, directory, {
        "part-00000.parquet": {"ids": [0, 1, 2]},
        "part-00001.parquet": {"ids": [10, 11, 12], "old": nan},  # id 11 has a NaN
        "part-00002.parquet": {"ids": [20, 21, 21]},  # 21 repeated in the file
        "part-00003.parquet": {"ids": [2, 30]},  # 2 also in part-00000
        "part-00004.parquet": {"ids": []},  # zero rows
        "part-00006.parquet": {"ids": [40, 41], "old": np.full((2, d_old), np.inf, np.float32)},  # all bad
    }, meta)
    good = store.read_bytes(f"{directory}/part-00000.parquet")
    store.write_bytes(f"{directory}/part-00005.parquet", good[: len(good) // 2])  # truncated
    return directory


def test_quarantine_accounts_for_every_row(trained, local_cfg, caplog):
    cfg = local_cfg("backfill.on_bad_input=quarantine", "backfill.distributor=local")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    stored = bad_lake(store, registry.read_meta(store, "fct"))
    with caplog.at_level("INFO", logger="fct_dist"):
        m = backfill.backfill(cfg, store, "fct", input=store.uri(stored))
    s = m["summary"]
    assert s["rows_in"] == 3 + 3 + 3 + 2 + 0 + 2  # rows of the files whose row count is known
    assert s["rows_rejected"] == 1 + 1 + 1 + 2  # NaN row, repeated id, id 2 again, the all-inf file
    assert s["rows_out"] + s["rows_rejected"] == s["rows_in"]
    truncated = store.uri(f"{stored}/part-00005.parquet")
    assert s["files_quarantined"] == 1 and s["rows_unknown_files"] == [truncated]  # its footer is gone
    (why,) = s["quarantined"].values()
    assert "row count unknown" in why
    (entry,) = [r for r in m["per_file"] if r["output"] == output_of(m)["part-00005.parquet"]]
    assert entry["rows_in"] is None and entry["rows_rejected"] is None
    assert "rows of 1 quarantined files unknown" in caplog.text
    ids, _ = read_output(store, store.path("embeddings", "fct", "test"))
    assert sorted(ids) == [0, 1, 2, 10, 12, 20, 21, 30]
    rejected = lake.read_lake(store, store.path("rejected", "fct", "test"), {"id": pa.int64(), "reason": pa.string()})
    reasons = dict(zip(rejected["id"].to_pylist(), rejected["reason"].to_pylist()))
    assert reasons == {11: "NaN/inf in old", 21: "duplicate id (repeated in this file)",
                       2: "duplicate id (kept in another file)", 40: "NaN/inf in old", 41: "NaN/inf in old"}
    empty = lake.read_part(store, store.path("embeddings", "fct", "test", output_of(m)["part-00006.parquet"]), {"emb": 16})
    assert empty.num_rows == 0  # a file whose rows were all rejected still has the output schema
    why = output_of(m)["part-00005.parquet"].removesuffix(".parquet") + ".reason.json"
    assert why in m["rejected_files"]
    reason = store.read_json(store.path("rejected", "fct", "test", why))
    assert "part-00005.parquet" in reason["file"]


def test_wrong_dims_or_producer_fail_before_any_work(trained, local_cfg):
    cfg = local_cfg("backfill.distributor=local")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    meta = registry.read_meta(store, "fct")
    wrong = dict(meta, dims=dict(meta["dims"], old=meta["dims"]["old"] + 1))
    write_stored(store, store.path("dims"), {"part-00000.parquet": {"ids": [1, 2]}}, wrong)
    with pytest.raises(LakeError, match=r"part-00000.parquet: column 'old' has dim 9; expected 8"):
        backfill.backfill(cfg, store, "fct", input=store.uri(store.path("dims")))
    other = dict(meta, producers=dict(meta["producers"], side="0123456789abcdef"))
    write_stored(store, store.path("prod"), {"part-00000.parquet": {"ids": [1, 2]}}, other)
    with pytest.raises(LakeError, match=r"column 'side' holds embeddings of model version '0123456789abcdef'"):
        backfill.backfill(cfg, store, "fct", input=store.uri(store.path("prod")))
    out = store.path("embeddings", "fct", "test")
    assert not store.list(out, ".parquet") and not currency.has_manifest(store, out)


def test_killed_backfill_resumes_exactly_once(ray_local, trained, tmp_path, caplog):
    """Kill the whole `fct backfill` process midway (its Ray dies with it), rerun (in this process, on the
    session's Ray): one row per id, each with h(old, side), and the rerun maps only what was not done."""
    _, src, _ = trained
    root = tmp_path / "root"
    store = open_store(Storage(root=str(root)))
    copy_tree(src, store, "models")
    id_lake(store, store.path("big"), registry.read_meta(store, "fct"), files=40, rows_per_file=3000)
    args = [sys.executable, "-m", "fct_dist.cli", "backfill", "--preset", "tiny", "--set", f"storage.root={root}",
            "--input", store.path("big"), "--set", "backfill.num_actors=1"]
    out = store.path("embeddings", "fct", "test")
    proc = subprocess.Popen([*args, "--set", "backfill.batch_size=16"], stdout=subprocess.DEVNULL,  # slow: killed midway
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.list(out, ".parquet")) < 3:
        time.sleep(0.2)
    kill_session(proc)
    done = len(store.list(out, ".parquet"))
    assert 3 <= done < 40 and not currency.has_manifest(store, out), "the kill did not land midway"
    caplog.set_level(logging.INFO, logger="fct_dist")
    backfill.backfill(make_cfg(str(root), "backfill.num_actors=1"), store, "fct", input=store.path("big"))
    assert f"resuming: {done} of 40 files already done" in caplog.text
    ids, emb = read_output(store, out)
    want_ids, want = expected_backfill(store, "fct", store.path("big"))
    np.testing.assert_array_equal(ids, want_ids)  # sorted and equal: every id exactly once
    np.testing.assert_allclose(emb, want, atol=1e-5)
    m = currency.manifest(store, out)
    assert m["summary"]["rows_in"] == m["summary"]["rows_out"] == 40 * 3000
    assert m["summary"]["files_mapped_this_run"] == 40 - done


def test_undecodable_image_is_quarantined_by_id(trained, local_cfg):
    cfg = local_cfg("extract.on_bad_input=quarantine", "extract.distributor=local")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    src = trained[1]
    good = src.list(src.path("images", "test"), ".parquet")[0]
    table = lake.read_part(src, good, {"id": pa.int64()})
    images = table["image"].to_pylist()
    images[3] = b"\x89PNG broken"
    image_lake.write_image_split(store, "test", table["id"].to_numpy(), images, table["label"].to_numpy(), 1000, {}, "test")
    m = extract.extract(cfg, store, "test", {"old": "old"}, "probe")
    assert (m["summary"]["rows_in"], m["summary"]["rows_out"], m["summary"]["rows_rejected"]) == (100, 99, 1)
    rejected = lake.read_lake(store, store.path("rejected", "probe", "test"), {"id": pa.int64(), "reason": pa.string()})
    assert rejected["id"].to_pylist() == [int(table["id"][3])]
    assert rejected["reason"][0].as_py().startswith("image does not decode")
