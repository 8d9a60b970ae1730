"""The Iceberg path beside the Parquet folder, in `fct bench`: the production profile's stored lake backfilled
by the same h through Ray, folder -> folder, and table -> table (the stored files registered in place as an
Iceberg table; the run pins its snapshot and commits its output as one snapshot), alternating, each
bench.io_repeats times. Steady rows/s (mapping only) and wall seconds (pin, plan, map, commit) side by side.

    .venv/bin/python -m fct_dist.bench.tables [--rows 1000000]    # this comparison alone
"""
from __future__ import annotations

import argparse
import functools
import logging
import time

from .. import config, lake, layout, tables
from ..config import Config
from ..layout import FCT, STORED
from ..pipeline import backfill
from ..storage import Store, open_store
from .fixtures import profiles, save_models, stored_lake
from .measure import engine_result, measured, median_run

log = logging.getLogger("fct_dist.bench.tables")  # also when run as __main__


def stored_table(cfg: Config, store: Store, split: str) -> str:
    """bench.stored_{split}_{lake}: the stored lake's files registered in an Iceberg table, in place (no copy);
    named for the lake's identity, so a regenerated lake gets a table of its own."""
    directory = layout.embeddings(store, STORED, split)
    name, cat = f"bench.stored_{split}_{lake.identity(store, directory)}", tables.catalog(cfg, store)
    if not cat.table_exists(name):
        files = lake.parts(store, directory)
        cat.create_namespace_if_not_exists("bench")
        t = cat.create_table(name, schema=tables.iceberg_schema(lake.read_schema(store, files[0]).remove_metadata()))
        t.add_files([tables.file_uri(store, f) for f in files])
    return f"{tables.SCHEME}{name}"


def table_run(cfg: Config, store: Store, source: str, split: str) -> dict:
    """One backfill of the stored table into bench.fct_{split}, from scratch (the table and its files dropped)."""
    name, cat = f"bench.fct_{split}", tables.catalog(cfg, store)
    if cat.table_exists(name):
        store.delete(store.resolve(cat.load_table(name).location()))
        cat.drop_table(name)
    t0 = time.time()
    m = backfill.backfill(cfg, store, FCT, split, input=source, output=f"{tables.SCHEME}{name}")
    return engine_result(m, source) | {"end_to_end_seconds": round(time.time() - t0, 2)}


def folder_run(cfg: Config, store: Store, split: str) -> dict:
    """One backfill of the stored folder into embeddings/fct-folder/{split}, from scratch."""
    out = layout.embeddings(store, "fct-folder", split)
    store.delete(out)
    t0 = time.time()
    m = backfill.backfill(cfg, store, FCT, split, output=store.uri(out))
    return engine_result(m, store.uri(out)) | {"end_to_end_seconds": round(time.time() - t0, 2)}


def compare(cfg: Config, store: Store, split: str) -> dict:
    """Folder and table backfills of the same stored lake, alternating; the median of each, and the ratios."""
    c = config.load(base=cfg, overrides=["backfill.distributor=ray"])
    source, runs = stored_table(c, store, split), {"folder": [], "table": []}
    for _ in range(cfg.bench.io_repeats):
        runs["folder"].append(measured(functools.partial(folder_run, c, store, split), 0.0))
        runs["table"].append(measured(functools.partial(table_run, c, store, source, split), 0.0))
    folder, table = median_run(runs["folder"]), median_run(runs["table"])
    out = {"folder": folder, "table": table,
           "table_cost_steady": round(folder["items_per_second"] / table["items_per_second"] - 1, 3),
           "table_cost_end_to_end": round(table["end_to_end_seconds"] / folder["end_to_end_seconds"] - 1, 3)}
    log.info("[bench] Iceberg table path: %s rows/s steady (folder %s), %.1f s end to end (folder %.1f s)",
             f"{table['items_per_second']:,.0f}", f"{folder['items_per_second']:,.0f}", table["end_to_end_seconds"],
             folder["end_to_end_seconds"])
    return out


def main() -> None:
    from ..runtime import init_ray, setup_logging
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--root", default="./fct-data")
    a = ap.parse_args()
    setup_logging(logging.INFO)
    cfg = config.load(overrides=[f"storage.root={a.root}", f"bench.rows={a.rows}"])
    p = next(p for p in profiles(cfg) if p.name == "production")
    store = open_store(cfg.storage).sub("bench", p.name)
    save_models(store, p)
    stored_lake(store, p.dims, a.rows, cfg.bench.rows_per_file)
    init_ray(cfg)
    r = compare(cfg, store, f"n{a.rows}")
    store.write_json(store.path("iceberg-vs-folder.json"), r)
    log.info(f"table path costs {100 * r['table_cost_steady']:+.1f} % steady, {100 * r['table_cost_end_to_end']:+.1f} % "
          f"end to end ({r['table']['end_to_end_seconds']} s vs {r['folder']['end_to_end_seconds']} s)")


if __name__ == "__main__":
    main()
