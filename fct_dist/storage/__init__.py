"""Storage roots: a local folder, `file://` or `s3://bucket/prefix`, each a `Store` over one pyarrow
filesystem (`base`), with its backend's atomic writes, file versions and conditional writes (`local`,
`s3`). Writes are atomic: a reader never sees half a file."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ..config import Storage as StorageCfg
from .base import AtomicFile, Conflict, StorageError, Store, is_storage_fault
from .local import LocalStore
from .s3 import S3Store, open_s3, preflight

__all__ = ["AtomicFile", "Conflict", "LocalStore", "S3Store", "StorageError", "Store", "is_storage_fault", "open_store"]


def open_store(cfg: StorageCfg, check: bool = False) -> Store:
    """Resolve `storage.root` (a path, `file://...` or `s3://bucket/prefix`) to a Store; `check`: for S3,
    first make sure within seconds that the credentials, the endpoint and the bucket are there."""
    u = urlparse(cfg.root)
    if u.scheme == "s3":
        if check:
            preflight(cfg)
        return open_s3(cfg)
    if u.scheme in ("", "file"):
        return LocalStore(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(u.path if u.scheme else cfg.root)))
    raise StorageError(f"storage.root {cfg.root!r}: unsupported scheme {u.scheme!r}; expected a local path, "
                       "file:// or s3://")
