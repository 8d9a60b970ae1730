"""fct-dist from Python: the stages as functions, and h as a Ray Data `map_batches` callable whose output
equals `fct backfill`'s."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import ray

import fct_dist
from fct_dist.bench.fixtures import save_transformation
from fct_dist.lake import LakeError
from fct_dist.models import registry
from fct_dist.storage import open_store

from .support import id_lake, make_cfg, read_output, write_stored

DIMS = {"old": 8, "side": 4, "new": 6}


@pytest.fixture
def stored(tmp_path):
    """A random-weight h under a local root and a stored lake of 3 files x 40 rows made for it."""
    cfg = make_cfg(str(tmp_path / "root"), "backfill.distributor=local")
    store = open_store(cfg.storage)
    save_transformation(store, DIMS, 16, 32)
    id_lake(store, str(tmp_path / "stored"), registry.read_meta(store, "fct"), files=3, rows_per_file=40)
    return cfg, store, tmp_path


@pytest.mark.parametrize("batch_format", ["numpy", "pyarrow"])
def test_h_in_a_ray_data_pipeline_equals_fct_backfill(stored, ray_local, batch_format):
    cfg, store, tmp = stored
    manifest = fct_dist.backfill(input=str(tmp / "stored"), output=str(tmp / "backfilled"), cfg=cfg)
    assert manifest["rows"] == 120
    ids, want = read_output(store, str(tmp / "backfilled"))
    (ray.data.read_parquet(str(tmp / "stored"))
        .map_batches(fct_dist.Transformation, fn_constructor_kwargs={"uri": f"{tmp}/root/models/fct", "cfg": cfg},
                     concurrency=2, num_cpus=0.5, batch_size=16, batch_format=batch_format)  # 2 CPUs here: room for the read
        .write_parquet(str(tmp / "mapped")))
    rows = sorted(ray.data.read_parquet(str(tmp / "mapped")).take_all(), key=lambda r: r["id"])
    np.testing.assert_array_equal([r["id"] for r in rows], ids)
    np.testing.assert_allclose(np.stack([np.asarray(r["emb"], np.float32) for r in rows]), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.stack([np.asarray(r["old"]) for r in rows])[:3].shape, (3, DIMS["old"]))


def test_the_callable_names_a_bad_row_and_a_uri_that_is_not_an_artefact(stored):
    cfg, store, tmp = stored
    meta = registry.read_meta(store, "fct")
    write_stored(store, str(tmp / "bad"), {"p.parquet": {"ids": [5, 6], "old": np.array([[0.0] * 8, [np.nan] * 8],
                                                                                        np.float32)}}, meta)
    h = fct_dist.Transformation(f"{tmp}/root/models/fct", cfg=cfg)
    import pyarrow.parquet as pq
    with pytest.raises(LakeError, match=r"id 6: NaN/inf in old \(1 bad rows in this batch\)"):
        h(pq.read_table(str(tmp / "bad" / "p.parquet")))
    with pytest.raises(LakeError, match=r"expected the URI of a model artefact, STORAGE_ROOT/models/NAME"):
        fct_dist.Transformation(f"{tmp}/root/fct", cfg=cfg)


def test_the_stage_functions_take_the_clis_parameters(stored):
    """The same stage from Python and from `fct`: a features-free evaluate of a root with no lakes is the
    CLI's clear error, and `set` overrides like --set."""
    cfg, store, tmp = stored
    fct_dist.backfill(input=str(tmp / "stored"), output=str(tmp / "out"), cfg=cfg, set=["columns.out=new_emb"])
    ids, vectors = read_output(store, str(tmp / "out"), "new_emb")
    assert len(ids) == 120 and vectors.shape == (120, DIMS["new"])
    with pytest.raises(LakeError, match="no Parquet files"):
        fct_dist.backfill(input=str(tmp / "nothing"), output=str(tmp / "out2"), cfg=cfg)


THREADS_START_RAY = """
import json, threading, ray
from fct_dist import config
from fct_dist.runtime import init_ray
cfg, start, seen = config.load(None, ["ray.num_cpus=2"]), threading.Barrier(2), []
def stage():  # what two stages side by side do first, each in its own thread that then ends
    start.wait()
    init_ray(cfg)
    seen.append(ray.get_runtime_context().gcs_address)
threads = [threading.Thread(target=stage) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"seen": seen, "after": ray.get(ray.remote(lambda: ray.get_runtime_context().gcs_address).remote())}))
ray.shutdown()
"""


@pytest.mark.cluster
def test_stages_in_threads_start_one_ray_that_outlives_them():
    """Two threads asking for Ray at once get one local Ray, and it still runs tasks after both threads ended:
    a thread that started it itself (Linux's parent-death signal follows the thread) takes it down when it
    ends, and two unlocked checks start two."""
    env = os.environ | {"RAY_gcs_rpc_server_reconnect_timeout_s": "5"}  # a lost GCS fails the run in seconds
    r = subprocess.run([sys.executable, "-c", THREADS_START_RAY], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["seen"] == [out["after"]] * 2
