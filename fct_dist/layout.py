"""Where everything lives under a storage root: the one definition of the storage layout.

    {root}/
      images/{split}/                part-*.parquet (id, image, label) + _manifest.json
      embeddings/{lake}/{split}/     part-*.parquet (id + one vector column per model) + _manifest.json
      embeddings/features-view{k}/train/  augmented view k of the train images through old, side and new
      rejected/{lake}/{split}/       rows and files a stage refused, each with its reason
      index/{lake}/{split}/          shard-*.faiss + _manifest.json (index/{lake}.{column}/ for a column
                                     other than emb)
      models/{name}/                 model.pt + meta.json (the artefact's manifest)
      checkpoints/                   Ray Train's run folders
      reports/{run}/                 upgrade, bench and chaos reports
      tables/{table}/{snapshot}/     _manifest.json: an Iceberg snapshot a run read, pinned (its data files)
      iceberg/                       the embedded Iceberg catalog (catalog.db, sqlite) and its warehouse

Stages meet only here: each one's inputs and outputs are these functions' paths (or URIs a user
passes instead). An embedding lake made by one model is named after it (`embeddings/fct/test`).
"""
from __future__ import annotations

from .storage import Store

# Model artefacts.
OLD, SIDE, NEW, BCT = "old", "side", "new", "bct"
FCT, FCT_NOSIDE = "fct", "fct-noside"  # the transformation h, with and without side-info
# Embedding lakes that no single model names.
STORED = "stored"  # id, old, side: what was kept at old-model time, the backfill's input
FEATURES = "features"  # id, old, side, new: the transformation's training data
REFILL = "refill"  # id, emb, uncertainty, reextracted: the backfilled gallery with its least sure part re-extracted
SPLITS = ("train", "test")
MANIFEST = "_manifest.json"  # in every finished folder, written last: without it the folder is not done


# The version chain: version 1 is the old model, 2 the new one, 3, 4, ... the ones after it. The upgrade to
# version k >= 3 has two transformations, each an artefact with its own upgraded lake: chained, h(v{k-1} -> vk)
# applied to the previous upgraded lake (for v2 that is fct's), and direct, h(v1 -> vk) applied to the stored one.
def version(k: int) -> str:
    """The model (and embedding lake) of version k."""
    return {1: OLD, 2: NEW}.get(k, f"v{k}")


def chained(k: int) -> str:
    return FCT if k == 2 else f"fct-v{k - 1}-v{k}"


def direct(k: int) -> str:
    return FCT if k == 2 else f"fct-v1-v{k}"


def features_view(view: int) -> str:
    """The features lake of one augmented view of the train images (train.transformation.views); 0: as stored."""
    return FEATURES if view == 0 else f"{FEATURES}-view{view}"


def version_features(k: int) -> str:
    """id, old, side, v{k-1}, vk (columns named after the models): both transformations' training data."""
    return f"features-v{k}"


def images(store: Store, split: str) -> str:
    return store.path("images", split)


def embeddings(store: Store, lake: str, split: str) -> str:
    return store.path("embeddings", lake, split)


def rejected(store: Store, lake: str, split: str) -> str:
    return store.path("rejected", lake, split)


def index(store: Store, lake: str, split: str, column: str = "emb") -> str:
    """A lake's index of its `emb` column; of another column, index/{lake}.{column}/{split}."""
    return store.path("index", lake if column == "emb" else f"{lake}.{column}", split)


def model(store: Store, name: str) -> str:
    return store.path("models", name)


def checkpoints(store: Store) -> str:
    return store.path("checkpoints")


def report(store: Store, run: str) -> str:
    return store.path("reports", run)


def pin(store: Store, table: str, snapshot: int) -> str:
    """The record of one Iceberg snapshot a stage read: its data files, as a lake's file list."""
    return store.path("tables", table, str(snapshot))


def iceberg(store: Store) -> str:
    """The embedded Iceberg catalog's folder: catalog.db (sqlite, local roots) and warehouse/."""
    return store.path("iceberg")
