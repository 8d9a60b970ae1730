"""Kill helpers of the fault tests and the soak: find our own processes, SIGKILL a whole session, wait
for a run to be mid-way."""
from __future__ import annotations

import os
import signal
import time

import psutil


def processes(title: str, root: psutil.Process | None = None) -> list[psutil.Process]:
    """Our own descendants whose command line contains `title` (Ray sets ray::<Actor> titles)."""
    root = root or psutil.Process()
    out = []
    for p in root.children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_session(proc, seconds: float = 60) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its session, and wait
    until none of them is left (a dying Ray worker can otherwise still finish a write)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == proc.pid:
                    left.append(p)
            except (OSError, psutil.Error):
                pass
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.1)
    raise TimeoutError(f"processes of session {proc.pid} still alive after {seconds} s")


def wait_for_files(store, out: str, n: int, alive, seconds: float = 120) -> int:
    """Wait until `out` holds n output files (while `alive()`); the count seen."""
    deadline = time.time() + seconds
    while time.time() < deadline and alive() and len(store.list(out, ".parquet")) < n:
        time.sleep(0.1)
    return len(store.list(out, ".parquet"))
