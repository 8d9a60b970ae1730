"""`make chaos`: a longer soak of the fault tests, ending with figures.

Per round: a backfill and an index build on S3 through the fault proxy (5 % faulty requests by
default), a backfill whose Ray actor is SIGKILLed midway, and a `fct backfill` process SIGKILLed
midway then rerun (each kill checked to have landed mid-run), a `fct backfill` paused (SIGSTOP) past its
lease while a second run takes over and finishes, then resumed (the finished lake must stay byte for
byte as committed), and a lease held by a live run in another pid namespace under this host name (it
must not be taken over until its heartbeat stops). Once: a Ray Train run on S3 through the
proxy (checkpoints), a worker node of a two-node Ray cluster lost during a backfill, an index build
and a Ray Train run (tests/harness/node_loss.py), and the bad-input table. Every finished lake is checked id by id with plain
pyarrow (every Parquet file its snapshot lists): rows lost and rows duplicated must be 0.

    python -m tests.harness.chaos [--rounds 3] [--fraction 0.05] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from moto.server import ThreadedMotoServer

from fct_dist import config, currency
from fct_dist.bench import fixtures
from fct_dist.lease import LEASE, machine
from fct_dist.pipeline import backfill, index
from fct_dist.storage import open_store

from .badinputs import CASES, attempt
from .faultproxy import FaultProxy
from ..support import all_ids, cli, committed, holder
from .kill import kill_session, processes, wait_for_files

os.environ.setdefault("AWS_ACCESS_KEY_ID", "chaos-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "chaos-secret")


class Tally:
    def __init__(self):
        self.faults, self.runs, self.lost, self.duplicated, self.log = 0, 0, 0, 0, []
        self.kinds: Counter = Counter()  # faults by kind, for the ones a round injects one at a time

    def check(self, what: str, store, directory: str, n: int) -> None:
        """Count ids missing from / repeated in a finished lake that should hold ids 0..n-1."""
        if not currency.has_manifest(store, directory):
            raise AssertionError(f"{what}: {store.uri(directory)} has no manifest")
        self.tally(what, all_ids(store, directory), n)

    def tally(self, what: str, ids: np.ndarray, n: int) -> None:
        """Count ids missing from / repeated in `ids`, which should be 0..n-1 once each."""
        lost = len(np.setdiff1d(np.arange(n), ids))
        duplicated = len(ids) - len(np.unique(ids))
        self.runs += 1
        self.lost += lost
        self.duplicated += duplicated
        self.log.append({"run": what, "rows": n, "lost": lost, "duplicated": duplicated})
        print(f"[chaos] {what}: {n:,} rows, lost {lost}, duplicated {duplicated}", flush=True)


def setup(root: str, rows: int, files: int, *sets: str):
    """(cfg, store, stored lake URI): random-weight tiny artefacts and a stored lake of `rows` ids in
    `files` files under `root`."""
    cfg = config.load(None, [f"storage.root={root}", *sets], preset="tiny")
    store = open_store(cfg.storage)
    p = fixtures.profiles(cfg)[0]
    fixtures.save_models(store, p)
    return cfg, store, store.uri(fixtures.stored_lake(store, p.dims, rows, -(-rows // files)))


def s3_round(t: Tally, endpoint: str, fraction: float, rows: int) -> None:
    proxy = FaultProxy(endpoint, fraction=fraction, stall_seconds=2.0).start()
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    cfg, store, stored = setup(f"s3://{bucket}/lake", rows, 20, f"storage.s3_endpoint={proxy.url}",
                                  "storage.s3_request_timeout=1", "storage.s3_create_bucket=true")
    backfill.backfill(cfg, store, "fct", input=stored)
    t.check(f"backfill on S3, {fraction:.0%} faulty requests", store, store.path("embeddings", "fct", "test"), rows)
    built = index.build(cfg, store, "fct", "test")
    assert built["rows"] == rows, built
    t.runs += 1
    proxy.stop()
    t.faults += proxy.faults
    print(f"[chaos] index on S3: {built['rows']:,} rows; proxy: {proxy.requests} requests, faults {proxy.counts}")


def landed_mid_run(what: str, done: int, files: int, store, out: str) -> None:
    if not 1 <= done < files or currency.has_manifest(store, out):
        raise AssertionError(f"{what}: the kill did not land mid-run ({done} of {files} files done)")


def actor_kill_round(t: Tally, root: str, rows: int) -> None:
    cfg, store, stored = setup(root, rows, 40, "backfill.batch_size=16", "backfill.num_actors=2")
    out, done = store.path("embeddings", "fct", "test"), {}
    run = threading.Thread(target=lambda: done.update(m=backfill.backfill(cfg, store, "fct", input=stored)))
    run.start()
    seen = wait_for_files(store, out, 2, run.is_alive)
    victims = processes("RayFileWorker")
    if not victims:
        raise AssertionError("no Ray actor found to kill")
    victims[0].kill()
    landed_mid_run("actor kill", seen, 40, store, out)
    t.faults += 1
    run.join(timeout=600)
    t.check("backfill, a Ray actor SIGKILLed", store, out, rows)


def driver_kill_round(t: Tally, root: str, rows: int) -> None:
    cfg, store, stored = setup(root, rows, 40)
    args = [sys.executable, "-m", "fct_dist.cli", "backfill", "--preset", "tiny", "--set", f"storage.root={root}",
            "--input", stored, "--set", "backfill.batch_size=16",
            "--set", "backfill.num_actors=1"]
    out = store.path("embeddings", "fct", "test")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_files(store, out, 3, lambda: proc.poll() is None)
    kill_session(proc)
    landed_mid_run("driver kill", len(store.list(out, ".parquet")), 40, store, out)
    t.faults += 1
    subprocess.run(args, check=True, capture_output=True, timeout=600)
    t.check("fct backfill SIGKILLed, then rerun", store, out, rows)


def backfill_cli(root: str, stored: str, *sets: str) -> list[str]:
    return cli(root, "--input", stored, *(x for s in sets for x in ("--set", s)))


def paused_writer_round(t: Tally, root: str, rows: int) -> None:
    """A run paused past its lease (a suspended VM, a long GC stall), a second run finishing meanwhile."""
    cfg, store, stored = setup(root, rows, 40)
    out = store.path("embeddings", "fct", "test")
    lease = ("backfill.lease_seconds=2", "backfill.gc_grace_seconds=600")
    zombie = subprocess.Popen(backfill_cli(root, stored, *lease, "backfill.batch_size=16"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = wait_for_files(store, out, 2, lambda: zombie.poll() is None)
    os.kill(zombie.pid, signal.SIGSTOP)
    landed_mid_run("paused writer", seen, 40, store, out)
    time.sleep(3)
    subprocess.run(backfill_cli(root, stored, *lease), check=True, capture_output=True, timeout=600)
    finished = committed(store, out)
    os.kill(zombie.pid, signal.SIGCONT)
    _, err = zombie.communicate(timeout=600)
    if zombie.returncode != 2 or "this run's lease was taken over" not in err:
        raise AssertionError(f"paused writer: it did not stop on its lost lease (exit {zombie.returncode}): {err[-500:]}")
    if committed(store, out) != finished:
        raise AssertionError("paused writer: the finished lake changed after the paused run resumed")
    t.faults += 1
    t.kinds["paused writer"] += 1
    t.check("fct backfill paused past its lease, another run finished, then resumed", store, out, rows)


def shared_hostname_round(t: Tally, root: str, rows: int) -> None:
    """A live run in another container with this host name (another pid namespace) holds the lease."""
    cfg, store, stored = setup(root, rows, 10)
    out = store.path("embeddings", "fct", "test")
    ttl = 8.0
    other = holder(**machine() | {"pid_ns": "pid:[1]"}, pid=2**22 - 1, ttl=ttl)  # a pid not seen here
    store.write_if(f"{out}/{LEASE}", other, None)
    refused = subprocess.run(backfill_cli(root, stored), capture_output=True, text=True, timeout=300)
    if refused.returncode != 2 or "is being written by another run" not in refused.stderr:
        raise AssertionError(f"shared host name: the live lease was not respected: {refused.stderr[-500:]}")
    time.sleep(ttl)  # its heartbeat stops: now it may be taken over
    subprocess.run(backfill_cli(root, stored), check=True, capture_output=True, timeout=600)
    t.faults += 1
    t.kinds["lease under a shared host name"] += 1
    t.check("a lease held under this host name from another pid namespace, then expired", store, out, rows)


def train_on_faulty_s3(t: Tally, endpoint: str, fraction: float) -> None:
    from fct_dist import datasets
    from fct_dist.train import stages
    proxy = FaultProxy(endpoint, fraction=fraction, stall_seconds=2.0).start()
    bucket = f"chaos-{uuid.uuid4().hex[:8]}"
    cfg = config.load(None, [f"storage.root=s3://{bucket}/lake", f"storage.s3_endpoint={proxy.url}",
                             "storage.s3_request_timeout=1", "storage.s3_create_bucket=true", "train.old.epochs=3"], preset="tiny")
    store = open_store(cfg.storage)
    datasets.fill(cfg, store)
    meta = stages.train_old(cfg, store, force=True)
    assert [h["epoch"] for h in meta["metrics"]["history"]] == [1, 2, 3]
    t.runs += 1
    proxy.stop()
    t.faults += proxy.faults
    print(f"[chaos] Ray Train on S3 (checkpoint per epoch): 3 epochs; proxy faults {proxy.counts}")


def node_loss_round(t: Tally, root: str) -> list[dict]:
    """tests/harness/node_loss.py's three scenarios (a two-node Ray cluster on this machine, the worker node
    SIGKILLed mid-run): the backfill's lake and the index checked id by id, training by its epochs."""
    import faiss

    from . import node_loss
    rows, out = node_loss.FILES * node_loss.ROWS_PER_FILE, []
    subprocess.run([sys.executable, "-m", "tests.harness.node_loss", f"{root}/node-loss"], check=True, capture_output=True,
                   timeout=900)
    for scenario in node_loss.SCENARIOS:
        where = f"{root}/node-loss/{scenario}"
        r = json.loads(Path(where, "result.json").read_text())
        if not (r["victims"] and 1 <= r["done_at_kill"] < r["total"] and r["finished"] and "error" not in r):
            raise AssertionError(f"node lost during {scenario}: {r}")
        t.faults += 1
        store = open_store(config.load(None, [f"storage.root={where}"], preset="tiny").storage)
        if scenario == "backfill":
            t.check("backfill, a worker node lost", store, store.path("embeddings", "fct", "test"), rows)
        elif scenario == "index":
            shards, _ = index.load(store, "fct", "test")
            ids = np.concatenate([faiss.vector_to_array(s.id_map) for s in shards])
            t.tally("index build, a worker node lost", ids, rows)
        else:
            t.runs += 1
            resumed = r["history"][-1]["resumed_at"]
            if [h["epoch"] for h in r["history"]] != list(range(1, r["total"] + 1)) or resumed < r["done_at_kill"]:
                raise AssertionError(f"training did not resume from its checkpoint after the node loss: {r}")
        out.append(r)
        print(f"[chaos] node lost during {scenario}: {r['victims']} workers killed with it after {r['done_at_kill']} "
              f"of {r['total']} {'epochs' if scenario == 'train' else 'files'}; finished in {r['seconds']} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chaos")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--out", default="fct-data/reports")
    a = ap.parse_args(argv)
    t0, t = time.time(), Tally()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
            for r in range(a.rounds):
                print(f"\n=== chaos round {r + 1}/{a.rounds} ===", flush=True)
                s3_round(t, endpoint, a.fraction, a.rows)
                actor_kill_round(t, f"{tmp}/actor-{r}", a.rows)
                driver_kill_round(t, f"{tmp}/driver-{r}", a.rows)
                paused_writer_round(t, f"{tmp}/paused-{r}", a.rows)
                shared_hostname_round(t, f"{tmp}/hostname-{r}", a.rows)
            train_on_faulty_s3(t, endpoint, a.fraction)
            print("\n=== a worker node lost (two Ray nodes on this machine) ===", flush=True)
            nodes = node_loss_round(t, tmp)
            print("\n=== bad inputs ===", flush=True)
            bad = [attempt(c, Path(tmp) / f"bad-{i}") for i, c in enumerate(CASES)]
    finally:
        ray.shutdown()
        server.stop()
    figures = {"faults_injected": t.faults, **{f"faults: {k}": v for k, v in t.kinds.items()},
               "runs_completed": t.runs, "rows_lost": t.lost,
               "rows_duplicated": t.duplicated, "bad_input_cases_tried": len(bad),
               "bad_input_cases_handled": sum(b["handled"] for b in bad), "seconds": round(time.time() - t0)}
    lines = ["# make chaos", "", f"rounds {a.rounds}, {a.fraction:.0%} faulty S3 requests, {a.rows:,} rows per lake", "",
             "| bad input | expected | observed | rows in = out + rejected | handled |", "|---|---|---|---|---|"]
    lines += [f"| {b['case']} | {b['expected']} | {b['observed'][:140]} | "
              f"{b['rows'][0]} = {b['rows'][1]} + {b['rows'][2]} | {'yes' if b['handled'] else '**NO**'} |" for b in bad]
    lines += ["", "| a worker node lost during | its workers killed | done at the loss | finished |", "|---|---|---|---|"]
    lines += [f"| {n['scenario']} | {n['victims']} | {n['done_at_kill']} of {n['total']} "
              f"{'epochs' if n['scenario'] == 'train' else 'files'} | yes, {n['seconds']} s |" for n in nodes]
    lines += ["", "| figure | value |", "|---|---|"] + [f"| {k.replace('_', ' ')} | {v} |" for k, v in figures.items()]
    md = "\n".join(lines) + "\n"
    out = Path(a.out) / time.strftime("chaos-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.md").write_text(md)
    (out / "chaos.json").write_text(json.dumps({"figures": figures, "runs": t.log, "bad_inputs": bad,
                                                "node_losses": nodes}, indent=2))
    print("\n" + md + f"\nchaos report: {out}/chaos.md")
    ok = t.lost == 0 and t.duplicated == 0 and figures["bad_input_cases_handled"] == len(bad)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
