"""extract and backfill end to end on a real local Ray, on a local folder and on a moto S3 endpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_dist import lake
from fct_dist.config import Storage
from fct_dist.lake import LakeError
from fct_dist.models import registry
from fct_dist.pipeline import backfill, extract
from fct_dist.storage import open_store

from .conftest import copy_tree


def read_output(store, directory, col="emb"):
    t = lake.read_lake(store, directory, {"id": pa.int64()}).sort_by("id")
    return t["id"].to_numpy(), lake.to_numpy(t[col])


def h_direct(store, name, old, side):
    h, _ = registry.load(store, name)
    with torch.no_grad():
        return h(torch.from_numpy(old), torch.from_numpy(side)).numpy()


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
    stored = lake.read_lake(store, store.path("embeddings", "stored", "test"), {"id": pa.int64()}).sort_by("id")
    ids, emb = read_output(store, store.path("embeddings", "fct", "test"))
    np.testing.assert_array_equal(ids, stored["id"].to_numpy())
    expected = h_direct(store, "fct", lake.to_numpy(stored["old"]), lake.to_numpy(stored["side"]))
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    s = m["summary"]
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (len(ids), len(ids), 0)
    assert s["files"] == len(m["inputs"]) and s["bytes_out"] > 0 and s["rows_per_second"] > 0
    assert m["producer"]["emb"]["version"] == registry.read_meta(store, "fct")["version"]


def test_extract_equals_models_applied_directly(ray_local, stage_store):
    cfg, store = stage_store
    extract.extract(cfg, store, "test", {"old": "old", "side": "side"}, "again")
    ids, x, _ = lake.read_images(store, "test")
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


def test_rerun_of_a_finished_job_writes_nothing(ray_local, trained, capsys):
    cfg, store, _ = trained
    out = store.path("embeddings", "fct", "test")
    before = {p: store.fs.get_file_info(p).mtime for p in store.list(out, ".parquet")}
    m = backfill.backfill(cfg, store, "fct", "test")
    assert "is complete and current: nothing to do" in capsys.readouterr().out
    assert {p: store.fs.get_file_info(p).mtime for p in store.list(out, ".parquet")} == before
    assert m["summary"]["rows_out"] == m["summary"]["rows_in"]


def write_stored(store, directory, files: dict[str, dict], meta: dict) -> None:
    """Stored-lake files {name: {"ids": [...], "old": array, "side": ..., "drop": columns to leave out}}
    carrying h's producers."""
    prod = {"old": {"model": "old", "version": meta["producers"]["old"], "dim": meta["dims"]["old"]},
            "side": {"model": "side", "version": meta["producers"]["side"], "dim": meta["dims"]["side"]}}
    rng = np.random.default_rng(0)
    for name, f in files.items():
        n = len(f["ids"])
        vectors = {c: f.get(c, rng.random((n, meta["dims"][c]), np.float32)) for c in ("old", "side")
                   if c not in f.get("drop", ())}
        lake.write_part(store, f"{directory}/{name}", lake.embedding_table(np.asarray(f["ids"]), vectors, prod))


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


def test_bad_input_fails_by_default_naming_file_and_id(ray_local, trained, local_cfg):
    cfg = local_cfg()
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    directory = bad_lake(store, registry.read_meta(store, "fct"))
    cfg.backfill.input = directory
    with pytest.raises(LakeError, match=r"part-00003.parquet: duplicate ids \[2\] also in an earlier file"):
        backfill.backfill(cfg, store, "fct")
    store.delete(f"{directory}/part-00003.parquet")
    with pytest.raises(Exception) as e:
        backfill.backfill(cfg, store, "fct")
    msg = str(e.value)
    assert any(s in msg for s in ("part-00001.parquet: id 11: NaN/inf in old", "part-00002.parquet: id 21: duplicate id",
                                  "part-00005.parquet: unreadable"))
    assert not store.has_manifest(store.path("embeddings", "fct", "test"))


