"""Feature lakes: stored vectors of several models side by side, by role (old, side, new), with their
ids and, where known, their labels. Training h, evaluating, refilling and searching all read them here.

A features lake is fct's own (embeddings/{name}/{train,test}, labels in the image lake) or one you bring
(URI/train, URI/test, columns named by `columns.*`, labels optional in `columns.label`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from . import currency, lake, layout, tables
from .config import Columns, Config
from .currency import digest
from .lake import LakeError
from .layout import FEATURES
from .storage import Store


@dataclass(frozen=True)
class Features:
    """A features lake: train and test splits with id, old, new and (optionally) side vectors."""
    train: str
    test: str
    columns: dict  # role (id, old, side, new) -> column name; no "side" when the lake has none
    dims: dict  # role -> dim
    versions: dict  # role -> the embedding space (model version) of its column (None when the lake does not say)
    key: str  # what the lake is (both splits' identities and the columns read)
    own: bool  # fct's own lake (labels in the image lake) rather than one at a URI (labels in columns.label)


def open_lake(cfg: Config, store: Store, uri: str | None = None, name: str = FEATURES,
              roles: dict[str, str] | None = None) -> Features:
    """The features fct extracted (embeddings/{name}/{split}, columns by role: `roles` or old, side, new)
    or, with `uri`, any lake at URI/train and URI/test read with the `columns` names (labels optional,
    side-info optional)."""
    if uri is None:
        dirs, cols = [layout.embeddings(store, name, s) for s in layout.SPLITS], Columns()
        for d, split in zip(dirs, layout.SPLITS):
            if not currency.has_manifest(store, d):
                raise LakeError(f"{store.uri(d)}: no finished feature lake; extract it first (fct extract --model old "
                                f"--model side --model new --name {name} --split {split})")
    else:
        dirs = [tables.locate(cfg, store, f"{uri}_{s}") if tables.is_table(uri) else f"{store.resolve(uri)}/{s}"
                for s in layout.SPLITS]  # a table per split: NAME_train, NAME_test
        cols = cfg.columns
    roles = dict(roles or {"old": cols.old, "side": cols.side, "new": cols.new})
    dims = {r: d for r, d in zip(roles, lake.column_dims(store, dirs[0], roles.values()).values())}
    for role in ("old", "new"):
        if dims[role] is None:
            raise LakeError(f"{store.uri(dirs[0])}: no {role} vector column {roles[role]!r} (set columns.{role})")
    if dims["side"] is None:
        del roles["side"], dims["side"]
    prod = lake.producer_of(lake.read_schema(store, lake.parts(store, dirs[0])[0]))
    versions = {r: lake.space_of(prod.get(c, {})) for r, c in roles.items()}
    key = digest([lake.identity(store, d) for d in dirs], roles, cols.id)
    return Features(*dirs, {"id": cols.id} | roles, dims, versions, key, uri is None)


def read(store: Store, directory: str, columns: dict[str, str], dims: dict[str, int],
         with_ids: bool = False, label: str | None = None) -> dict[str, torch.Tensor]:
    """{role: (n, d) float32} of a features lake; `columns` maps id, old, new (and side) to column names.
    Without side-info, `side` is `old` (the no-side transformation feeds old into both branches).
    With `with_ids`, also "id": (n,) int64; with `label` (a column), also "label": (n,) int32, in the
    same read."""
    vec = {r: c for r, c in columns.items() if r != "id"}
    extra = {label: pa.int32()} if label else {}
    t = lake.read_lake(store, directory, {columns["id"]: pa.int64()} | {c: dims[r] for r, c in vec.items()} | extra,
                       columns=[columns["id"], *vec.values(), *extra], id_col=columns["id"])
    x = {r: torch.from_numpy(lake.to_numpy(t[c])) for r, c in vec.items()}
    ids = {"id": torch.from_numpy(t[columns["id"]].to_numpy())} if with_ids else {}
    labels = {"label": torch.from_numpy(t[label].to_numpy())} if label else {}
    return x | {"side": x.get("side", x["old"])} | ids | labels


def views(store: Store, directories: tuple[str, ...], columns: dict[str, str], dims: dict[str, int]
          ) -> dict[str, torch.Tensor]:
    """read() of several lakes of the same rows (augmented views), stacked by id: {role: (n, V, d)} in id
    order and "id": (n,); a lake whose ids differ from the first's is an error naming both."""
    out = []
    for d in directories:
        x = read(store, d, columns, dims, with_ids=True)
        order = torch.argsort(x["id"])
        out.append({r: v[order] for r, v in x.items()})
        if not torch.equal(out[-1]["id"], out[0]["id"]):
            raise LakeError(f"{store.uri(d)}: not the same ids as {store.uri(directories[0])} ({len(x['id'])} rows "
                            f"vs {len(out[0]['id'])}); expected every view of the same rows: extract it again")
    return {r: torch.stack([x[r] for x in out], 1) for r in ("old", "side", "new")} | {"id": out[0]["id"]}


