"""`ray job submit` of the upgrade to a real Ray head on 127.0.0.1, with the lake on a moto S3 bucket."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fct_dist import currency
from fct_dist.config import Storage
from fct_dist.storage import open_store

from .support import SESSION_EPOCHS, copy_tree

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_endpoint):
    """A head node of our own: 127.0.0.1, its own temp dir and ports; stopped by its own pids."""
    temp = tempfile.mkdtemp(prefix="fct-head-")
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=2",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--include-dashboard=true", "--disable-usage-stats"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    for p in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in (p.info["cmdline"] or [])):
            try:
                p.kill()
            except psutil.Error:
                pass
    shutil.rmtree(temp, ignore_errors=True)


def submit(head: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", f"--address={head['address']}", "--working-dir", str(ROOT),
           "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--", str(BIN / "python"), *args]
    for attempt in range(10):  # right after start the head may answer "No available agent"
        out = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=900)
        if "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(3)
    return out


def test_upgrade_job_on_a_cluster_over_s3(ray_head, s3_endpoint, trained):
    bucket = f"fct-job-{uuid.uuid4().hex[:8]}"
    root = f"s3://{bucket}/lake"
    store = open_store(Storage(root=root, s3_endpoint=s3_endpoint, s3_create_bucket=True))
    # the session's old, side, new and BCT models are current for this config too (the same training
    # settings, new on the same 6 classes; no v3): the job skips them and trains h for 2 epochs in its
    # driver (Ray Train's worker groups are tested by test_train, the faults and the node-loss harness),
    # which keeps make test short, and runs every data-parallel stage itself, on the cluster, over S3
    for part in ("images", "models/old", "models/side", "models/new", "models/bct"):
        copy_tree(trained[1], store, part)
    sets = [f"storage.root={root}", f"storage.s3_endpoint={s3_endpoint}", "versions.classes=[6]", *SESSION_EPOCHS,
            "train.transformation.epochs=2", "train.num_workers=0"]
    out = submit(ray_head, "jobs/upgrade.py", "--preset", "tiny", *(x for s in sets for x in ("--set", s)))
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in log, log[-4000:]
    assert all(f"[{m}] up to date" in log for m in ("old", "side", "new", "bct")), log[-4000:]
    assert "[fct] epoch 2/2" in log and "[extract] files: 2/2 files" in log and "rows read" in log  # progress reaches the job log
    assert "| new / FCT (with side-info) |" in log
    for name in ("old", "side", "new", "bct", "fct", "fct-noside"):
        assert store.exists(store.path("models", name, "model.pt"))
    for lake in ("stored", "new", "bct", "fct", "fct-noside"):
        assert currency.has_manifest(store, store.path("embeddings", lake, "test"))
    assert currency.has_manifest(store, store.path("index", "fct", "test"))
    reports = [i.path for i in store.fs.get_file_info(
        __import__("pyarrow.fs").fs.FileSelector(store.path("reports"), recursive=True)) if i.path.endswith("report.md")]
    assert len(reports) == 1


def test_bad_config_job_fails_with_the_clear_error(ray_head):
    out = submit(ray_head, "jobs/backfill.py", "--set", "backfill.num_actors=0")
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert "backfill.num_actors: 0 is out of range; allowed 1 .. 100000" in log
    job_id = re.search(r"raysubmit_\w+", log).group(0)
    status = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={ray_head['address']}", job_id],
                            env=ray_head["env"], capture_output=True, text=True, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert f"Job '{job_id}' failed" in text  # what `ray job status` prints for JobStatus.FAILED
