"""The per-file engine's promises: outputs adopted only for the input and producer they came from,
one writer per output folder, storage faults that stop the job, honest row accounting, bounded
retries of a poison file (the snapshot commit and GC: test_snapshots.py). Most run on the local distributor; those about lost
workers run on Ray."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from fct_dist import currency, lake, layout
from fct_dist.lake import LakeError
from fct_dist.lease import LEASE, Lease, LeaseHeld, LeaseLost, machine
from fct_dist.pipeline import backfill, distribute, filemap
from fct_dist.pipeline.filejob import InputChanged
from fct_dist.storage import Conflict, StorageError, open_store

from .harness.faultproxy import FaultProxy
from .support import LOCAL, cli, expected_backfill, holder, id_lake, make_cfg, output_of, read_output, tiny_transformations, write_stored



@pytest.fixture
def engine(any_cfg):
    """(cfg, store, meta): random-weight transformations fct and fct-b; the stored lake goes to in/."""
    cfg = any_cfg(*LOCAL)
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    return cfg, store, meta


def out_dir(store):
    return layout.embeddings(store, "fct", "test")


def backfill_in(cfg, store, h_name: str = "fct", **kw) -> dict:
    """Backfill in/ (the stored lake of these tests) with models/{h_name}."""
    return backfill.backfill(cfg, store, h_name, "test", input=store.uri(store.path("in")), **kw)


def assert_backfilled(store, h_name: str, stored: str, out: str) -> None:
    """The output holds every stored id once, with h(old, side) as its vector."""
    ids, emb = read_output(store, out)
    want_ids, want = expected_backfill(store, h_name, stored)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_an_input_rewritten_after_it_was_mapped_commits_nothing_and_the_rerun_is_exact(engine):
    """An input file rewritten mid-run (same ids and size, other vectors) after this run mapped it: the
    commit's check finds it changed and nothing is committed; the rerun backfills the new content. Without
    the check the old vectors would be committed as the lake of the new input."""
    cfg, store, meta = engine
    files, rows = 20, 2000
    id_lake(store, store.path("in"), meta, files=files, rows_per_file=rows)
    cfg.backfill.batch_size, errors = 16, []
    run = threading.Thread(target=lambda: errors.append(pytest.raises(InputChanged, backfill_in, cfg, store)))
    run.start()
    deadline = time.time() + 60
    while time.time() < deadline and not store.list(out_dir(store), ".parquet"):
        time.sleep(0.05)
    done = store.list(out_dir(store), ".parquet")
    k = int(done[0].rsplit("/", 1)[1].split(".")[0].removeprefix("part-"))  # the input behind the first output
    before = store.read_bytes(store.path("in", lake.part_name(k)))
    write_stored(store, store.path("in"), {lake.part_name(k): {"ids": list(range(k * rows, (k + 1) * rows))}}, meta,
                 seed=1)
    changed = store.read_bytes(store.path("in", lake.part_name(k)))
    assert len(changed) == len(before) and changed != before
    run.join(timeout=300)
    assert len(done) < files, "the rewrite did not land mid-run"
    assert errors and lake.part_name(k) in str(errors[0].value) and "nothing was committed" in str(errors[0].value)
    assert not currency.has_manifest(store, out_dir(store))
    backfill_in(cfg, store)
    assert_backfilled(store, "fct", store.path("in"), out_dir(store))  # h of the rewritten file's vectors


def test_a_lake_regenerated_under_the_same_names_is_mapped_again(engine):
    cfg, store, meta = engine
    id_lake(store, store.path("in"), meta, files=3, rows_per_file=50)
    backfill_in(cfg, store)
    store.delete(store.path("in"))  # other ids under the same names, and one file fewer
    id_lake(store, store.path("in"), meta, files=2, rows_per_file=50, seed=1, first_id=1000)
    first = currency.manifest(store, out_dir(store))
    m = backfill_in(cfg, store)
    assert_backfilled(store, "fct", store.path("in"), out_dir(store))
    assert sorted(output_of(m)) == ["part-00000.parquet", "part-00001.parquet"] and len(m["files"]) == 2
    assert not {e["path"] for e in m["files"]} & {e["path"] for e in first["files"]}  # new names, nothing reused
    assert m["summary"]["files_mapped_this_run"] == 2 and m["generation"] == first["generation"] + 1
    # the same ids and sizes, other vectors: size and names alone cannot tell, the footer and mtime can
    before = store.fs.get_file_info(f"{store.path('in')}/part-00001.parquet").size
    write_stored(store, store.path("in"), {"part-00001.parquet": {"ids": list(range(1050, 1100))}}, meta, seed=7)
    assert store.fs.get_file_info(f"{store.path('in')}/part-00001.parquet").size == before
    m = backfill_in(cfg, store)
    assert m["summary"]["files_mapped_this_run"] == 1
    assert_backfilled(store, "fct", store.path("in"), out_dir(store))


def test_readers_of_a_finished_lake_read_the_files_its_manifest_lists(engine):
    cfg, store, meta = engine
    id_lake(store, store.path("in"), meta, files=2, rows_per_file=10)
    backfill_in(cfg, store)
    write_stored(store, out_dir(store), {"part-99999.parquet": {"ids": [5]}}, meta)  # a stray file, not committed
    ids, _ = read_output(store, out_dir(store))  # id 5 twice would raise here
    np.testing.assert_array_equal(ids, np.arange(20))


def test_outputs_of_another_model_version_are_replaced(engine):
    cfg, store, meta = engine
    id_lake(store, store.path("in"), meta, files=3, rows_per_file=20)
    backfill_in(cfg, store, "fct-b", output=store.uri(out_dir(store)))
    m = backfill_in(cfg, store, "fct", output=store.uri(out_dir(store)))
    assert m["summary"]["files_mapped_this_run"] == 3
    assert_backfilled(store, "fct", store.path("in"), out_dir(store))
    assert {lake.producer_of(lake.read_schema(store, p))["emb"]["model"] for p in lake.parts(store, out_dir(store))} == {"fct"}


def test_rerun_of_a_finished_job_writes_nothing(engine, caplog):
    cfg, store, meta = engine
    id_lake(store, store.path("in"), meta, files=2, rows_per_file=20)
    backfill_in(cfg, store)
    before = {i.path: i.mtime_ns for i in store.list_info(out_dir(store), hidden=True)}
    with caplog.at_level("INFO", logger="fct_dist"):
        backfill_in(cfg, store)
    assert "is complete and current: nothing to do" in caplog.text
    assert {i.path: i.mtime_ns for i in store.list_info(out_dir(store), hidden=True)} == before


def test_a_second_run_on_the_same_output_fails_fast_naming_the_first(local_cfg):
    cfg = local_cfg()
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    id_lake(store, store.path("in"), meta, files=30, rows_per_file=2000)
    common = ("--input", store.uri(store.path("in")), "--output", store.uri(out_dir(store)), "--set", "backfill.batch_size=16")
    first = subprocess.Popen(cli(cfg.storage.root, *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not store.list(out_dir(store), ".parquet"):
        time.sleep(0.05)
    assert first.poll() is None and store.list(out_dir(store), ".parquet"), "the first run is not mapping yet"
    t0 = time.time()
    second = subprocess.run(cli(cfg.storage.root, *common) + ["--model", "fct-b"], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 2 and time.time() - t0 < 30, second.stderr[-2000:]
    assert f"is being written by another run: pid {first.pid} on" in second.stderr, second.stderr[-2000:]
    assert first.poll() is None, "the first run must still be running when the second one gave up"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert_backfilled(store, "fct", store.path("in"), out_dir(store))
    again = subprocess.run(cli(cfg.storage.root, *common) + ["--model", "fct-b"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_backfilled(store, "fct-b", store.path("in"), out_dir(store))
    assert not store.exists(f"{out_dir(store)}/{LEASE}")


def test_a_live_lease_is_refused_and_a_stale_one_taken_over(any_cfg):
    store = open_store(any_cfg().storage)
    folder, path = store.path("out"), store.path("out", LEASE)
    store.write_if(path, holder(), None)
    with pytest.raises(LeaseHeld, match=r"is being written by another run: pid 1 on elsewhere \(fct backfill"):
        Lease(store, folder, 30).acquire()
    _, v = store.read_versioned(path)
    store.write_if(path, holder(heartbeat=time.time() - 60), v)  # stopped heartbeating 60 s ago, ttl 30
    lease = Lease(store, folder, 30).acquire()
    assert json.loads(store.read_versioned(path)[0])["token"] == lease.record["token"]
    lease.release()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a holder on this machine whose process ended
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    store.write_if(path, holder(**machine(), pid=gone.pid, pid_started=started), None)
    Lease(store, folder, 30).acquire().release()
    assert store.read_versioned(path) == (None, None)


def test_conditional_writes_let_one_of_two_writers_win(any_cfg):
    store = open_store(any_cfg().storage)
    path = store.path("x", "obj.json")
    v0 = store.write_if(path, b"a", None)
    with pytest.raises(Conflict):
        store.write_if(path, b"b", None)
    v1 = store.write_if(path, b"c", v0)
    with pytest.raises(Conflict):  # a second writer that read v0 too
        store.write_if(path, b"d", v0)
    assert store.read_versioned(path) == (b"c", v1)


def test_conditional_writes_at_once_let_exactly_one_writer_win(any_cfg):
    """Eight writers that all read the same version write at the same moment, for several rounds: one wins
    each round (its bytes are what is there after), the others get Conflict. A read-compare-write without
    the lock (or an unconditional PUT) lets several win."""
    store = open_store(any_cfg().storage)
    path = store.path("x", "race.json")
    version = store.write_if(path, b"start", None)
    for r in range(5):
        start, results = threading.Barrier(8), [None] * 8

        def write(i: int) -> None:
            start.wait()
            try:
                results[i] = store.write_if(path, f"round {r} writer {i}".encode(), version)
            except Conflict:
                results[i] = "conflict"
        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [i for i, v in enumerate(results) if v != "conflict"]
        assert len(won) == 1, (r, results)
        version = results[won[0]]
        assert store.read_versioned(path) == (f"round {r} writer {won[0]}".encode(), version)


def test_a_local_conditional_write_never_hangs_on_a_paused_lock_holder(local_cfg, monkeypatch):
    """A writer paused (SIGSTOP) while it holds a file's lock must not hang the next writer: it fails after
    LOCK_WAIT_S naming the lock, and writes nothing (a blocking flock hangs here forever)."""
    from fct_dist.storage import local
    store = open_store(local_cfg().storage)
    path = store.path("x", "obj.json")
    version = store.write_if(path, b"a", None)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(local, "LOCK_WAIT_S", 1.0)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"obj\.json\.lock has been locked by another process for over 1 s"):
            store.write_if(path, b"b", version)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert store.read_versioned(path) == (b"a", version)
    assert sorted(os.listdir(os.path.dirname(path))) == ["obj.json", "obj.json.lock"]  # no temp file left
    assert store.write_if(path, b"c", version)  # the holder is gone: the lock is free again


def test_a_run_whose_lease_is_taken_over_does_not_commit(engine):
    cfg, store, meta = engine
    id_lake(store, store.path("in"), meta, files=20, rows_per_file=2000)
    cfg.backfill.batch_size, cfg.backfill.lease_seconds, errors = 16, 2.0, []  # a heartbeat every 0.5 s
    run = threading.Thread(target=lambda: errors.append(pytest.raises(LeaseLost, backfill_in, cfg, store)))
    run.start()
    path, deadline = f"{out_dir(store)}/{LEASE}", time.time() + 60
    while time.time() < deadline and not store.list(out_dir(store), ".parquet"):
        time.sleep(0.05)
    for _ in range(20):  # what a run that judged it stale would do; a heartbeat may land in between
        _, version = store.read_versioned(path)
        try:
            store.write_if(path, holder(), version)
            break
        except Conflict:
            continue
    else:
        raise AssertionError("could not take the lease over in 20 tries")
    run.join(timeout=300)
    assert errors and "lease was taken over by pid 1 on elsewhere" in str(errors[0].value)
    assert len(store.list(out_dir(store), ".parquet")) < 20 and not currency.has_manifest(store, out_dir(store))


def test_a_storage_fault_in_the_footer_scan_stops_the_job(s3_cfg, s3_endpoint):
    """The second file holds an id of the first; its footer cannot be read at first. Skipping it
    would skip the duplicate check: the job must stop instead, naming the file."""
    direct = open_store(s3_cfg().storage)
    meta = tiny_transformations(direct)
    write_stored(direct, direct.path("in"), {"part-00000.parquet": {"ids": [1, 2, 3]},
                                             "part-00001.parquet": {"ids": [3, 4]}}, meta)
    proxy = FaultProxy(s3_endpoint, fraction=0.0, fail=r"in/part-00001\.parquet", fail_first=1).start()
    try:
        cfg = make_cfg(f"s3://{direct.root}", *LOCAL, "storage.s3_max_attempts=1", endpoint=proxy.url)
        with pytest.raises(StorageError, match=r"cannot read s3://.*/in/part-00001\.parquet"):
            backfill_in(cfg, open_store(cfg.storage))
        assert proxy.counts["fail"] == 1
    finally:
        proxy.stop()
    assert not currency.has_manifest(direct, out_dir(direct))


BUGGY = """
import sys, numpy as np
from fct_dist import config, lake
from fct_dist.storage import open_store
from fct_dist.pipeline import backfill, distribute, filemap
class DropsARow:  # a batch function with a bug: one vector fewer than good rows
    def __call__(self, rb):
        return np.zeros(rb.num_rows, bool), [], {"emb": np.zeros((rb.num_rows - 1, 16), np.float32)}
