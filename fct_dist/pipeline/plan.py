"""The engine's planning room, on the driver: every input's identity (`scan`), the ids each file leaves to
another (`cross_file_duplicates`: an id is kept in its first valid copy), the outputs already made for
this job's key (a resumed run adopts them), and the tasks left to map."""
from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import lake, snapshots
from ..currency import digest
from ..lake import LakeError
from .filejob import KEY, STATS, BatchFn, FileJob, Input, Task, invalid_rows
from .worker import quarantine

log = logging.getLogger(__name__)


def scan(job: FileJob) -> list[Input]:
    """Every input file's identity, rows and id range from its footer; schema and producers checked.
    A storage fault stops the job; an unusable file is flagged (`error`) for the bad-input policy."""
    store = job.store
    listed = lake.file_versions(store, job.in_dir)
    if not listed:
        raise LakeError(f"{store.uri(job.in_dir)}: no Parquet files (empty lake)")

    def one(entry: tuple[str, int, str]) -> Input:
        inside = entry[0].startswith(job.in_dir.rstrip("/") + "/")  # a pinned table's files lie elsewhere
        base = Input(*entry, name=snapshots.relative(job.in_dir, entry[0]) if inside else entry[0].rsplit("/", 1)[1])
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


def tasks(job: FileJob, inputs: list[Input], run_id: str) -> tuple[list[Input], list[Task], list[dict]]:
    """(the inputs with the files found unreadable flagged, the tasks left to map, the results of the files
    already done: adopted outputs, and quarantined ones under the quarantine policy). Under the fail policy
    the first unusable file or duplicate id stops the job here, before any work."""
    store, fail = job.store, job.actors.on_bad_input == "fail"
    if fail and any(i.error for i in inputs):
        bad = [i for i in inputs if i.error]
        raise LakeError(f"{bad[0].error}" + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""))
    dups, unreadable = cross_file_duplicates(job, inputs, validity(job))
    if unreadable and fail:
        raise LakeError(next(iter(unreadable.values())))
    inputs = [dataclasses.replace(i, error=unreadable.get(i.path, i.error)) for i in inputs]
    if dups and fail:
        p, ids = next(iter(dups.items()))
        raise LakeError(f"{store.uri(p)}: duplicate ids {ids[:10].tolist()} also in an earlier file "
                        f"({sum(map(len, dups.values()))} in {len(dups)} files); set {job.name}.on_bad_input="
                        "quarantine to keep each id's first valid copy and reject the rest")
    none = np.zeros(0, np.int64)
    every = [Task(i, output_key(job, i, dups.get(i.path, none)), dups.get(i.path, none), run_id) for i in inputs]
    existing = existing_outputs(job)
    done = {t.input.path: existing[t.key] for t in every if t.key in existing}
    results = [stats | {"output": name, "bytes_out": size, "seconds": 0.0} for name, stats, size in done.values()]
    if results:
        log.info("[%s] resuming: %d of %d files already done", job.name, len(results), len(inputs))
    todo = [t for t in every if t.input.path not in done]
    for t in [t for t in todo if t.input.error]:  # quarantine policy: unusable files never reach a worker
        results.append(quarantine(job, t, t.input.error))
    return inputs, [t for t in todo if not t.input.error], results
