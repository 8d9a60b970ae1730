"""A user's own images, one sub-folder per class: DIR/<class>/*.png|jpg|jpeg."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ConfigError

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
