"""Who runs the engine's files: this process (`Local`) or a pool of Ray actors (`RayActors`).

Both run the same `FileWorker.map_file`, so `fct bench` compares like with like. `map_files` returns
the per-file results, the seconds spent starting workers (reported apart from the steady-state rate)
and how many workers ran; `map_groups` runs a function over groups of items (refill's histograms).

The Ray pool is scheduled by the driver, file by file, up to `files_in_flight` files per actor (the
worker overlaps one file's reads and writes with another's compute). A file whose actor dies is
retried alone on an actor (so a second death is its own), at most `max_attempts` times; then it is
a poison file: quarantined, or the job stops naming it (`on_bad_input`). A dead actor is replaced;
the replacement gets work once it is up, so when a whole node is lost and the rest of the cluster
has no room for replacements, the surviving actors finish the files.
"""
from __future__ import annotations

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
from .filejob import FileJob, Task
from .worker import FileWorker, quarantine

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


class Local:
    """Every file in this process: one worker, `files_in_flight` files at a time."""

    def map_files(self, job: FileJob, tasks: list[Task], lease: Lease) -> tuple[list[dict], float, int]:
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

    def map_groups(self, fn: Callable[[list], Any], groups: list[list]) -> list:
        """fn over each group in this process's threads; results in the groups' order."""
        with ThreadPoolExecutor(max(1, min(len(groups), os.cpu_count() or 1))) as pool:
            return list(pool.map(fn, groups))


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


class RayActors:
    """Every file on a pool of Ray actors (GPU actors when the cluster has GPUs); Ray is started from `cfg`
    when this process has not joined one yet. Groups run as Ray tasks of `cpus` CPUs each."""

    def __init__(self, cfg: Config | None = None, cpus: float = 1.0):
        self.cfg, self.cpus = cfg, cpus

    def map_files(self, job: FileJob, tasks: list[Task], lease: Lease) -> tuple[list[dict], float, int]:
        if self.cfg is not None:
            init_ray(self.cfg)
        pool = ActorPool(job, len(tasks))
        try:
            startup = pool.start()
            return pool.run(tasks, lease), startup, pool.n
        finally:
            pool.stop()

    def map_groups(self, fn: Callable[[list], Any], groups: list[list]) -> list:
        """fn over each group as a Ray task; results in the groups' order."""
        if self.cfg is not None:
            init_ray(self.cfg)
        remote = ray.remote(num_cpus=self.cpus)(_apply)
        try:
            return ray.get([remote.remote(fn, g) for g in groups])
        except ray.exceptions.RayTaskError as e:
            raise _own_error(e) from None


