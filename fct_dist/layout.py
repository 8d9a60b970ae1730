"""Where everything lives under a storage root: the one definition of the storage layout.

    {root}/
      images/{split}/                part-*.parquet (id, image, label) + _manifest.json
      embeddings/{lake}/{split}/     part-*.parquet (id + one vector column per model) + _manifest.json
      rejected/{lake}/{split}/       rows and files a stage refused, each with its reason
      index/{lake}/{split}/          shard-*.faiss + _manifest.json (index/{lake}.{column}/ for a column
                                     other than emb)
      models/{name}/                 model.pt + meta.json (the artefact's manifest)
      checkpoints/                   Ray Train's run folders
      reports/{run}/                 upgrade, bench and chaos reports

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
# A second upgrade, old (v1) -> new (v2) -> V3: its model, its two transformations and their features.
V3 = "v3"
CHAINED, DIRECT = "fct-v2-v3", "fct-v1-v3"  # h(v2 -> v3) applied to the upgraded lake; h(v1 -> v3) to the stored one
FEATURES_V3 = "features-v3"  # id, old, side, new, v3: both transformations' training data

SPLITS = ("train", "test")


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
