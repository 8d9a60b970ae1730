"""A node lost mid-backfill, on a real two-node Ray cluster on this machine: a head and a worker node
(`ray.cluster_utils.Cluster`, each node its own raylet, all on 127.0.0.1), the backfill's actors
placed on both, then the worker node killed whole (SIGKILL of its raylet; its workers die with it).
Run in its own process by tests/test_cluster.py (a driver can join one Ray cluster only):

    python -m tests.node_loss ROOT      # writes ROOT/result.json
"""
from __future__ import annotations

import json
import sys
import threading
import time

import psutil
import ray
from ray.cluster_utils import Cluster

from fct_dist.pipeline import backfill
from fct_dist.storage import open_store

from .support import id_lake, make_cfg, tiny_transformations

FILES, ROWS_PER_FILE = 40, 3000


def actors_on(node) -> list[psutil.Process]:
    """The backfill's actors running under this node's raylet."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    out = []
    for p in raylet.children(recursive=True):
        try:
            if "RayFileWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def main(root: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})  # GCS on a free port of its own
    worker_node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # 8 actors of half a CPU fill both nodes' 4 CPUs: the scheduler must use the worker node
    cfg = make_cfg(root, "backfill.num_actors=8", "backfill.cpus_per_actor=0.5", "backfill.batch_size=16")
    store = open_store(cfg.storage)
    meta = tiny_transformations(store, ("fct",))
    stored = store.path("big")
    id_lake(store, stored, meta, FILES, ROWS_PER_FILE)
    out, result = store.path("embeddings", "fct", "test"), {}

    def run() -> None:
        try:
            result["manifest"] = backfill.backfill(cfg, store, "fct", input=stored)
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = repr(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not (actors_on(worker_node) and len(store.list(out, ".parquet")) >= 2):
        time.sleep(0.1)
    victims = actors_on(worker_node)
    done_at_kill = len(store.list(out, ".parquet"))
    cluster.remove_node(worker_node, allow_graceful=False)  # SIGKILL of the node's raylet
    thread.join(timeout=400)
    report = {"victims": len(victims), "victims_alive": sum(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                           for p in victims),
              "done_at_kill": done_at_kill, "files": FILES, "finished": not thread.is_alive()} | result
    report.pop("manifest", None)
    with open(f"{root}/result.json", "w") as f:
        json.dump(report, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
