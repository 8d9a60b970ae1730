"""The engine's worker room: a `FileWorker` maps whole input files through the batch function, one
output file per input, with its reads running ahead (`Prefetch`) and its Parquet encoding running behind
(`OutputWriter`), in threads (pyarrow and torch release the GIL); ids are checked with numpy, no per-row
Python. A file that is bad input is set aside whole (`quarantine`)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import lake
from ..lake import LakeError
from ..storage import Store, StorageError, is_storage_fault
from .filejob import KEY, STATS, FileJob, InputChanged, Task, invalid_rows, output_schema

log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 65_536  # output rows per Parquet row group


def worker() -> str:
    """host:pid of the process mapping a file, recorded with the file's result (which actor did what)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def true_rows(table: pa.Table, producer: dict) -> dict[str, int]:
    """Rows that are true in each bool output column (e.g. how many rows came from which source)."""
    return {c: int(np.count_nonzero(table[c].to_numpy(zero_copy_only=False))) for c, p in producer.items()
            if p.get("type") == "bool"}

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
        self.file = store.open_atomic(path)
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
            writer = OutputWriter(job.store, f"{job.out_dir}/{out_name}.parquet", output_schema(job), job.id_col)
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
                 "true_rows": trues, "worker": worker()}
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
        columns = {c: rb.column(c).filter(pa.array(~bad)) for c in job.carry} | {
            k: lake.to_arrow(v) for k, v in vectors.items()}
        out = pa.table({job.id_col: pa.array(ids[~bad], pa.int64())} | {c: columns[c] for c in job.producer})
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
             "bytes_in": inp.size, "quarantined": reason, "rejected_files": [copy, why], "worker": worker()}
    schema = output_schema(job)
    empty = schema.empty_table().replace_schema_metadata(schema.metadata | {KEY: task.key, STATS: json.dumps(stats)})
    nbytes = lake.write_part(job.store, f"{job.out_dir}/{name}.parquet", empty)
    log.warning("[%s] quarantined %s: %s", job.name, store.uri(inp.path), reason)
    return stats | {"output": f"{name}.parquet", "bytes_out": nbytes, "seconds": time.time() - (t0 or time.time())}
