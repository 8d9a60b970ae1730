"""What every storage backend offers (`Store`), and its errors; `local` and `s3` are the backends.

The same `pyarrow.fs.FileSystem` serves pyarrow, Ray Data (`filesystem=`), Ray Train
(`RunConfig(storage_filesystem=)`) and torch artefacts (bytes in, bytes out). A backend adds what
pyarrow does differently per filesystem: atomic writes, file versions and conditional writes."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """An object that cannot be read or written, named by its URI."""


class Conflict(StorageError):
    """A conditional write lost: the object is not (or no longer) the version the writer expected."""


def is_storage_fault(e: BaseException) -> bool:
    """An OSError from the filesystem or object store (errno set, or the AWS SDK's), as opposed to
    Arrow's OSErrors about the bytes it read (corrupt data), which are the input's fault."""
    return isinstance(e, OSError) and (e.errno is not None or "AWS Error" in str(e) or "curlCode" in str(e))


@dataclass
class Store:
    """A storage root: paths under it, and the operations every stage uses on them."""
    fs: pafs.FileSystem
    root: str  # the root inside `fs`: an absolute path, or bucket/prefix on S3
    scheme = ""  # "file" or "s3", set by the backend

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def sub(self, *parts: str) -> "Store":
        """A store rooted at a folder of this one, laid out like any storage root."""
        return replace(self, root=self.path(*parts))

    def uri(self, path: str) -> str:
        """A human-readable URI for messages and manifests."""
        return path

    def exists(self, path: str) -> bool:
        try:
            return self.fs.get_file_info(path).type != pafs.FileType.NotFound
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot stat {self.uri(path)}: {e}") from None

    def list(self, path: str, suffix: str = "") -> list[str]:
        """Files directly under `path` ending in `suffix`, sorted; hidden and `_` files skipped."""
        return [i.path for i in self.list_info(path, suffix)]

    def list_info(self, path: str, suffix: str = "", hidden: bool = False, recursive: bool = False) -> list[pafs.FileInfo]:
        """FileInfo (path, size, mtime) of the files directly under `path` (in its sub-folders too with
        `recursive`) ending in `suffix`, sorted by path; hidden (`.`) and `_` files only with `hidden`."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot list {self.uri(path)}: {e}") from None
        return sorted((i for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                       and (hidden or not i.base_name.startswith((".", "_")))), key=lambda i: i.path)

    def read_bytes(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot read {self.uri(path)}: {e}") from None

    def copy(self, src: str, dst: str) -> None:
        """Copy one file (server-side on S3); `dst` appears whole or not at all."""
        try:
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(src, dst)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot copy {self.uri(src)} to {self.uri(dst)}: {e}") from None

    def read_json(self, path: str) -> dict:
        return json.loads(self.read_bytes(path))

    def write_json(self, path: str, obj: dict) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self, path: str) -> None:
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(path)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot delete {self.uri(path)}: {e}") from None

    # What each backend does its own way.
    def resolve(self, location: str) -> str:
        """A URI or local path as a path in this store's filesystem (StorageError if it is elsewhere)."""
        raise NotImplementedError

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        """Atomically write `data` to `path`; on failure nothing appears under `path`."""
        raise NotImplementedError

    def open_atomic(self, path: str) -> "AtomicFile":
        """A file written as a stream that appears under `path` whole on commit, or not at all."""
        raise NotImplementedError

    def list_versions(self, path: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, str]]:
        """(path, size, version) of the files under `path` ending in `suffix`, sorted; hidden and `_`
        files skipped, and with `recursive` (hive folders such as `part=0/`) hidden and `_` folders too.
        The version changes whenever a file is written again."""
        raise NotImplementedError

    def read_versioned(self, path: str) -> tuple[bytes | None, str | None]:
        """(content, version) of a small object, or (None, None) when it does not exist; the version is
        what `write_if` compares."""
        raise NotImplementedError

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Write `data` only if the object is still at `version` (None: only if it does not exist);
        returns the new version, raises Conflict otherwise."""
        raise NotImplementedError


class AtomicFile:
    """A file written as a stream that appears under its path whole on `commit()`, and not at all on
    `abort()` or a failure (how: the backend's). Write and commit errors are StorageErrors naming the file."""

    def __init__(self, store: Store, path: str, stream):
        self.store, self.path, self.stream = store, path, stream

    def write(self, data: bytes | pa.Buffer) -> None:
        try:
            self.stream.write(data)
        except (OSError, pa.ArrowException) as e:
            self.abort()
            raise StorageError(f"cannot write {self.store.uri(self.path)}: {e}") from None

    def error(self, e: BaseException) -> BaseException:
        """An error raised while writing this file's stream, as the StorageError it is when the store failed."""
        if is_storage_fault(e):
            return StorageError(f"cannot write {self.store.uri(self.path)}: {e}")
        return e

    def commit(self) -> int:
        """Make the file appear whole under its path; returns its size in bytes."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop what was written."""
