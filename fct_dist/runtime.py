"""Ray start-up and device choice, shared by every stage."""
from __future__ import annotations

import os

import ray

from .config import Config


def init_ray(cfg: Config) -> None:
    """Join or start Ray once per process.

    Inside a Ray job (RAY_JOB_ID set by the job supervisor) always join the job's cluster; otherwise
    `ray.address`: `local` starts a private local Ray (never attaches to one started by `ray start`)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    kwargs = {}
    if cfg.ray.address == "local":
        # the dashboard (127.0.0.1 only) serves the state API that Ray Train's controller polls
        kwargs = {"num_cpus": cfg.ray.num_cpus, "object_store_memory": cfg.ray.object_store_memory}
    ray.init(address=cfg.ray.address, **kwargs)


def gpus_available() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def want_gpu(setting: str) -> bool:
    """Resolve a `use_gpu: auto|true|false` setting against the cluster."""
    if setting == "auto":
        return gpus_available()
    return setting == "true"