Truth = tuple[np.ndarray, np.ndarray]  # ids (sorted), their labels


def has_column(store: Store, directory: str, column: str) -> bool:
    return lake.read_schema(store, lake.parts(store, directory)[0]).get_field_index(column) >= 0


def truth(store: Store, directory: str, id_col: str = "id", label_col: str = "label") -> Truth:
    """(ids sorted, labels) of a lake with an id and a label column."""
    t = lake.read_lake(store, directory, {id_col: pa.int64(), label_col: pa.int32()}, columns=[id_col, label_col],
                       id_col=id_col).sort_by(id_col)
    return t[id_col].to_numpy(), t[label_col].to_numpy()


def split_truth(store: Store, split: str) -> Truth:
    """The labels of a split's images: the ground truth of fct's own lakes."""
    return truth(store, layout.images(store, split))


def labels_of(ids: np.ndarray, known: Truth, where: str, what: str, label_col: str = "label") -> np.ndarray:
    """The label of each id; an id without one is an error naming it, `where` the labels come from and
    `what` the rows are."""
    pos, found = lake.find(known[0], ids)
    if not found.all():
        raise LakeError(f"{where}: no {label_col!r} for id {int(ids[~found][0])} ({int((~found).sum())} {what} "
                        f"without a label; are the lakes from the same data?)")
    return known[1][pos]


def class_means(x: np.ndarray, labels: np.ndarray) -> tuple[list[int], torch.Tensor]:
    """(classes sorted, (classes, d) mean vector of each)."""
    classes = sorted(int(c) for c in np.unique(labels))
    return classes, torch.from_numpy(np.stack([x[labels == c].mean(0) for c in classes]))


@dataclass(frozen=True)
class Labels:
    """Where the class of each feature row is read: a lake with (id, label) columns, and the frozen new
    classifier's classes (its output i is class classes[i])."""
    directory: str
    id_col: str
    label_col: str
    classes: list[int]
    ignore_unknown: bool = False  # a class the classifier lacks: -100 (cross_entropy's ignore_index), not an error

    def targets(self, store: Store, ids: np.ndarray) -> np.ndarray:
        """The classifier index of each id's label; an id without a label is an error naming it, and so is
        one of a class the classifier lacks unless `ignore_unknown`."""
        labels = labels_of(ids, truth(store, self.directory, self.id_col, self.label_col), store.uri(self.directory),
                           "feature rows", self.label_col)
        classes = np.asarray(self.classes)
        idx = np.searchsorted(classes, labels).clip(max=len(classes) - 1)
        if self.ignore_unknown:
            return np.where(classes[idx] == labels, idx, -100).astype(np.int64)
        if (classes[idx] != labels).any():
            bad = int(np.flatnonzero(classes[idx] != labels)[0])
            raise LakeError(f"{store.uri(self.directory)}: id {int(ids[bad])} has label {int(labels[bad])}, "
                            f"a class the new model's classifier does not have ({self.classes})")
        return idx.astype(np.int64)


def train_labels(cfg: Config, store: Store, f: Features, classes: list[int]) -> Labels | None:
    """Where the train split's labels are: the image lake for fct's own features (classes the classifier
    lacks are ignored), the label column of a lake you bring, or None when it has none."""
    if f.own:
        return Labels(layout.images(store, "train"), "id", "label", classes, ignore_unknown=True)
    if has_column(store, f.train, cfg.columns.label):
        return Labels(f.train, f.columns["id"], cfg.columns.label, classes)
    return None
