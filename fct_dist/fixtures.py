"""Synthetic artefacts and lakes of a benchmark profile: random-weight models of the profile's sizes,
stored (old, side) lakes and image lakes. Shared by `fct bench`, the chaos soak and the tests.

Each lake is written once per setting and reused: it is current when its manifest carries the key of
the requested rows, layout and profile (`currency`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import currency, lake, layout
from .config import Config, digest
from .datasets import synthetic
from .layout import FCT, NEW, STORED
from .models import ResNet, ResNetConfig, Transformation, TransformationConfig, registry
from .storage import Store

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
        return [lake.encode_png(x) for x in synthetic.generate(np.arange(n) % 20, 28, 1, seed=0)]

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
    arch = TransformationConfig(p.dims["old"], p.dims["side"], p.dims["new"], p.branch, p.hidden)
    registry.save(store, FCT, Transformation(arch), {
        "kind": "transformation", "arch": arch, "dims": p.dims, "metrics": {},
        "producers": {"old": DATA_VERSION, "side": DATA_VERSION}}, key=DATA_VERSION)


def stored_lake(store: Store, p: Profile, rows: int, rows_per_file: int) -> str:
    """embeddings/stored/n{rows}: random (old, side) rows with ids 0..rows-1; written once per size."""
    directory = layout.embeddings(store, STORED, f"n{rows}")
    key = digest(rows, rows_per_file, lake.write_options(), p.dims)
    if currency.current(store, directory, key):
        return directory
    store.delete(directory)
    rng = np.random.default_rng(0)
    prod = {c: {"model": DATA_VERSION, "version": DATA_VERSION, "dim": p.dims[c]} for c in ("old", "side")}
    for k, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        vectors = {c: rng.standard_normal((n, p.dims[c]), np.float32) for c in ("old", "side")}
        lake.write_part(store, f"{directory}/{lake.part_name(k)}",
                        lake.embedding_table(np.arange(start, start + n), vectors, prod))
    currency.commit(store, directory, key, {"kind": "embeddings", "rows": rows, "producer": prod})
    return directory


def image_lake(store: Store, p: Profile, files: int) -> str:
    """images/bench: the profile's first `items` ids as encoded images; written once per setting."""
    directory = layout.images(store, IMAGE_SPLIT)
    source = {"source": "bench", "profile": p.name, "input_size": p.input_size}
    key = digest(source, p.items, files)
    if not currency.current(store, directory, key):
        lake.write_image_split(store, IMAGE_SPLIT, np.arange(p.items), p.images(p.items),
                               np.zeros(p.items, np.int32), math.ceil(p.items / files), source, key)
    return directory