cfg = config.load(None, [f"storage.root={sys.argv[1]}", "backfill.distributor=local"], preset="tiny")
store = open_store(cfg.storage)
job = backfill.backfill_job(cfg, store, input=store.path("in"))
job.make_fn = DropsARow
filemap.run(job, distribute.of(cfg, job.actors))
"""


def test_the_row_check_holds_under_python_O(local_cfg):
    cfg = local_cfg()
    store = open_store(cfg.storage)
    id_lake(store, store.path("in"), tiny_transformations(store), files=1, rows_per_file=10)
    r = subprocess.run([sys.executable, "-O", "-c", BUGGY, cfg.storage.root], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RuntimeError: backfill: the batch function returned emb of shape (9, 16)" in r.stderr, \
        r.stderr[-2000:]
    assert not currency.has_manifest(store, out_dir(store))


class KillsItsWorker:
    """The transformation, except that a batch holding `poison` kills the process (as an OOM kill
    or a crashing decoder would)."""

    def __init__(self, poison: int, fn):
        self.poison, self.fn = poison, fn()

    def __call__(self, rb):
        if self.poison in rb.column("id").to_numpy():
            os.kill(os.getpid(), signal.SIGKILL)
        return self.fn(rb)


@pytest.mark.parametrize("policy", ["quarantine", "fail"])
def test_a_poison_file_is_retried_a_bounded_number_of_times(ray_local, local_cfg, policy):
    cfg = local_cfg("backfill.distributor=ray", "backfill.num_actors=2", "backfill.max_attempts=2",
                    f"backfill.on_bad_input={policy}")
    store = open_store(cfg.storage)
    meta = tiny_transformations(store)
    id_lake(store, store.path("in"), meta, files=4, rows_per_file=25)
    job = backfill.backfill_job(cfg, store, input=store.uri(store.path("in")))
    job = dataclasses.replace(job, make_fn=functools.partial(KillsItsWorker, 60, job.make_fn))  # 60: part-00002
    if policy == "fail":
        with pytest.raises(LakeError, match=r"in/part-00002\.parquet: killed its worker 2 times"):
            filemap.run(job, distribute.of(cfg, job.actors))
        assert not currency.has_manifest(store, out_dir(store))
        return
    m = filemap.run(job, distribute.of(cfg, job.actors))
    s = m["summary"]
    assert s["files_quarantined"] == 1 and "killed its worker 2 times" in s["quarantined"][store.uri(store.path("in", "part-00002.parquet"))]
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (100, 75, 25)
    ids, emb = read_output(store, out_dir(store))
    want_ids, want = expected_backfill(store, "fct", store.path("in"))
    keep = (want_ids < 50) | (want_ids >= 75)
    np.testing.assert_array_equal(ids, want_ids[keep])
    np.testing.assert_allclose(emb, want[keep], atol=1e-5)
    copy = output_of(m)["part-00002.parquet"].removesuffix(".parquet") + ".quarantined"
    assert copy in m["rejected_files"] and store.exists(store.path("rejected", "fct", "test", copy))
