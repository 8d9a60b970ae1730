"""Shared fixtures: one local Ray, a real S3 endpoint (moto) on 127.0.0.1, a tiny trained lake."""
from __future__ import annotations

import os
import urllib.request
import uuid

import pyarrow.fs as pafs
import pytest
import ray

from fct_dist import config
from fct_dist.storage import Store, open_store

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray for the session (never attaches to a cluster started by `ray start`)."""
    yield ray.init(address="local", num_cpus=2, log_to_driver=False)
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with a free port."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_cfg(root: str, *overrides: str, endpoint: str | None = None) -> config.Config:
    sets = [f"storage.root={root}", *overrides]
    if endpoint:
        sets.append(f"storage.s3_endpoint={endpoint}")
    return config.load(None, sets, preset="tiny")


@pytest.fixture
def local_cfg(tmp_path):
    return lambda *o: make_cfg(str(tmp_path / "root"), *o)


@pytest.fixture
def s3_cfg(s3_endpoint):
    """A fresh bucket per test."""
    bucket = f"fct-{uuid.uuid4().hex[:10]}"
    return lambda *o: make_cfg(f"s3://{bucket}/lake", *o, endpoint=s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def any_cfg(request, local_cfg, s3_cfg):
    """The same test on a local folder and on the S3 endpoint."""
    return local_cfg if request.param == "local" else s3_cfg


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ray_local):
    """`fct upgrade` with the tiny preset, once per session: every artefact, lake, index and report."""
    from fct_dist import upgrade
    cfg = make_cfg(str(tmp_path_factory.mktemp("trained") / "root"))
    store = open_store(cfg.storage)
    report_dir = upgrade.upgrade(cfg, store)
    return cfg, store, report_dir


def copy_tree(src: Store, dst: Store, *parts: str) -> None:
    """Copy a sub-tree of one store into another (e.g. a trained local root into S3)."""
    dst.fs.create_dir(dst.path(*parts), recursive=True)
    pafs.copy_files(src.path(*parts), dst.path(*parts), source_filesystem=src.fs, destination_filesystem=dst.fs)


def moto_reset(endpoint: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
