"""What the engine works on: a job (`FileJob`), its input files as the driver found them (`Input`), one
file's task (`Task`), and the batch function's contract (`BatchFn`). The rooms (`plan`, `worker`, `commit`)
and the distributors meet here."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from ..config import Actors
from ..lake import META_KEY
from ..storage import Store, StorageError

KEY = b"fct.key"  # an output file's footer: the key it was made for
STATS = b"fct.stats"  # ... and its input's row accounting
OWN_SUFFIX = re.compile(r"\.[0-9a-f]{12}-[0-9a-f]{8}$")  # `.{run}-{rand}` of the files the engine writes


class BatchFn(Protocol):
    def __call__(self, batch: pa.RecordBatch) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
        """-> (bad-row mask, reason per bad row, output columns {column: (n_good, d), or (n_good,) for a
        scalar column} of the good rows)."""

def column_type(p: dict) -> pa.DataType:
    """The Arrow type of an output column from its producer entry: a float32 vector of `dim`, or with
    dim 0 a scalar of `type` (an Arrow type name; float32 unless it says otherwise)."""
    return pa.list_(pa.float32(), p["dim"]) if p["dim"] else pa.type_for_alias(p.get("type", "float32"))

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
    carry: list[str] = field(default_factory=list)  # input columns copied unchanged into the output (good rows)


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

def output_schema(job: FileJob) -> pa.Schema:
    """What every output file of `job` holds: the id, then each produced column, and the producers as metadata."""
    fields = [pa.field(job.id_col, pa.int64())] + [pa.field(c, column_type(p)) for c, p in job.producer.items()]
    return pa.schema(fields, metadata={META_KEY: json.dumps(job.producer, sort_keys=True)})

def invalid_rows(fn: BatchFn, table: pa.Table) -> np.ndarray:
    """The batch function's verdict on each row of a non-empty `table` (True: the row is bad input)."""
    return fn(table.combine_chunks().to_batches()[0])[0]
