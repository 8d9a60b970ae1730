"""Is an artefact current? One answer for every stage, and one way to commit.

An artefact is a folder whose manifest is written last, in one atomic step: without a manifest it
is not done, whatever else lies there. The manifest records the *key* the artefact was made for, a
digest of everything its content depends on (config sections, the versions of its inputs, the
identity of every input file). A stage computes the key it would write and skips only when the
manifest carries exactly that key.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from . import snapshots
from .layout import MANIFEST
from .storage import Store, StorageError

log = logging.getLogger(__name__)


def digest(*objs: Any) -> str:
    """Short stable hash of JSON-able objects: what a key is made of."""
    return hashlib.sha256(json.dumps(objs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def manifest(store: Store, directory: str) -> dict:
    """The manifest that marks `directory` complete; a clear error when it is missing."""
    path = f"{directory}/{MANIFEST}"
    if not store.exists(path):
        raise StorageError(f"{store.uri(directory)} is not a finished dataset: {MANIFEST} is missing "
                           "(the stage that writes it did not complete; rerun it)")
    return store.read_json(path)


def has_manifest(store: Store, directory: str) -> bool:
    return store.exists(f"{directory}/{MANIFEST}")


def current(store: Store, directory: str, key: str, manifest: str = MANIFEST) -> dict | None:
    """The manifest of `directory` when it was committed for `key` and every file it lists with a version
    is there unchanged (`snapshots.verify`), else None."""
    path = f"{directory}/{manifest}"
    if not store.exists(path):
        return None
    m = store.read_json(path)
    if m.get("key") != key:
        return None
    damage = snapshots.verify(store, directory, m)
    if damage:
        log.warning("%s is damaged (%s): making it again", store.uri(directory), "; ".join(damage[:3]))
        return None
    return m


def commit(store: Store, directory: str, key: str, content: dict, name: str = MANIFEST) -> dict:
    """Mark `directory` done for `key`: write its manifest (last, atomically); returns it."""
    content = content | {"key": key}
    store.write_json(f"{directory}/{name}", content)
    return content
