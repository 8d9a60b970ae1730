"""An artefact's bytes on the store: models/{name}/{file} + meta.json, written file first and meta last
(its presence marks the artefact complete), its version the SHA-256 of the file, checked on every read.
What the bytes are (a state_dict, a team's exported program) is for `registry` and `exported`."""
from __future__ import annotations

import hashlib
import time

from .. import currency, layout
from ..storage import Store

META = "meta.json"


class ArtefactError(ValueError):
    """A missing, tampered or mismatching model artefact."""


def version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def save_bytes(store: Store, name: str, data: bytes, meta: dict, key: str) -> dict:
    """Write the artefact's file (meta["file"], default model.pt), then meta.json with its version."""
    meta = meta | {"name": name, "version": version(data), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    directory = layout.model(store, name)
    store.write_bytes(f"{directory}/{meta.get('file', 'model.pt')}", data)
    return currency.commit(store, directory, key, meta, META)


def read_meta(store: Store, name: str) -> dict:
    directory = layout.model(store, name)
    if not store.exists(f"{directory}/{META}"):
        raise ArtefactError(f"model artefact {store.uri(directory)} not found: train it first (fct train-...)")
    return store.read_json(f"{directory}/{META}")


def read_verified(store: Store, name: str, meta: dict) -> tuple[bytes, str]:
    """(the artefact file's bytes, their URI), once their hash is the meta's version."""
    file = meta.get("file", "model.pt")
    where = f"{store.uri(layout.model(store, name))}/{file}"
    data = store.read_bytes(f"{layout.model(store, name)}/{file}")
    if version(data) != meta["version"]:
        raise ArtefactError(f"{where}: hash does not match meta version {meta['version']} "
                            "(tampered or partly written artefact)")
    return data, where
