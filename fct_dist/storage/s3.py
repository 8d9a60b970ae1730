"""`s3://bucket/prefix` as a storage root.

All I/O is pyarrow's S3 client (the AWS SDK's standard retry mode), which takes credentials from the
environment or the instance role: they are never passed in. A write is one PUT (or a completed
multipart upload), so it appears whole and is durable when it returns. A file's version is its ETag
(a digest of the content; LastModified has only one-second resolution). Conditional writes, which
pyarrow lacks, use S3's `If-None-Match` / `If-Match` through s3fs (botocore)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ..config import Storage as StorageCfg
from .base import AtomicFile, Conflict, StorageError, Store


@dataclass
class S3Store(Store):
    s3: tuple = ()  # (endpoint_url, region, max_attempts, connect_timeout, read_timeout) for conditional writes
    scheme = "s3"

    def uri(self, path: str) -> str:
        return f"s3://{path}"

    def resolve(self, location: str) -> str:
        u = urlparse(location)
        if u.scheme == "s3" and u.netloc:
            return f"{u.netloc}{u.path}".rstrip("/")
        raise StorageError(f"{location!r} is not on the storage of storage.root ({self.uri(self.root)}): "
                           "expected an s3://bucket/prefix URI")

    def write_bytes(self, path: str, data: bytes | pa.Buffer) -> None:
        try:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(path) as f:
                f.write(data)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot write {self.uri(path)}: {e}") from None

    def open_atomic(self, path: str) -> AtomicFile:
        return BufferedFile(self, path, pa.BufferOutputStream())

    def list_versions(self, path: str, suffix: str = "", recursive: bool = False) -> list[tuple[str, int, str]]:
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

    def read_versioned(self, path: str) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync
        fs = _s3fs(self.s3)
        try:
            return sync(fs.loop, _get_object, fs, *path.split("/", 1))
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(f"cannot read {self.uri(path)}: {e}") from None

    def write_if(self, path: str, data: bytes, version: str | None) -> str:
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


class BufferedFile(AtomicFile):
    """A buffer sent in one upload at commit: pyarrow's S3 streams cannot abort an upload once started."""

    def commit(self) -> int:
        data = self.stream.getvalue()
        self.store.write_bytes(self.path, data)
        return data.size


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


def s3_filesystem(cfg: StorageCfg, probe: bool = False) -> pafs.S3FileSystem:
    """The AWS SDK's standard retry mode (exponential backoff with jitter on throttling, 5xx and
    network errors) with the configured attempts and timeouts; a `probe` gives up within seconds."""
    kwargs: dict = {"region": cfg.s3_region, "allow_bucket_creation": cfg.s3_create_bucket,
                    "request_timeout": cfg.s3_request_timeout, "connect_timeout": cfg.s3_connect_timeout}
    if cfg.s3_endpoint:
        u = urlparse(cfg.s3_endpoint if "://" in cfg.s3_endpoint else f"https://{cfg.s3_endpoint}")
        kwargs |= {"endpoint_override": u.netloc, "scheme": u.scheme}
    if probe:
        kwargs |= {"request_timeout": PROBE_TIMEOUT, "connect_timeout": PROBE_TIMEOUT}
    attempts = 2 if probe else cfg.s3_max_attempts
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)


PROBE_TIMEOUT = 5.0  # seconds: the preflight's connect and request timeouts
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws), or run "
                    "where an instance role or pod identity provides them")


def preflight(cfg: StorageCfg) -> None:
    """Before any work, within seconds: credentials are found, the endpoint answers and the root's bucket
    exists (or is created, with storage.s3_create_bucket). The store's own client retries for a minute
    and more, which suits a running job and not a typo."""
    import botocore.session  # s3fs's dependency: the same credential chain as the AWS SDK pyarrow uses
    where = cfg.s3_endpoint or f"AWS S3 in {cfg.s3_region}"
    if botocore.session.get_session().get_credentials() is None:
        raise StorageError(f"no S3 credentials for storage.root {cfg.root}: {CREDENTIALS_HINT}")
    bucket = urlparse(cfg.root).netloc
    try:
        found = s3_filesystem(cfg, probe=True).get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        text = str(e)
        hint = (CREDENTIALS_HINT if any(c in text for c in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                             "Forbidden", "403"))
                else "check the network, storage.s3_endpoint (for MinIO or another S3-compatible store) and "
                     "storage.s3_region")
        raise StorageError(f"cannot reach bucket {bucket!r} of storage.root {cfg.root} at {where}: {text.strip()}; "
                           f"{hint}") from None
    if not found and not cfg.s3_create_bucket:
        raise StorageError(f"bucket {bucket!r} of storage.root {cfg.root} does not exist at {where}: correct "
                           "storage.root, create the bucket, or set storage.s3_create_bucket=true")


def open_s3(cfg: StorageCfg) -> S3Store:
    """The S3 store of `storage.root` = s3://bucket/prefix."""
    u = urlparse(cfg.root)
    if not u.netloc:
        raise StorageError(f"storage.root {cfg.root!r}: an s3:// root needs a bucket, e.g. s3://bucket/prefix")
    endpoint = cfg.s3_endpoint if not cfg.s3_endpoint or "://" in cfg.s3_endpoint else f"https://{cfg.s3_endpoint}"
    opts = (endpoint, cfg.s3_region, cfg.s3_max_attempts, cfg.s3_connect_timeout, cfg.s3_request_timeout)
    return S3Store(s3_filesystem(cfg), f"{u.netloc}{u.path}".rstrip("/"), opts)
