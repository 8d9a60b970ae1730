"""A node lost mid-run, on a real two-node Ray cluster on this machine: a head and a worker node
(`ray.cluster_utils.Cluster`, each node its own raylet, all on 127.0.0.1), the stage's workers
placed on both, then the worker node killed whole (SIGKILL of its raylet; its workers die with it).
Run in its own process by tests/test_cluster.py and by the chaos soak (a driver can join one Ray
cluster only):

    python -m tests.harness.node_loss ROOT [backfill] [index] [train]   # writes ROOT/{scenario}/result.json

backfill: the engine's actors; index: the shard-adding Ray tasks of `fct index`; train: Ray Train's
workers (one per node), killed once a checkpoint is registered.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import ray
from ray.cluster_utils import Cluster

from fct_dist import datasets
from fct_dist.config import Config
from fct_dist.pipeline import backfill, index
from fct_dist.storage import Store, open_store
from fct_dist.train import stages

from ..support import id_lake, make_cfg, registered_epoch, tiny_transformations
from .kill import processes

FILES, ROWS_PER_FILE, EPOCHS = 24, 3000, 5


def on_node(node, title: str) -> list[psutil.Process]:
    """Processes under this node's raylet whose title contains `title` (ray::<Actor or task>)."""
    return processes(title, psutil.Process(node.all_processes["raylet"][0].process.pid))


def in_thread(work: Callable[[], object]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = work()
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = repr(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def kill_when(cluster: Cluster, node, title: str, ready: Callable[[], bool], poll: float = 0.02) -> list[psutil.Process]:
    """Once `ready()` and some `title` process runs on `node`, SIGKILL the node; its victims."""
    deadline = time.time() + 180
    while time.time() < deadline and not (ready() and on_node(node, title)):
        time.sleep(poll)
    victims = on_node(node, title)
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL of the node's raylet
    return victims


def stored_lake(root: str, cfg: Config) -> tuple[Store, str]:
    store = open_store(cfg.storage)
    stored = store.path("big")
    id_lake(store, stored, tiny_transformations(store, ("fct",)), FILES, ROWS_PER_FILE)
    return store, stored


def lose_during_backfill(root: str, cluster: Cluster, node) -> dict:
    # 8 actors of half a CPU fill both nodes' 4 CPUs: the scheduler must use the worker node
    cfg = make_cfg(root, "backfill.num_actors=8", "backfill.cpus_per_actor=0.5", "backfill.batch_size=16")
    store, stored = stored_lake(root, cfg)
    out = store.path("embeddings", "fct", "test")
    thread, result = in_thread(lambda: backfill.backfill(cfg, store, "fct", input=stored))
    victims = kill_when(cluster, node, "RayFileWorker", lambda: len(store.list(out, ".parquet")) >= 2, poll=0.1)
    done_at_kill = len(store.list(out, ".parquet"))
    thread.join(timeout=400)
    return {"victims": victims, "done_at_kill": done_at_kill, "total": FILES, "thread": thread} | result


def lose_during_index_build(root: str, cluster: Cluster, node) -> dict:
    # a shard per file, half a CPU per task: both nodes add shards, in several waves
    cfg = make_cfg(root, "index.factory=Flat", f"index.num_shards={FILES}")
    store, stored = stored_lake(root, cfg)
    backfill.backfill(cfg, store, "fct", input=stored)  # the lake to index, fault-free
    out = store.path("index", "fct", "test")
    thread, result = in_thread(lambda: index.build(cfg, store, "fct", "test"))
    victims = kill_when(cluster, node, "_add_shard", lambda: len(store.list(out, ".faiss")) >= 2)
    done_at_kill = len(store.list(out, ".faiss"))
    thread.join(timeout=400)
    return {"victims": victims, "done_at_kill": done_at_kill, "total": FILES, "thread": thread} | result


def lose_during_training(root: str, cluster: Cluster, node) -> dict:
    # one Ray Train worker per node (SPREAD); after the loss both fit on the head's 2 CPUs
    cfg = make_cfg(root, "train.num_workers=2", "train.placement_strategy=SPREAD", f"train.old.epochs={EPOCHS}",
                   "train.old.batch_size=8")
    store = open_store(cfg.storage)
    datasets.fill(cfg, store)
    checkpoints = root + "/checkpoints"
    thread, result = in_thread(lambda: stages.train_old(cfg, store)["metrics"]["history"])
    registered = {"epoch": 0}

    def ready() -> bool:  # a checkpoint is registered, and a Train worker runs on each node (SPREAD is a wish)
        registered["epoch"] = registered_epoch(Path(checkpoints))
        return registered["epoch"] >= 1 and bool(on_node(cluster.head_node, "RayTrainWorker"))

    victims = kill_when(cluster, node, "RayTrainWorker", ready, poll=0.05)
    thread.join(timeout=400)
    history = result.pop("value", None) or []
    return {"victims": victims, "done_at_kill": registered["epoch"], "total": EPOCHS, "thread": thread,
            "history": [{"epoch": h["epoch"], "resumed_at": h["resumed_at"]} for h in history]} | result


SCENARIOS = {"backfill": lose_during_backfill, "index": lose_during_index_build, "train": lose_during_training}


def main(root: str, scenarios: list[str]) -> None:
    """Each scenario on the same cluster, a fresh worker node for each; ROOT/{scenario}/result.json."""
    # GCS on a free port of its own; a dead node's health checks fail at once (its raylet is gone), so the GCS
    # declares it dead after 3 checks 1 s apart instead of Ray's default 5 x 3 s (the timeout of a slow but
    # live node's check stays Ray's 10 s)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": {
        "health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        for scenario in scenarios:
            worker_node = cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            t0, where = time.time(), f"{root}/{scenario}"
            r = SCENARIOS[scenario](where, cluster, worker_node)
            victims, thread = r.pop("victims"), r.pop("thread")
            r.pop("value", None)
            report = r | {"scenario": scenario, "victims": len(victims), "victim_pids": [p.pid for p in victims],
                          "victims_alive": sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in victims),
                          "finished": not thread.is_alive(), "seconds": round(time.time() - t0, 1)}
            os.makedirs(where, exist_ok=True)
            with open(f"{where}/result.json", "w") as f:
                json.dump(report, f)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(SCENARIOS))
