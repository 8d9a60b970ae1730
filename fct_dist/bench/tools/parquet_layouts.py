"""The measurement behind the Parquet layout of the vectors we write (docs/ARCHITECTURE.md): write
and read speed and size of one output file's worth of 128-d float vectors under each candidate
layout, on one core, best of 5.

    taskset -c 0 .venv/bin/python -m fct_dist.bench.tools.parquet_layouts [--rows 200000] [--dim 128]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VEC = ["emb.list.element"]
LAYOUTS = {
    "pyarrow defaults (dictionary + snappy)": {},
    "no dictionary, snappy": {"use_dictionary": False},
    "no dictionary, no compression": {"use_dictionary": False, "compression": "none"},
    "... + statistics on id only (chosen)": {"use_dictionary": False, "compression": "none", "write_statistics": ["id"]},
    "... + byte_stream_split": {"use_dictionary": False, "compression": "none", "write_statistics": ["id"],
                                "use_byte_stream_split": VEC},
    "... + byte_stream_split + zstd(1)": {"use_dictionary": False, "compression": "zstd", "compression_level": 1,
                                          "write_statistics": ["id"], "use_byte_stream_split": VEC},
    "... + data page v2": {"use_dictionary": False, "compression": "none", "write_statistics": ["id"],
                           "data_page_version": "2.0"},
    "... + 1 MiB pages": {"use_dictionary": False, "compression": "none", "write_statistics": ["id"],
                          "data_page_size": 1 << 20},
}


def best(f, k: int = 5) -> tuple[float, object]:
    out, t = None, 1e9
    for _ in range(k):
        t0 = time.perf_counter()
        out = f()
        t = min(t, time.perf_counter() - t0)
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((a.rows, a.dim), np.float32)
    table = pa.table({"id": pa.array(np.arange(a.rows)),
                      "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), a.dim)})
    print("| layout | bytes / row | write rows/s | read rows/s |\n|---|---|---|---|")
    for name, opts in LAYOUTS.items():
        def write():
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, **opts)
            return sink.getvalue()
        tw, buf = best(write)
        tr, _ = best(lambda: [b.column(1).values.to_numpy() for b in pq.ParquetFile(pa.BufferReader(buf)).iter_batches(8192)])
        print(f"| {name} | {buf.size / a.rows:,.1f} | {a.rows / tw:,.0f} | {a.rows / tr:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
