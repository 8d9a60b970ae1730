"""The vector lakes: schemas, validated readers and atomic writers (the image lake: `image_lake`).

Embedding lake: id int64 + one fixed_size_list<float32>[d] per model
                (file metadata key `fct`: JSON with the producing model of every vector column).
                Read from any vector layout real lakes have (`vector_dim`): list<double> as Spark's
                ArrayType writes it, large_list, fixed_shape_tensor; rows of another length are bad input.
Where they live: `layout`. Every finished dataset directory holds a `_manifest.json`, written last
(`currency.commit`, or `snapshots.commit` for the engine's lakes); when it lists its files, readers
read exactly those (one snapshot), never the folder.

Written layout (chosen by measurement, docs/ARCHITECTURE.md): no dictionary, no compression (float
vectors neither repeat nor compress), statistics only on the id column (they give each file's id
range from its footer). Any valid Parquet is read.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import currency, snapshots
from .currency import digest
from .storage import Store, StorageError, is_storage_fault

META_KEY = b"fct"
PINNED = "table-snapshot"  # the manifest kind of a pinned Iceberg snapshot (tables.pin)
# Vectors read from a lake are zero-copy views of Arrow's read-only buffers, and fct only reads the tensors
# made from them (h, training, search): torch's warning about non-writable arrays is noise to a user
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class LakeError(ValueError):
    """A lake file whose content is not what the reader expects; the message names the file."""


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def to_arrow(x: np.ndarray) -> pa.Array:
    """(n, d) float array -> fixed_size_list<float32>[d]; a 1-d array (a scalar per row) as it is."""
    if x.ndim == 1:
        return pa.array(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


FLOATS = (pa.float16(), pa.float32(), pa.float64())
VECTOR_TYPES = ("fixed_size_list, list or large_list of float16/32/64, or a 1-d arrow.fixed_shape_tensor")


def _storage(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col.storage if isinstance(col, pa.ExtensionArray) else col


def vectors(col: pa.Array | pa.ChunkedArray, d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A vector column (any layout `vector_dim` accepts) -> ((n, d) float32, bad-row mask): a row is bad
    when it is null or, in a list column, not of length d (d: the first row's length when None).
    Bad rows read as NaN; float64/float16 are converted once, here."""
    col = _storage(col)
    n = len(col)
    if pa.types.is_fixed_size_list(col.type):
        k = col.type.list_size
        # .values keeps the slots of null rows (flatten would drop them); missing floats read as NaN
        values = col.values.slice(col.offset * k, n * k)
        x = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, k)
        bad = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(n, bool)
        if d is not None and k != d:
            raise LakeError(f"vector column of dim {k}; expected {d}")
        return x, bad
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy()
    if d is None:
        d = int(next((v for v in lengths if v >= 0), 0))
    bad = lengths != d
    if not bad.any():  # the common case: one flatten, one conversion
        return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, d), bad
    x = np.full((n, d), np.nan, np.float32)
    x[~bad] = col.filter(pa.array(~bad)).flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    return x, bad