def test_quarantine_accounts_for_every_row(ray_local, trained, local_cfg):
    cfg = local_cfg("backfill.on_bad_input=quarantine")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    cfg.backfill.input = bad_lake(store, registry.read_meta(store, "fct"))
    m = backfill.backfill(cfg, store, "fct")
    s = m["summary"]
    assert s["rows_in"] == 3 + 3 + 3 + 2 + 0 + 2  # the truncated file's footer is gone: its rows cannot be counted
    assert s["rows_rejected"] == 1 + 1 + 1 + 2  # NaN row, repeated id, id 2 again, the all-inf file
    assert s["rows_out"] + s["rows_rejected"] == s["rows_in"]
    assert s["files_quarantined"] == 1
    (why,) = s["quarantined"].values()
    assert "row count unknown" in why
    ids, _ = read_output(store, store.path("embeddings", "fct", "test"))
    assert sorted(ids) == [0, 1, 2, 10, 12, 20, 21, 30]
    rejected = lake.read_lake(store, store.path("rejected", "fct", "test"), {"id": pa.int64(), "reason": pa.string()})
    reasons = dict(zip(rejected["id"].to_pylist(), rejected["reason"].to_pylist()))
    assert reasons == {11: "NaN/inf in old", 21: "duplicate id (repeated in this file)",
                       2: "duplicate id (kept in an earlier file)", 40: "NaN/inf in old", 41: "NaN/inf in old"}
    empty = lake.read_part(store, store.path("embeddings", "fct", "test", "part-00006.parquet"), {"emb": 16})
    assert empty.num_rows == 0  # a file whose rows were all rejected still has the output schema
    reason = store.read_json(store.path("rejected", "fct", "test", "part-00005.parquet.reason.json"))
    assert "part-00005.parquet" in reason["file"]


def test_wrong_dims_or_producer_fail_before_any_work(ray_local, trained, local_cfg):
    cfg = local_cfg()
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    meta = registry.read_meta(store, "fct")
    wrong = dict(meta, dims=dict(meta["dims"], old=meta["dims"]["old"] + 1))
    write_stored(store, store.path("dims"), {"part-00000.parquet": {"ids": [1, 2]}}, wrong)
    cfg.backfill.input = store.path("dims")
    with pytest.raises(LakeError, match=r"part-00000.parquet: column 'old' has dim 9; expected 8"):
        backfill.backfill(cfg, store, "fct")
    other = dict(meta, producers=dict(meta["producers"], side="0123456789abcdef"))
    write_stored(store, store.path("prod"), {"part-00000.parquet": {"ids": [1, 2]}}, other)
    cfg.backfill.input = store.path("prod")
    with pytest.raises(LakeError, match=r"column 'side' was produced by model version '0123456789abcdef'"):
        backfill.backfill(cfg, store, "fct")
    assert not store.exists(store.path("embeddings", "fct"))


def test_killed_backfill_resumes_exactly_once(trained, tmp_path):
    """Kill the whole `fct backfill` process midway (its Ray dies with it), rerun: one row per id."""
    _, src, _ = trained
    root = tmp_path / "root"
    store = open_store(Storage(root=str(root)))
    copy_tree(src, store, "models")
    meta = registry.read_meta(store, "fct")
    write_stored(store, store.path("big"), {lake.part_name(i): {"ids": list(range(i * 3000, (i + 1) * 3000))}
                                            for i in range(40)}, meta)
    args = [sys.executable, "-m", "fct_dist.cli", "backfill", "--preset", "tiny", "--set", f"storage.root={root}",
            "--set", f"backfill.input={store.path('big')}", "--set", "backfill.batch_size=16",
            "--set", "backfill.num_actors=1"]
    out = store.path("embeddings", "fct", "test")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.list(out, ".parquet")) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(store.list(out, ".parquet"))
    assert 3 <= done < 40 and not store.has_manifest(out), "the kill did not land midway"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming: {done}" in rerun.stdout or "resuming:" in rerun.stdout
    ids, _ = read_output(store, out)
    assert len(ids) == 40 * 3000 and len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(ids, np.arange(40 * 3000))
    m = store.manifest(out)
    assert m["summary"]["rows_in"] == m["summary"]["rows_out"] == 40 * 3000
    assert json.dumps(m).count("rows_in") == 41  # one per file + the summary


def test_undecodable_image_is_quarantined_by_id(ray_local, trained, local_cfg):
    cfg = local_cfg("extract.on_bad_input=quarantine")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    src = trained[1]
    good = src.list(src.path("images", "test"), ".parquet")[0]
    table = lake.read_part(src, good, {"id": pa.int64()})
    images = table["image"].to_pylist()
    images[3] = b"\x89PNG broken"
    lake.write_image_split(store, "test", table["id"].to_numpy(), images, table["label"].to_numpy(), 1000, {})
    m = extract.extract(cfg, store, "test", {"old": "old"}, "probe")
    assert (m["summary"]["rows_in"], m["summary"]["rows_out"], m["summary"]["rows_rejected"]) == (100, 99, 1)
    rejected = lake.read_lake(store, store.path("rejected", "probe", "test"), {"id": pa.int64(), "reason": pa.string()})
    assert rejected["id"].to_pylist() == [int(table["id"][3])]
    assert rejected["reason"][0].as_py().startswith("image does not decode")
