"""`fct search`: query images embedded with a model, answered by a lake's sharded index, and drawn.

The picture is the plainest proof of an upgrade: queries embedded by the *new* model find their
neighbours in a gallery that was backfilled from stored old embeddings, never re-reading an image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from . import image_lake, lake, layout, report
from .lake import LakeError
from .models import registry
from .pipeline import index
from .storage import Store


@dataclass
class Images:
    ids: np.ndarray  # (n,)
    pixels: np.ndarray  # (n, C, H, W) uint8
    labels: np.ndarray  # (n,)


def images(store: Store, split: str, ids: list[int] | np.ndarray) -> Images:
    """The images of `ids` in images/{split}, in the order asked; an error names the ids not there."""
    image_lake.image_manifest(store, split)
    directory = layout.images(store, split)
    t = lake.read_lake(store, directory, {"id": pa.int64(), "image": pa.binary(), "label": pa.int32()})
    all_ids = t["id"].to_numpy()
    ids = np.asarray(ids, np.int64)
    missing = ids[~np.isin(ids, all_ids)]
    if len(missing):
        raise LakeError(f"ids {missing.tolist()} are not in {store.uri(directory)} (its ids run from "
                        f"{all_ids.min()} to {all_ids.max()}, {len(all_ids)} images)")
    order = np.argsort(all_ids)
    take = pa.array(order[np.searchsorted(all_ids, ids, sorter=order)])
    return Images(ids, image_lake.decode_images(t["image"].take(take), store.uri(directory), ids),
                  t["label"].take(take).to_numpy())


def spread_ids(store: Store, split: str, n: int) -> np.ndarray:
    """n ids spread evenly over images/{split} (in id order): default queries."""
    ids = np.sort(lake.read_lake(store, layout.images(store, split), {"id": pa.int64()}, columns=["id"])["id"].to_numpy())
    return ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).astype(int)]


@torch.no_grad()
def embed(store: Store, model: str, pixels: np.ndarray) -> np.ndarray:
    """Embed uint8 images (n, C, H, W) with models/{model}: (n, d) float32."""
    module, meta = registry.load(store, model)
    return registry.embedder(meta["kind"], module)(torch.from_numpy(pixels)).numpy()


def query(store: Store, model: str, lake_name: str, split: str, ids: list[int], k: int,
          nprobe: int) -> tuple[Images, np.ndarray, np.ndarray]:
    """Embed the images `ids` of `split` with `model`, search embeddings/{lake_name}/{split}'s index:
    (queries, distances (n, k), neighbour ids (n, k))."""
    q = images(store, split, ids)
    d, i = index.search(store, lake_name, split, embed(store, model, q.pixels), k, nprobe)
    return q, d, i


def draw(store: Store, split: str, q: Images, dist: np.ndarray, nbr: np.ndarray, title: str) -> bytes:
    """One PNG: a row per query (the query, then its neighbours with label and distance; green when
    the neighbour's label is the query's, red otherwise)."""
    found = nbr[nbr >= 0]
    gallery = images(store, split, np.unique(found)) if len(found) else None
    where = {int(x): j for j, x in enumerate(gallery.ids)} if gallery else {}
    k = nbr.shape[1]
    fig, axes = report.figure((1.3 * (k + 1), 1.5 * len(q.ids)), rows=len(q.ids), cols=k + 1)
    axes = np.asarray(axes).reshape(len(q.ids), k + 1)

    def show(ax, pixels: np.ndarray, text: str, color: str | None = None) -> None:
        img = pixels.transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        ax.set_title(text, fontsize=7, color=color or "black")
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(color or "black")
            spine.set_linewidth(2 if color else 1)

    for r in range(len(q.ids)):
        show(axes[r, 0], q.pixels[r], f"query {q.ids[r]}\nlabel {q.labels[r]}")
        for c in range(k):
            ax, x = axes[r, c + 1], int(nbr[r, c])
            if x < 0:
                ax.axis("off")
                continue
            j = where[x]
            same = gallery.labels[j] == q.labels[r]
            show(ax, gallery.pixels[j], f"{x} ({gallery.labels[j]})\nd={dist[r, c]:.3g}", "green" if same else "red")
    fig.suptitle(title, fontsize=9)
    return report.png(fig)
