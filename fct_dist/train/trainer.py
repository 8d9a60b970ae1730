"""The one TorchTrainer factory: scaling from the config, checkpoints under storage.root."""
from __future__ import annotations

import logging
import os
import shutil
import threading

import ray
import ray.train
import torch
import torch.nn as nn
from ray.train.torch import TorchTrainer

from .. import layout
from ..config import Config
from ..progress import Bar
from ..runtime import init_ray, on_driver_node, verbose, want_gpu
from ..storage import Store
from .loop import STATE, Task, train_loop_per_worker

log = logging.getLogger(__name__)


def workers_of(cfg: Config, stage_workers: int | None = None) -> int:
    """A stage's Ray Train workers: its own count (null: train.num_workers); 0 (in the driver) when
    train.num_workers is 0."""
    return min(cfg.train.num_workers, stage_workers or cfg.train.num_workers)


def scaling(cfg: Config, workers: int) -> ray.train.ScalingConfig:
    """`workers` share the CPUs of train.num_workers x train.cpus_per_worker (a stage with fewer workers gets
    more threads per worker, not fewer CPUs), one GPU each where there are GPUs."""
    t = cfg.train
    gpu = want_gpu(t.use_gpu)
    cpus = t.cpus_per_worker * t.num_workers / max(1, workers)
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu, placement_strategy=t.placement_strategy,
                                   resources_per_worker={"CPU": cpus} | ({"GPU": 1} if gpu else {}))


@ray.remote(num_cpus=0)
class Board:
    """Where rank 0 posts its progress (steps done, a postfix, finished epochs' lines) for the driver
    to draw: workers print nothing, so Ray's worker output can stay in its log files."""

    def __init__(self):
        self.step, self.total, self.postfix, self.lines = 0, 0, "", []

    def put(self, step: int = 0, total: int = 0, postfix: str = "", line: str = "", pid: int = 0) -> None:
        if step:
            self.step, self.total, self.postfix = step, total, postfix
        if line:
            self.lines.append((line, pid))

    def get(self, seen: int) -> tuple[int, int, str, list[tuple[str, int]]]:
        return self.step, self.total, self.postfix, self.lines[seen:]


def follow(board, stage: str, stop: threading.Event, every: float = 0.5) -> None:
    """Draw the board's progress until `stop` (in a driver thread)."""
    bar, seen = None, 0
    while True:
        stopping = stop.wait(every)
        try:
            step, total, postfix, lines = ray.get(board.get.remote(seen), timeout=10)
        except (ray.exceptions.RayError, TimeoutError):  # e.g. a node lost: the run goes on, and so does the bar
            if stopping:
                break
            continue
        if total and bar is None:
            bar = Bar(f"[{stage}] steps", total, "steps")
        for line, pid in lines:
            line += f" [worker pid {pid}]" if verbose() else ""  # -v: which worker trained the epoch
            bar.write(line) if bar else log.info("%s", line)
        seen += len(lines)
        if bar:
            bar.goto(step, postfix)
        if stopping:
            break
    if bar:
        bar.close()


def fit(task: Task, stage: str, run_name: str, cfg: Config, store: Store, workers: int | None = None
        ) -> tuple[nn.Module, list[dict]]:
    """Train `task` with Ray Train; returns the trained module (CPU, unwrapped) and its epoch history.

    Checkpoints go to {storage.root}/checkpoints/{run_name}; rerunning the same run name (same stage
    config and inputs) resumes from the last checkpoint instead of starting over. `workers`: the stage's own
    count (workers_of)."""
    init_ray(cfg)
    workers = workers_of(cfg, workers)
    board, stop = Board.options(scheduling_strategy=on_driver_node()).remote(), threading.Event()
    drawer = threading.Thread(target=follow, args=(board, stage, stop), daemon=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "stage": stage, "board": board, "precision": cfg.train.precision},
        scaling_config=scaling(cfg, workers),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=layout.checkpoints(store), storage_filesystem=store.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures)))
    drawer.start()
    try:
        result = trainer.fit()
    finally:
        stop.set()
        drawer.join()
        ray.kill(board)
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), weights_only=True, map_location="cpu")
    if workers == 0:  # local mode: the checkpoint is the loop's own temp folder (see loop.py)
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    module = task.model()
    module.load_state_dict(state["model"])
    return module.eval(), state["history"]
