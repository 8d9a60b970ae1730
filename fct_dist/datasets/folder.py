"""A user's own images: one sub-folder per class (DIR/<class>/*.png|jpg|jpeg) for `fct data`, or a
flat folder of images named by id (DIR/000123.jpg) for `fct extract`, packed into Parquet first."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import currency, lake
from ..config import ConfigError
from ..currency import digest
from ..lake import LakeError
from ..storage import Store

SUFFIXES = {".png", ".jpg", ".jpeg"}


def load(root: str | Path, test_fraction: float, seed: int) -> tuple[dict[str, tuple], list[str]]:
    """({split: (ids, encoded image bytes, labels)}, class names); labels follow sorted folder names."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.folder {root}: not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data.folder {root}: no class sub-folders; expected DIR/<class>/*.png|jpg")
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if not found:
            raise ConfigError(f"data.folder {root / name}: no .png/.jpg/.jpeg images")
        files += found
        labels += [c] * len(found)
    order = np.random.default_rng(seed).permutation(len(files))
    n_test = max(1, int(round(test_fraction * len(files))))
    out, next_id = {}, 0
    for split, idx in (("train", np.sort(order[n_test:])), ("test", np.sort(order[:n_test]))):
        out[split] = (np.arange(next_id, next_id + len(idx), dtype=np.int64),
                      [files[i].read_bytes() for i in idx], np.asarray(labels, np.int32)[idx])
        next_id += len(idx)
    return out, classes


def is_image_folder(store: Store, directory: str) -> bool:
    """True when `directory` holds images (and no Parquet files)."""
    names = [path.lower() for path, _, _ in store.list_versions(directory)]
    return any(Path(n).suffix in SUFFIXES for n in names) and not any(n.endswith(".parquet") for n in names)


def pack(store: Store, directory: str, out_dir: str, rows_per_file: int, id_col: str = "id",
         image_col: str = "image") -> dict:
    """Pack a flat folder of images into an image lake (id, image columns as named) at `out_dir`, ids from
    the file names (`000123.jpg` -> 123); redone only when the folder's listing changes. Returns the manifest."""
    listing = [f for f in store.list_versions(directory) if Path(f[0]).suffix.lower() in SUFFIXES]
    key = digest("folder", store.uri(directory), listing, id_col, image_col)  # (path, size, version) of every image
    done = currency.current(store, out_dir, key)
    if done:
        return done
    files, ids = [path for path, _, _ in listing], []
    for path in files:
        stem = Path(path).stem
        if not stem.isdigit():
            raise LakeError(f"{store.uri(path)}: the file name is not an id; expected images named by their "
                            "integer id (e.g. 000123.jpg)")
        ids.append(int(stem))
    dups = lake.duplicate_ids(np.asarray(ids, np.int64))
    if len(dups):
        same = [store.uri(p) for p, x in zip(files, ids) if x == dups[0]]
        raise LakeError(f"id {int(dups[0])} is named by more than one file: {', '.join(same)}")
    store.delete(out_dir)
    names = []
    with ThreadPoolExecutor(16) as pool:  # object stores answer many small reads in parallel
        for k, start in enumerate(range(0, len(files), rows_per_file)):
            chunk = list(pool.map(store.read_bytes, files[start:start + rows_per_file]))
            table = pa.table({id_col: pa.array(ids[start:start + rows_per_file], pa.int64()),
                              image_col: pa.array(chunk, pa.binary())})
            names.append(lake.part_name(k))
            lake.write_part(store, f"{out_dir}/{names[-1]}", table)
    return currency.commit(store, out_dir, key, {"kind": "images", "rows": len(files), "files": names,
                                                 "source": store.uri(directory)})
