"""Lakes as snapshots: a paused (zombie) writer never touches a lake another run finished, the commit is
one compare-and-swap, GC keeps the previous generation and young files; and the row-level promises:
each id's first valid copy survives, a quarantined file owns no id, hive folders are read, a run never
writes into its own input, a lease survives a shared host name and a damaged lease file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fct_dist import currency, lake, layout, snapshots
from fct_dist.lake import LakeError
from fct_dist.lease import LEASE, Lease, LeaseHeld, machine
from fct_dist.pipeline import backfill
from fct_dist.layout import MANIFEST
from fct_dist.storage import open_store

from .support import LOCAL, cli, committed, expected_backfill, h_direct, holder, id_lake, output_of, read_output, tiny_transformations, write_stored
from .harness.kill import processes, wait_for_files


def out_dir(store):
    return layout.embeddings(store, "fct", "test")


@pytest.mark.parametrize("where,paused", [("local", "driver"), ("s3", "driver"), ("local", "actor")])
def test_a_paused_writer_never_touches_the_lake_another_run_finished(where, paused, request):
    """Run A (model fct) is SIGSTOPped mid-run past its lease (with `actor`: its Ray actor too); run B
    (fct-b) takes the lease over and commits; A resumes and finishes the file it was writing. The lake
    must stay byte for byte what B committed, A must fail naming the lost lease, and a rerun must verify
    the files before calling the lake current."""
    cfg = request.getfixturevalue(f"{where}_cfg")()  # the local cases start no moto
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    files = 12
    id_lake(store, store.path("in"), meta, files=files, rows_per_file=2000)
    endpoint = request.getfixturevalue("s3_endpoint") if where == "s3" else None
    common = ("--input", store.uri(store.path("in")), "--output", store.uri(out_dir(store)),
              "--set", "backfill.lease_seconds=2", "--set", "backfill.gc_grace_seconds=600")
    zombie_args = [*common, "--set", "backfill.batch_size=16", "--model", "fct"]
    if paused == "actor":
        zombie_args += ["--set", "backfill.distributor=ray", "--set", "backfill.num_actors=1"]
    zombie = subprocess.Popen(cli(cfg.storage.root, *zombie_args, endpoint=endpoint), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        at_pause = wait_for_files(store, out_dir(store), 1, lambda: zombie.poll() is None)
        stopped = [psutil.Process(zombie.pid)]
        if paused == "actor":
            stopped = processes("RayFileWorker", stopped[0]) + stopped
            assert len(stopped) == 2, "no Ray actor to pause"
        for p in stopped:
            p.send_signal(signal.SIGSTOP)
        assert 1 <= at_pause < files, f"the pause did not land mid-run ({at_pause} of {files} files written)"
        time.sleep(3)  # past the 2 s lease
        second = subprocess.run(cli(cfg.storage.root, *common, "--model", "fct-b", endpoint=endpoint),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-2000:]
        finished = committed(store, out_dir(store))
        before_resume = len(store.list(out_dir(store), ".parquet"))
        for p in stopped:  # the actor first: it finishes its file while its driver still sleeps
            p.send_signal(signal.SIGCONT)
            time.sleep(2)
        _, err = zombie.communicate(timeout=300)
    finally:
        if zombie.poll() is None:
            os.killpg(zombie.pid, signal.SIGKILL)
    assert zombie.returncode == 2 and "this run's lease was taken over by" in err, err[-2000:]
    assert len(store.list(out_dir(store), ".parquet")) > before_resume, "the zombie wrote nothing after it resumed"
    assert committed(store, out_dir(store)) == finished
    assert_backfilled(store, "fct-b")
    again = subprocess.run(cli(cfg.storage.root, *common, "--model", "fct-b", endpoint=endpoint),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "complete and current: nothing to do" in again.stderr, again.stderr[-2000:]
    assert committed(store, out_dir(store)) == finished
    victim = currency.manifest(store, out_dir(store))["files"][3]["path"]  # a damaged finished lake is named and repaired
    store.delete(f"{out_dir(store)}/{victim}")
    repair = subprocess.run(cli(cfg.storage.root, *common, "--model", "fct-b", endpoint=endpoint),
                            capture_output=True, text=True, timeout=300)
    assert repair.returncode == 0 and f"{victim} is missing" in repair.stderr, repair.stderr[-2000:]
    m = currency.manifest(store, out_dir(store))
    assert m["summary"]["files_mapped_this_run"] == 1 and m["generation"] == json.loads(finished[MANIFEST])["generation"] + 1
    assert_backfilled(store, "fct-b")


def assert_backfilled(store, h_name: str, stored: str | None = None) -> None:
    ids, emb = read_output(store, out_dir(store))
    want_ids, want = expected_backfill(store, h_name, stored or store.path("in"))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_a_commit_from_a_stale_generation_commits_nothing(any_cfg):
    """Two runs that started from the same generation: the second commit fails and the first stays."""
    store = open_store(any_cfg().storage)
    d = store.path("lake")
    first = snapshots.commit(store, d, snapshots.base(store, d), "k1", {"files": []})
    a, b = snapshots.base(store, d), snapshots.base(store, d)
    snapshots.commit(store, d, a, "k2", {"files": [], "who": "a"})
    with pytest.raises(snapshots.SnapshotMoved, match=r"started from generation 1; generation 2 was committed"):
        snapshots.commit(store, d, b, "k3", {"files": [], "who": "b"})
    m = currency.manifest(store, d)
    assert (m["generation"], m["who"], m["key"]) == (2, "a", "k2") and first["generation"] == 1
    assert store.read_json(store.path("lake", "_snapshots", "00000001.json"))["key"] == "k1"


def test_a_lease_on_this_host_name_in_another_pid_namespace_is_not_stolen(any_cfg):
    """Containers sharing a host name: a pid invisible here proves nothing; only the heartbeat counts."""
    store = open_store(any_cfg().storage)
    folder, path = store.path("out"), store.path("out", LEASE)
    gone = subprocess.Popen(["true"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    here = machine()
    assert {"host", "boot_id", "pid_ns"} <= set(here), "this test needs Linux's boot id and pid namespace"
    store.write_if(path, holder(**here | {"pid_ns": "pid:[1]"}, pid=gone.pid, pid_started=started), None)
    with pytest.raises(LeaseHeld, match=f"is being written by another run: pid {gone.pid} on {here['host']}"):
        Lease(store, folder, 30).acquire()
    _, v = store.read_versioned(path)
    store.write_if(path, holder(**here, pid=gone.pid, pid_started=started), v)  # same namespace: provably gone
    Lease(store, folder, 30).acquire().release()
    assert store.read_versioned(path) == (None, None)


@pytest.mark.parametrize("content", [b"", b'{"token": "abc", "host": "h'])
def test_an_empty_or_truncated_lease_file_is_taken_over(any_cfg, content, caplog):
    store = open_store(any_cfg().storage)
    folder, path = store.path("out"), store.path("out", LEASE)
    store.write_bytes(path, content)
    with caplog.at_level("WARNING", logger="fct_dist"):
        lease = Lease(store, folder, 30).acquire()
    assert "it is empty or truncated" in caplog.text and f"{store.uri(path)}" in caplog.text
    assert json.loads(store.read_versioned(path)[0])["token"] == lease.record["token"]
    lease.release()


@pytest.mark.parametrize("output", ["in", "in/sub", "."])
def test_an_output_overlapping_the_input_is_refused_before_anything_is_touched(local_cfg, output):
    cfg = local_cfg(*LOCAL)
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    id_lake(store, store.path("in"), meta, files=2, rows_per_file=10)
    before = store.list_versions(store.root, recursive=True)
    with pytest.raises(LakeError, match=r"a run must never write into the lake it reads"):
        backfill.backfill(cfg, store, input=store.uri(store.path("in")), output=store.path(output))
    assert store.list_versions(store.root, recursive=True) == before


def rows(summary: dict) -> tuple[int, int, int]:
    return summary["rows_in"], summary["rows_out"], summary["rows_rejected"]


def test_an_id_is_kept_in_its_first_valid_copy(any_cfg):
    """Id 2's first copy (in the file) and id 5's (across files) are NaN; their later copies are valid."""
    cfg = any_cfg(*LOCAL, "backfill.on_bad_input=quarantine")
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    rng = np.random.default_rng(0)
    a_old, b_old = rng.random((5, 8), np.float32), rng.random((3, 8), np.float32)
    a_old[1] = np.nan  # id 2, first copy
    a_old[3] = np.nan  # id 5, the copy in the first file
    side_a, side_b = rng.random((5, 8), np.float32), rng.random((3, 8), np.float32)
    write_stored(store, store.path("in"), {"part-0.parquet": {"ids": [1, 2, 2, 5, 3], "old": a_old, "side": side_a},
                                           "part-1.parquet": {"ids": [5, 6, 4], "old": b_old, "side": side_b}}, meta)
    m = backfill.backfill(cfg, store, input=store.uri(store.path("in")))
    assert rows(m["summary"]) == (8, 6, 2)
    ids, emb = read_output(store, out_dir(store))
    np.testing.assert_array_equal(ids, [1, 2, 3, 4, 5, 6])
    old = np.stack([a_old[0], a_old[2], a_old[4], b_old[2], b_old[0], b_old[1]])
    side = np.stack([side_a[0], side_a[2], side_a[4], side_b[2], side_b[0], side_b[1]])
    np.testing.assert_allclose(emb, h_direct(store, "fct", old, side), atol=1e-5)
    rejected = lake.read_lake(store, layout.rejected(store, "fct", "test"), {"id": pa.int64(), "reason": pa.string()})
    assert sorted(zip(rejected["id"].to_pylist(), rejected["reason"].to_pylist())) == [
        (2, "NaN/inf in old"), (5, "NaN/inf in old")]


def corrupt_page(store, path: str, column: str) -> None:
    """Overwrite the first page header of `column` in a Parquet file (its footer stays readable)."""
    data = bytearray(store.read_bytes(path))
    md = pq.read_metadata(pa.BufferReader(bytes(data)))
    off = md.row_group(0).column(md.schema.to_arrow_schema().get_field_index(column)).data_page_offset
    data[off:off + 12] = b"\xff" * 12
    store.write_bytes(path, bytes(data))


@pytest.mark.parametrize("column", ["id", "old"])
def test_a_file_whose_pages_do_not_decode_is_quarantined_and_owns_no_id(local_cfg, column):
    """part-0 holds ids 1-3 and a page of `column` that does not decode; part-1 holds 3 and 4. The job
    goes on (quarantine), part-0 is set aside with its reason, and id 3 is kept from part-1."""
    cfg = local_cfg(*LOCAL, "backfill.on_bad_input=quarantine")
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    write_stored(store, store.path("in"), {"part-0.parquet": {"ids": [1, 2, 3]}, "part-1.parquet": {"ids": [3, 4]}}, meta)
    corrupt_page(store, store.path("in", "part-0.parquet"), column)
    m = backfill.backfill(cfg, store, input=store.uri(store.path("in")))
    assert rows(m["summary"]) == (5, 2, 3) and m["summary"]["files_quarantined"] == 1
    (why,) = m["summary"]["quarantined"].values()
    assert "part-0.parquet: not a readable Parquet file" in why
    part1 = store.path("in", "part-1.parquet")
    ids, emb = read_output(store, out_dir(store))
    np.testing.assert_array_equal(ids, [3, 4])
    t = lake.read_part(store, part1, {"id": pa.int64()})
    np.testing.assert_allclose(emb, h_direct(store, "fct", lake.to_numpy(t["old"]), lake.to_numpy(t["side"])), atol=1e-5)


def test_a_hive_partitioned_lake_is_read_whole(any_cfg):
    """Spark's layout: part=K/ folders, a _SUCCESS marker and a _temporary/ folder of a writer in flight."""
    cfg = any_cfg(*LOCAL)
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    write_stored(store, store.path("in"), {"part=0/a.parquet": {"ids": [1, 2]}, "part=1/b.parquet": {"ids": [3]},
                                           "part=1/c.parquet": {"ids": [4, 5]},
                                           "_temporary/0/d.parquet": {"ids": [1]}}, meta)
    store.write_bytes(store.path("in", "_SUCCESS"), b"")
    m = backfill.backfill(cfg, store, input=store.uri(store.path("in")))
    assert rows(m["summary"]) == (5, 5, 0)
    assert sorted(e["path"].split(".")[0] for e in m["files"]) == ["part=0/a", "part=1/b", "part=1/c"]
    ids, emb = read_output(store, out_dir(store))
    np.testing.assert_array_equal(ids, [1, 2, 3, 4, 5])
    t = pa.concat_tables([lake.read_part(store, store.path("in", p), {"id": pa.int64()})
                          for p in ("part=0/a.parquet", "part=1/b.parquet", "part=1/c.parquet")])
    np.testing.assert_allclose(emb, h_direct(store, "fct", lake.to_numpy(t["old"]), lake.to_numpy(t["side"])), atol=1e-5)


