"""The one `train_loop_per_worker` and the tasks it trains.

A Task says what a stage trains (model, data, loss, optimizer); the loop does the rest the same way
for every stage: DDP, sharded sampling, cosine schedule with warm-up, bf16 autocast (train.precision),
progress posted to the driver's board (`trainer.Board`), a checkpoint per epoch and resumption from
the last one.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from ray.train.v2.api.context import LocalTrainContext
from torch.utils.data import DistributedSampler, TensorDataset

from .. import features, image_lake, losses
from ..config import Optim
from ..models import (Classifier, ClassifierConfig, ResNetConfig, SimCLR, SimCLRConfig, Transformation,
                      TransformationConfig)
from ..runtime import train_dtype
from ..storage import Store
from . import augment

STATE = "state.pt"


@dataclass
class Task:
    """What a stage trains. Built on the driver, pickled to every worker."""
    opt: Optim  # the stage's training settings (its config.train.* section)

    def dataset(self) -> TensorDataset:
        raise NotImplementedError

    def model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.opt.lr, momentum=self.opt.momentum,
                               weight_decay=self.opt.weight_decay, nesterov=True)

    def epoch_start(self, model: nn.Module, epoch: int) -> None:
        """Hook after model.train() at the start of each epoch."""


@dataclass
class ImageTask(Task):
    store: Store = None
    images: ray.ObjectRef = None  # the train split, decoded once by the driver (stages.shared_images)
    arch: ResNetConfig = None
    labels: list[int] | None = None  # train on these classes only (None: all)

    def dataset(self) -> TensorDataset:
        _, x, y = image_lake.select(ray.get(self.images), self.labels, self.opt.max_train_images)
        target = np.searchsorted(np.asarray(self.classes()), y)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(target.astype(np.int64)))

    def classes(self) -> list[int]:
        return self.labels if self.labels is not None else image_lake.image_manifest(self.store, "train")["labels"]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return augment.shift(x) if self.opt.augment else x


@dataclass
class ClassifierTask(ImageTask):
    num_classes: int = 0

    def model(self) -> nn.Module:
        return Classifier(ClassifierConfig(self.arch, self.num_classes))

    def loss(self, model, batch):
        x, y = batch
        _, logits = model(self.inputs(x))
        return losses.classification(logits, y, self.opt.label_smoothing)


@dataclass
class BctTask(ClassifierTask):
    old_fc: torch.Tensor = None  # the frozen old classifier's weight (old classes, emb_dim)
    old_index: torch.Tensor = None  # target index -> old classifier index, -1 where unknown

    def loss(self, model, batch):
        x, y = batch
        emb, logits = model(self.inputs(x))
        influence = losses.bct_influence(emb, y, self.old_fc.to(emb.device), self.old_index.to(emb.device))
        return losses.classification(logits, y, self.opt.label_smoothing) + self.opt.influence_weight * influence


@dataclass
class SimCLRTask(ImageTask):
    proj_dim: int = 64

    def model(self) -> nn.Module:
        return SimCLR(SimCLRConfig(self.arch, self.proj_dim))

    def loss(self, model, batch):
        x, _ = batch
        return losses.nt_xent(model(augment.view(x)), model(augment.view(x)), self.opt.temperature)


@dataclass
class TransformationTask(Task):
    """h(old, side) -> new by MSE; with a classifier, plus its label-smoothed CE on h's output; with an
    uncertainty head, FastFill's weighting of both by each item's predicted log-variance. With `views`,
    each item of a batch is one of its views drawn at random: the rows as stored or an augmented view."""
    store: Store = None
    features: str = ""  # directory of the feature lake's train split
    columns: dict = None  # role (id, old, side, new) -> column name
    arch: TransformationConfig = None
    classifier: torch.Tensor | None = None  # the frozen new model's classifier weight (classes, new_dim)
    labels: features.Labels | None = None  # with `classifier`: where each row's class is read
    views: tuple[str, ...] = ()  # directories of augmented views of the same rows (their train splits)

    def dataset(self) -> TensorDataset:
        a = self.arch
        dims = {"old": a.old_dim, "side": a.side_dim, "new": a.new_dim}
        x = features.views(self.store, (self.features, *self.views), self.columns, dims)  # (n, V, d) each
        y = self.labels.targets(self.store, x["id"].numpy()) if self.labels else np.zeros(len(x["id"]), np.int64)
        return TensorDataset(x["old"], x["side"], x["new"], torch.from_numpy(y))

    def model(self) -> nn.Module:
        return Transformation(self.arch)

    def optimizer(self, params):
        return torch.optim.Adam(params, lr=self.opt.lr, weight_decay=self.opt.weight_decay)

    def loss(self, model, batch):
        old, side, new, y = batch  # (B, V, d) each: V views of every item
        pick = (torch.arange(len(y), device=y.device), torch.randint(old.shape[1], (len(y),), device=y.device))
        old, side, new = old[pick], side[pick], new[pick]  # (B, d): one view per item
        h = model.module if hasattr(model, "module") else model  # DDP wraps it; the head is called on the output
        pred = model(old, side)
        weight = self.opt.classification_weight if self.classifier is not None else 0.0
        return losses.transformation(
            pred, new, h.log_variance(pred) if self.arch.uncertainty else None,
            pred @ self.classifier.to(pred.device).T if weight else None, y, weight, self.opt.label_smoothing,
            self.opt.mu_uncertainty)

    def epoch_start(self, model, epoch):
        if epoch >= round((1 - self.opt.freeze_bn_fraction) * self.opt.epochs):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.eval()

def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    return peak * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: its shard of the data, the model resumed from the last checkpoint, then an
    epoch at a time, each reported with a checkpoint (rank 0 writes it)."""
    task: Task = config["task"]
    stage, opt, board = config["stage"], task.opt, config["board"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(opt.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    sampler, loader = shard(task, rank, world)
    model, optimizer, start, history = resume(task)
    dtype = train_dtype(config["precision"], ray.train.torch.get_device())
    # train.num_workers=0 runs this loop in the driver (Ray Train's local mode): no upload, no resume
    local, kept = isinstance(ctx, LocalTrainContext), None
    for epoch in range(start, opt.epochs):
        sampler.set_epoch(epoch)
        metrics = run_epoch(task, model, optimizer, loader, epoch, rank, world, board, dtype)
        # resumed_at: the checkpoint's epoch this worker group started from; workers x threads x dtype: how it trained
        history.append(metrics | {"resumed_at": start, "workers": world, "threads": torch.get_num_threads(),
                                  "precision": str(dtype).removeprefix("torch.")})
        if rank == 0:
            board.put.remote(pid=os.getpid(), line=f"[{stage}] epoch {epoch + 1}/{opt.epochs} loss {metrics['loss']:.4f} "
                                  f"{metrics['items_per_s']:.0f} items/s")
        d = report(model, optimizer, history, rank)
        if local:  # Ray keeps only a reference to the folder: keep the last one, `fit` reads and removes it
            shutil.rmtree(kept, ignore_errors=True)
            kept = d
        else:
            shutil.rmtree(d, ignore_errors=True)


class Batches:
    """An epoch of the sampler's indices in batches (the last partial one dropped), each taken from the
    tensors by one indexing op and moved to the device. A DataLoader fetches and collates row by row:
    ~8x an indexing op for h's short rows, a sixth of an epoch of h at the demo's sizes."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], sampler: DistributedSampler, size: int,
                 device: torch.device):
        self.tensors, self.sampler, self.size, self.device = tensors, sampler, size, device

    def __len__(self) -> int:
        return len(self.sampler) // self.size

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler))
        for i in range(len(self)):
            rows = order[i * self.size:(i + 1) * self.size]
            yield [t[rows].to(self.device, non_blocking=True) for t in self.tensors]


def shard(task: Task, rank: int, world: int) -> tuple[DistributedSampler, Batches]:
    """This worker's share of the task's data, reshuffled per epoch, batches of batch_size / world."""
    data, opt = task.dataset(), task.opt
    per_worker = max(1, min(opt.batch_size // world, len(data) // world))
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=opt.seed, drop_last=True)
    return sampler, Batches(data.tensors, sampler, per_worker, ray.train.torch.get_device())


def resume(task: Task) -> tuple[nn.Module, torch.optim.Optimizer, int, list[dict]]:
    """(model, optimizer, first epoch, history so far): from Ray Train's last checkpoint when there is one."""
    model, start, history, state = task.model(), 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE), weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        start, history = state["epoch"], state["history"]
    model = ray.train.torch.prepare_model(model)
    optimizer = task.optimizer(model.parameters())
    if state:
        optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, start, history


def run_epoch(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Batches, epoch: int,
              rank: int, world: int, board, dtype: torch.dtype) -> dict:
    """One pass over the loader with the cosine schedule, matmuls and convolutions in `dtype` (autocast);
    rank 0 feeds the driver's progress bar."""
    opt, steps, device = task.opt, len(loader), ray.train.torch.get_device()
    total, warmup = opt.epochs * steps, int(opt.warmup_epochs * steps)
    amp = torch.autocast(device.type, dtype, enabled=dtype != torch.float32)
    model.train()
    task.epoch_start(model, epoch)
    t0, loss_sum, seen = time.time(), 0.0, 0
    for i, batch in enumerate(loader):
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(epoch * steps + i, total, warmup, opt.lr)
        with amp:
            loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum, seen = loss_sum + loss.item() * len(batch[0]), seen + len(batch[0])
        if rank == 0 and (i % 5 == 0 or i == steps - 1):  # fire and forget: the driver draws the bar
            board.put.remote(step=epoch * steps + i + 1, total=opt.epochs * steps,
                             postfix=f"epoch {epoch + 1}/{opt.epochs} loss {loss.item():.4f} "
                                     f"{seen * world / (time.time() - t0):.0f} items/s")
    return {"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "seconds": time.time() - t0,
            "items_per_s": seen * world / (time.time() - t0)}


def report(model: nn.Module, optimizer: torch.optim.Optimizer, history: list[dict], rank: int) -> str:
    """Report the epoch's metrics to Ray Train with a checkpoint (written by rank 0) of model, optimizer and
    history; returns the checkpoint's local folder."""
    d, ckpt = tempfile.mkdtemp(prefix="fct-ckpt-"), None
    if rank == 0:
        bare = model.module if hasattr(model, "module") else model
        torch.save({"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": history[-1]["epoch"], "history": history}, os.path.join(d, STATE))
        ckpt = ray.train.Checkpoint.from_directory(d)
    ray.train.report(history[-1], checkpoint=ckpt)  # uploads it to storage, except in local mode
    return d
