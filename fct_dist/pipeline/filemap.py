"""The per-file engine: map a lake, file by file, through a batch function, exactly once.

Every input file `X.parquet` (hive folders such as `part=0/X.parquet` included) becomes exactly one
output file `X.{run}-{rand}.parquet`, written once under a name no other write uses, which appears whole
in one step (`storage.AtomicFile`) once all its rows are done. The output lake is a sequence of
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

A worker (`FileWorker`, one per Ray actor or one in-process, see `distribute.py`) maps a file with
its reads running ahead and its Parquet encoding running behind the batch function, in threads
(pyarrow and torch release the GIL); ids are validated with numpy, no per-row Python.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import queue
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import lake, snapshots
from ..config import Actors, digest
from ..lake import LakeError
from ..lease import Lease
from ..storage import AtomicFile, Store, StorageError, is_storage_fault

log = logging.getLogger(__name__)
KEY = b"fct.key"
STATS = b"fct.stats"
ROW_GROUP_ROWS = 65_536  # output rows per Parquet row group
OWN_SUFFIX = re.compile(r"\.[0-9a-f]{12}-[0-9a-f]{8}$")  # `.{run}-{rand}` of the files the engine writes


class BatchFn(Protocol):
    def __call__(self, batch: pa.RecordBatch) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """-> (bad-row mask, reason per bad row, output columns {column: (n_good, d), or (n_good,) for a
        scalar column} of the good rows)."""


def column_type(p: dict) -> pa.DataType:
    """The Arrow type of an output column from its producer entry: a float32 vector of `dim`, or with
    dim 0 a scalar of `type` (float32 unless it says bool)."""
    return pa.list_(pa.float32(), p["dim"]) if p["dim"] else pa.from_numpy_dtype(np.dtype(p.get("type", "float32")))


def true_rows(table: pa.Table, producer: dict) -> dict[str, int]:
    """Rows that are true in each bool output column (e.g. how many rows came from which source)."""
    return {c: int(np.count_nonzero(table[c].to_numpy(zero_copy_only=False))) for c, p in producer.items()
            if p.get("type") == "bool"}


class InputChanged(StorageError):
    """An input file changed while the run was using it: never quarantined, the run stops."""


@dataclass
class FileJob:
    store: Store
    in_dir: str
    out_dir: str
    rejected_dir: str
    expected: dict  # input column -> Arrow type or vector dim
    columns: list[str]  # input columns to read
    make_fn: Callable[[], BatchFn]  # built once per worker (loads the models onto its device)
    producer: dict  # output file metadata: what produced each output column
    fingerprint: str  # what the outputs depend on besides their input (producer versions, settings)
    actors: Actors
    id_col: str = "id"
    name: str = "map"
    expect_versions: dict = field(default_factory=dict)  # input column -> the embedding space (version) it must be in


@dataclass(frozen=True)
class Input:
    """One input file as the driver found it."""
    path: str
    size: int
    version: str  # changes whenever the file is written again (Store.list_versions)
    name: str = ""  # the path inside the input folder (`part=0/x.parquet` in a hive lake)
    footer: str = ""  # footer hash; "" when the footer is unreadable
    rows: int | None = None  # from the footer
    ids: tuple[int, int] | None = None  # (min, max) from footer statistics; None = unknown
    error: str = ""  # why the file cannot be used (unreadable footer or id column, wrong schema or producer)

    def output_name(self, run_id: str) -> str:
        """A name no other write uses: the input's (less the run part an fct lake's input already carries, so a
        chain of upgrades keeps short names), this run's id and a random part (a retry is a new write)."""
        stem = OWN_SUFFIX.sub("", self.name.removesuffix(".parquet"))
        return f"{stem}.{run_id}-{uuid.uuid4().hex[:8]}"

    def identity(self) -> dict:
        return {"path": self.path, "size": self.size, "version": self.version, "footer": self.footer}