def test_gc_keeps_the_previous_generation_and_young_files(any_cfg):
    """Generations 1 (fct), 2 (fct-b), 3 (fct, one input rewritten: two outputs of 1 adopted). gc keeps
    what 3 and 2 list and anything younger than the grace; with no grace it removes 1's orphan, a
    zombie's file, a killed writer's temp file and 1's snapshot record."""
    cfg = any_cfg(*LOCAL)
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    d = out_dir(store)
    id_lake(store, store.path("in"), meta, files=3, rows_per_file=10)
    run = lambda model: backfill.backfill(cfg, store, model, input=store.uri(store.path("in")), output=store.uri(d))
    g1, g2 = run("fct"), run("fct-b")
    write_stored(store, store.path("in"), {"part-00001.parquet": {"ids": list(range(10, 20))}}, meta, seed=5)
    g3 = run("fct")
    assert g3["summary"]["files_mapped_this_run"] == 1 and g3["generation"] == 3
    orphan = output_of(g1)["part-00001.parquet"]
    store.write_bytes(f"{d}/part-00000.zombie-1.parquet", b"x")
    store.write_bytes(f"{d}/.part-00000.parquet.dead.tmp", b"x")
    listed = {e["path"] for g in (g2, g3) for e in g["files"]}
    assert orphan not in listed and store.exists(f"{d}/{orphan}")
    young = snapshots.collect(store, d, grace_seconds=3600, lease_seconds=30)
    assert young["deleted"] == 0 and young["kept_young"] == 3
    c = snapshots.collect(store, d, grace_seconds=0, lease_seconds=30)
    assert c["deleted"] == 3
    left = {snapshots.relative(d, i.path) for i in store.list_info(d, hidden=True, recursive=True)}
    assert {n for n in left if not n.startswith("_")} == listed
    assert not store.exists(f"{d}/_snapshots/00000001.json") and store.exists(f"{d}/_snapshots/00000002.json")
    assert_backfilled(store, "fct")


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is needed to see the system calls")
def test_local_outputs_are_fsynced_before_their_rename_and_the_folder_after(local_cfg):
    """A power loss after a commit must not leave a committed name pointing at bytes still in the page cache."""
    cfg = local_cfg()
    store = open_store(cfg.storage)
    id_lake(store, store.path("in"), tiny_transformations(store), files=2, rows_per_file=10)
    trace = store.path("trace.txt")
    r = subprocess.run(["strace", "-f", "-qq", "-y", "-o", trace, "-e", "trace=fsync,rename,renameat,renameat2",
                        *cli(cfg.storage.root, "--input", store.uri(store.path("in")))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = open(trace).read().splitlines()  # -y: each fd printed with its path, fsync(7</path/to/file>)
    for name in [e["path"] for e in currency.manifest(store, out_dir(store))["files"]] + [MANIFEST]:
        final = f"{out_dir(store)}/{name}"
        (k,) = [k for k, c in enumerate(calls) if "rename" in c and f'"{final}"' in c]
        tmp = calls[k].split('"')[1]
        assert any("fsync(" in c and f"<{tmp}>" in c for c in calls[:k]), f"{name}: not fsynced before its rename"
        assert any("fsync(" in c and f"<{out_dir(store)}>" in c for c in calls[k:]), \
            f"{name}: its folder was not fsynced after the rename"
