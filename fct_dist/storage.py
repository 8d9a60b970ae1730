"""Storage roots: a local folder, `file://` or `s3://bucket/prefix`, as one pyarrow filesystem.

The same `pyarrow.fs.FileSystem` serves pyarrow, Ray Data (`filesystem=`), Ray Train
(`RunConfig(storage_filesystem=)`) and torch artefacts (bytes in, bytes out). Credentials are never
passed in: pyarrow's S3 client takes them from the environment or the instance role.

Writes are atomic: the payload is serialised first, then appears under its final name in one step
(a rename on local disk, a single PUT on S3), so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .config import Storage as StorageCfg

MANIFEST = "_manifest.json"


class StorageError(RuntimeError):
    """An object that cannot be read or written, named by its URI."""


def is_storage_fault(e: BaseException) -> bool:
    """An OSError from the filesystem or object store (errno set, or the AWS SDK's), as opposed to
    Arrow's OSErrors about the bytes it read (corrupt data), which are the input's fault."""
    return isinstance(e, OSError) and (e.errno is not None or "AWS Error" in str(e) or "curlCode" in str(e))


@dataclass
class Store:
    fs: pafs.FileSystem
    root: str  # the root inside `fs`: an absolute path, or bucket/prefix on S3
    scheme: str  # "file" or "s3"

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def sub(self, *parts: str) -> "Store":
        """A store rooted at a folder of this one, laid out like any storage root."""
        return Store(self.fs, self.path(*parts), self.scheme)

    def uri(self, path: str) -> str:
        """A human-readable URI for messages and manifests."""
        return f"s3://{path}" if self.scheme == "s3" else path

    def exists(self, path: str) -> bool:
        try:
            return self.fs.get_file_info(path).type != pafs.FileType.NotFound
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot stat {self.uri(path)}: {e}") from None

    def list(self, path: str, suffix: str = "") -> list[str]:
        """Files directly under `path` ending in `suffix`, sorted; hidden and `_` files skipped."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot list {self.uri(path)}: {e}") from None
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
                      and not i.base_name.startswith((".", "_")))

    def read_bytes(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot read {self.uri(path)}: {e}") from None

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        """Atomically write `data` to `path`; on failure nothing appears under `path`."""
        parent = path.rsplit("/", 1)[0]
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        try:
            self.fs.create_dir(parent, recursive=True)
            if self.scheme == "s3":
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
                return
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, path)
        except (OSError, pa.ArrowException) as e:
            if self.scheme != "s3" and os.path.exists(tmp):  # a full disk must not keep the half-written tmp
                os.remove(tmp)
            raise StorageError(f"cannot write {self.uri(path)}: {e}") from None

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

    def manifest(self, directory: str) -> dict:
        """The manifest that marks `directory` complete; a clear error when it is missing."""
        path = f"{directory}/{MANIFEST}"
        if not self.exists(path):
            raise StorageError(f"{self.uri(directory)} is not a finished dataset: {MANIFEST} is missing "
                               "(the stage that writes it did not complete; rerun it)")
        return self.read_json(path)

    def write_manifest(self, directory: str, manifest: dict) -> None:
        """Written last: its presence is what marks `directory` as done."""
        self.write_json(f"{directory}/{MANIFEST}", manifest)

    def has_manifest(self, directory: str) -> bool:
        return self.exists(f"{directory}/{MANIFEST}")


def s3_filesystem(cfg: StorageCfg) -> pafs.S3FileSystem:
    """The AWS SDK's standard retry mode (exponential backoff with jitter on throttling, 5xx and
    network errors) with the configured attempts and timeouts."""
    kwargs: dict = {"region": cfg.s3_region, "allow_bucket_creation": True,
                    "request_timeout": cfg.s3_request_timeout, "connect_timeout": cfg.s3_connect_timeout}
    if cfg.s3_endpoint:
        u = urlparse(cfg.s3_endpoint if "://" in cfg.s3_endpoint else f"https://{cfg.s3_endpoint}")
        kwargs |= {"endpoint_override": u.netloc, "scheme": u.scheme}
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.s3_max_attempts),
                             **kwargs)


def open_store(cfg: StorageCfg) -> Store:
    """Resolve `storage.root` (a path, `file://...` or `s3://bucket/prefix`) to a Store."""
    u = urlparse(cfg.root)
    if u.scheme == "s3":
        if not u.netloc:
            raise StorageError(f"storage.root {cfg.root!r}: an s3:// root needs a bucket, e.g. s3://bucket/prefix")
        return Store(s3_filesystem(cfg), f"{u.netloc}{u.path}".rstrip("/"), "s3")
    if u.scheme in ("", "file"):
        path = u.path if u.scheme == "file" else cfg.root
        return Store(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), "file")
    raise StorageError(f"storage.root {cfg.root!r}: unsupported scheme {u.scheme!r}; expected a local path, "
                       "file:// or s3://")
