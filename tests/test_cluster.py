"""The cluster definitions: the launcher YAML against Ray's own schema, KubeRay manifests' required fields."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from fct_dist.storage import open_store

from .support import expected_backfill, make_cfg, read_output

CLUSTER = Path(__file__).parent.parent / "cluster"
ROOT = CLUSTER.parent


def test_aws_launcher_config_passes_rays_schema():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(cfg))  # fills Ray's defaults, then raises on any schema violation
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}  # no work on the head
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] > gpu["min_workers"] == 0  # autoscaling
    assert "IamInstanceProfile" in gpu["node_config"]
    for name, node in cfg["available_node_types"].items():  # never Ray's built-in default AMI (past its end of life)
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/"), name
    assert cfg["docker"]["image"] == gpu_image()  # the Dockerfile's gpu target, as its header builds it
    assert any("boto3" in c for c in cfg["head_setup_commands"])  # the head's autoscaler talks to EC2
    with pytest.raises(Exception):  # the schema check is real: an unknown key fails it
        validate_config(prepare_config(dict(cfg, not_a_launcher_key=1)))
    text = (CLUSTER / "aws.yaml").read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def gpu_image() -> str:
    """The image name the Dockerfile's header builds for its gpu target."""
    line = next(x for x in (ROOT / "Dockerfile").read_text().splitlines() if "--target gpu" in x)
    return shlex.split(line.lstrip("# "))[5]


def test_dockerfile_builds_the_project_on_the_pinned_ray_for_cpu_and_gpu():
    """No Docker engine runs here: the file is checked for what a build needs (both targets, Ray's image of
    the version pyproject pins, every file it copies present, the CPU target's torch from the CPU index)."""
    from fct_dist import __version__
    text = (ROOT / "Dockerfile").read_text()
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    pinned = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"ARG RAY_VERSION={pinned}" in lines
    targets = {x.split(" AS ")[1]: x.split()[1] for x in lines if x.startswith("FROM ")}
    assert targets == {"project": "scratch", "cpu": "rayproject/ray:${RAY_VERSION}-py311-cpu",
                       "gpu": "rayproject/ray:${RAY_VERSION}-py311-gpu"}
    for x in lines:
        if x.startswith("COPY ") and "--from" not in x:
            for src in x.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert "pip install --no-cache-dir -r requirements-cpu.txt" in text and 'pip install --no-cache-dir -e ".[gpu]"' in text
    assert gpu_image().endswith(f":{__version__}-gpu")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "fct-data", ".git"} <= set(ignored)


def test_the_cpu_requirements_pin_the_cpu_build_of_the_torch_make_installs():
    req = (ROOT / "requirements-cpu.txt").read_text().splitlines()
    make_pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in req
    assert f"torch=={make_pin}+cpu" in req and "-e .[cpu]" in req


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # `kubectl port-forward` reaches the pod's address
    assert head["template"]["spec"]["containers"][0]["image"] == gpu_image()
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"] == gpu_image()
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "shm", "mountPath": "/dev/shm"} in mounts
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kuberay_raycluster():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob_runs_an_existing_entrypoint_and_tears_down():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/upgrade.py"] and (ROOT / argv[1]).exists()
    from fct_dist import config
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    config.load(ROOT / argv[argv.index("--config") + 1], overrides)  # the job's config is valid
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_runtime_env_excludes_local_bulk():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".venv/", ".git/", "fct-data/"} <= set(env["excludes"])


def test_every_stage_has_a_job_entrypoint():
    from fct_dist.cli import parser
    stages = parser()._subparsers._group_actions[0].choices
    for name in stages:
        if name != "search":
            assert (ROOT / "jobs" / f"{name.replace('-', '_')}.py").exists(), name


@pytest.fixture(scope="module")
def node_losses(tmp_path_factory) -> Path:
    """tests/harness/node_loss.py in its own process (a driver joins one cluster only): a head and a worker
    node on this machine, the stage's workers on both, the worker node SIGKILLed mid-run; once per
    stage (backfill, index build, training), each with a fresh worker node."""
    root = tmp_path_factory.mktemp("node-loss")
    proc = subprocess.run([sys.executable, "-m", "tests.harness.node_loss", str(root)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def node_loss(root: Path, scenario: str) -> tuple[dict, Path]:
    r = json.loads((root / scenario / "result.json").read_text())
    assert r["victims"] >= 1 and r["victims_alive"] == 0, r  # work ran on the worker node, and died with it
    assert 1 <= r["done_at_kill"] < r["total"], r  # the node was lost mid-run
    assert r["finished"] and "error" not in r, r
    return r, root / scenario


@pytest.mark.cluster
@pytest.mark.slow
def test_a_worker_node_lost_mid_backfill_ends_exactly_once_on_the_rest(node_losses):
    r, root = node_loss(node_losses, "backfill")
    assert r["done_at_kill"] >= 2, r
    store = open_store(make_cfg(str(root)).storage)
    ids, emb = read_output(store, store.path("embeddings", "fct", "test"))
    want_ids, want = expected_backfill(store, "fct", store.path("big"))
    np.testing.assert_array_equal(ids, want_ids)  # sorted: every id exactly once
    np.testing.assert_allclose(emb, want, atol=1e-5)


@pytest.mark.cluster
@pytest.mark.slow
def test_a_worker_node_lost_mid_index_build_indexes_every_row_once(node_losses):
    """The lost node's shard tasks rerun on the head (Ray retries a task whose node died); the index
    holds every row of the lake once, with its vector."""
    import faiss

    from fct_dist.pipeline import index
    r, root = node_loss(node_losses, "index")
    store = open_store(make_cfg(str(root)).storage)
    shards, manifest = index.load(store, "fct", "test")
    assert len(shards) == r["total"] == len(manifest["shards"])
    ids = np.concatenate([faiss.vector_to_array(s.id_map) for s in shards])
    vecs = np.concatenate([s.index.reconstruct_n(0, s.ntotal) for s in shards])
    order = np.argsort(ids)
    want_ids, want = read_output(store, store.path("embeddings", "fct", "test"))
    np.testing.assert_array_equal(ids[order], want_ids)  # every row exactly once
    np.testing.assert_array_equal(vecs[order], want)


@pytest.mark.cluster
@pytest.mark.slow
def test_a_worker_node_lost_mid_training_resumes_from_the_last_checkpoint_on_the_rest(node_losses):
    """One Ray Train worker per node; the worker node is lost once a checkpoint is registered: the
    worker group restarts on the head and continues from that checkpoint (no epoch up to it is
    trained again), to the last epoch."""
    r, _ = node_loss(node_losses, "train")
    assert [h["epoch"] for h in r["history"]] == list(range(1, r["total"] + 1)), r
    resumed = r["history"][-1]["resumed_at"]  # the checkpoint the last worker group started from
    assert resumed >= r["done_at_kill"] >= 1, r  # not from scratch: from the checkpoint the loss found (or later)
    # the epochs up to that checkpoint were trained before the loss, each once; the rest after it
    assert [h["resumed_at"] for h in r["history"]] == [0] * resumed + [resumed] * (r["total"] - resumed), r
