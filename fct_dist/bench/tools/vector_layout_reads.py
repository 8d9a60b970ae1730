"""What a lake written by someone else costs to read: one stored-lake file (id, old, side; 128-d
vectors) in each vector layout fct accepts, read and turned into float32 matrices by the reader the
backfill uses (`lake.vectors`), on one core, best of 5.

    taskset -c 0 .venv/bin/python -m fct_dist.bench.tools.vector_layout_reads [--rows 100000] [--dim 128]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fct_dist import lake


def layouts(x: np.ndarray) -> dict[str, tuple[pa.Array, dict]]:
    """(vector column, writer options) per layout, for the same float32 vectors."""
    n, d = x.shape
    offsets = pa.array(np.arange(0, n * d + 1, d, dtype=np.int32))
    ours = lake.write_options()
    return {
        "fct's own: fixed_size_list<float32>, uncompressed": (lake.to_arrow(x), ours),
        "Spark ArrayType(DoubleType): list<double>, snappy": (
            pa.ListArray.from_arrays(offsets, pa.array(x.astype(np.float64).reshape(-1))), {"compression": "snappy"}),
        "pandas/NumPy export: list<float>, snappy": (
            pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1))), {"compression": "snappy"}),
        "large_list<float>, uncompressed": (
            pa.LargeListArray.from_arrays(offsets.cast(pa.int64()), pa.array(x.reshape(-1))), ours),
        "arrow.fixed_shape_tensor<float32>[d], uncompressed": (
            pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [d]), lake.to_arrow(x)), ours),
    }


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--rows", type=int, default=100_000)
    a.add_argument("--dim", type=int, default=128)
    args = a.parse_args()
    rng = np.random.default_rng(0)
    old, side = (rng.standard_normal((args.rows, args.dim), np.float32) for _ in range(2))
    print(f"| layout ({args.rows:,} rows, 2 x {args.dim}-d) | MB on disk | rows/s read + converted (1 core) | vs fct's own |")
    print("|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, ((o, opts), (s, _)) in zip(layouts(old), zip(layouts(old).values(), layouts(side).values())):
            path = os.path.join(tmp, "part.parquet")
            pq.write_table(pa.table({"id": np.arange(args.rows), "old": o, "side": s}), path, **opts)
            best = 1e9
            for _ in range(5):
                t0 = time.perf_counter()
                t = pq.read_table(path, columns=["id", "old", "side"])
                x_old, bad_old = lake.vectors(t["old"], args.dim)
                x_side, bad_side = lake.vectors(t["side"], args.dim)
                best = min(best, time.perf_counter() - t0)
            assert not (bad_old.any() or bad_side.any()) and np.array_equal(x_old, old) and np.array_equal(x_side, side)
            rate = args.rows / best
            base = base or rate
            print(f"| {name} | {os.path.getsize(path) / 1e6:.1f} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