def to_numpy(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A vector column -> (n, d) float32 (null rows as NaN)."""
    return vectors(col)[0]


def vector_problems(col: pa.Array | pa.ChunkedArray, name: str, d: int, rows: np.ndarray) -> list[str]:
    """Why each of `rows` (bad rows found by `vectors`) is not a vector of d floats."""
    col = _storage(col)
    lengths = pc.list_value_length(col.take(pa.array(rows, pa.int64()))).to_pylist() \
        if not pa.types.is_fixed_size_list(col.type) else [None] * len(rows)
    return [f"null vector in column {name!r}" if n is None else
            f"vector of length {n} in column {name!r}; expected {d}" for n in lengths]


def vector_dim(t: pa.DataType) -> int | None:
    """d of a fixed-size vector column, 0 for a list column (each row carries its length, checked
    per row), None when `t` is not a vector column (see VECTOR_TYPES)."""
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name == "arrow.fixed_shape_tensor" and len(t.shape) != 1:
            return None
        t = t.storage_type
    if pa.types.is_fixed_size_list(t) and t.value_type in FLOATS:
        return t.list_size
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type in FLOATS:
        return 0
    return None


def producer_of(schema: pa.Schema) -> dict:
    """The `fct` metadata a writer attached: {column: {model, version, dim, [space, inputs]}, ...}."""
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def space_of(entry: dict) -> str | None:
    """The model version whose embedding space a column is in: an extracted column's own model's; a
    transformed one records the version h was trained towards as `space`, and its inputs' entries (their
    lineage) as `inputs`."""
    return entry.get("space", entry.get("version"))


def embedding_table(ids: np.ndarray, vectors: dict[str, np.ndarray], producer: dict,
                    id_col: str = "id") -> pa.Table:
    cols = {id_col: pa.array(np.asarray(ids, dtype=np.int64))} | {k: to_arrow(v) for k, v in vectors.items()}
    table = pa.table(cols)
    return table.replace_schema_metadata({META_KEY: json.dumps(producer, sort_keys=True)})


def write_options(id_col: str = "id") -> dict:
    """ParquetWriter options of every file we write."""
    return {"use_dictionary": False, "compression": "none", "write_statistics": [id_col]}


def parquet_bytes(table: pa.Table, id_col: str = "id") -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **write_options(id_col))
    return sink.getvalue()


def write_part(store: Store, path: str, table: pa.Table) -> int:
    """Atomically write one Parquet file; returns its size in bytes."""
    buf = parquet_bytes(table)
    store.write_bytes(path, buf)
    return buf.size


def check_schema(schema: pa.Schema, expected: dict[str, pa.DataType | int], where: str) -> None:
    """`expected` maps column -> Arrow type, or -> d for a vector column of dim d (0: any dim)."""
    for name, want in expected.items():
        idx = schema.get_field_index(name)
        if idx < 0:
            raise LakeError(f"{where}: missing column {name!r}; columns present: {', '.join(schema.names)}")
        got = schema.field(idx).type
        if isinstance(want, int):
            d = vector_dim(got)
            if d is None:
                raise LakeError(f"{where}: column {name!r} has type {got}; expected a vector column of {want} "
                                f"floats ({VECTOR_TYPES})")
            if d and want and d != want:
                raise LakeError(f"{where}: column {name!r} has dim {d}; expected {want}")
        elif got != want:
            raise LakeError(f"{where}: column {name!r} has type {got}; expected {want}")


@dataclass(frozen=True)
class Footer:
    sha: str  # SHA-256 of the footer bytes: changes with the schema, row groups, statistics and metadata
    metadata: pq.FileMetaData
    size: int  # of the whole file


def read_footer(store: Store, path: str) -> Footer:
    """A Parquet file's footer, in one ranged read (two when it exceeds 64 KiB); a storage fault
    raises StorageError, bytes that are not Parquet raise LakeError."""
    where = store.uri(path)
    try:
        with store.fs.open_input_file(path) as f:
            size = f.size()
            tail = f.read_at(min(size, 1 << 16), max(0, size - (1 << 16)))
            n = int.from_bytes(tail[-8:-4], "little") if len(tail) >= 12 else -1
            if tail[-4:] != b"PAR1" or not 0 < n <= size - 12:
                raise LakeError(f"{where}: not a readable Parquet file (no Parquet footer)")
            if n + 8 > len(tail):
                tail = f.read_at(n + 8, size - n - 8)
            raw = tail[-(n + 8):-8]
            metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + raw + tail[-8:]))
    except LakeError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, where) from None
    return Footer(hashlib.sha256(raw).hexdigest()[:32], metadata, size)


def repeats(ids: np.ndarray, invalid: np.ndarray | None = None) -> np.ndarray:
    """Every occurrence of an id but the one kept: its first valid occurrence (`invalid`: a bad-row mask),
    or its first when none is valid; vectorised."""
    n = len(ids)
    order = np.lexsort((np.arange(n), invalid if invalid is not None else np.zeros(n, bool), ids))
    s = ids[order]
    out = np.zeros(n, bool)
    out[order[1:][s[1:] == s[:-1]]] = True
    return out


def find(known: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pos, found): where each of `ids` sits in the sorted array `known`, and whether it is there at all
    (pos is clipped into range, so known[pos] is always safe to read)."""
    if not len(known):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.searchsorted(known, ids).clip(max=len(known) - 1)
    return pos, known[pos] == ids


def duplicate_ids(ids: np.ndarray) -> np.ndarray:
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq[counts > 1]


def read_error(e: Exception, where: str) -> Exception:
    """A failed Parquet read as the right error: the store's fault, or bytes that are not Parquet."""
    if is_storage_fault(e):
        return StorageError(f"cannot read {where}: {e}")
    return LakeError(f"{where}: not a readable Parquet file ({e})")


def read_schema(store: Store, path: str) -> pa.Schema:
    try:
        with store.fs.open_input_file(path) as f:
            return pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, store.uri(path)) from None


def read_part(store: Store, path: str, expected: dict[str, pa.DataType | int],
              columns: Iterable[str] | None = None, id_col: str = "id") -> pa.Table:
    """Read one Parquet file, check its schema and that its ids are unique; errors name the file."""
    where = store.uri(path)
    try:
        with store.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            check_schema(pf.schema_arrow, expected, where)
            table = pf.read(columns=list(columns) if columns else None)
    except LakeError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise read_error(e, where) from None
    for name, want in expected.items():
        if isinstance(want, int) and name in table.column_names:
            x, bad = vectors(table[name], want or None)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                who = f"id {table[id_col][row].as_py()}" if id_col in table.column_names else f"row {row}"
                raise LakeError(f"{where}: {who}: {vector_problems(table[name], name, x.shape[1], [row])[0]} "
                                f"({int(bad.sum())} such rows in this file)")
    if id_col in table.column_names:
        dups = duplicate_ids(table[id_col].to_numpy())
        if len(dups):
            raise LakeError(f"{where}: duplicate ids {dups[:10].tolist()} (column {id_col!r})")
    return table


