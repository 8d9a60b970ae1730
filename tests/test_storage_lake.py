import threading

import numpy as np
import pyarrow as pa
import pytest

from fct_dist import currency, image_lake, lake
from fct_dist.datasets import synthetic
from fct_dist.lake import LakeError
from fct_dist.storage import StorageError, open_store

from .harness.faultproxy import FaultProxy
from .support import make_cfg


def store_of(cfg):
    return open_store(cfg.storage)


def test_image_lake_round_trip(any_cfg):
    store = store_of(any_cfg())
    labels = np.array([0, 1, 2, 1, 0], np.int32)
    images = synthetic.generate(labels, 16, 1, seed=0)
    m = image_lake.write_image_split(store, "train", np.arange(5), [image_lake.encode_png(i) for i in images], labels, 2,
                               {"source": "test"}, "test")
    assert m["rows"] == 5 and m["files"] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert m["labels"] == [0, 1, 2] and m["image_shape"] == [1, 16, 16]
    assert currency.manifest(store, store.path("images", "train"))["rows"] == 5
    ids, x, y = image_lake.read_images(store, "train")
    np.testing.assert_array_equal(ids, np.arange(5))
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels)
    ids, x, y = image_lake.read_images(store, "train", labels=[1])
    np.testing.assert_array_equal(ids, [1, 3])
    # the training stages' subset of the split decoded whole is read_images' own (labels first, then the limit)
    for labels, limit in (([0, 1], 3), ([1], None), (None, 2)):
        for got, want in zip(image_lake.select(image_lake.read_images(store, "train"), labels, limit),
                             image_lake.read_images(store, "train", labels, limit)):
            np.testing.assert_array_equal(got, want)


def test_embedding_lake_round_trip_with_producer(any_cfg):
    store = store_of(any_cfg())
    v = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    prod = {"old": {"model": "old", "version": "abc", "dim": 8}}
    path = store.path("embeddings", "x", "test", lake.part_name(0))
    lake.write_part(store, path, lake.embedding_table(np.arange(6), {"old": v}, prod))
    t = lake.read_part(store, path, {"id": pa.int64(), "old": 8})
    assert t.schema.field("old").type == pa.list_(pa.float32(), 8)
    assert lake.producer_of(t.schema) == prod
    np.testing.assert_array_equal(lake.to_numpy(t["old"]), v)


def vector_layouts(v: np.ndarray) -> dict[str, pa.Array]:
    """The same vectors in every layout real lakes have."""
    d = v.shape[1]
    flat64 = pa.array(v.astype(np.float64).reshape(-1))
    offsets = pa.array(np.arange(0, v.size + 1, d), pa.int32())
    return {
        "fixed_size_list<float32>": lake.to_arrow(v),
        "list<double> (Spark ArrayType)": pa.ListArray.from_arrays(offsets, flat64),
        "large_list<float>": pa.LargeListArray.from_arrays(offsets.cast(pa.int64()), pa.array(v.reshape(-1))),
        "fixed_shape_tensor": pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [d]), lake.to_arrow(v)),
        "fixed_size_list<double>": pa.FixedSizeListArray.from_arrays(flat64, d)}


@pytest.mark.parametrize("layout", list(vector_layouts(np.zeros((1, 1), np.float32))))
def test_every_vector_layout_reads_as_the_same_float32_vectors(tmp_path, layout):
    store = open_store(make_cfg(tmp_path).storage)
    v = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    path = store.path("lake", "part-0.parquet")
    lake.write_part(store, path, pa.table({"item": pa.array(np.arange(5)), "vec": vector_layouts(v)[layout]}))
    t = lake.read_part(store, path, {"item": pa.int64(), "vec": 4}, id_col="item")
    x, bad = lake.vectors(t["vec"], 4)
    assert x.dtype == np.float32 and not bad.any()
    np.testing.assert_allclose(x, v, rtol=1e-7)  # float64 rounds back to the same float32


def test_ragged_and_null_vectors_are_bad_rows_named_by_id(tmp_path):
    store = open_store(make_cfg(tmp_path).storage)
    col = pa.array([[1.0, 2.0], [3.0], None, [4.0, 5.0]], pa.list_(pa.float64()))
    x, bad = lake.vectors(col, 2)
    np.testing.assert_array_equal(bad, [False, True, True, False])
    np.testing.assert_array_equal(x[[0, 3]], [[1, 2], [4, 5]])
    assert lake.vector_problems(col, "emb_v1", 2, np.flatnonzero(bad)) == [
        "vector of length 1 in column 'emb_v1'; expected 2", "null vector in column 'emb_v1'"]
    path = store.path("lake", "part-0.parquet")
    lake.write_part(store, path, pa.table({"id": pa.array([10, 11, 12, 13]), "emb_v1": col}))
    with pytest.raises(LakeError, match=r"part-0.parquet: id 11: vector of length 1 in column 'emb_v1'; "
                                        r"expected 2 \(2 such rows in this file\)"):
        lake.read_part(store, path, {"id": pa.int64(), "emb_v1": 2})
    with pytest.raises(LakeError, match=r"column 'emb_v1' has type string; expected a vector column of 2 floats"):
        lake.check_schema(pa.schema([("emb_v1", pa.string())]), {"emb_v1": 2}, "x")


