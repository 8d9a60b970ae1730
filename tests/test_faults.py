"""Faults survived: lost actors, S3 throttling/resets/stalls, a permanently failing
object, a full disk and a denied directory. Each run ends exactly once or fails clearly, with nothing
marked done that is not."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import psutil
import pytest

from fct_dist import currency
from fct_dist.config import Storage
from fct_dist.lease import LEASE
from fct_dist.models import registry
from fct_dist.pipeline import backfill, index
from fct_dist.storage import open_store
from fct_dist.train import stages

from .harness.faultproxy import KINDS, FaultProxy
from .support import copy_tree, expected_backfill, id_lake, make_cfg, read_output
from .harness.kill import processes

ROWS_PER_FILE, FILES = 3000, 40


def big_lake(store, meta) -> str:
    directory = store.path("big")
    id_lake(store, directory, meta, FILES, ROWS_PER_FILE)
    return directory


def exactly_once(store, out: str, stored: str) -> None:
    """Every stored id once in the output, with h(old, side), and a manifest that balances."""
    ids, emb = read_output(store, out)
    want_ids, want = expected_backfill(store, "fct", stored)
    np.testing.assert_array_equal(ids, want_ids)  # sorted, so equality = every id once
    np.testing.assert_allclose(emb, want, atol=1e-5)
    m = currency.manifest(store, out)["summary"]
    assert m["rows_in"] == m["rows_out"] == len(want_ids) and m["rows_rejected"] == 0


def test_killed_actor_is_replaced_and_the_backfill_ends_exactly_once(ray_local, trained, local_cfg, caplog):
    cfg = local_cfg("backfill.batch_size=16", "backfill.num_actors=2")
    store = open_store(cfg.storage)
    copy_tree(trained[1], store, "models")
    stored = big_lake(store, registry.read_meta(store, "fct"))
    out, result = store.path("embeddings", "fct", "test"), {}
    run = threading.Thread(target=lambda: result.update(m=backfill.backfill(cfg, store, "fct", input=stored)))
    run.start()
    deadline = time.time() + 120
    while time.time() < deadline and len(store.list(out, ".parquet")) < 2:
        time.sleep(0.1)
    before = {p.pid for p in processes("RayFileWorker")}
    (victim, *_) = processes("RayFileWorker")
    victim.send_signal(signal.SIGKILL)
    done_at_kill = len(store.list(out, ".parquet"))
    run.join(timeout=300)
    assert "m" in result, "the backfill did not finish after its actor was killed"
    assert 2 <= done_at_kill < FILES, "the kill did not land mid-run"
    assert not victim.is_running() and "a worker died while mapping" in caplog.text  # its files were retried
    # a replacement actor (a pid that did not exist at the kill) mapped some of the files
    workers = {int(r["worker"].rsplit(":", 1)[1]) for r in result["m"]["per_file"]}
    assert workers - before, f"no file was mapped by a new actor: {workers} all existed before the kill ({before})"
    exactly_once(store, out, stored)


@pytest.fixture
def faulty_s3(trained, s3_endpoint):
    """A bucket holding the trained models and lakes (written directly), reached through a proxy
    that injects faults into 5 % of the requests."""
    # every 20th request faulted, the kinds in turn; and the reply to the first conditional write of the
    # backfill's lease lost (the write lands, the client retries it and must recognise its own write)
    proxy = FaultProxy(s3_endpoint, fraction=0.05, stall_seconds=2.0, lose=rf"^PUT \S*/{LEASE}").start()
    bucket = f"fct-{uuid.uuid4().hex[:10]}"
    direct = open_store(make_cfg(f"s3://{bucket}/lake", endpoint=s3_endpoint).storage)
    for part in ("models", "images", "embeddings/stored"):
        copy_tree(trained[1], direct, part)
    cfg = make_cfg(f"s3://{bucket}/lake", "storage.s3_request_timeout=1", endpoint=proxy.url)
    yield cfg, open_store(cfg.storage), proxy
    proxy.stop()


def test_backfill_index_and_checkpoints_survive_5_percent_s3_faults(ray_local, trained, faulty_s3):
    cfg, store, proxy = faulty_s3
    _, local, _ = trained
    seen = {"before": len(proxy.injected)}
    m = backfill.backfill(cfg, store, "fct", "test")
    seen["backfill"] = len(proxy.injected)
    ids, emb = read_output(store, store.path("embeddings", "fct", "test"))
    ref_ids, ref_emb = read_output(local, local.path("embeddings", "fct", "test"))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5)
    assert m["summary"]["rows_out"] == len(ref_ids)
    built = index.build(cfg, store, "fct", "test")
    assert built["rows"] == len(ref_ids)
    d, i = index.search(store, "fct", "test", ref_emb[:20], 5, cfg.index.nprobe)
    d_ref, i_ref = index.search(local, "fct", "test", ref_emb[:20], 5, cfg.index.nprobe)
    np.testing.assert_array_equal(i, i_ref)
    seen["index"] = len(proxy.injected)
    meta = stages.train_old(cfg, store, force=True)  # Ray Train checkpoints every epoch to the faulty bucket
    assert [h["epoch"] for h in meta["metrics"]["history"]] == list(range(1, cfg.train.old.epochs + 1))
    seen["training"] = len(proxy.injected)
    marks = list(seen.values())
    per_stage = {stage: [kind for kind, _ in proxy.injected[a:b]] for stage, a, b in zip(list(seen)[1:], marks, marks[1:])}
    assert all(k in per_stage["backfill"] for k in KINDS), per_stage  # each kind landed in the backfill itself
    assert [r for k, r in proxy.injected[seen["before"]:seen["backfill"]] if k == "lost" and LEASE in r], per_stage
    assert per_stage["index"] and per_stage["training"], per_stage


def test_permanently_failing_object_stops_the_job_naming_it(ray_local, trained, s3_endpoint):
    proxy = FaultProxy(s3_endpoint, fraction=0.0, fail=r"stored/test/part-00001\.[^/]*parquet").start()
    try:
        bucket = f"fct-{uuid.uuid4().hex[:10]}"
        direct = open_store(make_cfg(f"s3://{bucket}/lake", endpoint=s3_endpoint).storage)
        for part in ("models", "embeddings/stored"):
            copy_tree(trained[1], direct, part)
        cfg = make_cfg(f"s3://{bucket}/lake", "storage.s3_max_attempts=2", endpoint=proxy.url)
        with pytest.raises(Exception, match=r"cannot read s3://.*/stored/test/part-00001\.[^/ ]*parquet: .*503"):
            backfill.backfill(cfg, open_store(cfg.storage), "fct", "test")
        assert proxy.counts["fail"] >= 2  # retried, then given up
        out = direct.path("embeddings", "fct", "test")
        assert not currency.has_manifest(direct, out) and not [p for p in direct.list(out) if "/part-00001." in p]
    finally:
        proxy.stop()


def confined(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a private user (+ mount) namespace: root there cannot override the permissions
    of files it does not own, and can mount a small tmpfs of its own."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("user namespaces (unshare -Urm) are not available on this machine")
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def backfill_cmd(root, *args: str) -> str:
    """`fct backfill` on the local distributor (no Ray inside the namespace: what fails is the disk)."""
    args = [sys.executable, "-m", "fct_dist.cli", "backfill", "--preset", "tiny", "--set", f"storage.root={root}",
            "--set", "backfill.distributor=local", *args]
    return " ".join(args)


def test_full_disk_fails_clearly_and_marks_nothing_done(trained, tmp_path):
    src = open_store(Storage(root=str(tmp_path / "src")))
    copy_tree(trained[1], src, "models")
    big = big_lake(src, registry.read_meta(src, "fct"))
    used = sum(f.stat().st_size for f in (tmp_path / "src").rglob("*") if f.is_file())
    root = tmp_path / "root"
    root.mkdir()
    out = f"{root}/embeddings/fct/test"
    r = confined(f"mount -t tmpfs -o size={used // 2**20 + 2}m none {root} && cp -a {tmp_path}/src/. {root}/ && "
                 f"{backfill_cmd(root, '--input', big.replace(str(tmp_path / 'src'), str(root)))}; "
                 f"echo rc=$?; echo manifests: $(find {out} -name _manifest.json); echo tmp: $(find {root} -name '*.tmp')")
    assert "rc=2" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "No space left on device" in r.stderr and f"cannot write {out}/part-" in r.stderr, r.stderr[-3000:]
    assert "manifests:\n" in r.stdout and "tmp:\n" in r.stdout, r.stdout


def test_denied_output_directory_fails_clearly_and_writes_nothing(trained, tmp_path):
    root = tmp_path / "root"
    store = open_store(Storage(root=str(root)))
    copy_tree(trained[1], store, "models")
    copy_tree(trained[1], store, "embeddings/stored")
    denied = tmp_path / "denied"
    denied.mkdir()
    if os.geteuid() == 0:
        os.chown(denied, 12345, 12345)  # unmapped in the namespace below: its root gets no override
    else:
        denied.chmod(0o555)
    r = confined(f"{backfill_cmd(root, '--output', f'{denied}/fct')}; echo rc=$?")
    assert "rc=2" in r.stdout, r.stdout + r.stderr[-3000:]
    assert f"cannot write {denied}/fct/_lease.json" in r.stderr and "Permission denied" in r.stderr, r.stderr[-3000:]
    assert not any(denied.iterdir())


def test_local_services_listen_on_loopback(ray_local, s3_endpoint):
    """The dashboard, the test S3 and the fault proxy listen on 127.0.0.1 only. (Ray 2.60's gRPC
    servers bind every interface whatever the node address; Ray's token auth, on by default, guards
    them: see cluster/README.md.)"""
    proxy = FaultProxy(s3_endpoint).start()
    try:
        me = psutil.Process()
        # Each service is told by the process that owns it as well as its port: Ray's servers in other
        # processes bind every interface, and one may hold the same port number at another address.
        dashboard = [p.pid for p in me.children(recursive=True) if any("dashboard.py" in a for a in p.cmdline())]
        assert len(dashboard) == 1, dashboard
        listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        for url, owner in ((ray_local.dashboard_url, dashboard[0]), (s3_endpoint, me.pid), (proxy.url, me.pid)):
            port = int(url.rsplit(":", 1)[1])
            assert {ip for ip, p, pid in listening if p == port and pid == owner} == {"127.0.0.1"}, url
    finally:
        proxy.stop()
