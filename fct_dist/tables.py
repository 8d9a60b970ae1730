"""Iceberg tables as lakes: `iceberg://namespace.table[@snapshot]` wherever a stage takes a lake.

In: a stage pins one snapshot of the table (its current one without `@`): the snapshot's data files are
written down as a lake's file list (`layout.pin`), which every reader (the engine, index, refill) reads as it
reads an fct lake's snapshot, and the snapshot is part of the job's key, so a rerun after someone appended is a
new job. A snapshot with delete files is refused, naming them: fct maps whole data files and never serves a
deleted row.

Out (`publish`): the engine writes the output lake as usual, in a folder of the table's data location named
for the job, then the result becomes ONE Iceberg snapshot that replaces the table's rows and carries the job's
key (`fct.job-key`). It is committed over the table as the run found it at its start: if anyone committed in
between, Iceberg's serializable validation refuses it (a stale writer never adds a second copy), and a rerun of
the job the table already shows commits nothing.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import pyarrow as pa

from . import currency, lake, layout
from .config import Config
from .currency import digest
from .lake import PINNED, LakeError
from .pipeline.filejob import FileJob, output_schema
from .storage import Store, StorageError

log = logging.getLogger(__name__)

SCHEME = "iceberg://"
JOB_KEY = "fct.job-key"  # the snapshot property that names the job whose output the snapshot is


class TableMoved(LakeError):
    """Someone committed to the output table while this run was working: nothing was committed."""


def is_table(location: str | None) -> bool:
    return bool(location) and location.startswith(SCHEME)


def parse(uri: str) -> tuple[str, int | None]:
    """iceberg://namespace.table[@snapshot] -> (namespace.table, snapshot id or None)."""
    name, _, snap = uri[len(SCHEME):].partition("@")
    if "." not in name or not all(name.split(".")) or (snap and not snap.isdigit()):
        raise LakeError(f"{uri!r}: expected iceberg://namespace.table, or iceberg://namespace.table@SNAPSHOT_ID "
                        "(a 64-bit snapshot id) to read an earlier snapshot")
    return name, int(snap) if snap else None


def file_uri(store: Store, path: str) -> str:
    """A store path as the URI Iceberg records for a data file."""
    return store.uri(path) if store.scheme == "s3" else f"file://{path}"


def properties(cfg: Config, store: Store) -> dict:
    """The catalog's properties: `tables.properties`, else the embedded SQL catalog on sqlite in {root}/iceberg;
    S3 I/O through storage's endpoint and region unless they say otherwise."""
    props = {k: str(v) for k, v in cfg.tables.properties.items()}
    if "uri" not in props and "type" not in props:
        if store.scheme != "file":
            raise LakeError("tables.properties: an s3 storage root has no embedded Iceberg catalog (its sqlite file "
                            "must be local): set tables.properties.uri (sqlite:////path/catalog.db on one machine) or "
                            "a REST or Glue catalog (tables.properties.type, .uri)")
        store.fs.create_dir(layout.iceberg(store), recursive=True)
        props["uri"] = f"sqlite:///{layout.iceberg(store)}/catalog.db"
    if props.get("uri", "").startswith(("sqlite", "postgresql")):
        props.setdefault("warehouse", file_uri(store, f"{layout.iceberg(store)}/warehouse"))
    if store.scheme == "s3":
        if cfg.storage.s3_endpoint:
            props.setdefault("s3.endpoint", cfg.storage.s3_endpoint)
        props.setdefault("s3.region", cfg.storage.s3_region)
    return props


def catalog_kwargs(cfg: Config, store: Store) -> dict:
    """What `ray.data.read_iceberg(catalog_kwargs=...)` / `write_iceberg` need to reach the same catalog."""
    return {"name": cfg.tables.catalog, **properties(cfg, store)}


def catalog(cfg: Config, store: Store):
    from pyiceberg.catalog import load_catalog
    return load_catalog(cfg.tables.catalog, **properties(cfg, store))


