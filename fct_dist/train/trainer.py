"""The one TorchTrainer factory: scaling from the config, checkpoints under storage.root."""
from __future__ import annotations

import os

import ray.train
import torch
import torch.nn as nn
from ray.train.torch import TorchTrainer

from ..config import Config
from ..runtime import init_ray, want_gpu
from ..storage import Store
from .loop import STATE, Task, train_loop_per_worker


def scaling(cfg: Config) -> ray.train.ScalingConfig:
    t = cfg.train
    gpu = want_gpu(t.use_gpu)
    return ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=gpu,
                                   resources_per_worker={"CPU": t.cpus_per_worker} | ({"GPU": 1} if gpu else {}))


def fit(task: Task, stage: str, run_name: str, cfg: Config, store: Store) -> tuple[nn.Module, list[dict]]:
    """Train `task` with Ray Train; returns the trained module (CPU, unwrapped) and its epoch history.

    Checkpoints go to {storage.root}/checkpoints/{run_name}; rerunning the same run name (same stage
    config and inputs) resumes from the last checkpoint instead of starting over."""
    init_ray(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"task": task, "stage": stage},
        scaling_config=scaling(cfg),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=store.path("checkpoints"), storage_filesystem=store.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures)))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE), weights_only=True, map_location="cpu")
    module = task.model()
    module.load_state_dict(state["model"])
    return module.eval(), state["history"]
