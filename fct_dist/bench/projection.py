"""The 1B-item projection of `fct bench`: measured per-item costs -> wall time and GPU-hours on K GPUs."""
from __future__ import annotations

from ..config import Projection


def project(pc: Projection, production: dict, gpu: bool) -> dict:
    """Wall time and GPU-hours for pc.items on K GPUs: per-GPU rates (measured here when a GPU ran,
    else pc's assumptions), object-storage bandwidth as a second limit, bytes per item as measured."""
    rows = []
    for job, rate_key in (("backfill", "gpu_backfill_rows_per_s"), ("re-extraction", "gpu_extract_images_per_s")):
        r = production[job]["ray"]
        rate = r["items_per_second"] / r["gpus"] if gpu else getattr(pc, rate_key)
        for k in pc.gpus:
            compute_h = pc.items / (k * rate) / 3600
            storage_h = pc.items * r["bytes_per_item"] * 8 / (pc.storage_gbps * 1e9) / 3600
            wall_h = max(compute_h, storage_h)
            rows.append({"job": job, "gpus": k, "per_gpu_rate": rate, "rate_source": "measured" if gpu else "assumed",
                         "bytes_per_item": r["bytes_per_item"], "wall_hours": round(wall_h, 3),
                         "gpu_hours": round(k * wall_h, 2), "bound": "GPU" if compute_h >= storage_h else "storage",
                         "cpu_core_hours_at_measured_rate": round(pc.items * r["cpu_seconds_per_million"] / 1e6 / 3600, 1)})
    return {"items": pc.items, "storage_gbps": pc.storage_gbps, "rows": rows}