def test_writes_leave_no_temporaries(any_cfg):
    store = store_of(any_cfg())
    path = store.path("a", "b.bin")
    store.write_bytes(path, b"one")
    store.write_bytes(path, b"two")
    assert store.read_bytes(path) == b"two"
    assert [i.base_name for i in store.list_info(store.path("a"), hidden=True)] == ["b.bin"]


def test_a_reader_racing_the_writer_sees_whole_files_only(local_cfg):
    """40 versions of a 4 MB file, each one byte value throughout, written while another thread reads
    the file in a loop: every read is one whole version (a write in place would show a short or a
    mixed read)."""
    store, size = store_of(local_cfg()), 4 << 20
    path, stop, reads, torn = store.path("race", "f.bin"), threading.Event(), [], []
    store.write_bytes(path, bytes([0]) * size)

    def reader():
        while not stop.is_set():
            data = store.read_bytes(path)
            reads.append(data[:1])
            if len(data) != size or data.count(data[:1]) != size:
                torn.append((len(data), data[:1]))
    t = threading.Thread(target=reader)
    t.start()
    for k in range(1, 41):
        store.write_bytes(path, bytes([k]) * size)
    stop.set()
    t.join()
    assert len(set(reads)) > 3, "the reader did not overlap the writes"
    assert not torn, torn[:5]


def test_a_failed_multipart_upload_leaves_the_previous_version(s3_cfg, s3_endpoint):
    """A 24 MB write goes up as a multipart upload; its completion fails: the object keeps its
    previous content (nothing half-written appears)."""
    direct = store_of(s3_cfg())
    path = direct.path("big", "f.bin")
    direct.write_bytes(path, b"old")
    proxy = FaultProxy(s3_endpoint, fraction=0.0, fail=r"^POST .*/big/f\.bin\?uploadId=").start()
    try:
        cfg = make_cfg(f"s3://{direct.root}", "storage.s3_max_attempts=2", endpoint=proxy.url)
        with pytest.raises(StorageError, match=r"cannot write s3://.*/big/f\.bin"):
            store_of(cfg).write_bytes(path, b"x" * (24 << 20))
        assert proxy.counts["fail"] >= 1  # the upload got as far as its completion
    finally:
        proxy.stop()
    assert direct.read_bytes(path) == b"old"


def test_missing_manifest_is_a_clear_error(any_cfg):
    store = store_of(any_cfg())
    with pytest.raises(StorageError, match="is not a finished dataset: _manifest.json is missing"):
        currency.manifest(store, store.path("embeddings", "nothing"))


def write_vectors(store, name, ids, d=8, col="old"):
    path = store.path("lake", name)
    lake.write_part(store, path, lake.embedding_table(np.asarray(ids), {col: np.ones((len(ids), d))}, {}))
    return path


