"""Synthetic artefacts and lakes of a benchmark profile: random-weight models of the profile's sizes,
stored (old, side) lakes and image lakes. Shared by `fct bench`, the chaos soak and the tests.

Each lake is written once per setting and reused: it is current when its manifest carries the key of
the requested rows, layout and profile (`currency`).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import currency, image_lake, lake, layout
from ..config import Config
from ..currency import digest
from ..datasets import synthetic
from ..layout import FCT, NEW, STORED
from ..models import ResNet, ResNetConfig, Transformation, TransformationConfig, registry
from ..storage import Store

DATA_VERSION = "bench"  # the producer version recorded in (and expected of) the synthetic stored lakes
IMAGE_SPLIT = "bench"


@dataclass
class Profile:
    name: str
    encoder: ResNetConfig  # the re-extracting model
    input_size: int | None  # images resized to this side before the encoder (None: native size)
    dims: dict  # old, side, new
    branch: int
    hidden: int
    items: int  # items re-extracted (ids 0..items-1 of the backfilled lake)
    batch_size: int  # images per encoder forward pass
    images: Callable[[int], list[bytes]]  # n -> encoded images


def profiles(cfg: Config) -> list[Profile]:
    b, m = cfg.bench, cfg.models

    def demo_images(n: int) -> list[bytes]:
        return [image_lake.encode_png(x) for x in synthetic.generate(np.arange(n) % 20, 28, 1, seed=0)]

    demo = Profile("demo", ResNetConfig(1, m.new.width, list(m.new.blocks), m.new.emb_dim),
                   None, {"old": m.old.emb_dim, "side": m.side.emb_dim, "new": m.new.emb_dim},
                   m.transformation.branch, m.transformation.hidden, b.demo_items, cfg.extract.batch_size,
                   demo_images)
    production = Profile("production", ResNetConfig(3, 64, [3, 4, 6, 3], 128, bottleneck=True, imagenet=True),
                         b.image_size, {"old": 128, "side": 128, "new": 128}, 256, 2048, b.production_items,
                         b.production_batch_size, lambda n: synthetic.jpeg_photos(n, b.jpeg_height, seed=0))
    return [demo, production]


def save_models(store: Store, p: Profile) -> None:
    """Random-weight artefacts `new` (the encoder) and `fct` (h) of the profile's sizes."""
    torch.manual_seed(0)
    resized = {"size": p.input_size, "resize": p.input_size, "channels": 3} if p.input_size else None
    registry.save(store, NEW, ResNet(p.encoder), {"kind": "encoder", "arch": p.encoder, "metrics": {},
                                                  "dims": {"emb": p.dims["new"]}, "preprocess": resized},
                  key=DATA_VERSION)
    save_transformation(store, p.dims, p.branch, p.hidden)


def save_transformation(store: Store, dims: dict, branch: int, hidden: int) -> None:
    """A random-weight `fct` (h) of these sizes (dims: old, side, new)."""
    torch.manual_seed(0)
    arch = TransformationConfig(dims["old"], dims["side"], dims["new"], branch, hidden)
    registry.save(store, FCT, Transformation(arch), {
        "kind": "transformation", "arch": arch, "dims": dims, "metrics": {},
        "producers": {"old": DATA_VERSION, "side": DATA_VERSION}}, key=DATA_VERSION)


@dataclass
class Clustered:
    """Rows drawn around `clusters` centres of a `latent`-d space and mapped linearly into each column
    (plus `noise`): the low intrinsic dimension of real embeddings, so that search quality means
    something. Centres and maps depend on `seed` only; the rows of file k on (seed, k)."""
    clusters: int
    latent: int
    spread: float
    noise: float
    seed: int = 0

    def rows(self, dims: dict, n: int, stream: int) -> dict[str, np.ndarray]:
        """n rows {column: (n, dims[column]) float32} of random stream `stream`."""
        g = np.random.default_rng(self.seed)
        centres = g.standard_normal((self.clusters, self.latent), np.float32)
        maps = {c: (g.standard_normal((self.latent, dims[c])) / np.sqrt(self.latent)).astype(np.float32)
                for c in ("old", "side")}
        r = np.random.default_rng([self.seed, stream])
        z = centres[r.integers(0, self.clusters, n)] + np.float32(self.spread) * r.standard_normal((n, self.latent), np.float32)
        return {c: z @ m + np.float32(self.noise) * r.standard_normal((n, dims[c]), np.float32) for c, m in maps.items()}


def stored_lake(store: Store, dims: dict, rows: int, rows_per_file: int, structure: Clustered | None = None) -> str:
    """embeddings/stored/n{rows} (c{rows} when clustered): (old, side) rows with ids 0..rows-1, each
    file's rows a function of its index only (so a small lake is the first files of a large one);
    random normal rows unless `structure` says otherwise; written once per setting, files in parallel."""
    directory = layout.embeddings(store, STORED, f"{'c' if structure else 'n'}{rows}")
    key = digest(rows, rows_per_file, lake.write_options(), dims, structure)
    if currency.current(store, directory, key):
        return directory
    store.delete(directory)
    prod = {c: {"model": DATA_VERSION, "version": DATA_VERSION, "dim": dims[c]} for c in ("old", "side")}

    def write(k: int) -> None:
        start = k * rows_per_file
        n = min(rows_per_file, rows - start)
        if structure:
            vectors = structure.rows(dims, n, k)
        else:
            rng = np.random.default_rng([0, k])
            vectors = {c: rng.standard_normal((n, dims[c]), np.float32) for c in ("old", "side")}
        lake.write_part(store, f"{directory}/{lake.part_name(k)}",
                        lake.embedding_table(np.arange(start, start + n), vectors, prod))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy's generators, BLAS and Parquet's writer release the GIL
        list(pool.map(write, range(math.ceil(rows / rows_per_file))))
    currency.commit(store, directory, key, {"kind": "embeddings", "rows": rows, "producer": prod})
    return directory


def bench_images(store: Store, p: Profile, files: int) -> str:
    """images/bench: the profile's first `items` ids as encoded images; written once per setting."""
    directory = layout.images(store, IMAGE_SPLIT)
    source = {"source": "bench", "profile": p.name, "input_size": p.input_size}
    key = digest(source, p.items, files)
    if not currency.current(store, directory, key):
        image_lake.write_image_split(store, IMAGE_SPLIT, np.arange(p.items), p.images(p.items),
                               np.zeros(p.items, np.int32), math.ceil(p.items / files), source, key)
    return directory