@dataclass
class Task:
    input: Input
    key: str  # what the output's footer must say for it to count as done
    exclude: np.ndarray  # sorted ids of this file kept from another file (their first valid copy is there)
    run_id: str = ""  # the run that maps it (names its files)
    attempts: int = 0  # workers lost while mapping it


def scan(job: FileJob) -> list[Input]:
    """Every input file's identity, rows and id range from its footer; schema and producers checked.
    A storage fault stops the job; an unusable file is flagged (`error`) for the bad-input policy."""
    store = job.store
    listed = lake.file_versions(store, job.in_dir)
    if not listed:
        raise LakeError(f"{store.uri(job.in_dir)}: no Parquet files (empty lake)")

    def one(entry: tuple[str, int, str]) -> Input:
        base = Input(*entry, name=snapshots.relative(job.in_dir, entry[0]))
        where = store.uri(base.path)
        try:
            f = lake.read_footer(store, base.path)
            schema = f.metadata.schema.to_arrow_schema().with_metadata(f.metadata.metadata or {})
        except LakeError as e:
            return dataclasses.replace(base, error=str(e))
        found = dataclasses.replace(base, footer=f.sha, rows=f.metadata.num_rows, ids=id_range(f, job.id_col))
        try:
            lake.check_schema(schema, job.expected, where)
            check_versions(schema, job.expect_versions, where)
        except LakeError as e:
            return dataclasses.replace(found, error=str(e))
        return found

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, listed))


def id_range(footer: lake.Footer, id_col: str) -> tuple[int, int] | None:
    """(min, max) id from the row-group statistics; None when a row group has none."""
    md = footer.metadata
    col = md.schema.to_arrow_schema().get_field_index(id_col)
    if col < 0 or md.num_rows == 0:
        return None if col < 0 else (0, -1)
    lo = hi = None
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if md.row_group(g).num_rows == 0:
            continue
        if st is None or not st.has_min_max:
            return None
        lo, hi = (st.min, st.max) if lo is None else (min(lo, st.min), max(hi, st.max))
    return (lo, hi) if lo is not None else (0, -1)


def check_versions(schema: pa.Schema, expect: dict[str, str], where: str) -> None:
    """Each input column must be in the embedding space (model version) the consumer was trained on: a
    column extracted by that version, or transformed into its space (a chained upgrade's input)."""
    prod = lake.producer_of(schema)
    for col, version in expect.items():
        got = lake.space_of(prod.get(col, {}))
        if prod and version is not None and got != version:
            raise LakeError(f"{where}: column {col!r} holds embeddings of model version {got!r}; "
                            f"expected {version!r} (the version the transformation was trained on)")


def overlapping(inputs: list[Input]) -> list[list[Input]]:
    """Groups (in input order) of the usable files whose id ranges overlap: only they can share an id."""
    usable = [i for i in inputs if not i.error and i.ids != (0, -1)]
    full = (-(2**63), 2**63 - 1)
    spans = sorted(((i.ids or full)[0], (i.ids or full)[1], k) for k, i in enumerate(usable))
    groups, cur, hi = [], [], None
    for lo, top, k in spans:
        if cur and lo <= hi:
            cur.append(k)
            hi = max(hi, top)
        else:
            groups.append(cur)
            cur, hi = [k], top
    groups.append(cur)
    return [[usable[k] for k in sorted(g)] for g in groups if len(g) > 1]


