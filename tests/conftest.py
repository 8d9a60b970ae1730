"""Shared fixtures: one local Ray, a real S3 endpoint (moto) on 127.0.0.1, a tiny trained lake.

The tiers are marks (pyproject.toml registers them): a test is `s3` when it reaches the moto server,
`slow` when it needs the session's three-version upgrade (`trained`) or says so itself, `cluster` when
it starts Ray nodes or jobs of its own, `gpu` when it needs a GPU. The first two are set here from the
fixtures a test uses, so a new test lands in the right tier without remembering to. `make test-fast`
runs what carries none of them."""
from __future__ import annotations

import os
import uuid

import pytest
import ray

from fct_dist.storage import open_store

from .support import SESSION_EPOCHS, make_cfg

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


@pytest.fixture
def local_cfg(tmp_path):
    return lambda *o: make_cfg(str(tmp_path / "root"), *o)


@pytest.fixture
def s3_cfg(s3_endpoint):
    """A fresh bucket per test."""
    bucket = f"fct-{uuid.uuid4().hex[:10]}"
    return lambda *o: make_cfg(f"s3://{bucket}/lake", *o, endpoint=s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def any_cfg(request):
    """The same test on a local folder and on the S3 endpoint (the local case never starts moto)."""
    return request.getfixturevalue(f"{request.param}_cfg")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ray_local):
    """`fct upgrade` with the tiny preset through three versions (old on 4 classes, new on 6, v3 on all 8),
    once per run: every artefact, lake, index and report. Under pytest-xdist the first worker to need it
    trains it and the others read the same root (each test writes only paths of its own there)."""
    from filelock import FileLock
    from fct_dist import runner
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's temp folder, shared by its workers
    cfg = make_cfg(str(base / "trained" / "root"), "versions.classes=[6, null]",
                   "train.num_workers=0",  # in the driver: Ray Train itself is tested by test_train, test_jobs, the faults
                   *SESSION_EPOCHS)  # test_train checks that each model learnt, on the held-out images
    store = open_store(cfg.storage)
    done = base / "trained" / "report_dir.txt"
    with FileLock(str(base / "trained.lock")):
        if not done.exists():
            done.parent.mkdir(exist_ok=True)
            done.write_text(runner.upgrade(cfg, store))
    return cfg, store, done.read_text()


# `make test` runs the modules on two pytest-xdist workers (--dist loadfile --no-loadscope-reorder: a module
# at a time, in this order): the longest first, so that one worker runs the node-loss cluster while the
# other trains the session's upgrade (`trained`) that the rest of these need
FIRST = ("test_fastfill", "test_cluster", "test_jobs", "test_snapshots", "test_your_lake", "test_train")


def pytest_collection_modifyitems(items):
    import torch
    rank = {m: i for i, m in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(FIRST)))
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (cluster/gpu-check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        uses = set(getattr(item, "fixturenames", ()))
        params = getattr(getattr(item, "callspec", None), "params", {})
        if uses & {"s3_endpoint", "s3_cfg", "faulty_s3"} or "s3" in (params.get("any_cfg"), params.get("where")):
            item.add_marker(pytest.mark.s3)
        if "trained" in uses:
            item.add_marker(pytest.mark.slow)