class ActorPool:
    """The actors of one `map_files` and what each slot is doing: up to `files_in_flight` files, or one
    suspect file alone (a file that lost a worker), or waiting for its replacement actor to come up."""

    def __init__(self, job: FileJob, files: int):
        a = self.a = job.actors
        gpu = gpus_available() and a.gpus_per_actor > 0
        self.opts = {"num_cpus": a.cpus_per_actor, "num_gpus": a.gpus_per_actor if gpu else 0,
                     "max_concurrency": a.files_in_flight, "max_restarts": 0}
        self.job, self.job_ref = job, ray.put(job)
        n = self.n = min(a.num_actors, files, placeable(self.opts, job.name))
        if n < min(a.num_actors, files):
            log.warning("[%s] the cluster holds only %d actors of %s CPUs and %s GPUs: using %d of %d", job.name, n,
                        self.opts["num_cpus"], self.opts["num_gpus"], n, a.num_actors)
        self.actors: list = []
        self.generation = [0] * n  # bumped when a slot's actor is replaced
        self.load, self.alone, self.up = [0] * n, [False] * n, [True] * n
        self.running: dict = {}  # ref -> (slot, generation, task)
        self.starting: dict = {}  # ready ref of a replacement actor -> slot: no work until it is placed and up
        self.pending: deque = deque()
        self.suspects: deque = deque()

    def start(self) -> float:
        """Start the actors and wait until they are up; the seconds it took."""
        t0 = time.time()
        self.actors = [RayFileWorker.options(**self.opts).remote(self.job_ref) for _ in range(self.n)]
        try:
            ray.get([x.ready.remote() for x in self.actors])
        except ray.exceptions.RayTaskError as e:
            raise _own_error(e) from None
        return time.time() - t0

    def stop(self) -> None:
        for x in self.actors:
            ray.kill(x)

    def run(self, tasks: list[Task], lease: Lease) -> list[dict]:
        progress, results = Progress(self.job, tasks), []
        progress.start()
        self.pending.extend(tasks)
        while self.pending or self.suspects or self.running:
            self.assign()
            (ref,), _ = ray.wait([*self.running, *self.starting], num_returns=1)
            if ref in self.starting:  # a replacement is up (or could not start: its slot stays out of work)
                s = self.starting.pop(ref)
                try:
                    self.up[s] = ray.get(ref)
                except ray.exceptions.RayActorError:
                    log.warning("[%s] a replacement worker could not start; going on with the others", self.job.name)
                continue
            s, gen, t = self.running.pop(ref)
            if gen == self.generation[s]:
                self.load[s] -= 1
                self.alone[s] = self.alone[s] and self.load[s] > 0
            try:
                results.append(ray.get(ref))
                progress.done(results[-1])
            except ray.exceptions.RayTaskError as e:
                raise _own_error(e) from None
            except ray.exceptions.RayActorError as e:
                if gen == self.generation[s]:  # replace the dead actor once; its other files fail here too
                    self.replace(s)
                results.extend(self.retry_or_quarantine(t, e))
            lease.check()
        return results

    def assign(self) -> None:
        """Give each slot that is up work until it is full; a suspect file goes alone to an idle slot."""
        for s in (s for s in range(self.n) if self.up[s]):
            while not self.alone[s] and self.load[s] < self.a.files_in_flight:
                if self.suspects and self.load[s] == 0:
                    t, self.alone[s] = self.suspects.popleft(), True
                elif self.pending:
                    t = self.pending.popleft()
                else:
                    break
                self.running[self.actors[s].map_file.remote(t)] = (s, self.generation[s], t)
                self.load[s] += 1

    def replace(self, s: int) -> None:
        """A new actor in slot s; it gets work once placed: after a node is lost there may be no room for it,
        and the files go to the actors that are left."""
        self.actors[s] = RayFileWorker.options(**self.opts).remote(self.job_ref)
        self.generation[s] += 1
        self.load[s], self.alone[s], self.up[s] = 0, False, False
        self.starting[self.actors[s].ready.remote()] = s

    def retry_or_quarantine(self, t: Task, e: ray.exceptions.RayActorError) -> list[dict]:
        """A file whose worker died: again, alone, up to max_attempts; then a poison file (quarantined, or the
        job stops naming it)."""
        t.attempts += 1
        where, first = self.job.store.uri(t.input.path), str(e).splitlines()[0]
        log.warning("[%s] a worker died while mapping %s (attempt %d of %d): %s", self.job.name, where,
                    t.attempts, self.a.max_attempts, first)
        if t.attempts < self.a.max_attempts:
            self.suspects.append(t)
            return []
        reason = f"killed its worker {t.attempts} times (last: {first})"
        if self.a.on_bad_input == "fail":
            raise LakeError(f"{where}: {reason}; set {self.job.name}.on_bad_input=quarantine to set it "
                            "aside and map the rest") from None
        return [quarantine(self.job, t, reason)]


def _apply(fn: Callable[[list], Any], group: list) -> Any:
    return fn(group)


def of(cfg: Config, actors: Actors) -> Local | RayActors:
    """The distributor a config section names (Ray is started only when there is work)."""
    return RayActors(cfg, actors.cpus_per_actor) if actors.distributor == "ray" else Local()
