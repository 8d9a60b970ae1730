"""A lake as a sequence of snapshots: immutable files, one compare-and-swap commit, GC with a grace period.

    {lake}/_manifest.json          the current snapshot: generation N, key, every file with size and version
    {lake}/_snapshots/{N}.json     each committed generation, as committed (the previous one stays readable)
    {lake}/**/*.{run}-{rand}.parquet   data files: written once under a name no other write uses, never
                                   renamed over another file, never changed, deleted only by `gc`

The commit point is one conditional write of `_manifest.json` over the version the run read when it
started (`Base`): S3 `If-Match` (`If-None-Match: *` for a first commit), a `flock` + compare on local
disk (`Store.write_if`). A run whose base is no longer current (another run committed meanwhile, e.g.
after taking its lease over while it was paused) commits nothing and fails with `SnapshotMoved`; since
nothing in the write path deletes or overwrites, such a zombie can only leave orphan files, never
change what readers see. This is an Iceberg/Delta table snapshot reduced to one pointer file: a reader
reads the file list of one generation (`lake.parts`), never the folder.

`verify` checks that every file a snapshot lists is there with its recorded size and version before a
stage calls a lake current. `gc` removes the files no kept generation lists (the current and the
previous one) once they are older than a grace period, and this run's own unlisted files at once.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from .lease import Lease
from .layout import MANIFEST
from .storage import Conflict, Store, StorageError

log = logging.getLogger(__name__)
SNAPSHOTS = "_snapshots"
KEEP = 2  # generations whose files gc keeps: the current one and the one before it


class SnapshotMoved(StorageError):
    """Another run committed a new generation after this run started: this run commits nothing."""


@dataclass(frozen=True)
class Base:
    """The generation a run builds on, as it read it at its start."""
    manifest: dict | None  # None: nothing committed yet
    version: str | None  # what the commit's conditional write compares

    @property
    def generation(self) -> int:
        return (self.manifest or {}).get("generation", 0)


def base(store: Store, directory: str) -> Base:
    data, version = store.read_versioned(f"{directory}/{MANIFEST}")
    if data is None:
        return Base(None, None)
    try:
        return Base(json.loads(data), version)
    except ValueError:
        raise StorageError(f"{store.uri(directory)}/{MANIFEST} is not valid JSON ({len(data)} bytes): the lake's "
                           "commit record is damaged") from None


def relative(directory: str, path: str) -> str:
    return path[len(directory.rstrip("/")) + 1:]


def listing(store: Store, directory: str) -> dict[str, tuple[int, str]]:
    """{path relative to `directory`: (size, version)} of every file under it (`_` and `.` names skipped)."""
    return {relative(directory, p): (size, version) for p, size, version in store.list_versions(directory, recursive=True)}


def file_entries(store: Store, directory: str, names: list[str]) -> list[dict]:
    """{path (relative), size, version} of each of `names` as the store has it now; a missing one is an error."""
    found = listing(store, directory)
    missing = [n for n in names if n not in found]
    if missing:
        raise StorageError(f"{store.uri(directory)}: {len(missing)} files this run wrote are gone before its commit "
                           f"(first: {missing[0]}); nothing was committed: rerun")
    return [{"path": n, "size": found[n][0], "version": found[n][1]} for n in names]


def names(entries: list) -> list[str]:
    """The relative paths of a manifest's `files` (entries with versions, or plain names of older lakes)."""
    return [e if isinstance(e, str) else e["path"] for e in entries]


def verify(store: Store, directory: str, manifest: dict) -> list[str]:
    """What is wrong with the files a snapshot lists: each missing or changed file, named; [] when intact."""
    entries = [e for e in manifest.get("files", []) if isinstance(e, dict)]
    if not entries:
        return []
    found = listing(store, directory)
    problems = []
    for e in entries:
        got = found.get(e["path"])
        if got is None:
            problems.append(f"{e['path']} is missing")
        elif got != (e["size"], e["version"]):
            problems.append(f"{e['path']} changed (size {got[0]}, version {got[1]}; committed: size {e['size']}, "
                            f"version {e['version']})")
    return problems