def listed_paths(store: Store, directory: str) -> list[str]:
    """The paths of the files the lake's manifest lists (its current snapshot, or the data files of the
    Iceberg snapshot a pin records: `tables.pin`); [] without such a list."""
    m = currency.manifest(store, directory) if currency.has_manifest(store, directory) else {}
    if m.get("kind") == PINNED:
        return list(m["paths"])
    listed = m.get("files")
    return [f"{directory}/{n}" for n in snapshots.names(listed)] if isinstance(listed, list) else []


def pinned(store: Store, directory: str) -> str | None:
    """iceberg://table@snapshot when `directory` is the pin of a table's snapshot, else None."""
    if not currency.has_manifest(store, directory):
        return None
    m = currency.manifest(store, directory)
    return m["table"] if m.get("kind") == PINNED else None


def parts(store: Store, directory: str) -> list[str]:
    """The lake's Parquet files: those its manifest lists (one snapshot) when it has one, else every Parquet
    file under the folder, in hive partition folders (`key=value/`) too (partition values are not read as
    columns)."""
    listed = listed_paths(store, directory)
    if listed:
        return listed
    files = [p for p, _, _ in store.list_versions(directory, ".parquet", recursive=True)]
    if not files:
        raise LakeError(f"{store.uri(directory)}: no Parquet files (empty lake)")
    return files


def file_versions(store: Store, directory: str) -> list[tuple[str, int, str]]:
    """(path, size, version) of each of the lake's Parquet files (see `parts`); a file its manifest lists
    that is gone is an error naming it."""
    want = listed_paths(store, directory)
    if not want:
        return store.list_versions(directory, ".parquet", recursive=True)
    by_path = versions_of(store, want)
    missing = [p for p in want if p not in by_path]
    if missing:
        raise LakeError(f"{store.uri(missing[0])}: listed in the lake's manifest but missing ({len(missing)} such "
                        "files): the lake is damaged; rerun the stage that wrote it")
    return [by_path[p] for p in want]


def versions_of(store: Store, paths: list[str]) -> dict[str, tuple[str, int, str]]:
    """{path: (path, size, version)} of those of `paths` that exist, one listing per folder they are in."""
    folders = sorted({p.rsplit("/", 1)[0] for p in paths})
    with ThreadPoolExecutor(16) as pool:
        listed = pool.map(lambda d: store.list_versions(d, ".parquet"), folders)
    want = set(paths)
    return {p: (p, size, version) for found in listed for p, size, version in found if p in want}


def read_lake(store: Store, directory: str, expected: dict[str, pa.DataType | int],
              columns: Iterable[str] | None = None, id_col: str = "id") -> pa.Table:
    """Read a whole (small) lake into one table, validated file by file; ids unique across files."""
    files = parts(store, directory)
    tables = [read_part(store, path, expected, columns, id_col) for path in files]
    ids = np.concatenate([t[id_col].to_numpy() for t in tables])
    dups = duplicate_ids(ids)
    if len(dups):
        where = [store.uri(p) for p, t in zip(files, tables) if np.isin(dups[0], t[id_col].to_numpy())]
        raise LakeError(f"duplicate id {int(dups[0])} ({len(dups)} duplicated ids in all) in {' and '.join(where)}")
    return pa.concat_tables(tables, promote_options="default")


def identity(store: Store, directory: str) -> str:
    """What a finished lake is: its manifest's key (fct's own lakes), else a digest of its Parquet files'
    (path, size, version): a lake someone else wrote changes identity whenever a file is rewritten."""
    if currency.has_manifest(store, directory) and currency.manifest(store, directory).get("key"):
        return currency.manifest(store, directory)["key"]
    listed = store.list_versions(directory, ".parquet", recursive=True)
    if not listed:
        raise LakeError(f"{store.uri(directory)}: no Parquet files (empty lake)")
    return digest(listed)


def column_dims(store: Store, directory: str, columns: Iterable[str]) -> dict[str, int | None]:
    """Vector dim of each column in the lake's first file (a list column: its first row's length);
    None for a column the lake does not have."""
    path = parts(store, directory)[0]
    schema = read_schema(store, path)
    dims = {}
    for c in columns:
        if schema.get_field_index(c) < 0:
            dims[c] = None
            continue
        check_schema(schema, {c: 0}, store.uri(path))
        d = vector_dim(schema.field(c).type)
        if not d:  # a list: its rows carry their length; the first row's is the lake's
            with store.fs.open_input_file(path) as f:
                first = pq.ParquetFile(f).read_row_group(0, columns=[c])[c]
            d = vectors(first.slice(0, 1))[0].shape[1]
        dims[c] = d
    return dims