def load(cfg: Config, store: Store, name: str):
    """The table, or a LakeError naming it and the catalog."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError
    try:
        return catalog(cfg, store).load_table(name)
    except (NoSuchTableError, NoSuchNamespaceError):
        raise LakeError(f"{SCHEME}{name}: no such table in Iceberg catalog {cfg.tables.catalog!r} "
                        f"({properties(cfg, store).get('uri')})") from None


def pin(cfg: Config, store: Store, uri: str) -> str:
    """Pin the snapshot `uri` names (the table's current one without @): its data files as a lake's file list
    under layout.pin; returns that folder. Delete files, other file formats and files outside the storage are
    refused by name."""
    name, snap = parse(uri)
    t = load(cfg, store, name)
    s = t.current_snapshot() if snap is None else t.snapshot_by_id(snap)
    if s is None:
        raise LakeError(f"{uri}: the table has no snapshot yet (no rows)" if snap is None else
                        f"{uri}: no such snapshot; the table's latest: {[x.snapshot_id for x in t.snapshots()][-5:]}")
    at = f"{SCHEME}{name}@{s.snapshot_id}"
    d = layout.pin(store, name, s.snapshot_id)
    if currency.has_manifest(store, d):
        return d  # a snapshot never changes: its record is made once
    tasks = list(t.scan(snapshot_id=s.snapshot_id).plan_files())
    deletes = sorted({f.file_path for task in tasks for f in task.delete_files})
    if deletes:
        raise LakeError(f"{at}: {len(deletes)} delete files remove rows from its data files (first: {deletes[0]}); "
                        "fct maps whole data files and never serves a deleted row: compact the table first (Spark: "
                        "CALL system.rewrite_data_files with delete-file-threshold 1), or name a snapshot without deletes")
    if not tasks:
        raise LakeError(f"{at}: no data files (empty table)")
    for task in tasks:
        if task.file.file_format.name != "PARQUET":
            raise LakeError(f"{at}: data file {task.file.file_path} is {task.file.file_format.name}; fct reads Parquet")
    try:
        paths = sorted(store.resolve(task.file.file_path) for task in tasks)
    except StorageError as e:
        raise LakeError(f"{at}: {e}") from None
    currency.commit(store, d, digest(str(t.metadata.table_uuid), s.snapshot_id),
                    {"kind": PINNED, "table": at, "paths": paths})
    log.info("pinned %s: %d data files", at, len(paths))
    return d


def locate(cfg: Config, store: Store, location: str) -> str:
    """A stage's input: a table's snapshot, pinned (`pin`), or a URI or path on the storage."""
    return pin(cfg, store, location) if is_table(location) else store.resolve(location)


def iceberg_schema(schema: pa.Schema) -> pa.Schema:
    """Iceberg has no fixed-size list: a vector column is a list<float> there (readers check the dim)."""
    return pa.schema([f.with_type(pa.list_(f.type.value_type)) if pa.types.is_fixed_size_list(f.type) else f
                      for f in schema])


def publish(cfg: Config, store: Store, uri: str, job: FileJob, run: Callable[[FileJob], dict]) -> dict:
    """Run the engine job `job` (`run(job) -> manifest`) into a folder of the table's data location named for
    the job, then commit its output as one snapshot of the table (see the module's docstring). The table is
    made (or its schema checked) before any work."""
    from pyiceberg.exceptions import CommitFailedException, TableAlreadyExistsError, ValidationException
    from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible
    from pyiceberg.table.snapshots import IsolationLevel, Operation
    name, snap = parse(uri)
    if snap is not None:
        raise LakeError(f"{uri}: an output table takes no @snapshot (a run commits the table's next one)")
    cat, schema = catalog(cfg, store), output_schema(job)
    try:
        cat.create_namespace_if_not_exists(name.rsplit(".", 1)[0])
        t = cat.create_table(name, schema=iceberg_schema(schema))
        log.info("[%s] made Iceberg table %s at %s", job.name, uri, t.location())
    except TableAlreadyExistsError:
        t = cat.load_table(name)  # the table as this run found it: the commit is validated against it
    try:
        _check_pyarrow_schema_compatible(t.schema(), schema, format_version=t.format_version)
    except ValueError as e:
        raise LakeError(f"{uri}: the table's schema does not hold this {job.name}'s output "
                        f"({', '.join(schema.names)}): {e}") from None
    if t.metadata.isolation_level(Operation.DELETE) != IsolationLevel.SERIALIZABLE:
        raise LakeError(f"{uri}: write.delete.isolation-level is snapshot; fct commits only under serializable "
                        "isolation, which refuses a stale commit instead of adding a second copy")
    start = t.current_snapshot()
    out = f"{store.resolve(t.location())}/data/{job.name}-{digest(job.fingerprint, lake.identity(store, job.in_dir))}"
    manifest = run(dataclasses.replace(job, out_dir=out, rejected_dir=f"{out}.rejected"))
    if start is not None and start.summary.get(JOB_KEY) == manifest["key"]:
        log.info("[%s] %s already holds this job's output (snapshot %d): nothing to commit", job.name, uri,
                 start.snapshot_id)
        return manifest | {"table": f"{SCHEME}{name}@{start.snapshot_id}"}
    files = [f"{out}/{r['output']}" for r in manifest["per_file"] if r["rows_out"]]
    try:
        t = commit(t, store, files, {JOB_KEY: manifest["key"], "fct.stage": job.name, "fct.source": manifest["source"]})
    except (CommitFailedException, ValidationException) as e:
        raise TableMoved(f"{uri}: someone committed to the table while this run was working (it started at "
                         f"snapshot {start.snapshot_id if start else 'none'}): nothing was committed ({e}); rerun, "
                         "which adopts this run's files") from None
    at = f"{SCHEME}{name}@{t.current_snapshot().snapshot_id}"
    log.info("[%s] committed %s: %d files, %d rows", job.name, at, len(files), manifest["rows"])
    return manifest | {"table": at}


def commit(t, store: Store, files: list[str], props: dict):
    """One snapshot of `t` (as loaded: its current snapshot is what the commit is validated against) whose data
    files are exactly `files`, referenced in place."""
    from pyiceberg.io.pyarrow import parquet_file_to_data_file
    with t.transaction() as tx:
        if tx.table_metadata.name_mapping() is None:  # files written by fct carry no Iceberg field ids
            tx.set_properties(**{"schema.name-mapping.default": tx.table_metadata.schema().name_mapping.model_dump_json()})
        with tx.update_snapshot(snapshot_properties=props).overwrite() as ow:
            if t.current_snapshot() is not None:
                for task in t.scan(snapshot_id=t.current_snapshot().snapshot_id).plan_files():
                    ow.delete_data_file(task.file)
            for p in files:
                ow.append_data_file(parquet_file_to_data_file(t.io, tx.table_metadata, file_uri(store, p)))
    return t
