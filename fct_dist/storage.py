"""Storage roots: a local folder, `file://` or `s3://bucket/prefix`, as one pyarrow filesystem.

The same `pyarrow.fs.FileSystem` serves pyarrow, Ray Data (`filesystem=`), Ray Train
(`RunConfig(storage_filesystem=)`) and torch artefacts (bytes in, bytes out). Credentials are never
passed in: pyarrow's S3 client takes them from the environment or the instance role.

Writes are atomic: the payload is serialised first, then appears under its final name in one step
(a rename on local disk, a single PUT or a completed multipart upload on S3), so a reader never sees
half a file. On local disk they are durable too: the file is fsynced before the rename and its folder
after it, so a power loss after a commit cannot leave a committed name pointing at missing bytes (an
S3 PUT is durable when it returns).

Leases need one more thing pyarrow's S3 client lacks: a conditional write (compare-and-swap).
`write_if` does it with S3's `If-None-Match` / `If-Match` through s3fs (botocore), and on local disk
under an exclusive `flock`.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from .config import Storage as StorageCfg

MANIFEST = "_manifest.json"


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
    fs: pafs.FileSystem
    root: str  # the root inside `fs`: an absolute path, or bucket/prefix on S3
    scheme: str  # "file" or "s3"
    s3: tuple = ()  # (endpoint_url, region, max_attempts, connect_timeout, read_timeout) for conditional writes

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts if p)])

    def sub(self, *parts: str) -> "Store":
        """A store rooted at a folder of this one, laid out like any storage root."""
        return Store(self.fs, self.path(*parts), self.scheme, self.s3)

    def uri(self, path: str) -> str:
        """A human-readable URI for messages and manifests."""
        return f"s3://{path}" if self.scheme == "s3" else path

    def resolve(self, location: str) -> str:
        """A URI (`s3://bucket/prefix`, `file:///dir`) or local path as a path in this store's filesystem."""
        u = urlparse(location)
        if u.scheme == "s3" and self.scheme == "s3" and u.netloc:
            return f"{u.netloc}{u.path}".rstrip("/")
        if u.scheme in ("", "file") and self.scheme == "file":
            return os.path.abspath(os.path.expanduser(u.path if u.scheme else location)).rstrip("/")
        raise StorageError(f"{location!r} is not on the storage of storage.root ({self.uri(self.root)}): "
                           f"expected {'an s3://bucket/prefix URI' if self.scheme == 's3' else 'a local path or file:// URI'}")

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

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        """Atomically write `data` to `path`; on failure nothing appears under `path`."""
        if self.scheme == "s3":
            try:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
            except (OSError, pa.ArrowException) as e:
                raise StorageError(f"cannot write {self.uri(path)}: {e}") from None
            return
        out = AtomicFile(self, path)
        out.write(data)
        out.commit()

    def list_versions(self, path: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, str]]:
        """(path, size, version) of the files under `path` ending in `suffix`, sorted; hidden and `_`
        files skipped, and with `recursive` (hive folders such as `part=0/`) hidden and `_` folders too.
        The version changes whenever a file is written again: the ETag on S3 (a digest of the content;
        LastModified has only one-second resolution), mtime + ctime + inode on local disk (ctime cannot
        be set back, unlike mtime)."""
        if self.scheme != "s3":
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
        try:
            fs = _s3fs(self.s3)
            entries = (fs.find(path, detail=True, refresh=True).values() if recursive
                       else fs.ls(path, detail=True, refresh=True))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StorageError(f"cannot list {self.uri(path)}: {e}") from None
        return sorted((e["name"], e["size"], e["ETag"].strip('"')) for e in entries
                      if e["type"] == "file" and e["name"].endswith(suffix)
                      and not any(part.startswith((".", "_")) for part in e["name"][len(path):].split("/")))

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

    def copy(self, src: str, dst: str) -> None:
        """Copy one file (server-side on S3); `dst` appears whole or not at all."""
        try:
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            self.fs.copy_file(src, dst)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot copy {self.uri(src)} to {self.uri(dst)}: {e}") from None

    def read_versioned(self, path: str) -> tuple[bytes | None, str | None]:
        """(content, version) of a small object, or (None, None) when it does not exist; the version
        is what `write_if` compares (the ETag on S3, a content hash on local disk)."""
        if self.scheme != "s3":
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None, None
            except OSError as e:
                raise StorageError(f"cannot read {self.uri(path)}: {e}") from None
            return data, hashlib.sha256(data).hexdigest()
        from fsspec.asyn import sync
        fs = _s3fs(self.s3)
        try:
            return sync(fs.loop, _get_object, fs, *path.split("/", 1))
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(f"cannot read {self.uri(path)}: {e}") from None

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
        """Write `data` only if the object is still at `version` (None: only if it does not exist);
        returns the new version, raises Conflict otherwise."""
        if self.scheme == "s3":
            return self._s3_write_if(path, data, version)
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

    def _s3_write_if(self, path: str, data: bytes, version: str | None) -> str:
        bucket, key = path.split("/", 1)
        cond = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            if version is None:
                self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # the bucket too, as every write does
            return _s3fs(self.s3).call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
        except OSError as e:
            code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or (
                    isinstance(e, FileExistsError) and code != "NoSuchBucket"):
                raise Conflict(f"{self.uri(path)} changed: expected version {version}") from None
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

    def has_manifest(self, directory: str) -> bool:
        return self.exists(f"{directory}/{MANIFEST}")


