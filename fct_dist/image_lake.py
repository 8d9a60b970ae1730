"""The image lake: images/{split}/ (id int64, image binary PNG/JPEG, label int32), its writer, its
validated reader and the decoding every model input goes through."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from . import currency, layout
from .lake import LakeError, part_name, read_lake, write_part
from .storage import Store, StorageError

IMAGE_SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int32())])


def encode_png(img: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return out.getvalue()


FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
RESIZE_MODES = ("fit", "shorter", "stretch")
CROPS = ("center", "none")


@dataclass(frozen=True)
class Preprocess:
    """How image bytes become one model's input (a model card's preprocessing fields); size 0: as stored.

    resize_mode `fit` (fct's default): the centre square scaled to resize x resize (PIL's ImageOps.fit),
    then the centre size x size (offset floored). `shorter`: the shorter side to resize, aspect kept
    (torchvision's Resize(resize)); `stretch`: the whole image to resize x resize (Resize((resize, resize)));
    both then cut the centre square as torchvision's CenterCrop does (offset rounded). `draft` lets libjpeg
    decode a JPEG at a reduced scale still >= resize: faster, but not what a pipeline that decodes at
    full size computes."""
    size: int = 0
    resize: int = 0  # 0: size
    channels: int = 3
    resize_mode: str = "fit"
    interpolation: str = "bicubic"
    crop: str = "center"
    draft: bool = True

    @property
    def side(self) -> int:
        return self.resize or self.size

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def draft_request(self, image: Image.Image) -> tuple | None:
        """What to ask libjpeg for (None: a full decode)."""
        return (self.mode, (self.side, self.side)) if self.size and self.draft and image.format == "JPEG" else None

    def apply(self, im: Image.Image) -> np.ndarray:
        """A decoded image -> uint8 (H, W[, 3]) as this model takes it."""
        if not self.size:
            return np.asarray(im)
        r, f, s = self.side, FILTERS[self.interpolation], self.size
        im = im.convert(self.mode)
        if self.resize_mode == "fit":
            im = ImageOps.fit(im, (r, r), method=f)  # = shorter side to r, centre square
            left = top = (r - s) // 2
        else:
            w, h = im.size
            if self.resize_mode == "shorter":  # torchvision's _compute_resized_output_size
                long = int(r * max(w, h) / min(w, h))
                im = im.resize((r, long) if w <= h else (long, r), f)
            else:
                im = im.resize((r, r), f)
            w, h = im.size
            left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))  # torchvision's center_crop
        if im.size != (s, s):
            im = im.crop((left, top, left + s, top + s))
        return np.asarray(im)


def decode_ways(data: bytes, ways: Sequence[Preprocess]) -> list[np.ndarray]:
    """One image's bytes -> its input for each way: decoded once, or once per JPEG draft scale asked for."""
    first = Image.open(io.BytesIO(data))
    opened: dict = {}
    for p in ways:
        key = p.draft_request(first)
        if key not in opened:
            im = first if not opened else Image.open(io.BytesIO(data))
            if key:
                im.draft(*key)
            im.load()
            opened[key] = im
    return [p.apply(opened[p.draft_request(first)]) for p in ways]


def decode_image(data: bytes, size: int | None = None, resize: int | None = None, channels: int = 3) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (H, W[, 3]); with `size`: fitted as Preprocess(size, resize, channels) says."""
    return decode_ways(data, [Preprocess(size or 0, resize or 0, channels)])[0]


def as_chw(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (C, H, W)."""
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def decode_images(col: pa.Array | pa.ChunkedArray | list[bytes], where: str = "",
                  ids: np.ndarray | None = None, size: int | None = None, resize: int | None = None,
                  channels: int = 3) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (n, C, H, W) (see decode_image); an image that does not decode is named by id."""
    values = col.to_pylist() if hasattr(col, "to_pylist") else col
    out = []
    for i, b in enumerate(values):
        try:
            a = decode_image(b, size, resize, channels)
        except Exception as e:  # PIL raises many types for corrupt bytes
            who = f"id {int(ids[i])}" if ids is not None else f"row {i}"
            raise LakeError(f"{where}: image of {who} does not decode ({type(e).__name__}: {e})") from None
        out.append(as_chw(a))
    if len({a.shape for a in out}) > 1:
        raise LakeError(f"{where}: images of different sizes {sorted({a.shape for a in out})}; "
                        "expected one size per lake")
    return np.stack(out) if out else np.zeros((0, 1, 1, 1), np.uint8)


def write_image_split(store: Store, split: str, ids: np.ndarray, images: list[bytes], labels: np.ndarray,
                      rows_per_file: int, producer: dict, key: str) -> dict:
    """Write encoded images to images/{split}/, then its manifest for `key` (what the images were made
    from, see `currency`); returns the manifest."""
    directory = layout.images(store, split)
    if store.exists(directory):
        store.delete(directory)
    files, nbytes = [], 0
    for k, start in enumerate(range(0, len(ids), rows_per_file)):
        sl = slice(start, start + rows_per_file)
        table = pa.table({"id": pa.array(ids[sl], pa.int64()), "image": pa.array(images[sl], pa.binary()),
                          "label": pa.array(labels[sl], pa.int32())}, schema=IMAGE_SCHEMA)
        path = f"{directory}/{part_name(k)}"
        nbytes += write_part(store, path, table)
        files.append(path.rsplit("/", 1)[1])
    shape = decode_images(images[:1], store.uri(directory)).shape[1:] if images else ()
    manifest = {"kind": "images", "split": split, "rows": int(len(ids)), "files": files, "bytes": nbytes,
                "schema": IMAGE_SCHEMA.to_string(), "image_shape": list(shape),
                "labels": sorted(int(c) for c in np.unique(labels)), "producer": producer}
    return currency.commit(store, directory, key, manifest)


def read_images(store: Store, split: str, labels: Iterable[int] | None = None,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, uint8 images (n, C, H, W), labels) of one split, optionally only some labels / the first `limit`."""
    directory = layout.images(store, split)
    image_manifest(store, split)
    table = read_lake(store, directory, {"id": pa.int64(), "image": pa.binary(), "label": pa.int32()})
    y = table["label"].to_numpy()
    idx = rows_of(y, labels, limit)
    ids = table["id"].to_numpy()[idx]
    return ids, decode_images(table["image"].take(idx), store.uri(directory), ids), y[idx]


def rows_of(y: np.ndarray, labels: Iterable[int] | None = None, limit: int | None = None) -> np.ndarray:
    """Positions of the rows whose label is in `labels` (None: all), the first `limit` of them."""
    return np.flatnonzero(np.isin(y, list(labels)) if labels is not None else np.ones(len(y), bool))[:limit]


def select(images: tuple[np.ndarray, np.ndarray, np.ndarray], labels: Iterable[int] | None = None,
           limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """read_images' subset of a split it read whole: (ids, images, labels) of some labels / the first `limit`."""
    idx = rows_of(images[2], labels, limit)
    return tuple(a[idx] for a in images)


def image_manifest(store: Store, split: str) -> dict:
    try:
        return currency.manifest(store, layout.images(store, split))
    except StorageError as e:
        raise LakeError(f"{e}; fill the image lake first with `fct data`") from None
