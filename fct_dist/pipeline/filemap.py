"""Map a lake, file by file, through models held by a Ray Data actor pool: exactly once, resumable.

Design (why per file): every input file `X.parquet` becomes exactly one output file `X.parquet` in the
output directory, written atomically (tmp + rename on disk, one PUT on S3) once all its rows are done.
An output file's existence therefore means "this input file is done": a rerun after any crash (worker,
actor, driver) skips the inputs whose outputs exist and maps the rest, so every input id ends up in
exactly one output row (or in rejected/). The output's Parquet metadata records rows read and
rejected, so the final `_manifest.json` (written last, the commit) accounts for every input row
even across reruns: rows_in = rows_out + rows_rejected. `_run.json` pins the producer fingerprint:
outputs of a different producer (say a retrained h) are cleared instead of reused.

Inside the actor a file is read batch by batch (bounded memory), bad rows are validated out, the
good ones go through the model on the actor's device; Ray Data schedules files over the pool.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from .. import lake
from ..config import Actors
from ..lake import LakeError
from ..runtime import gpus_available
from ..storage import Store, is_storage_fault

FIELDS = ("input", "output", "rows_in", "rows_out", "rows_rejected", "bytes_in", "bytes_out", "seconds",
          "quarantined")
STATS_KEY = b"fct.stats"


class BatchFn(Protocol):
    def __call__(self, batch: pa.RecordBatch) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """-> (bad-row mask, reason per bad row, output vectors {column: (n_good, d)} of the good rows)."""


@dataclass
class FileJob:
    store: Store
    inputs: list[str]
    out_dir: str
    rejected_dir: str
    expected: dict  # input column -> Arrow type or vector dim
    columns: list[str]  # input columns to read
    make_fn: Callable[[], BatchFn]  # built once per actor (loads the models onto its device)
    producer: dict  # output file metadata: what produced each output column
    fingerprint: str  # what the outputs depend on (producer versions, settings)
    actors: Actors
    id_col: str = "id"
    name: str = "map"
    expect_versions: dict = field(default_factory=dict)  # input column -> producer version it must carry
    extra_manifest: dict = field(default_factory=dict)


class FileMapper:
    """Ray Data actor: builds the batch function once, then maps whole files."""

    def __init__(self, job: FileJob):
        self.job = job
        self.fn = job.make_fn()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.map_file(str(p), set(ex)) for p, ex in zip(batch["input"], batch["exclude"])]
        return {k: np.array([r[k] for r in rows]) for k in FIELDS}

    def map_file(self, path: str, exclude: set[int]) -> dict:
        job, t0 = self.job, time.time()
        where, name = job.store.uri(path), path.rsplit("/", 1)[1]
        try:
            outs, rejected, rows_in, seen = [], [], 0, set()
            with job.store.fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                lake.check_schema(pf.schema_arrow, job.expected, where)
                check_versions(pf.schema_arrow, job.expect_versions, where)
                bytes_in = f.size()
                for rb in pf.iter_batches(job.actors.batch_size, columns=job.columns):
                    rows_in += rb.num_rows
                    out, rej = self.map_batch(rb, where, seen, exclude)
                    outs.append(out)
                    if rej is not None:
                        rejected.append(rej)
        except (LakeError, OSError, pa.ArrowException) as e:
            if is_storage_fault(e):  # the store failed, not the data: never quarantine, always stop
                raise lake.read_error(e, where) from None
            if job.actors.on_bad_input == "fail":
                raise LakeError(str(e) if isinstance(e, LakeError) else f"{where}: unreadable ({e})") from None
            return self.quarantine_file(path, str(e), t0)
        n_rej = sum(r.num_rows for r in rejected)
        if rejected:
            lake.write_part(job.store, f"{job.rejected_dir}/{name}", pa.concat_tables(rejected))
        stats = {"input": path, "rows_in": rows_in, "rows_rejected": n_rej, "bytes_in": bytes_in}
        table = pa.concat_tables(outs) if outs else lake.embedding_table(
            np.zeros(0), {c: np.zeros((0, p["dim"])) for c, p in job.producer.items()}, job.producer)
        meta = {lake.META_KEY: json.dumps(job.producer, sort_keys=True), STATS_KEY: json.dumps(stats)}
        table = table.replace_schema_metadata(meta)
        assert table.num_rows + n_rej == rows_in, f"{where}: rows lost in mapping"
        out = f"{job.out_dir}/{name}"
        nbytes = lake.write_part(job.store, out, table)  # the commit of this file
        return stats | {"output": out, "rows_out": table.num_rows, "bytes_out": nbytes,
                        "seconds": time.time() - t0, "quarantined": ""}

    def map_batch(self, rb: pa.RecordBatch, where: str, seen: set, exclude: set) -> tuple[pa.Table, pa.Table | None]:
        job = self.job
        ids = rb.column(job.id_col).to_numpy()
        invalid, reasons, vectors = self.fn(rb)  # vectors: rows that are not invalid
        reason = np.full(len(ids), "", dtype=object)
        reason[invalid] = reasons
        dup = np.zeros(len(ids), bool)
        for i, x in enumerate(ids.tolist()):  # ids repeated inside the file, or kept in an earlier file
            if x in seen or x in exclude:
                dup[i] = True
                reason[i] = reason[i] or ("duplicate id (kept in an earlier file)" if x in exclude
                                          else "duplicate id (repeated in this file)")
            seen.add(x)
        bad = invalid | dup
        if bad.any() and job.actors.on_bad_input == "fail":
            first = int(np.flatnonzero(bad)[0])
            raise LakeError(f"{where}: id {int(ids[first])}: {reason[first]} ({int(bad.sum())} bad rows in this "
                            f"batch; set {job.name}.on_bad_input=quarantine to move them to rejected/)")
        vectors = {k: v[~dup[~invalid]] for k, v in vectors.items()}
        out = lake.embedding_table(ids[~bad], vectors, job.producer)
        rej = None
        if bad.any():
            rej = pa.Table.from_batches([rb]).filter(pa.array(bad)).append_column(
                "reason", pa.array(reason[bad].tolist(), pa.string()))
        return out, rej

    def quarantine_file(self, path: str, reason: str, t0: float) -> dict:
        job, name = self.job, path.rsplit("/", 1)[1]
        data = job.store.read_bytes(path) if job.store.exists(path) else b""
        job.store.write_bytes(f"{job.rejected_dir}/{name}.quarantined", data)
        job.store.write_json(f"{job.rejected_dir}/{name}.reason.json", {"file": job.store.uri(path), "reason": reason})
        try:
            rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        except (pa.ArrowException, OSError):
            rows, reason = 0, f"{reason} (row count unknown: the footer is unreadable)"
        return {"input": path, "output": "", "rows_in": rows, "rows_out": 0, "rows_rejected": rows,
                "bytes_in": len(data), "bytes_out": 0, "seconds": time.time() - t0, "quarantined": reason}


def check_versions(schema: pa.Schema, expect: dict[str, str], where: str) -> None:
    """Each input column must come from the model version the consumer was trained against."""
    prod = lake.producer_of(schema)
    for col, version in expect.items():
        got = prod.get(col, {}).get("version")
        if prod and got != version:
            raise LakeError(f"{where}: column {col!r} was produced by model version {got!r}; "
                            f"expected {version!r} (the version the transformation was trained on)")


def id_ranges(store: Store, paths: list[str], id_col: str) -> list[tuple[str, int, int] | None]:
    """(path, min id, max id) per file from Parquet footer statistics (no data read)."""
    def one(p):
        try:
            with store.fs.open_input_file(p) as f:
                md = pq.ParquetFile(f).metadata
            col = md.schema.to_arrow_schema().get_field_index(id_col)
            lo = hi = None
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(col).statistics
                if st is None or not st.has_min_max:
                    return (p, -(2**63), 2**63 - 1)  # no statistics: assume it may overlap anything
                lo = st.min if lo is None else min(lo, st.min)
                hi = st.max if hi is None else max(hi, st.max)
            return None if lo is None else (p, lo, hi)
        except (OSError, pa.ArrowException):
            return None  # unreadable: the actor reports it
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, paths))


def cross_file_duplicates(store: Store, paths: list[str], id_col: str) -> dict[str, list[int]]:
    """Ids that also occur in an earlier file (input order), by file. Only files whose id ranges
    overlap are read, so a lake written in id order costs one footer read per file."""
    ranges = sorted((r for r in id_ranges(store, paths, id_col) if r), key=lambda r: r[1])
    order = {p: i for i, p in enumerate(paths)}
    groups, cur, hi = [], [], None
    for r in ranges:
        if cur and r[1] <= hi:
            cur.append(r[0])
            hi = max(hi, r[2])
        else:
            if len(cur) > 1:
                groups.append(cur)
            cur, hi = [r[0]], r[2]
    if len(cur) > 1:
        groups.append(cur)
    out: dict[str, list[int]] = {}
    for group in groups:
        seen: set[int] = set()
        for p in sorted(group, key=order.get):
            try:
                with store.fs.open_input_file(p) as f:
                    ids = pq.read_table(f, columns=[id_col])[id_col].to_numpy()
            except (OSError, pa.ArrowException) as e:
                raise lake.read_error(e, store.uri(p)) from None
            dup = sorted(set(ids.tolist()) & seen)
            if dup:
                out[p] = dup
            seen.update(ids.tolist())
    return out


def _done_stats(store: Store, out: str) -> dict:
    """Stats of an already committed output file, from its own footer."""
    with store.fs.open_input_file(out) as f:
        md = pq.ParquetFile(f).metadata
        size = f.size()
    stats = json.loads(md.metadata[STATS_KEY])
    return stats | {"output": out, "rows_out": md.num_rows, "bytes_out": size, "seconds": 0.0,
                    "quarantined": ""}


def run(job: FileJob) -> dict:
    """Map every input file not yet done; then write the manifest that commits the output lake."""
    store, t0 = job.store, time.time()
    if not job.inputs:
        raise LakeError(f"{job.name}: no input files (empty lake)")
    names = [p.rsplit("/", 1)[1] for p in job.inputs]
    if store.has_manifest(job.out_dir):
        m = store.manifest(job.out_dir)
        if m.get("fingerprint") == job.fingerprint and sorted(m["inputs"]) == sorted(job.inputs):
            print(f"[{job.name}] {store.uri(job.out_dir)} is complete and current: nothing to do")
            return m
    run_marker = f"{job.out_dir}/_run.json"
    if store.exists(run_marker) and store.read_json(run_marker).get("fingerprint") != job.fingerprint:
        store.delete(job.out_dir)
        store.delete(job.rejected_dir)
    if not store.exists(run_marker):
        store.write_json(run_marker, {"fingerprint": job.fingerprint, "producer": job.producer})
    store.delete(f"{job.out_dir}/_manifest.json")

    dups = cross_file_duplicates(store, job.inputs, job.id_col)
    if dups and job.actors.on_bad_input == "fail":
        p, ids = next(iter(dups.items()))
        raise LakeError(f"{store.uri(p)}: duplicate ids {ids[:10]} also in an earlier file "
                        f"({sum(map(len, dups.values()))} in {len(dups)} files); set {job.name}.on_bad_input="
                        "quarantine to keep the first occurrence and reject the rest")
    done = set(store.list(job.out_dir, ".parquet"))
    todo = [p for p, n in zip(job.inputs, names) if f"{job.out_dir}/{n}" not in done]
    results = [_done_stats(store, f"{job.out_dir}/{n}") for p, n in zip(job.inputs, names)
               if f"{job.out_dir}/{n}" in done]
    if results:
        print(f"[{job.name}] resuming: {len(results)} of {len(job.inputs)} files already done")
    if todo:
        results += _map_with_ray(job, todo, dups)
    return _commit(job, results, time.time() - t0, len(todo))


def _map_with_ray(job: FileJob, todo: list[str], dups: dict[str, list[int]]) -> list[dict]:
    a = job.actors
    gpu = gpus_available() and a.gpus_per_actor > 0
    # a stage's own error (bad input, storage) reaches the caller as itself, not as UserCodeException
    ray.data.DataContext.get_current().raise_original_map_exception = True
    ds = ray.data.from_items([{"input": p, "exclude": dups.get(p, [])} for p in todo],
                             override_num_blocks=len(todo))
    ds = ds.map_batches(FileMapper, fn_constructor_kwargs={"job": job}, batch_size=1,
                        compute=ray.data.ActorPoolStrategy(size=min(a.num_actors, len(todo))),
                        num_cpus=a.cpus_per_actor, num_gpus=a.gpus_per_actor if gpu else 0)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in ds.iter_rows()]


def _commit(job: FileJob, results: list[dict], wall: float, mapped_files: int) -> dict:
    store = job.store
    results.sort(key=lambda r: r["input"])
    total = {k: sum(r[k] for r in results) for k in ("rows_in", "rows_out", "rows_rejected", "bytes_in", "bytes_out")}
    quarantined = [r for r in results if r["quarantined"]]
    if total["rows_out"] + total["rows_rejected"] != total["rows_in"]:
        raise LakeError(f"{job.name}: rows do not add up: out {total['rows_out']} + rejected "
                        f"{total['rows_rejected']} != read {total['rows_in']}; not committing")
    mapped = sum(r["rows_in"] for r in results if r["seconds"] > 0)
    summary = total | {"files": len(results), "files_mapped_this_run": mapped_files,
                       "files_quarantined": len(quarantined),
                       "quarantined": {store.uri(r["input"]): r["quarantined"] for r in quarantined}, "wall_seconds": round(wall, 2),
                       "rows_per_second": round(mapped / wall, 1) if wall > 0 else None}
    manifest = {"kind": "embeddings", "stage": job.name, "fingerprint": job.fingerprint, "producer": job.producer,
                "inputs": sorted(job.inputs), "files": results, "rows": total["rows_out"], "summary": summary,
                "rejected_dir": store.uri(job.rejected_dir) if total["rows_rejected"] else None} | job.extra_manifest
    store.write_manifest(job.out_dir, manifest)
    print(f"[{job.name}] {summary['rows_in']} rows read, {summary['rows_out']} written, "
          f"{summary['rows_rejected']} rejected, {summary['bytes_in'] / 1e6:.1f} MB in, "
          f"{summary['bytes_out'] / 1e6:.1f} MB out, {wall:.1f} s, {summary['rows_per_second']} rows/s "
          f"-> {store.uri(job.out_dir)}")
    return manifest