async def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """Content and ETag from one GET (so they belong together)."""
    r = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with r["Body"] as body:
        return await body.read(), r["ETag"]


@lru_cache(maxsize=None)
def _s3fs(opts: tuple):
    """One s3fs client per process and endpoint (conditional writes only; all other I/O is pyarrow's)."""
    import s3fs
    endpoint, region, attempts, connect, read = opts
    config = {"retries": {"max_attempts": attempts, "mode": "standard"}}
    config |= {k: v for k, v in (("connect_timeout", connect), ("read_timeout", read)) if v}
    return s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs={"region_name": region}, config_kwargs=config,
                             skip_instance_cache=True)


class AtomicFile:
    """A file written as a stream that appears under its path whole on `commit()`, and not at all on
    `abort()` or a failure: a hidden temp file renamed into place on local disk; on S3 a buffer sent
    in one upload at commit (pyarrow's S3 streams cannot abort an upload once started). Write and
    commit errors are StorageErrors naming the file."""

    def __init__(self, store: Store, path: str):
        self.store, self.path, self.tmp = store, path, None
        if store.scheme == "s3":
            self.stream = pa.BufferOutputStream()
            return
        parent, name = path.rsplit("/", 1)
        self.tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
        try:
            store.fs.create_dir(parent, recursive=True)
            self.stream = store.fs.open_output_stream(self.tmp)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot write {store.uri(path)}: {e}") from None

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
        if self.tmp is None:
            data = self.stream.getvalue()
            self.store.write_bytes(self.path, data)
            return data.size
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
        """Drop what was written (a full disk must not keep a half-written temp file)."""
        if self.tmp is None:
            return
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
        endpoint = cfg.s3_endpoint if not cfg.s3_endpoint or "://" in cfg.s3_endpoint else f"https://{cfg.s3_endpoint}"
        opts = (endpoint, cfg.s3_region, cfg.s3_max_attempts, cfg.s3_connect_timeout, cfg.s3_request_timeout)
        return Store(s3_filesystem(cfg), f"{u.netloc}{u.path}".rstrip("/"), "s3", opts)
    if u.scheme in ("", "file"):
        path = u.path if u.scheme == "file" else cfg.root
        return Store(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), "file")
    raise StorageError(f"storage.root {cfg.root!r}: unsupported scheme {u.scheme!r}; expected a local path, "
                       "file:// or s3://")