def read_columns(job: FileJob, inp: Input, columns: list[str]) -> pa.Table:
    """Whole columns of one input; bytes that do not decode are a LakeError naming the file."""
    try:
        with job.store.fs.open_input_file(inp.path) as f:
            return pq.read_table(f, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise lake.read_error(e, job.store.uri(inp.path)) from None


def cross_file_duplicates(job: FileJob, inputs: list[Input], valid: Callable[[pa.Table], np.ndarray]
                          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({path: sorted ids it leaves to another file}, {path: why it is unreadable}). An id in several files
    is kept in the first file (input order) holding a copy that `valid` accepts (the first file holding it
    when none does). Only files whose id ranges overlap are read, id column first: a lake written in id
    order costs no read at all. A file whose columns do not decode is reported unreadable and owns no id."""
    exclude, unreadable = {}, {}
    for group in overlapping(inputs):
        while True:  # again without a file found unreadable: it must not own an id
            group = [i for i in group if i.path not in unreadable]
            ids = {}
            for i in group:
                try:
                    ids[i.path] = read_columns(job, i, [job.id_col])[job.id_col].to_numpy()
                except LakeError as e:
                    unreadable[i.path] = str(e)
            group = [i for i in group if i.path in ids]
            uniq = np.concatenate([np.unique(ids[i.path]) for i in group] or [np.zeros(0, np.int64)])
            shared, counts = np.unique(uniq, return_counts=True)
            shared = shared[counts > 1]
            if not len(shared) or job.actors.on_bad_input == "fail":
                break
            owner, broken = {}, False
            for i in group:  # which shared ids each file holds a valid copy of, in input order
                here = np.isin(ids[i.path], shared)
                if not here.any():
                    continue
                try:
                    rows = read_columns(job, i, job.columns).filter(pa.array(here))
                except LakeError as e:
                    unreadable[i.path], broken = str(e), True
                    break
                ok = ids[i.path][here][valid(rows)]
                for x in ok.tolist():
                    owner.setdefault(x, i.path)
            if broken:
                continue
            for x in shared.tolist():  # no valid copy anywhere: the first file holding it keeps (rejects) it
                owner.setdefault(x, next(i.path for i in group if np.isin(x, ids[i.path])))
            break
        for i in group:
            if len(shared) and job.actors.on_bad_input == "fail":
                earlier = np.concatenate([ids[j.path] for j in group[:group.index(i)]] or [np.zeros(0, np.int64)])
                dup = np.intersect1d(ids[i.path], earlier)
            else:
                mine = np.intersect1d(ids[i.path], shared)
                dup = mine[[owner[x] != i.path for x in mine.tolist()]] if len(mine) else mine
            if len(dup):
                exclude[i.path] = dup
    return exclude, unreadable


class Prefetch:
    """Iterate `it` ahead in a thread, `depth` items deep; its exceptions surface in the consumer.
    `close()` stops and joins the thread, so the file it reads can be closed safely afterwards."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 2):
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for x in it:
                if not self._put((x, None)):
                    return
            self._put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put((self._END, e))

    def __iter__(self) -> Iterator:
        while True:
            x, err = self.q.get()
            if x is self._END:
                if err is not None:
                    raise err
                return
            yield x

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class OutputWriter:
    """One output file, Parquet-encoded in a background thread in row groups of ROW_GROUP_ROWS,
    streamed into an AtomicFile: it appears whole on `close()`, or not at all."""

    def __init__(self, store: Store, path: str, schema: pa.Schema, id_col: str):
        self.file = AtomicFile(store, path)
        self.writer = pq.ParquetWriter(self.file.stream, schema, **lake.write_options(id_col))
        self.pool = ThreadPoolExecutor(1)
        self.pending: list[pa.Table] = []
        self.futures: list = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.rows += table.num_rows
        if sum(t.num_rows for t in self.pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _wait(self, future) -> None:
        try:
            future.result()
        except (OSError, pa.ArrowException) as e:
            raise self.file.error(e) from None

    def _flush(self) -> None:
        if self.pending:
            self.futures.append(self.pool.submit(self.writer.write_table, pa.concat_tables(self.pending)))
            self.pending = []
        for f in [f for f in self.futures if f.done()]:
            self._wait(f)
            self.futures.remove(f)
        while len(self.futures) > 2:  # bounded memory: at most 2 row groups waiting to be encoded
            self._wait(self.futures.pop(0))

    def close(self, metadata: dict[bytes, str]) -> int:
        """Finish the file and make it appear (the commit of its input); returns its size in bytes."""
        try:
            self._flush()
            for f in self.futures:
                self._wait(f)
            self.pool.shutdown()
            self.writer.add_key_value_metadata(metadata)
            self.writer.close()
        except BaseException as e:
            self.abort()
            raise (self.file.error(e) if isinstance(e, (OSError, pa.ArrowException)) else e) from None
        return self.file.commit()

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        try:  # closed now, so that it does not try again on a closed stream when collected
            self.writer.close()
        except (OSError, pa.ArrowException):
            pass
        self.file.abort()


class FileWorker:
    """Maps whole files with one batch function. Thread-safe: files in flight share the function,
    whose calls take turns (one device, one thread pool), while their reads and writes overlap."""

    def __init__(self, job: FileJob):
        self.job = job
        self.fn = job.make_fn()
        self.compute = threading.Lock()
        self.busy = threading.local()  # seconds inside the batch function, per file (one thread maps one file)

    def map_file(self, task: Task) -> dict:
        try:
            return self._attempt(task)
        finally:  # the file's Arrow buffers go back to the OS with it, not at the allocator's leisure
            pa.default_memory_pool().release_unused()

    def _attempt(self, task: Task) -> dict:
        job, inp, t0 = self.job, task.input, time.time()
        where = job.store.uri(inp.path)
        try:
            return self._map(task, where, t0)
        except StorageError:  # the store failed, or the input changed under us: never quarantined
            raise
        except (LakeError, OSError, pa.ArrowException) as e:
            if is_storage_fault(e):
                raise lake.read_error(e, where) from None
            reason = str(e) if isinstance(e, LakeError) else f"{where}: unreadable ({e})"
            if job.actors.on_bad_input == "fail":
                raise LakeError(reason) from None
            return quarantine(job, task, reason, t0)

    def _map(self, task: Task, where: str, t0: float) -> dict:
        job, inp = self.job, task.input
        self.busy.seconds = 0.0
        footer = lake.read_footer(job.store, inp.path)
        if (footer.sha, footer.size) != (inp.footer, inp.size):
            raise InputChanged(f"{where} changed while this run was using it (size or footer differs from "
                               "when the run started); rerun")
        out_name = inp.output_name(task.run_id)
        with job.store.fs.open_input_file(inp.path) as f:
            pf = pq.ParquetFile(f, metadata=footer.metadata)
            ids_all = pf.read(columns=[job.id_col]).column(0).to_numpy()
            elsewhere = np.isin(ids_all, task.exclude) if len(task.exclude) else np.zeros(len(ids_all), bool)
            repeated = lake.repeats(ids_all) & ~elsewhere
            bad_ids = repeated | elsewhere
            if bad_ids.any() and job.actors.on_bad_input == "fail":
                first = int(np.flatnonzero(bad_ids)[0])
                raise LakeError(f"{where}: id {int(ids_all[first])}: duplicate id "
                                f"({'kept in another file' if elsewhere[first] else 'repeated in this file'}); "
                                f"set {job.name}.on_bad_input=quarantine to move such rows to rejected/")
            if repeated.any():  # keep each id's first valid copy, not merely its first
                repeated = self._repeats(pf, ids_all, elsewhere)
            writer = OutputWriter(job.store, f"{job.out_dir}/{out_name}.parquet", self._out_schema(), job.id_col)
            rejected, rows_in, trues = [], 0, {}
            try:
                with contextlib.closing(Prefetch(pf.iter_batches(job.actors.batch_size, columns=job.columns))) as batches:
                    for rb in batches:
                        sl = slice(rows_in, rows_in + rb.num_rows)
                        rows_in += rb.num_rows
                        out, rej = self._map_batch(rb, where, repeated[sl], elsewhere[sl])
                        writer.add(out)
                        for c, n in true_rows(out, job.producer).items():
                            trues[c] = trues.get(c, 0) + n
                        if rej is not None:
                            rejected.append(rej)
            except BaseException:
                writer.abort()
                raise
        n_rej = sum(r.num_rows for r in rejected)
        if rows_in != inp.rows or writer.rows + n_rej != rows_in:
            writer.abort()
            raise RuntimeError(f"{where}: rows do not add up: footer {inp.rows}, read {rows_in}, "
                               f"written {writer.rows} + rejected {n_rej}")
        stats = {"input": inp.identity(), "rows_in": rows_in, "rows_out": writer.rows, "rows_rejected": n_rej,
                 "bytes_in": inp.size, "quarantined": "", "rejected_files": [f"{out_name}.parquet"] if rejected else [],
                 "true_rows": trues}
        try:  # rejected rows first: the output file is the commit
            if rejected:
                table = pa.concat_tables(rejected).replace_schema_metadata({KEY: task.key})
                lake.write_part(job.store, f"{job.rejected_dir}/{out_name}.parquet", table)
        except BaseException:
            writer.abort()
            raise
        nbytes = writer.close({KEY: task.key, STATS: json.dumps(stats)})  # the commit of this file
        return stats | {"output": f"{out_name}.parquet", "bytes_out": nbytes, "seconds": time.time() - t0,
                        "fn_seconds": self.busy.seconds}

    def _repeats(self, pf: pq.ParquetFile, ids: np.ndarray, elsewhere: np.ndarray) -> np.ndarray:
        """Every copy of a repeated id but its first valid one (as the batch function judges them)."""
        job = self.job
        rows = np.isin(ids, ids[lake.repeats(ids)]) & ~elsewhere
        table = pf.read(columns=job.columns).filter(pa.array(rows))
        invalid = np.zeros(len(ids), bool)
        with self.compute:
            invalid[rows] = invalid_rows(self.fn, table)
        return lake.repeats(ids, invalid) & ~elsewhere


    def _out_schema(self) -> pa.Schema:
        job = self.job
        fields = [pa.field(job.id_col, pa.int64())] + [pa.field(c, column_type(p)) for c, p in job.producer.items()]
        return pa.schema(fields, metadata={lake.META_KEY: json.dumps(job.producer, sort_keys=True)})

    def _map_batch(self, rb: pa.RecordBatch, where: str, repeated: np.ndarray,
                   elsewhere: np.ndarray) -> tuple[pa.Table, pa.Table | None]:
        job = self.job
        ids = rb.column(job.id_col).to_numpy()
        with self.compute:
            t0 = time.perf_counter()
            invalid, reasons, vectors = self.fn(rb)  # vectors: rows that are not invalid
            self.busy.seconds += time.perf_counter() - t0
        dup = repeated | elsewhere
        bad = invalid | dup
        if invalid.any() and job.actors.on_bad_input == "fail":
            first = int(np.flatnonzero(invalid)[0])
            raise LakeError(f"{where}: id {int(ids[first])}: {reasons[0]} ({int(invalid.sum())} bad rows in this "
                            f"batch; set {job.name}.on_bad_input=quarantine to move them to rejected/)")
        for c, v in vectors.items():  # a model that does not match its record is a bug, not bad input
            want = (int((~invalid).sum()), *([job.producer[c]["dim"]] if job.producer[c]["dim"] else []))
            if v.shape != want:
                raise RuntimeError(f"{job.name}: the batch function returned {c} of shape {v.shape}; expected {want}")
        if dup[~invalid].any():
            vectors = {k: v[~dup[~invalid]] for k, v in vectors.items()}
        out = pa.table({job.id_col: pa.array(ids[~bad], pa.int64())} | {k: lake.to_arrow(v) for k, v in vectors.items()})
        if not bad.any():
            return out, None
        reason = np.full(len(ids), "", dtype=object)
        reason[invalid] = reasons
        reason[repeated & ~invalid] = "duplicate id (repeated in this file)"
        reason[elsewhere & ~invalid] = "duplicate id (kept in another file)"
        rej = pa.Table.from_batches([rb]).filter(pa.array(bad)).append_column(
            "reason", pa.array(reason[bad].tolist(), pa.string()))
        return out, rej


def quarantine(job: FileJob, task: Task, reason: str, t0: float | None = None) -> dict:
    """Set a whole input file aside: a copy and the reason under rejected/, and an empty output whose
    footer says so (so a rerun with the same key does not try it again)."""
    store, inp = job.store, task.input
    name = inp.output_name(task.run_id)
    copy, why = f"{name}.quarantined", f"{name}.reason.json"
    store.copy(inp.path, f"{job.rejected_dir}/{copy}")
    store.write_json(f"{job.rejected_dir}/{why}", {"file": store.uri(inp.path), "reason": reason, "key": task.key,
                                                   "rows": inp.rows})
    if inp.rows is None:
        reason = f"{reason} (row count unknown: the footer is unreadable)"
    stats = {"input": inp.identity(), "rows_in": inp.rows, "rows_out": 0, "rows_rejected": inp.rows,
             "bytes_in": inp.size, "quarantined": reason, "rejected_files": [copy, why]}
    empty = pa.table({job.id_col: pa.array([], pa.int64())} | {
        c: pa.array([], column_type(p)) for c, p in job.producer.items()})
    meta = {KEY: task.key, STATS: json.dumps(stats), lake.META_KEY: json.dumps(job.producer, sort_keys=True)}
    nbytes = lake.write_part(job.store, f"{job.out_dir}/{name}.parquet", empty.replace_schema_metadata(meta))
    log.warning("[%s] quarantined %s: %s", job.name, store.uri(inp.path), reason)
    return stats | {"output": f"{name}.parquet", "bytes_out": nbytes, "seconds": time.time() - (t0 or time.time())}


def output_key(job: FileJob, inp: Input, exclude: np.ndarray) -> str:
    return digest(job.fingerprint, inp.identity(), digest(exclude.tolist()) if len(exclude) else "")


def existing_outputs(job: FileJob) -> dict[str, tuple[str, dict, int]]:
    """{key: (name, stats, bytes)} of the output files already in the folder (any generation, any run,
    orphans included), from their footers; a file that is not readable Parquet is ignored."""
    store = job.store

    def one(path: str):
        try:
            f = lake.read_footer(store, path)
        except LakeError:
            return "", None
        meta = f.metadata.metadata or {}
        return meta.get(KEY, b"").decode(), (snapshots.relative(job.out_dir, path), json.loads(meta.get(STATS, b"{}")),
                                             f.size)

    listed = [p for p, _, _ in store.list_versions(job.out_dir, ".parquet", recursive=True)]
    with ThreadPoolExecutor(16) as pool:
        return {key: v for key, v in pool.map(one, listed) if key}


def check_disjoint(job: FileJob) -> None:
    """The output and rejected folders must lie outside the input folder, and it outside them: a run reads
    every file under its input and writes under its outputs."""
    store, a = job.store, job.in_dir.rstrip("/") + "/"
    for what, d in (("the output", job.out_dir), ("the rejected-rows folder", job.rejected_dir)):
        b = d.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise LakeError(f"{store.uri(d)} ({what}) {'is' if a == b else 'overlaps'} the input folder "
                            f"{store.uri(job.in_dir)}: a run must never write into the lake it reads; choose an "
                            "output outside the input (and not above it)")


def invalid_rows(fn: BatchFn, table: pa.Table) -> np.ndarray:
    """The batch function's verdict on each row of a non-empty `table` (True: the row is bad input)."""
    return fn(table.combine_chunks().to_batches()[0])[0]


def validity(job: FileJob) -> Callable[[pa.Table], np.ndarray]:
    """The batch function's valid-row mask, its models loaded on first use (only ids found in several files
    need it, on the driver)."""
    fn: list[BatchFn] = []

    def valid(table: pa.Table) -> np.ndarray:
        if not table.num_rows:
            return np.zeros(0, bool)
        if not fn:
            fn.append(job.make_fn())
        return ~invalid_rows(fn[0], table)
    return valid


def run(job: FileJob, distribute: Callable[[FileJob, list[Task], Lease], tuple[list[dict], float, int]]) -> dict:
    """Map every input file not yet done for this job's key; then commit the output lake's next snapshot."""
    store, t0 = job.store, time.time()
    check_disjoint(job)
    with Lease(store, job.out_dir, job.actors.lease_seconds, f"fct {job.name}") as lease:
        at = snapshots.base(store, job.out_dir)
        inputs = scan(job)
        job_key = digest(job.fingerprint, [i.identity() for i in inputs])
        if at.manifest and at.manifest.get("key") == job_key:
            damage = snapshots.verify(store, job.out_dir, at.manifest)
            if not damage:
                log.info("[%s] %s is complete and current: nothing to do", job.name, store.uri(job.out_dir))
                return at.manifest
            log.warning("[%s] %s is damaged (%s%s): mapping those files again", job.name, store.uri(job.out_dir),
                        "; ".join(damage[:3]), f"; and {len(damage) - 3} more" if len(damage) > 3 else "")
        if job.actors.on_bad_input == "fail" and any(i.error for i in inputs):
            bad = [i for i in inputs if i.error]
            raise LakeError(f"{bad[0].error}" + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""))
        dups, unreadable = cross_file_duplicates(job, inputs, validity(job))
        if unreadable and job.actors.on_bad_input == "fail":
            raise LakeError(next(iter(unreadable.values())))
        inputs = [dataclasses.replace(i, error=unreadable.get(i.path, i.error)) for i in inputs]
        if dups and job.actors.on_bad_input == "fail":
            p, ids = next(iter(dups.items()))
            raise LakeError(f"{store.uri(p)}: duplicate ids {ids[:10].tolist()} also in an earlier file "
                            f"({sum(map(len, dups.values()))} in {len(dups)} files); set {job.name}.on_bad_input="
                            "quarantine to keep each id's first valid copy and reject the rest")
        none = np.zeros(0, np.int64)
        tasks = [Task(i, output_key(job, i, dups.get(i.path, none)), dups.get(i.path, none), lease.run_id)
                 for i in inputs]
        existing = existing_outputs(job)
        done = {t.input.path: existing[t.key] for t in tasks if t.key in existing}
        results = [stats | {"output": name, "bytes_out": size, "seconds": 0.0} for name, stats, size in done.values()]
        if results:
            log.info("[%s] resuming: %d of %d files already done", job.name, len(results), len(inputs))
        todo = [t for t in tasks if t.input.path not in done]
        for t in [t for t in todo if t.input.error]:  # quarantine policy: unusable files never reach a worker
            results.append(quarantine(job, t, t.input.error))
        todo = [t for t in todo if not t.input.error]
        t_map, startup, workers = time.time(), 0.0, 0
        if todo:
            mapped, startup, workers = distribute(job, todo, lease)
            results += mapped
        timing = {"startup_seconds": startup, "map_seconds": time.time() - t_map - startup, "workers": workers}
        check_unchanged(job, inputs)
        manifest = commit(job, lease, at, results, inputs, job_key, timing | {
            "driver_seconds": t_map - t0, "files_mapped_this_run": len(todo)})
        lease.renew()  # a run whose lease was taken over in the meantime leaves the folder to its new holder
        snapshots.gc(store, job.out_dir, job.rejected_dir, job.actors.gc_grace_seconds, lease.run_id)
        return manifest


def check_unchanged(job: FileJob, inputs: list[Input]) -> None:
    """Every input is still the version the run started from (one listing): else nothing is committed."""
    now = {p: (size, version) for p, size, version in job.store.list_versions(job.in_dir, ".parquet", recursive=True)}
    for i in inputs:
        if now.get(i.path) != (i.size, i.version):
            raise InputChanged(f"{job.store.uri(i.path)} changed or disappeared while this run was using it; "
                               "nothing was committed: rerun")


def commit(job: FileJob, lease: Lease, at: snapshots.Base, results: list[dict], inputs: list[Input], job_key: str,
           timing: dict) -> dict:
    """Check the row accounting, confirm the lease, and commit the next snapshot over `at`."""
    store, t0 = job.store, time.time()
    order = {i.path: k for k, i in enumerate(inputs)}
    results.sort(key=lambda r: order.get(r["input"]["path"], -1))
    if sorted(r["input"]["path"] for r in results) != sorted(order):
        raise RuntimeError(f"{job.name}: results for {len(results)} files, expected {len(inputs)}")
    unknown = [r for r in results if r["rows_in"] is None]
    known = [r for r in results if r["rows_in"] is not None]
    total = {k: sum(r[k] for r in known) for k in ("rows_in", "rows_out", "rows_rejected")}
    total |= {k: sum(r[k] for r in results) for k in ("bytes_in", "bytes_out")}
    trues = {c: sum(r.get("true_rows", {}).get(c, 0) for r in results) for c, p in job.producer.items()
             if p.get("type") == "bool"}
    if total["rows_out"] + total["rows_rejected"] != total["rows_in"]:
        raise RuntimeError(f"{job.name}: rows do not add up: out {total['rows_out']} + rejected "
                           f"{total['rows_rejected']} != read {total['rows_in']}; not committing")
    quarantined = {store.uri(r["input"]["path"]): r["quarantined"] for r in results if r["quarantined"]}
    mapped_rows = sum(r["rows_in"] or 0 for r in results if r["seconds"] > 0)
    fn_seconds = sum(r.get("fn_seconds", 0.0) for r in results if r["seconds"] > 0)
    busy = fn_seconds / (timing["workers"] * timing["map_seconds"]) if timing["workers"] else None
    summary = total | {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()} | {
        "fn_seconds": round(fn_seconds, 3), "fn_busy": round(busy, 3) if busy is not None else None,
        "files": len(results), "files_quarantined": len(quarantined), "quarantined": quarantined, "true_rows": trues,
        "rows_unknown_files": [store.uri(r["input"]["path"]) for r in unknown],
        "rows_per_second": round(mapped_rows / timing["map_seconds"], 1) if mapped_rows else None}
    manifest = {"kind": "embeddings", "stage": job.name, "fingerprint": job.fingerprint,
                "producer": job.producer, "source": store.uri(job.in_dir),
                "files": snapshots.file_entries(store, job.out_dir, [r["output"] for r in results]),
                "rejected_files": sorted(f for r in results for f in r["rejected_files"]),
                "per_file": results, "rows": total["rows_out"], "summary": summary, "writer": lease.run_id,
                "rejected_dir": store.uri(job.rejected_dir)}
    lease.renew()  # fencing: a run whose lease was taken over never commits (and the snapshot check below)
    summary["commit_seconds"] = round(time.time() - t0, 3)
    manifest = snapshots.commit(store, job.out_dir, at, job_key, manifest)
    unknown_note = f", rows of {len(unknown)} quarantined files unknown" if unknown else ""
    log.info("[%s] %s rows read, %s written, %s rejected%s, %d files (%d mapped now), %.1f MB in, %.1f MB out, "
             "%s rows/s -> %s (generation %d)", job.name, total["rows_in"], total["rows_out"], total["rows_rejected"],
             unknown_note, len(results), timing["files_mapped_this_run"], total["bytes_in"] / 1e6,
             total["bytes_out"] / 1e6, summary["rows_per_second"], store.uri(job.out_dir), manifest["generation"])
    return manifest
