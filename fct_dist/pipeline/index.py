"""`fct index` / `fct search`: a sharded FAISS index over an embedding lake.

The billion-scale recipe of faiss's `benchs/distributed_ondisk`: train the quantizer once on a
sample, then every Ray task adds its slice of the lake (with the lake's ids) to a copy of the trained
empty index and writes one shard; search fans out over the shards through faiss's `IndexShards`.
"""
from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np
import pyarrow as pa
import ray
from faiss.contrib.exhaustive_search import knn_ground_truth

from .. import currency, lake, layout, tables
from ..config import Config
from ..currency import digest
from ..lake import LakeError
from ..progress import Bar
from ..runtime import init_ray, on_driver_node, want_gpu
from ..storage import Store, StorageError

log = logging.getLogger(__name__)


def choose_factory(n: int, d: int, train_sample: int) -> str:
    """Flat below 50k rows; IVF-Flat below 5M; above, IVF-PQ with a one-byte code per 2 dims (d/2
    bytes per vector: at d/4 the codes cap recall@10 near 0.8 on clustered data) and an HNSW coarse
    quantizer (assigning tens of millions of rows to flat centroids would dominate the build).
    nlist ~ 4 sqrt(n), at most what `train_sample` rows train (faiss wants >= 39 per list)."""
    if n < 50_000:
        return "Flat"
    nlist = min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(max(train_sample // 39, 1))))
    if n < 5_000_000:
        return f"IVF{nlist},Flat"
    return f"IVF{nlist}_HNSW32,PQ{d // 2 if d % 2 == 0 else d}"


def new_index(factory: str, d: int) -> faiss.Index:
    """An index that accepts the lake's ids: Flat-type indexes get an IDMap around them."""
    index = faiss.index_factory(d, factory)
    ivf = faiss.try_extract_index_ivf(index)
    pq = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(pq, faiss.IndexIVFPQ):  # polysemous training only serves Hamming pre-filtering, which search
        pq.do_polysemous_training = False  # never turns on, and it took 70 % of a 20k-row training here
    return index if hasattr(index, "nlist") or factory.startswith("IDMap") else faiss.IndexIDMap(index)


def to_gpu(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    if use_gpu and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ else index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe


def read_vectors(store: Store, path: str, column: str, d: int, id_col: str = "id") -> tuple[np.ndarray, np.ndarray]:
    t = lake.read_part(store, path, {id_col: pa.int64(), column: d}, columns=[id_col, column], id_col=id_col)
    x = lake.to_numpy(t[column])
    if not np.isfinite(x).all():
        raise LakeError(f"{store.uri(path)}: NaN/inf vectors in column {column!r}; an index needs finite vectors")
    return t[id_col].to_numpy(), x


@ray.remote(num_cpus=0)
class RowsAdded:
    """Rows the shard tasks have added so far, for the driver's progress bar."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


@ray.remote
def _add_shard(trained: bytes, store: Store, files: list[str], column: str, d: int, id_col: str, out: str,
               use_gpu: bool, added) -> dict:
    """One shard: a copy of the trained empty index plus this slice of the lake, written atomically."""
    t0 = time.time()
    index = to_gpu(faiss.deserialize_index(np.frombuffer(trained, np.uint8)), use_gpu)
    rows = 0
    for path in files:
        ids, x = read_vectors(store, path, column, d, id_col)
        index.add_with_ids(x, ids)
        rows += len(ids)
        added.add.remote(len(ids))  # fire and forget: a rerun of this task after a lost node counts again
    data = faiss.serialize_index(to_cpu(index)).tobytes()
    store.write_bytes(out, data)
    return {"file": out.rsplit("/", 1)[1], "rows": rows, "bytes": len(data), "seconds": time.time() - t0}


def add_shards(trained: bytes, store: Store, slices: list[list[str]], column: str, d: int, id_col: str, out: str,
               use_gpu: bool, rows: int) -> list[dict]:
    """Ray tasks add the slices to copies of the trained index, shard-{i}.faiss each, under a live bar."""
    added, ref = RowsAdded.options(scheduling_strategy=on_driver_node()).remote(), ray.put(trained)
    bar = Bar("[index] rows added", rows, "rows")
    pending = [_add_shard.options(num_cpus=0.5, num_gpus=1 if use_gpu else 0).remote(
        ref, store, sl, column, d, id_col, f"{out}/shard-{i:05d}.faiss", use_gpu, added) for i, sl in enumerate(slices)]
    shards, t0 = pending, time.time()
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        try:
            n = min(ray.get(added.get.remote(), timeout=10), rows)
        except (ray.exceptions.RayError, TimeoutError):  # the bar is lost, not the build
            continue
        bar.goto(n, f"{n / max(time.time() - t0, 1e-9):,.0f} rows/s")
    results = ray.get(shards)
    bar.goto(sum(r["rows"] for r in results))
    bar.close()
    ray.kill(added)
    return results


def sample_vectors(store: Store, files: list[str], column: str, d: int, n: int, id_col: str = "id",
                   seed: int = 0) -> np.ndarray:
    """Up to n training vectors, read from randomly chosen files until enough."""
    rng, chunks, got = np.random.default_rng(seed), [], 0
    for i in rng.permutation(len(files)):
        chunks.append(read_vectors(store, files[i], column, d, id_col)[1])
        got += len(chunks[-1])
        if got >= n:
            break
    x = np.concatenate(chunks)
    return x[rng.choice(len(x), n, replace=False)] if len(x) > n else x


def source_of(store: Store, src: str, column: str, plain: bool = False) -> dict:
    """What the index needs of a lake (its key, rows and the column's dim): an fct lake's manifest; with
    `plain`, for a Parquet folder someone else wrote (ids + a vector column) or an Iceberg table, the same
    read from its files. A column that is not a vector column of the lake is an error listing those that are."""
    table = lake.pinned(store, src) is not None  # an Iceberg snapshot's files: read like a plain folder
    if plain and (table or not currency.has_manifest(store, src)):
        files = lake.parts(store, src)
        schema = lake.read_schema(store, files[0])
        if lake.producer_of(schema) and not table:
            currency.manifest(store, src)  # fct's own files without a manifest: an unfinished lake, refused
        vector_columns = [f.name for f in schema if lake.vector_dim(f.type) is not None]
        source = None
    else:  # the manifest alone says it: no listing, no footer read (evaluate asks this of every case)
        source = currency.manifest(store, src)
        vector_columns = [name for name, entry in source["producer"].items() if entry.get("dim")]
    if column not in vector_columns:
        raise LakeError(f"{store.uri(src)}: no vector column {column!r}; its vector columns are "
                        f"{', '.join(vector_columns) or 'none'} (choose one with --column)")
    if source is not None:
        return source
    rows = sum(lake.read_footer(store, path).metadata.num_rows for path in files)
    dim = lake.column_dims(store, src, [column])[column]
    return {"key": lake.identity(store, src), "rows": rows, "producer": {column: {"dim": dim}}}


def settings(cfg: Config, source: dict, column: str) -> dict:
    """What an index over a lake (given by its manifest) depends on: the index config and the lake's key."""
    c, d = cfg.index, source["producer"][column]["dim"]
    factory = choose_factory(source["rows"], d, c.train_sample) if c.factory == "auto" else c.factory
    return {"factory": factory, "dim": d, "column": column, "train_sample": c.train_sample,
            "num_shards": c.num_shards, "nprobe": c.nprobe, "source_key": source["key"]}


def current(cfg: Config, store: Store, name: str, split: str, column: str = "emb") -> dict | None:
    """The manifest of index/{name}/{split} when it indexes today's embeddings/{name}/{split}, else None."""
    s = settings(cfg, source_of(store, layout.embeddings(store, name, split), column), column)
    return currency.current(store, layout.index(store, name, split, column), digest(s))


def build(cfg: Config, store: Store, name: str, split: str = "test", column: str = "emb", input: str | None = None,
          output: str | None = None) -> dict:
    """Index embeddings/{name}/{split} column `column` into index/{name}/{split}/shard-*.faiss + manifest;
    or the lake at the URI `input` (fct's, or any Parquet folder with ids in `columns.id` and the vector
    column) into `output` (default INPUT.index)."""
    src = tables.locate(cfg, store, input) if input else layout.embeddings(store, name, split)
    out = store.resolve(output) if output else f"{src}.index" if input else layout.index(store, name, split, column)
    id_col = cfg.columns.id if input else "id"
    source = source_of(store, src, column, plain=bool(input))
    s = settings(cfg, source, column)
    done = currency.current(store, out, digest(s))
    if done:
        log.info("[index] %s is current: skipped", store.uri(out))
        return done
    init_ray(cfg)
    t0, d, use_gpu = time.time(), s["dim"], want_gpu(cfg.index.use_gpu)
    files = lake.parts(store, src)
    index = new_index(s["factory"], d)
    sample = sample_vectors(store, files, column, d, s["train_sample"], id_col)
    t_train = time.time()
    if not index.is_trained:
        gpu_index = to_gpu(index, use_gpu)
        gpu_index.train(sample)
        index = to_cpu(gpu_index)
    train_seconds = time.time() - t_train
    trained = faiss.serialize_index(index).tobytes()
    store.delete(out)
    n_shards = min(s["num_shards"], len(files))
    slices = [files[i::n_shards] for i in range(n_shards)]
    shards = add_shards(trained, store, slices, column, d, id_col, out, use_gpu, source["rows"])
    seconds = time.time() - t0
    rows = sum(sh["rows"] for sh in shards)
    manifest = currency.commit(store, out, digest(s), {
        "kind": "faiss-index", "factory": s["factory"], "dim": d, "metric": "L2", "nprobe": s["nprobe"],
        "shards": shards, "rows": rows, "bytes": sum(sh["bytes"] for sh in shards), "source": store.uri(src),
        "source_producer": source["producer"], "column": column, "train_sample": len(sample),
        "build_seconds": round(seconds, 2), "train_seconds": round(train_seconds, 2),
        "rows_per_second": round(rows / seconds, 1), "gpu": use_gpu, "settings": s})
    log.info("[index] %s: %d rows in %d shards, %.1f MB, %.0f rows/s -> %s", s["factory"], rows, len(shards),
             manifest["bytes"] / 1e6, manifest["rows_per_second"], store.uri(out))
    return manifest


def _load_shard(store: Store, directory: str, file: str) -> faiss.Index:
    path = f"{directory}/{file}"
    if not store.exists(path):
        raise StorageError(f"index shard {store.uri(path)} is missing (listed in the manifest)")
    try:
        return faiss.deserialize_index(np.frombuffer(store.read_bytes(path), np.uint8))
    except RuntimeError as e:
        raise StorageError(f"index shard {store.uri(path)} is corrupt: {str(e).splitlines()[0]}") from None


def load(store: Store, name: str, split: str = "test", column: str = "emb",
         directory: str | None = None) -> tuple[list[faiss.Index], dict]:
    """The shards and manifest of index/{name}/{split} (of `column`), or of the index at `directory`."""
    directory = directory or layout.index(store, name, split, column)
    manifest = currency.manifest(store, directory)
    return [_load_shard(store, directory, s["file"]) for s in manifest["shards"]], manifest


def search_shards(shards: list[faiss.Index], queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, ids) over every shard through faiss's `IndexShards`: one thread per shard,
    results merged by distance, each shard's own ids kept."""
    fan = faiss.IndexShards(shards[0].d, True, False)  # threaded, successive_ids=False
    for s in shards:
        set_nprobe(s, nprobe)
        fan.add_shard(s)  # faiss's Python wrapper keeps a reference to each shard
    return fan.search(np.ascontiguousarray(queries, np.float32), k)


def exact_knn(store: Store, files: list[str], column: str, d: int, queries: np.ndarray, k: int,
              id_col: str = "id") -> np.ndarray:
    """The ids (n, k) of each query's exact k nearest rows of the lake `files`, streamed file by file
    (faiss.contrib's knn_ground_truth), so no lake is too large for it."""
    ids = []

    def blocks():
        for path in files:
            file_ids, x = read_vectors(store, path, column, d, id_col)
            ids.append(file_ids)
            yield x

    _, pos = knn_ground_truth(np.ascontiguousarray(queries, np.float32), blocks(), k)  # positions in block order
    return np.concatenate(ids)[pos]


def recall(truth: np.ndarray, found: np.ndarray) -> float:
    """k-recall@k: the share of each query's exact k nearest (truth, (n, k)) among the k found, averaged."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(t, f)) / k for t, f in zip(truth, found[:, :k])]))


def search(store: Store, name: str, split: str, queries: np.ndarray, k: int, nprobe: int,
           column: str = "emb", directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, ids) over every shard of the index of embeddings/{name}/{split} (its `column`),
    or of the index at `directory`."""
    shards, manifest = load(store, name, split, column, directory)
    if queries.shape[1] != manifest["dim"]:
        raise LakeError(f"queries have dim {queries.shape[1]}; the index {store.uri(directory or layout.index(store, name, split, column))} "
                        f"has dim {manifest['dim']}")
    return search_shards(shards, queries, k, nprobe)
