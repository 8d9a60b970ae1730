"""The per-file engine: map a lake, file by file, through a batch function, exactly once.

Every input file `X.parquet` (hive folders such as `part=0/X.parquet` included) becomes exactly one
output file `X.{run}-{rand}.parquet`, written once under a name no other write uses, which appears whole
in one step (`Store.open_atomic`) once all its rows are done. The output lake is a sequence of
snapshots (`fct_dist.snapshots`): nothing in the write path deletes or overwrites a file, and one
conditional write of the manifest commits a run. What makes "exactly once" impossible to fool:
- **Identity.** The driver lists every input with its version (`Store.list_versions`: the S3 ETag,
  or mtime + ctime + inode on local disk; an input lake with a manifest: the files of its snapshot)
  and reads its footer before any work (`scan`): size, version and a hash of the footer bytes
  identify the file; the footer also gives its row count, schema, producer metadata and id range.
  Each output's footer records the *key* it was made for: a digest of the producer fingerprint
  (models, versions, settings), its input's identity and the ids it leaves to other files. An
  existing output is adopted only when its key is the one this run would write, whatever its name;
  the job key (fingerprint + every input's identity) decides whether a finished lake is current, and
  only after every file its snapshot lists is verified to be there unchanged.
- **One writer.** A lease (`fct_dist.lease`) on the output folder makes a second run fail at once,
  naming the first. A paused run whose lease was taken over (a zombie) cannot do harm: it writes only
  files of its own names, and its commit fails because the snapshot moved (`SnapshotMoved`).
- **Every row once.** An id found more than once (in a file, or in several files) is kept in its
  first *valid* copy (input order, then row order), decided among the files that are actually used:
  a file quarantined before mapping owns no id. The other copies go to rejected/ with their reason.
- **Commit.** A new snapshot lists exactly this run's result (each file with its size and version)
  and is written only if the lake is still at the generation the run started from. It refuses to
  commit unless rows out + rows rejected = rows read for every file whose rows are known; a
  quarantined file whose footer is unreadable has an unknown row count, and the manifest and the
  summary say so. Files no kept generation lists are removed by `snapshots.gc` (end of run, `fct gc`).

The engine in three rooms, run in order by `run` below: `plan` (driver: identities, duplicates,
tasks), `worker` (a `FileWorker` per Ray actor or in this process, see `distribute`: maps a file), and
`commit` (driver: accounting, the snapshot). Their shared types are in `filejob`.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

from .. import lake, snapshots, tables
from ..config import Config
from ..currency import digest
from ..lease import Lease
from . import commit, plan
from .filejob import FileJob, Task

log = logging.getLogger(__name__)


class Distributor(Protocol):
    def map_files(self, job: FileJob, tasks: list[Task], lease: Lease) -> tuple[list[dict], float, int]:
        """Map the tasks' files -> (their results, seconds spent starting workers, workers used)."""


def run(job: FileJob, distributor: Distributor) -> dict:
    """Map every input file not yet done for this job's key; then commit the output lake's next snapshot."""
    store, t0 = job.store, time.time()
    plan.check_disjoint(job)
    with Lease(store, job.out_dir, job.actors.lease_seconds, f"fct {job.name}") as lease:
        at = snapshots.base(store, job.out_dir)
        inputs = plan.scan(job)
        pinned = lake.pinned(store, job.in_dir)  # an Iceberg snapshot: its id is part of the job
        job_key = digest(job.fingerprint, [i.identity() for i in inputs], *([pinned] if pinned else []))
        if at.manifest and at.manifest.get("key") == job_key:
            damage = snapshots.verify(store, job.out_dir, at.manifest)
            if not damage:
                log.info("[%s] %s is complete and current: nothing to do", job.name, store.uri(job.out_dir))
                return at.manifest
            log.warning("[%s] %s is damaged (%s%s): mapping those files again", job.name, store.uri(job.out_dir),
                        "; ".join(damage[:3]), f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
        inputs, todo, results = plan.tasks(job, inputs, lease.run_id)
        t_map, startup, workers = time.time(), 0.0, 0
        if todo:
            mapped, startup, workers = distributor.map_files(job, todo, lease)
            results += mapped
        timing = {"startup_seconds": startup, "map_seconds": time.time() - t_map - startup, "workers": workers}
        commit.check_unchanged(job, inputs)
        manifest = commit.commit(job, lease, at, results, inputs, job_key, timing | {
            "driver_seconds": t_map - t0, "files_mapped_this_run": len(todo)})
        lease.renew()  # a run whose lease was taken over in the meantime leaves the folder to its new holder
        snapshots.gc(store, job.out_dir, job.rejected_dir, job.actors.gc_grace_seconds, lease.run_id)
        return manifest


def run_into(cfg: Config, job: FileJob, distributor: Distributor, output: str | None) -> dict:
    """`run`; when `output` names an Iceberg table, into that table as one snapshot (`tables.publish`)."""
    if tables.is_table(output):
        return tables.publish(cfg, job.store, output, job, lambda j: run(j, distributor))
    return run(job, distributor)
