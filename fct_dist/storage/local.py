"""A local folder (or `file://`) as a storage root.

Writes are atomic and durable: a hidden temp file is fsynced, renamed into place, and its folder
fsynced after the rename, so a power loss after a commit cannot leave a committed name pointing at
missing bytes. A file's version is its mtime + ctime + inode (ctime cannot be set back, unlike mtime);
a conditional write holds an exclusive `flock` around read-compare-write."""
from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa

from .base import AtomicFile, Conflict, StorageError, Store


@dataclass
class LocalStore(Store):
    scheme = "file"

    def resolve(self, location: str) -> str:
        u = urlparse(location)
        if u.scheme in ("", "file"):
            return os.path.abspath(os.path.expanduser(u.path if u.scheme else location)).rstrip("/")
        raise StorageError(f"{location!r} is not on the storage of storage.root ({self.uri(self.root)}): "
                           "expected a local path or file:// URI")

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        out = self.open_atomic(path)
        out.write(data)
        out.commit()

    def open_atomic(self, path: str) -> AtomicFile:
        return RenamedFile(self, path)

    def list_versions(self, path: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, str]]:
        out = []
        for folder, dirs, names in self._walk(path, recursive):
            for name in names:
                if name.endswith(suffix) and not name.startswith((".", "_")):
                    try:
                        st = os.stat(f"{folder}/{name}")
                    except FileNotFoundError:  # removed between the listing and the stat
                        continue
                    out.append((f"{folder}/{name}", st.st_size, f"{st.st_mtime_ns}.{st.st_ctime_ns}.{st.st_ino}"))
        return sorted(out)

    def _walk(self, path: str, recursive: bool):
        """os.walk of a local folder, hidden and `_` folders skipped; only the top with recursive=False."""
        try:
            os.stat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot list {self.uri(path)}: {e}") from None

        def fail(e: OSError) -> None:
            if not isinstance(e, FileNotFoundError):
                raise StorageError(f"cannot list {self.uri(e.filename or path)}: {e}") from None

        for folder, dirs, names in os.walk(path, onerror=fail):
            dirs[:] = sorted(d for d in dirs if recursive and not d.startswith((".", "_")))
            yield folder, dirs, names

    def read_versioned(self, path: str) -> tuple[bytes | None, str | None]:
        """The version is a content hash here."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(f"cannot read {self.uri(path)}: {e}") from None
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, exist_ok=True)
            lock = open(f"{path}.lock", "a")
        except OSError as e:
            raise StorageError(f"cannot write {self.uri(path)}: {e}") from None
        with lock:  # every local conditional writer of `path` holds this lock around read-compare-write
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read_versioned(path)[1] != version:
                raise Conflict(f"{self.uri(path)} changed: expected version {version}")
            self.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()


class RenamedFile(AtomicFile):
    """A hidden temp file beside the target, renamed into place on commit."""

    def __init__(self, store: LocalStore, path: str):
        parent, name = path.rsplit("/", 1)
        self.tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            store.fs.create_dir(parent, recursive=True)
            stream = store.fs.open_output_stream(self.tmp)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot write {store.uri(path)}: {e}") from None
        super().__init__(store, path, stream)

    def commit(self) -> int:
        try:
            size = self.stream.tell()
            self.stream.close()
            fsync(self.tmp)  # the bytes are on disk before the name points at them
            self.store.fs.move(self.tmp, self.path)
            fsync(os.path.dirname(self.path))  # and the rename itself survives a power loss
        except (OSError, pa.ArrowException) as e:
            self.abort()
            raise StorageError(f"cannot write {self.store.uri(self.path)}: {e}") from None
        return size

    def abort(self) -> None:
        """A full disk must not keep a half-written temp file."""
        try:
            self.stream.close()
        except (OSError, pa.ArrowException):
            pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def fsync(path: str) -> None:
    """Flush a local file's (or folder's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
