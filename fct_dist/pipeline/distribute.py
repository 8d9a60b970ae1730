"""Who runs the engine's files: this process (`local`) or a pool of Ray actors (`ray`).

Both run the same `FileWorker.map_file`, so `fct bench` compares like with like. Each returns the
per-file results, the seconds spent starting workers (reported apart from the steady-state rate)
and how many workers ran.

The Ray pool is scheduled by the driver, file by file, up to `files_in_flight` files per actor (the
worker overlaps one file's reads and writes with another's compute). A file whose actor dies is
retried alone on an actor (so a second death is its own), at most `max_attempts` times; then it is
a poison file: quarantined, or the job stops naming it (`on_bad_input`). A dead actor is replaced;
the replacement gets work once it is up, so when a whole node is lost and the rest of the cluster
has no room for replacements, the surviving actors finish the files.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from typing import Any, Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import ray

from ..config import Actors, Config, ConfigError
from ..lake import LakeError
from ..lease import Lease
from ..progress import Bar
from ..runtime import gpus_available, init_ray
from ..storage import StorageError
from . import filemap
from .filemap import FileJob, FileWorker, Task, quarantine

log = logging.getLogger(__name__)


class Progress:
    """Files done as a live bar (or a log line every few seconds), with rows and rows/s since the
    workers were ready."""

    def __init__(self, job: FileJob, tasks: list[Task]):
        self.bar = Bar(f"[{job.name}] files", len(tasks), "files")
        self.rows, self.t0 = 0, time.time()

    def start(self) -> None:
        self.t0 = time.time()

    def done(self, stats: dict) -> None:
        self.rows += stats["rows_in"] or 0
        rate = self.rows / max(time.time() - self.t0, 1e-9)
        self.bar.update(1, f"{self.rows:,} rows, {rate:,.0f} rows/s")
        if self.bar.n >= self.bar.total:
            self.bar.close()


def local(job: FileJob, tasks: list[Task], lease: Lease) -> tuple[list[dict], float, int]:
    """Every file in this process: one worker, `files_in_flight` files at a time."""
    t0 = time.time()
    worker = FileWorker(job)
    startup, progress, results = time.time() - t0, Progress(job, tasks), []
    progress.start()
    with ThreadPoolExecutor(job.actors.files_in_flight) as pool:
        futures = [pool.submit(worker.map_file, t) for t in tasks]
        try:
            for fut in as_completed(futures):
                results.append(fut.result())
                progress.done(results[-1])
                lease.check()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return results, startup, 1


@ray.remote
class RayFileWorker:
    """A Ray actor holding one FileWorker (its models on the actor's device)."""

    def __init__(self, job: FileJob):
        self.worker = FileWorker(job)

    def ready(self) -> bool:
        return True

    def map_file(self, task: Task) -> dict:
        return self.worker.map_file(task)


def placeable(opts: dict, section: str) -> int:
    """How many actors of this shape the cluster can hold at once (more would wait forever)."""
    total = ray.cluster_resources()
    fits = [int(total.get(k, 0) / opts[o] + 1e-9) for k, o in (("CPU", "num_cpus"), ("GPU", "num_gpus")) if opts[o] > 0]
    n = min(fits, default=1 << 30)
    if n < 1:
        raise ConfigError(f"{section}.cpus_per_actor={opts['num_cpus']}, gpus_per_actor={opts['num_gpus']}: no actor "
                          f"of that size fits this cluster ({total.get('CPU', 0)} CPUs, {total.get('GPU', 0)} GPUs)")
    return n


def _own_error(e: ray.exceptions.RayTaskError) -> BaseException:
    """A stage's own error raised in an actor, as itself (the CLI prints its message)."""
    return e.cause if isinstance(e.cause, (LakeError, StorageError)) else e


def actor_pool(job: FileJob, tasks: list[Task], lease: Lease, cfg: Config | None = None) -> tuple[list[dict], float, int]:
    """Every file on a pool of Ray actors (GPU actors when the cluster has GPUs); Ray is started
    here, from `cfg`, when this process has not joined one yet."""
    if cfg is not None:
        init_ray(cfg)
    a = job.actors
    gpu = gpus_available() and a.gpus_per_actor > 0
    opts = {"num_cpus": a.cpus_per_actor, "num_gpus": a.gpus_per_actor if gpu else 0,
            "max_concurrency": a.files_in_flight, "max_restarts": 0}
    job_ref = ray.put(job)
    n = min(a.num_actors, len(tasks), placeable(opts, job.name))
    if n < min(a.num_actors, len(tasks)):
        log.warning("[%s] the cluster holds only %d actors of %s CPUs and %s GPUs: using %d of %d", job.name, n,
                    opts["num_cpus"], opts["num_gpus"], n, a.num_actors)
    t0 = time.time()
    actors = [RayFileWorker.options(**opts).remote(job_ref) for _ in range(n)]
    generation = [0] * n  # bumped when a slot's actor is replaced
    try:
        try:
            ray.get([x.ready.remote() for x in actors])
        except ray.exceptions.RayTaskError as e:
            raise _own_error(e) from None
        startup, progress, results = time.time() - t0, Progress(job, tasks), []
        progress.start()
        pending, suspects = deque(tasks), deque()
        running: dict = {}  # ref -> (slot, generation, task)
        starting: dict = {}  # ready ref of a replacement actor -> slot: no work until it is placed and up
        load, alone, up = [0] * n, [False] * n, [True] * n
        while pending or suspects or running:
            for s in (s for s in range(n) if up[s]):
                while not alone[s] and load[s] < a.files_in_flight:
                    if suspects and load[s] == 0:  # a file that lost a worker runs alone
                        t, alone[s] = suspects.popleft(), True
                    elif pending:
                        t = pending.popleft()
                    else:
                        break
                    running[actors[s].map_file.remote(t)] = (s, generation[s], t)
                    load[s] += 1
            (ref,), _ = ray.wait([*running, *starting], num_returns=1)
            if ref in starting:  # a replacement is up (or could not start: its slot stays out of work)
                s = starting.pop(ref)
                try:
                    up[s] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    log.warning("[%s] a replacement worker could not start; going on with the others", job.name)
                continue
            s, gen, t = running.pop(ref)
            if gen == generation[s]:
                load[s] -= 1
                alone[s] = alone[s] and load[s] > 0
            try:
                results.append(ray.get(ref))
                progress.done(results[-1])
            except ray.exceptions.RayTaskError as e:
                raise _own_error(e) from None
            except ray.exceptions.RayActorError as e:
                if gen == generation[s]:  # replace the dead actor once; its other files fail here too
                    actors[s] = RayFileWorker.options(**opts).remote(job_ref)
                    generation[s] += 1
                    load[s], alone[s], up[s] = 0, False, False
                    # it gets work once placed: after a node is lost there may be no room for it,
                    # and the files go to the actors that are left
                    starting[actors[s].ready.remote()] = s
                t.attempts += 1
                where = job.store.uri(t.input.path)
                log.warning("[%s] a worker died while mapping %s (attempt %d of %d): %s", job.name, where,
                            t.attempts, a.max_attempts, str(e).splitlines()[0])
                if t.attempts < a.max_attempts:
                    suspects.append(t)
                    continue
                reason = f"killed its worker {t.attempts} times (last: {str(e).splitlines()[0]})"
                if a.on_bad_input == "fail":
                    raise LakeError(f"{where}: {reason}; set {job.name}.on_bad_input=quarantine to set it "
                                    "aside and map the rest") from None
                results.append(quarantine(job, t, reason))
            lease.check()
        return results, startup, n
    finally:
        for x in actors:
            ray.kill(x)


def _apply(fn: Callable[[list], Any], group: list) -> Any:
    return fn(group)


def map_groups(cfg: Config, actors: Actors, fn: Callable[[list], Any], groups: list[list]) -> list:
    """fn over each group of items (e.g. files), as Ray tasks of the section's CPU share or, with the local
    distributor, in this process's threads; results in the groups' order."""
    if actors.distributor == "ray":
        init_ray(cfg)
        remote = ray.remote(num_cpus=actors.cpus_per_actor)(_apply)
        try:
            return ray.get([remote.remote(fn, g) for g in groups])
        except ray.exceptions.RayTaskError as e:
            raise _own_error(e) from None
    with ThreadPoolExecutor(max(1, min(len(groups), os.cpu_count() or 1))) as pool:
        return list(pool.map(fn, groups))


def run(cfg: Config, job: FileJob) -> dict:
    """Run an engine job on its configured distributor (Ray is started only when there is work)."""
    distributor = functools.partial(actor_pool, cfg=cfg) if job.actors.distributor == "ray" else local
    return filemap.run(job, distributor)
