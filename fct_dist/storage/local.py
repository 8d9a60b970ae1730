"""A local folder (or `file://`) as a storage root.

Writes are atomic and durable: a hidden temp file is fsynced, renamed into place, and its folder
fsynced after the rename, so a power loss after a commit cannot leave a committed name pointing at
missing bytes. A file's version is its mtime + ctime + inode (ctime cannot be set back, unlike mtime);
a conditional write holds an exclusive `flock` around read-compare-rename only: its bytes are written
and fsynced before, so a writer paused (SIGSTOP) or slow inside the lock holds it for microseconds,
and a writer waiting for the lock gives up after LOCK_WAIT_S naming the lock instead of hanging."""
from __future__ import annotations

import fcntl
import hashlib
import os
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa

from .base import AtomicFile, Conflict, StorageError, Store

LOCK_WAIT_S = 30.0  # far above any compare-and-rename; what is left is a holder paused inside the lock


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
        out = RenamedFile(self, path)
        out.write(data)
        out.flush()  # the bytes are on disk before the lock is taken
        try:
            lock = open(f"{path}.lock", "a")
        except OSError as e:
            out.abort()
            raise StorageError(f"cannot write {self.uri(path)}: {e}") from None
        with lock:  # every local conditional writer of `path` holds this lock around read-compare-rename
            try:
                wait_for(lock, f"{self.uri(path)}.lock")
                if self.read_versioned(path)[1] != version:
                    raise Conflict(f"{self.uri(path)} changed: expected version {version}")
                out.rename()
            except BaseException:
                out.abort()
                raise
        out.sync_folder()
        return hashlib.sha256(data).hexdigest()


def wait_for(lock, name: str) -> None:
    """Take an exclusive flock on `lock`, or fail after LOCK_WAIT_S naming it (never hang on a paused holder)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(f"{name} has been locked by another process for over {LOCK_WAIT_S:.0f} s "
                                   "(a writer paused or hung inside a conditional write); nothing was written") from None
            time.sleep(0.01)


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
        size = self.flush()
        self.rename()
        self.sync_folder()
        return size

    def flush(self) -> int:
        """Close and fsync the temp file: the bytes are on disk before the name points at them."""
        def close() -> int:
            size = self.stream.tell()
            self.stream.close()
            fsync(self.tmp)
            return size
        return self._guard(close)

    def rename(self) -> None:
        self._guard(lambda: self.store.fs.move(self.tmp, self.path))

    def sync_folder(self) -> None:
        """The rename itself survives a power loss."""
        self._guard(lambda: fsync(os.path.dirname(self.path)))

    def _guard(self, step):
        try:
            return step()
        except (OSError, pa.ArrowException) as e:
            self.abort()
            raise StorageError(f"cannot write {self.store.uri(self.path)}: {e}") from None

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
