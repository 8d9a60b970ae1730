"""Is an artefact current? One answer for every stage, and one way to commit.

An artefact is a folder whose manifest is written last, in one atomic step: without a manifest it
is not done, whatever else lies there. The manifest records the *key* the artefact was made for, a
digest of everything its content depends on (config sections, the versions of its inputs, the
identity of every input file). A stage computes the key it would write and skips only when the
manifest carries exactly that key.
"""
from __future__ import annotations

import logging

from . import snapshots
from .storage import MANIFEST, Store

log = logging.getLogger(__name__)


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


def commit(store: Store, directory: str, key: str, manifest: dict, name: str = MANIFEST) -> dict:
    """Mark `directory` done for `key`: write its manifest (last, atomically); returns it."""
    manifest = manifest | {"key": key}
    store.write_json(f"{directory}/{name}", manifest)
    return manifest