def commit(store: Store, directory: str, at: Base, key: str, manifest: dict) -> dict:
    """Make `manifest` the lake's next generation, only if `at` is still the current one; returns it."""
    gen = at.generation + 1
    manifest = manifest | {"key": key, "generation": gen, "committed": time.time()}
    data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    try:
        store.write_if(f"{directory}/{MANIFEST}", data, at.version)
    except Conflict:
        now = base(store, directory)
        raise SnapshotMoved(f"{store.uri(directory)}: the snapshot moved while this run was writing (it started "
                            f"from generation {at.generation}; generation {now.generation} was committed meanwhile "
                            "by another run, e.g. one that took this run's lease over): nothing was committed; "
                            "this run's files are orphans that `fct gc` removes") from None
    store.write_bytes(f"{directory}/{SNAPSHOTS}/{gen:08d}.json", data)  # the history: written only by the winner
    return manifest


def kept(store: Store, directory: str, current: dict) -> list[dict]:
    """The generations gc keeps: the current one and the one before it (when its record is still there)."""
    gen = current.get("generation", 0)
    out = [current]
    for g in range(gen - 1, max(gen - KEEP, 0), -1):
        path = f"{directory}/{SNAPSHOTS}/{g:08d}.json"
        if store.exists(path):
            out.append(store.read_json(path))
    return out


def gc(store: Store, directory: str, rejected_dir: str | None, grace_seconds: float, run_id: str = "") -> dict:
    """Delete what no kept generation lists: data and rejected files older than `grace_seconds` (and any age
    when their name carries `run_id`, this run's own), killed writers' temp files, older snapshot records.
    Call it holding the lake's lease. Returns the counts."""
    at = base(store, directory)
    if at.manifest is None or "generation" not in at.manifest:
        raise StorageError(f"{store.uri(directory)}: not a lake with snapshots (no {MANIFEST} with a generation): "
                           "gc removes only what a committed snapshot does not list, so it will not touch this folder")
    gens = kept(store, directory, at.manifest)
    cutoff = time.time() - grace_seconds
    counts = {"deleted": 0, "bytes": 0, "kept_young": 0}

    def sweep(folder: str, listed: set[str]) -> None:
        for info in store.list_info(folder, hidden=True, recursive=True):
            rel = relative(folder, info.path)
            if rel.startswith("_") or rel in listed:
                continue
            own = bool(run_id) and f".{run_id}-" in rel.rsplit("/", 1)[-1]
            if not own and info.mtime_ns / 1e9 > cutoff:
                counts["kept_young"] += 1
                continue
            store.delete(info.path)
            counts["deleted"] += 1
            counts["bytes"] += info.size

    sweep(directory, {n for m in gens for n in names(m.get("files", []))})
    if rejected_dir:
        sweep(rejected_dir, {n for m in gens for n in m.get("rejected_files", [])})
    for info in store.list_info(f"{directory}/{SNAPSHOTS}", ".json", hidden=True):
        g = int(info.base_name.split(".")[0]) if info.base_name.split(".")[0].isdigit() else None
        if g is not None and g <= at.generation - KEEP:
            store.delete(info.path)
    if counts["deleted"]:
        log.info("gc %s: deleted %d files (%.1f MB) no kept generation lists; kept %d younger than %.0f s",
                 store.uri(directory), counts["deleted"], counts["bytes"] / 1e6, counts["kept_young"], grace_seconds)
    return counts


def collect(store: Store, directory: str, grace_seconds: float, lease_seconds: float) -> dict:
    """`fct gc`: gc of one lake (and its rejected-rows folder) under the lake's lease, so no run is writing it."""
    with Lease(store, directory, lease_seconds, "fct gc"):
        rejected = base(store, directory).manifest or {}
        rejected_dir = store.resolve(rejected["rejected_dir"]) if rejected.get("rejected_dir") else None
        return gc(store, directory, rejected_dir, grace_seconds)
