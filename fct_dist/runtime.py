"""Ray start-up and device choice, shared by every stage."""
from __future__ import annotations

import logging
import os
import platform
import sys
import threading

import psutil
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .config import Config


def setup_logging(level: int) -> None:
    """The CLI's output: fct_dist's lines on stderr at `level` (INFO: steps, progress, summaries).
    Ray's own output (its workers' stdout, its INFO lines) stays in Ray's log files
    (/tmp/ray/session_latest/logs) unless `level` is DEBUG (`-v`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("fct_dist")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    # fct writes column statistics on the id only (vectors' min/max help no query): pyiceberg warns of that
    # for every vector column of every file it registers
    logging.getLogger("pyiceberg.io.pyarrow").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)


def verbose() -> bool:
    return logging.getLogger("fct_dist").getEffectiveLevel() <= logging.DEBUG


_STARTING = threading.Lock()


def init_ray(cfg: Config) -> None:
    """Join or start Ray once per process, whichever thread asks first (stages side by side both ask).

    Inside a Ray job (RAY_JOB_ID set by the job supervisor) always join the job's cluster; otherwise
    `ray.address`: `local` starts a private local Ray (never attaches to one started by `ray start`)."""
    with _STARTING:  # two threads past an unlocked check would each start a local Ray
        if ray.is_initialized():
            return
        if threading.current_thread() is threading.main_thread():
            _start(cfg)
            return
        # a local Ray's node processes die with the thread that started them (Linux's parent-death signal follows
        # the thread, not the process): a stage's thread that ends would take the cluster with it
        started, failed = threading.Event(), []

        def keeper() -> None:
            try:
                _start(cfg)
            except BaseException as e:  # noqa: BLE001 - raised again in the thread that asked
                failed.append(e)
            started.set()
            threading.Event().wait()

        threading.Thread(target=keeper, name="ray-keeper", daemon=True).start()
        started.wait()
        if failed:
            raise failed[0]


def _start(cfg: Config) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray's workers' output and its own INFO lines go to its log files; `-v` shows them here too
    quiet = {"log_to_driver": verbose(), "logging_level": logging.DEBUG if verbose() else logging.ERROR}
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return
    kwargs = {}
    if cfg.ray.address == "local":
        # the dashboard (127.0.0.1 only) serves the state API that Ray Train's controller polls
        kwargs = {"num_cpus": cfg.ray.num_cpus, "object_store_memory": cfg.ray.object_store_memory}
    ray.init(address=cfg.ray.address, **kwargs, **quiet)


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Schedule an actor on this driver's node where it can be: a helper the driver reads (a progress
    board) then dies only with the driver's node."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def gpus_available() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def want_gpu(setting: str) -> bool:
    """Resolve a `use_gpu: auto|true|false` setting against the cluster."""
    if setting == "auto":
        return gpus_available()
    return setting == "true"


def cpuinfo(*names: str) -> str | None:
    """The first of these fields of Linux's /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(names)), None)
    except OSError:
        return None


def cpu_flags() -> set[str]:
    """This machine's CPU feature flags (x86's `flags`, Arm's `Features`; empty where unknown)."""
    return set((cpuinfo("flags", "Features") or "").split())


def train_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Resolve `train.precision: auto|bf16|fp32` on a training worker: auto is bf16 on a GPU and on a CPU
    that multiplies bf16 natively (AVX512-BF16, AMX or Arm's BF16: ~1.8x the demo's ResNet steps, ~2.7x h's),
    fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if setting == "auto":
        native = device.type == "cuda" or bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if setting == "bf16" else torch.float32


def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def machine() -> dict:
    """What ran: CPU, cores, memory, GPU and the versions of the stack (the torch actually imported)."""
    import faiss
    import pyarrow
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__,
            "faiss": faiss.__version__, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
