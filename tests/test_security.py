"""Credentials never leave the environment: not in logs, manifests, reports or error messages."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from fct_dist.storage import open_store

from .support import copy_tree, make_cfg
from .harness.faultproxy import FaultProxy


def test_no_credential_value_in_any_log_manifest_report_or_error(trained, s3_endpoint):
    key, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"sEcReT{uuid.uuid4().hex}"
    bucket = f"fct-{uuid.uuid4().hex[:10]}"
    direct = open_store(make_cfg(f"s3://{bucket}/lake", endpoint=s3_endpoint).storage)
    for part in ("models", "embeddings/stored"):
        copy_tree(trained[1], direct, part)
    proxy = FaultProxy(s3_endpoint, fraction=0.0, fail=r"stored/test/part-00000\.[^/]*parquet").start()
    with tempfile.TemporaryDirectory(prefix="fctsec", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        env = os.environ | {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "RAY_TMPDIR": ray_tmp}

        def fct(*args: str, endpoint: str = s3_endpoint) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "fct_dist.cli", *args, "--preset", "tiny", "--set",
                   f"storage.root=s3://{bucket}/lake", "--set", f"storage.s3_endpoint={endpoint}",
                   "--set", "storage.s3_max_attempts=2"]
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

        # the failing run maps in its own process (Ray's logs come from the first two): one Ray start-up less
        runs = [fct("backfill"), fct("index"), fct("backfill", "--model", "fct-noside", "--set", "backfill.distributor=local",
                                                  endpoint=proxy.url)]
        proxy.stop()
        assert [r.returncode for r in runs] == [0, 0, 2], runs[-1].stderr[-2000:]
        assert "cannot read s3://" in runs[2].stderr  # the error path was taken and reported
        texts = {f"run {i} output": r.stdout + r.stderr for i, r in enumerate(runs)}
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.suffix in (".log", ".out", ".err") for p in logs), "no Ray logs were written to scan"
        texts |= {str(p): p.read_bytes().decode("latin-1") for p in logs}
    objects = direct.fs.get_file_info(pafs.FileSelector(direct.root, recursive=True))
    texts |= {o.path: direct.read_bytes(o.path).decode("latin-1") for o in objects if o.type == pafs.FileType.File}
    assert any(p.endswith("_manifest.json") for p in texts) and any("/index/" in p for p in texts)
    leaks = [where for where, text in texts.items() if key in text or secret in text]
    assert not leaks, leaks
