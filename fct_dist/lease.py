"""A lease on an output folder: one writer at a time, taken over when its holder is gone.

`{folder}/_lease.json` names its holder (a random run id, host, pid, command, start) and carries a
heartbeat that a thread renews every `ttl / 4` seconds with a conditional write (`Store.write_if`: S3
`If-Match`, or a `flock` on local disk), so two runs can never both believe they hold it:
- a second run finds a live lease and fails at once, naming the holder;
- a lease is stale when its heartbeat is older than `ttl`; at once when its holder's process is
  provably gone: same host name, same boot (`/proc/sys/kernel/random/boot_id`) and same pid namespace,
  and no process with its pid and start time. Containers sharing a host name (host networking,
  `docker run --hostname`) see other pid namespaces, where an invisible pid proves nothing: there only
  the heartbeat counts. A stale lease is taken over with a conditional write, so of two runs taking it
  over only one wins;
- an empty or truncated lease file (a crash or a full disk while it was written by another tool) is
  no holder: it is taken over, with a warning naming it;
- a holder whose renewal is refused has been taken over: `check()` raises `LeaseLost`, and the
  engine calls it before every commit (the commit itself is fenced too: see `snapshots`).
Heartbeats compare wall clocks across hosts: they are assumed to agree within a small part of `ttl`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import psutil

from .storage import Conflict, Store, StorageError

log = logging.getLogger(__name__)
LEASE = "_lease.json"


class LeaseHeld(StorageError):
    """Another live run holds the folder."""


class LeaseLost(StorageError):
    """This run's lease was taken over (it stopped heartbeating for longer than the ttl)."""


def describe(holder: dict) -> str:
    age = time.time() - holder.get("heartbeat", 0)
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command', '?')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}, "
            f"last heartbeat {age:.0f} s ago)")


def machine() -> dict:
    """What makes a pid meaningful: the host name, this boot and this pid namespace (Linux; empty elsewhere)."""
    ids = {"host": socket.gethostname()}
    for key, read in (("boot_id", lambda: open("/proc/sys/kernel/random/boot_id").read().strip()),
                      ("pid_ns", lambda: os.readlink("/proc/self/ns/pid"))):
        try:
            ids[key] = read()
        except OSError:
            pass
    return ids


def is_stale(holder: dict, now: float | None = None) -> bool:
    """The holder stopped heartbeating, or its process is provably gone (see the module docstring)."""
    if (now or time.time()) - holder.get("heartbeat", 0) > holder.get("ttl", 0):
        return True
    here = machine()
    if len(here) < 3 or any(holder.get(k) != v for k, v in here.items()):
        return False  # another host, boot or pid namespace: a pid not seen here may be alive there
    try:
        return abs(psutil.Process(holder["pid"]).create_time() - holder["pid_started"]) > 1.0
    except (psutil.Error, KeyError):
        return True


def parse(data: bytes) -> dict | None:
    """A lease file's holder; None when the file is empty or truncated (not valid JSON)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


class Lease:
    def __init__(self, store: Store, folder: str, ttl: float, what: str = ""):
        self.store, self.path, self.ttl = store, f"{folder}/{LEASE}", ttl
        self.version: str | None = None
        self.lost: str | None = None
        me = psutil.Process()
        self.record = machine() | {"token": uuid.uuid4().hex, "pid": os.getpid(), "pid_started": me.create_time(),
                                   "command": what or os.path.basename(sys.argv[0]), "started": time.time(),
                       "heartbeat": time.time(), "ttl": ttl}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lease-heartbeat")

    def acquire(self) -> "Lease":
        """Take the lease, or raise LeaseHeld naming the live holder."""
        where = self.store.uri(self.path.rsplit("/", 1)[0])
        data, version = self.store.read_versioned(self.path)
        if data is not None:
            holder = parse(data)
            if holder is None:
                log.warning("taking over %s: it is empty or truncated (%d bytes; a writer crashed or the disk was "
                            "full), so it names no holder", self.store.uri(self.path), len(data))
            elif not is_stale(holder):
                raise LeaseHeld(f"{where} is being written by another run: {describe(holder)}; wait for it to "
                                f"finish, or stop it (its lease expires {self.ttl:.0f} s after its last heartbeat)")
            else:
                log.warning("taking over the stale lease of %s on %s", describe(holder), where)
        holder = self._write(version)
        if holder is not None:
            raise LeaseHeld(f"{where}: another run took the lease first: {describe(holder)}")
        self._thread.start()
        return self

    def _write(self, version: str | None) -> dict | None:
        """Write our record over `version`: None when it is ours now, else who holds the lease."""
        payload = json.dumps(self.record, sort_keys=True).encode()
        try:
            self.version = self.store.write_if(self.path, payload, version)
            return None
        except Conflict:
            data, current = self.store.read_versioned(self.path)
            if data == payload:  # our own write, applied before its reply was lost and retried
                self.version = current
                return None
            return (parse(data) or {}) if data else {}

    def renew(self) -> None:
        """One heartbeat now; a refused one means the lease was taken over."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            self.record["heartbeat"] = time.time()
            holder = self._write(self.version)
            if holder is not None:
                self.lost = (f"{self.store.uri(self.path)}: this run's lease was taken over by "
                             f"{describe(holder) if holder else 'nobody (it was removed)'}")
                raise LeaseLost(self.lost)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLost:
                return
            except StorageError as e:  # the store is failing: the work itself will stop on it
                log.warning("lease heartbeat failed (retrying): %s", e)

    @property
    def run_id(self) -> str:
        """This run's random id: it names the files the run writes (see snapshots)."""
        return self.record["token"][:12]

    def check(self) -> None:
        """Raise LeaseLost when another run has taken the lease over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not self.lost and self.store.read_versioned(self.path)[1] == self.version:
            self.store.delete(self.path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