def test_bad_lake_files_are_named(any_cfg):
    store = store_of(any_cfg())
    good = write_vectors(store, "part-00000.parquet", [1, 2, 3])
    data = store.read_bytes(good)
    truncated = store.path("lake", "part-00001.parquet")
    store.write_bytes(truncated, data[: len(data) // 2])
    with pytest.raises(LakeError, match=r"part-00001.parquet: not a readable Parquet file"):
        lake.read_part(store, truncated, {"id": pa.int64()})
    with pytest.raises(LakeError, match=r"part-00000.parquet: column 'old' has dim 8; expected 16"):
        lake.read_part(store, good, {"id": pa.int64(), "old": 16})
    with pytest.raises(LakeError, match=r"part-00000.parquet: missing column 'side'; columns present: id, old"):
        lake.read_part(store, good, {"id": pa.int64(), "side": 8})
    dup = write_vectors(store, "part-00002.parquet", [5, 5, 6])
    with pytest.raises(LakeError, match=r"part-00002.parquet: duplicate ids \[5\]"):
        lake.read_part(store, dup, {"id": pa.int64()})


def test_duplicate_ids_across_files_name_both_files(any_cfg):
    store = store_of(any_cfg())
    write_vectors(store, "part-00000.parquet", [1, 2, 3])
    write_vectors(store, "part-00001.parquet", [3, 4])
    with pytest.raises(LakeError, match=r"duplicate id 3 .* in .*part-00000.parquet and .*part-00001.parquet"):
        lake.read_lake(store, store.path("lake"), {"id": pa.int64()})


def test_empty_lake_is_an_error(any_cfg):
    store = store_of(any_cfg())
    with pytest.raises(LakeError, match="no Parquet files"):
        lake.read_lake(store, store.path("nothing"), {"id": pa.int64()})


def test_undecodable_image_is_named_by_id():
    with pytest.raises(LakeError, match="image of id 42 does not decode"):
        image_lake.decode_images([b"not a png"], "f.parquet", np.array([42]))


def test_storage_root_forms(tmp_path):
    from fct_dist.config import Storage
    assert open_store(Storage(root=f"file://{tmp_path}/x")).root == f"{tmp_path}/x"
    s3 = open_store(Storage(root="s3://bucket/pre/fix/", s3_endpoint="http://127.0.0.1:9"))
    assert (s3.root, s3.scheme) == ("bucket/pre/fix", "s3")
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_store(Storage(root="gs://b/p"))


def test_jpeg_is_resized_and_centre_cropped_to_the_model_input():
    from fct_dist.datasets import synthetic
    jpegs = synthetic.jpeg_photos(2, 48, seed=0)  # 64 x 48 RGB
    assert image_lake.decode_images(jpegs).shape == (2, 3, 48, 64)
    assert image_lake.decode_images(jpegs, size=32).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("w, h", [(64, 48), (48, 64)])
def test_images_are_fitted_pixel_for_pixel_like_a_pil_reference(w, h):
    """Noise (no symmetry to hide a transposed or off-centre crop), wide and tall: the shorter side resized
    to `resize` by bicubic over the centre square (the box computed here), then the centre `size` x `size`
    cut out of it when `resize` is larger; both branches, against PIL directly."""
    from PIL import Image
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)
    png = image_lake.encode_png(pixels)
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)  # the centre square

    def reference(r: int) -> np.ndarray:  # (3, r, r)
        return np.asarray(Image.fromarray(pixels).resize((r, r), Image.Resampling.BICUBIC, box=box)).transpose(2, 0, 1)

    np.testing.assert_array_equal(image_lake.decode_images([png], size=32)[0], reference(32))
    o = (40 - 32) // 2  # resize 40, then the centre 32 x 32
    np.testing.assert_array_equal(image_lake.decode_images([png], size=32, resize=40)[0],
                                  reference(40)[:, o:o + 32, o:o + 32])


def test_s3_is_checked_before_any_work_missing_bucket_no_credentials_no_endpoint(s3_endpoint, tmp_path):
    """fct's own commands check in seconds what the store's client would retry for a minute: a bucket
    that does not exist (never created by a typo), credentials that are not there, an endpoint that
    does not answer; each error names the bucket or the fix."""
    import os
    import subprocess
    import sys
    import uuid
    bucket = f"typo-{uuid.uuid4().hex[:8]}"

    def fct(*sets: str, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fct_dist.cli", "index", "--preset", "tiny", "--set", "storage.s3_max_attempts=8",
               *(x for s in sets for x in ("--set", s))]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    out = fct(f"storage.root=s3://{bucket}/lake", f"storage.s3_endpoint={s3_endpoint}")
    assert out.returncode == 2
    assert (f"bucket '{bucket}' of storage.root s3://{bucket}/lake does not exist at {s3_endpoint}: correct "
            "storage.root, create the bucket, or set storage.s3_create_bucket=true") in out.stderr
    creator = make_cfg(f"s3://{bucket}/lake", endpoint=s3_endpoint)
    assert open_store(creator.storage).fs.get_file_info(bucket).type.name == "NotFound"  # the typo created nothing
    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}  # no keys, no profile, no instance role
    out = fct(f"storage.root=s3://{bucket}/lake", f"storage.s3_endpoint={s3_endpoint}", env=no_credentials)
    assert out.returncode == 2
    assert f"no S3 credentials for storage.root s3://{bucket}/lake: set AWS_ACCESS_KEY_ID" in out.stderr
    out = fct("storage.root=s3://bucket/lake", "storage.s3_endpoint=http://127.0.0.1:9")  # nothing listens
    assert out.returncode == 2
    assert "cannot reach bucket 'bucket' of storage.root s3://bucket/lake at http://127.0.0.1:9: " in out.stderr
    assert "check the network, storage.s3_endpoint" in out.stderr
