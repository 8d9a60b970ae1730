"""The engine's commit room: the inputs are still the versions the run read, the rows add up, and the
output lake's next snapshot lists exactly this run's result (`snapshots.commit`, conditional on the
generation the run started from)."""
from __future__ import annotations

import logging
import time

from .. import lake, snapshots
from ..lease import Lease
from ..progress import rate
from .filejob import FileJob, Input, InputChanged

log = logging.getLogger(__name__)


def check_unchanged(job: FileJob, inputs: list[Input]) -> None:
    """Every input is still the version the run started from (one listing per folder): else nothing is committed."""
    now = {p: (size, version) for p, size, version in lake.versions_of(job.store, [i.path for i in inputs]).values()}
    for i in inputs:
        if now.get(i.path) != (i.size, i.version):
            raise InputChanged(f"{job.store.uri(i.path)} changed or disappeared while this run was using it; "
                               "nothing was committed: rerun")

def commit(job: FileJob, lease: Lease, at: snapshots.Base, results: list[dict], inputs: list[Input], job_key: str,
           timing: dict) -> dict:
    """Check the row accounting, confirm the lease, and commit the next snapshot over `at`."""
    store, t0 = job.store, time.time()
    order = {i.path: k for k, i in enumerate(inputs)}
    results.sort(key=lambda r: order.get(r["input"]["path"], -1))
    if sorted(r["input"]["path"] for r in results) != sorted(order):
        raise RuntimeError(f"{job.name}: results for {len(results)} files, expected {len(inputs)}")
    unknown = [r for r in results if r["rows_in"] is None]
    known = [r for r in results if r["rows_in"] is not None]
    total = {k: sum(r[k] for r in known) for k in ("rows_in", "rows_out", "rows_rejected")}
    total |= {k: sum(r[k] for r in results) for k in ("bytes_in", "bytes_out")}
    trues = {c: sum(r.get("true_rows", {}).get(c, 0) for r in results) for c, p in job.producer.items()
             if p.get("type") == "bool"}
    if total["rows_out"] + total["rows_rejected"] != total["rows_in"]:
        raise RuntimeError(f"{job.name}: rows do not add up: out {total['rows_out']} + rejected "
                           f"{total['rows_rejected']} != read {total['rows_in']}; not committing")
    quarantined = {store.uri(r["input"]["path"]): r["quarantined"] for r in results if r["quarantined"]}
    mapped_rows = sum(r["rows_in"] or 0 for r in results if r["seconds"] > 0)
    fn_seconds = sum(r.get("fn_seconds", 0.0) for r in results if r["seconds"] > 0)
    busy = fn_seconds / (timing["workers"] * timing["map_seconds"]) if timing["workers"] else None
    summary = total | {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()} | {
        "fn_seconds": round(fn_seconds, 3), "fn_busy": round(busy, 3) if busy is not None else None,
        "files": len(results), "files_quarantined": len(quarantined), "quarantined": quarantined, "true_rows": trues,
        "rows_unknown_files": [store.uri(r["input"]["path"]) for r in unknown],
        "rows_per_second": rate(mapped_rows, timing["map_seconds"]) if mapped_rows else None}
    manifest = {"kind": "embeddings", "stage": job.name, "fingerprint": job.fingerprint,
                "producer": job.producer, "source": lake.pinned(store, job.in_dir) or store.uri(job.in_dir),
                "files": snapshots.file_entries(store, job.out_dir, [r["output"] for r in results]),
                "rejected_files": sorted(f for r in results for f in r["rejected_files"]),
                "per_file": results, "rows": total["rows_out"], "summary": summary, "writer": lease.run_id,
                "rejected_dir": store.uri(job.rejected_dir)}
    lease.renew()  # fencing: a run whose lease was taken over never commits (and the snapshot check below)
    summary["commit_seconds"] = round(time.time() - t0, 3)
    manifest = snapshots.commit(store, job.out_dir, at, job_key, manifest)
    unknown_note = f", rows of {len(unknown)} quarantined files unknown" if unknown else ""
    log.info("[%s] %s rows read, %s written, %s rejected%s, %d files (%d mapped now), %.1f MB in, %.1f MB out, "
             "%s rows/s -> %s (generation %d)", job.name, total["rows_in"], total["rows_out"], total["rows_rejected"],
             unknown_note, len(results), timing["files_mapped_this_run"], total["bytes_in"] / 1e6,
             total["bytes_out"] / 1e6, summary["rows_per_second"], store.uri(job.out_dir), manifest["generation"])
    return manifest
