"""Training: the weight-sharing supernet, and the retraining of one chosen arch (the library; the command line is
`python -m experiments.train`).

Both use one loop: SGD with Nesterov momentum, a per-step cosine schedule after an optional linear warm-up, label
smoothing, weight decay on conv and linear weights only, channels_last, AMP on CUDA, a tqdm bar with loss,
accuracy and ETA, and a checkpoint after every epoch (written atomically, loaded with `weights_only=True`). Rerunning
the same command after a kill continues from the last checkpoint and, on CPU, ends bit for bit where an uninterrupted
run would; a run directory made by a different configuration is refused, naming what differs.

Supernet sampling (every process draws the same archs: the arch generator is seeded identically on all ranks):
  - uniform: one random arch per step, every choice uniform (Single Path One-Shot);
  - sandwich: the largest, the smallest and `sandwich_random` random archs per step, gradients summed (BigNAS); with
    `distill`, the largest learns from the labels and the others from its detached soft predictions;
  - fair: as many random archs per step as a decision has most choices (4 in fashion_mnist), in which every choice of
    every decision appears equally often, their gradients averaged, no distillation (FairNAS's strict fairness).
With `ema_decay`, an exponential moving average of the weights is kept beside them (and checkpointed); the trained
supernet holds the average at the end, and candidates are scored with it. With `replicas: N`, N supernets of the
recipe train one after another (seeds seed..seed+N-1; the first in RUN_DIR, replica k in RUN_DIR/replicaK), and
candidates are scored by the mean over them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from experiments import distributed
from experiments.checkpoints import (
    CHECKPOINT_FORMAT,
    MODEL_FILE,
    RETRAIN_CHECKPOINT,
    SUPERNET_CHECKPOINT,
    RunDirError,
    load_checkpoint,
    load_weights,
    replica_dir,
    save_checkpoint,
    save_model,
    write_json,
)
from experiments.config import ExperimentConfig, TrainRecipe, fingerprint
from experiments.cudnn import cudnn_mode
from experiments.data import DataConfig, ImageDataset, Splits, make_loader
from experiments.distributed import DistContext
from search_space import Arch, SearchSpace, Supernet, space_to_dict
from search_space.network import ShuffleNetV2

_ARCH_STREAM = 1  # the arch generator's seed is (seed, _ARCH_STREAM): independent of the loader's streams


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did (all processes together)."""

    epoch: int  # epochs completed, counting from 1
    loss: float  # mean training loss; the supernet reports its first arch of each step (uniform: the sampled one)
    accuracy: float  # training accuracy of the same, in [0, 1]
    lr: float  # learning rate of the epoch's last step
    seconds: float  # wall time of the training steps (evaluation excluded)
    images_per_s: float  # training images per second, all processes together
    val_accuracy: float | None = None  # retraining: validation accuracy after the epoch


@dataclass(frozen=True)
class RetrainResult:
    """The outcome of `retrain`."""

    arch: Arch
    val_accuracy: float  # on the validation split (held out of the training data)
    test_accuracy: float  # on the official test split
    seconds: float  # training wall time summed over epochs (across resumptions)
    history: list[EpochStats]
    model_path: Path  # RUN_DIR/model.pt
    model: nn.Module  # the trained network itself (eval mode, on the training device)


# ---- public API ---------------------------------------------------------------------------------------------------


def train_supernet(
    supernet: Supernet,
    splits: Splits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    seed: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
    stop_after: int | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Train the shared weights with `cfg.supernet`, resuming from RUN_DIR/supernet.pt when it exists.

    Args:
        supernet: the supernet; its initial weights come from the caller (seed torch before building it).
        splits: the data; training uses `splits.train`.
        cfg: the experiment; `cfg.supernet` is the recipe, `cfg.data.augment` switches augmentation.
        run_dir: where the checkpoint and supernet.json go; created if missing.
        seed: seeds the loader order and the arch sampler; None uses `cfg.seed`.
        device: None uses `cfg.device`.
        progress: show a tqdm bar and one line per epoch on stderr (process 0 only).
        ctx: this process among data-parallel ones (the process group must be up); None is a single process.
        stop_after: return after this many epochs in total even if the run has more (a job with a time limit);
            calling again continues.
        on_epoch: called on every process with each epoch's stats once its checkpoint is written (epochs done by
            an earlier call are not reported again).

    Returns:
        One `EpochStats` per completed epoch, resumed ones included. With `cfg.supernet.ema_decay`, `supernet` then
        holds the averaged weights (what candidates are scored with; RUN_DIR/supernet.pt keeps both).

    Raises:
        RunDirError: RUN_DIR holds a checkpoint of a different configuration.
    """
    seed = cfg.seed if seed is None else seed
    identity = {
        "kind": "supernet",
        "space": space_to_dict(supernet.space),
        "num_classes": supernet.num_classes,
        "data": _data_identity(cfg.data),
        "recipe": cfg.supernet.identity(),
        "seed": seed,
    }
    loop = _SupernetLoop(
        supernet, splits, cfg, identity, Path(run_dir), seed, torch.device(device or cfg.device), progress,
        ctx or DistContext(),
    )
    history = loop.run(stop_after, on_epoch)
    if loop.ema is not None:
        loop.ema.copy_to(supernet)
    if loop.ctx.is_main:
        write_json(Path(run_dir) / "supernet.json", {"identity": identity, "history": _plain(history)})
    return history



def train_supernets(
    space: SearchSpace,
    splits: Splits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> list[Supernet]:
    """Train the `cfg.supernet.replicas` supernets of the recipe, one after another; resumable as `train_supernet`.

    Replica k starts from weights drawn with seed `cfg.seed + k` and trains with that seed in `replica_dir(run_dir,
    k)`, so the first is the supernet a single-replica run trains, and raising `replicas` keeps the trained ones.

    Returns:
        The trained supernets (eval mode), the first replica first.
    """
    supernets = []
    for k in range(cfg.supernet.replicas):
        seed = cfg.seed + k
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            supernet = Supernet(space, splits.num_classes)
        if progress and cfg.supernet.replicas > 1 and (ctx is None or ctx.is_main):
            print(f"supernet replica {k + 1}/{cfg.supernet.replicas} (seed {seed})", file=sys.stderr, flush=True)
        train_supernet(supernet, splits, cfg, replica_dir(run_dir, k), seed=seed, device=device, progress=progress,
                       ctx=ctx)
        supernets.append(supernet.eval())
    return supernets


def retrain(
    space: SearchSpace,
    arch: Arch,
    splits: Splits,
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    seed: int | None = None,
    device: str | torch.device | None = None,
    init_from: Supernet | None = None,
    progress: bool = True,
    ctx: DistContext | None = None,
    stop_after: int | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> RetrainResult | None:
    """Train `arch` on its own with `cfg.retrain`, resuming from RUN_DIR/retrain.pt when it exists.

    Args:
        space: the space `arch` belongs to (its geometry builds the network).
        arch: the architecture.
        splits: the data; trains on `splits.train`, reports `splits.val` each epoch and `splits.test` at the end.
        cfg: the experiment; `cfg.retrain` is the recipe.
        run_dir: where retrain.pt, model.pt and retrain.json go.
        seed: seeds the initial weights and the loader; None uses `cfg.seed`.
        device: None uses `cfg.device`.
        init_from: a supernet whose `extract(arch)` weights start the training (fine-tuning); required exactly when
            `cfg.retrain.from_supernet` is true.
        progress: show a tqdm bar and one line per epoch (process 0 only).
        ctx: this process among data-parallel ones; None is a single process.
        stop_after: return None after this many epochs in total, leaving the run to be continued.
        on_epoch: called on every process with each epoch's stats (val_accuracy included) once its checkpoint is
            written; epochs done by an earlier call are not reported again.

    Returns:
        The accuracies and RUN_DIR/model.pt (a file with the state_dict, arch code, geometry and class count), or
        None when `stop_after` stopped the run early.
    """
    seed = cfg.seed if seed is None else seed
    ctx = ctx or DistContext()
    model = _initial_model(space, arch, splits.num_classes, cfg, seed, init_from)
    identity = {
        "kind": "retrain",
        "arch": arch.encode(),
        "geometry": space.geometry.to_dict(),
        "num_classes": splits.num_classes,
        "data": _data_identity(cfg.data),
        "recipe": dataclasses.asdict(cfg.retrain),
        "seed": seed,
    }
    run_dir = Path(run_dir)
    loop = _RetrainLoop(model, splits, cfg, identity, run_dir, seed, torch.device(device or cfg.device), progress, ctx)
    history = loop.run(stop_after, on_epoch)
    if len(history) < cfg.retrain.epochs:
        return None
    test = loop.accuracy(splits.test)
    loop.model.to(memory_format=torch.contiguous_format)  # NCHW again after channels_last: as users run it
    result = RetrainResult(
        arch=arch, val_accuracy=float(history[-1].val_accuracy), test_accuracy=test,
        seconds=sum(h.seconds for h in history), history=history, model_path=run_dir / MODEL_FILE,
        model=loop.model.eval(),
    )
    if ctx.is_main:
        _write_retrained(result, identity, splits)
    distributed.barrier(ctx)
    return result


def _initial_model(space: SearchSpace, arch: Arch, num_classes: int, cfg: ExperimentConfig, seed: int,
                   init_from: Supernet | None) -> ShuffleNetV2:
    """The network `retrain` starts from: drawn with `seed`, or the supernet's weights when fine-tuning."""
    if cfg.retrain.from_supernet and init_from is None:
        raise ValueError("retrain.from_supernet is true: pass the supernet to start from (--supernet PATH)")
    if init_from is not None and not cfg.retrain.from_supernet:
        raise ValueError("a supernet to start from was given, but retrain.from_supernet is false")
    space.validate(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = space.build(arch, num_classes)
    if init_from is not None:
        model.load_state_dict(init_from.extract(arch).state_dict())
    return model


def _write_retrained(result: RetrainResult, identity: dict[str, Any], splits: Splits) -> None:
    """RUN_DIR/model.pt (the network, its normalisation and accuracies) and RUN_DIR/retrain.json (the summary)."""
    save_model(result.model, result.model_path, extra={
        "mean": list(splits.mean), "std": list(splits.std),
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
    })
    summary = {"identity": identity, "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
               "history": _plain(result.history)}
    write_json(result.model_path.parent / "retrain.json", summary)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """SGD parameter groups: conv and linear weights decay; BatchNorm weights and biases and all biases do not.

    Decaying BatchNorm scales and biases only shrinks them towards zero for no regularisation benefit (they do not
    set the capacity of the network), which hurts small networks most.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimiser step `step` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))



class WeightAverage:
    """An exponential moving average of a model's parameters, updated after every optimiser step.

    The shared weights end wherever the last steps, and the last archs sampled, left them; the average spreads that
    over the recent past (BigNAS and OFA score with one). The decay warms up as min(decay, (1 + t) / (10 + t)) after t
    updates (as TensorFlow's ExponentialMovingAverage with num_updates), so the random initialisation fades within
    the first steps. Buffers are not averaged: candidates get their BatchNorm statistics re-estimated anyway.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.params = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.params[name].lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averaged ones."""
        for name, p in model.named_parameters():
            p.copy_(self.params[name])

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "params": self.params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["params"].keys() != self.params.keys():
            raise RunDirError("the checkpoint's weight average does not match the model's parameters")
        self.updates = state["updates"]
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)


# ---- the training loop --------------------------------------------------------------------------------------------


class _Loop:
    """One resumable training run; subclasses define one optimisation step and what else the checkpoint holds."""

    kind = ""
    checkpoint_name = ""
    find_unused_parameters = False
    cudnn = "heuristic"  # cuDNN's algorithm choice (experiments/cudnn.py): autotuned only where the shapes are fixed

    def __init__(
        self,
        model: nn.Module,
        recipe: TrainRecipe,
        cfg: ExperimentConfig,
        splits: Splits,
        identity: dict[str, Any],
        run_dir: Path,
        seed: int,
        device: torch.device,
        progress: bool,
        ctx: DistContext,
    ) -> None:
        self.recipe, self.splits, self.identity, self.run_dir = recipe, splits, identity, run_dir
        self.augment = cfg.data.augment
        self.seed, self.device, self.ctx = seed, device, ctx
        self.progress = progress and ctx.is_main
        self.fingerprint = fingerprint(identity)
        cuda = device.type == "cuda"
        self.channels_last = recipe.channels_last
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.amp) if cuda else None
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(
            parameter_groups(self.model, recipe.weight_decay), lr=recipe.lr, momentum=recipe.momentum,
            nesterov=recipe.nesterov,
        )
        self.steps_per_epoch = self._steps_per_epoch()
        total = self.steps_per_epoch * recipe.epochs
        warmup = round(recipe.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_factor(step, total, warmup)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.history: list[EpochStats] = []
        self.start_epoch = 0
        self._resume()
        self.net: nn.Module = self.model
        if ctx.distributed:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if cuda else None,
                find_unused_parameters=self.find_unused_parameters,
            )

    # -- to override

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward for one batch (the optimiser steps afterwards); returns (loss, logits) to report."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_epoch(self) -> dict[str, Any]:
        return {}

    # -- the loop

    def run(self, stop_after: int | None, on_epoch: Callable[[EpochStats], None] | None) -> list[EpochStats]:
        recipe = self.recipe
        end = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
        images_per_step = recipe.batch_size * self.ctx.world_size
        bar = tqdm(
            total=recipe.epochs * self.steps_per_epoch * images_per_step,
            initial=self.start_epoch * self.steps_per_epoch * images_per_step,
            desc=self.kind, unit="img", unit_scale=True, disable=not self.progress, dynamic_ncols=True,
            file=sys.stderr,
        )
        with bar, cudnn_mode(self.device, self.cudnn):
            for epoch in range(self.start_epoch, end):
                self.history.append(self._epoch(epoch, bar))
                if self.ctx.is_main:
                    self._save(epoch + 1)
                if self.progress:
                    bar.write(_describe(self.kind, self.history[-1], recipe.epochs), file=sys.stderr)
                if on_epoch is not None:
                    on_epoch(self.history[-1])
        distributed.barrier(self.ctx)
        return list(self.history)

    def _epoch(self, epoch: int, bar: tqdm) -> EpochStats:
        self.net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x images, correct, images
        start = time.perf_counter()
        for i, (images, labels) in enumerate(self._batches(epoch)):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            loss, logits = self.step(images, labels)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.after_step()
            with torch.no_grad():
                sums[0] += loss.double() * len(labels)
                sums[1] += (logits.argmax(1) == labels).sum()
                sums[2] += len(labels)
            bar.update(len(labels) * self.ctx.world_size)
            if self.progress and (i % 10 == 9 or i == self.steps_per_epoch - 1):
                loss_mean, acc = (sums[:2] / sums[2]).tolist()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_mean:.3f}", acc=f"{acc:.3f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.3g}", refresh=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        distributed.all_reduce_sum(sums, self.ctx)
        distributed.broadcast_buffers(self.model, self.ctx)
        extra = self.after_epoch()
        return EpochStats(
            epoch=epoch + 1,
            loss=float(sums[0] / sums[2]),
            accuracy=float(sums[1] / sums[2]),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            seconds=seconds,
            images_per_s=float(sums[2]) / seconds,
            **extra,
        )

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = self._loader(epoch)
        for i, batch in enumerate(loader):
            if i >= self.steps_per_epoch:
                return
            yield batch

    def _loader(self, epoch: int):
        return make_loader(
            self.splits.train, batch_size=self.recipe.batch_size, shuffle=True, augment=self.augment, seed=self.seed,
            epoch=epoch, rank=self.ctx.rank, world_size=self.ctx.world_size, drop_last=True, device=self.device,
        )

    def _steps_per_epoch(self) -> int:
        steps = len(self._loader(0))
        if steps == 0:
            raise ValueError(
                f"{self.kind}.batch_size: {self.recipe.batch_size} x {self.ctx.world_size} process(es) is more than "
                f"the {len(self.splits.train)} training images"
            )
        cap = self.recipe.max_steps_per_epoch
        return steps if cap is None else min(steps, cap)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @torch.no_grad()
    def accuracy(self, dataset: ImageDataset, batch_size: int | None = None) -> float:
        """Exact top-1 accuracy on `dataset`, each process scoring its share (the wrap-around padding excluded)."""
        model = self.model.eval()
        loader = make_loader(
            dataset, batch_size=batch_size or self.recipe.batch_size * 2, shuffle=False, augment=False, seed=self.seed,
            rank=self.ctx.rank, world_size=self.ctx.world_size, device=self.device,
        )
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        seen = 0
        for images, labels in loader:
            position = self.ctx.rank + (seen + torch.arange(len(labels), device=self.device)) * self.ctx.world_size
            real = position < len(dataset)  # the loader pads the last shard by wrapping around
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                hits = (model(images).argmax(1) == labels) & real
            counts += torch.stack([hits.sum().double(), real.sum().double()])
            seen += len(labels)
        distributed.all_reduce_sum(counts, self.ctx)
        return float(counts[0] / counts[1])

    # -- checkpoints

    def _save(self, epoch: int) -> None:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": self.kind,
                "epoch": epoch,
                "fingerprint": self.fingerprint,
                "identity": self.identity,
                "world_size": self.ctx.world_size,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "history": _plain(self.history),
                **self.extra_state(),
            },
            self.run_dir / self.checkpoint_name,
        )

    def _resume(self) -> None:
        path = self.run_dir / self.checkpoint_name
        if not path.exists():
            return
        ckpt = load_checkpoint(path, self.kind)
        if ckpt["fingerprint"] != self.fingerprint:
            changes = _differences(ckpt["identity"], self.identity)
            raise RunDirError(
                f"{self.run_dir}: holds a {self.kind} run of a different configuration ({'; '.join(changes)}); "
                f"use another --run-dir, or delete {path} to start over"
            )
        if ckpt["world_size"] != self.ctx.world_size and self.ctx.is_main:
            print(f"warning: {path} was written by {ckpt['world_size']} process(es), continuing with "
                  f"{self.ctx.world_size}: the global batch size changes", file=sys.stderr)
        load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.load_extra_state(ckpt)
        self.history = [EpochStats(**h) for h in ckpt["history"]]
        self.start_epoch = ckpt["epoch"]


class _SupernetLoop(_Loop):
    kind = "supernet"
    checkpoint_name = SUPERNET_CHECKPOINT
    find_unused_parameters = True  # each step trains one subgraph: the other units get no gradient
    cudnn = "heuristic"  # a new arch, so new convolution shapes, on almost every step: no autotuning

    def __init__(self, supernet: Supernet, splits: Splits, cfg: ExperimentConfig, identity: dict[str, Any],
                 run_dir: Path, seed: int, device: torch.device, progress: bool, ctx: DistContext) -> None:
        self.space = supernet.space
        self.sn = cfg.supernet
        self.rng = np.random.default_rng([seed, _ARCH_STREAM])  # identical on every rank: same arch sequence
        self.largest, self.smallest = self.space.largest(), self.space.smallest()
        self.ema: WeightAverage | None = None  # set here, or by load_extra_state when a checkpoint is resumed
        super().__init__(supernet, cfg.supernet, cfg, splits, identity, run_dir, seed, device, progress, ctx)
        if self.sn.ema_decay is not None and self.ema is None:
            self.ema = WeightAverage(self.model, self.sn.ema_decay)

    def archs(self) -> list[Arch]:
        if self.sn.sampling == "uniform":
            return [self.space.sample(self.rng)]
        if self.sn.sampling == "fair":
            return self.space.sample_fair(self.rng)
        return [self.largest, self.smallest] + [self.space.sample(self.rng) for _ in range(self.sn.sandwich_random)]

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, *others = self.archs()
        # Fair: the step follows the mean of its archs' gradients (their sum, at the lr that suits one arch, is as
        # if the lr were multiplied by their number, and stalls); sandwich sums them, as BigNAS does.
        weight = 1.0 / (1 + len(others)) if self.sn.sampling == "fair" else 1.0
        with self.autocast():
            logits = self.net(images, first)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.recipe.label_smoothing)
        self.scaler.scale(loss * weight).backward()
        # The other archs' gradients add to the first's: one optimiser step for all of them.
        distill = self.sn.sampling == "sandwich" and self.sn.distill and others
        teacher = F.softmax(logits.detach().float(), dim=1) if distill else None
        for arch in others:
            with self.autocast():
                out = self.net(images, arch)
            if teacher is None:
                other_loss = F.cross_entropy(out.float(), labels, label_smoothing=self.recipe.label_smoothing)
            else:  # in-place distillation: soft cross-entropy against the largest's predictions
                other_loss = -(teacher * F.log_softmax(out.float(), dim=1)).sum(1).mean()
            self.scaler.scale(other_loss * weight).backward()
        return loss.detach(), logits.detach()

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"arch_rng": self.rng.bit_generator.state}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["arch_rng"]
        if self.sn.ema_decay is not None:  # the fingerprint matched, so the checkpoint holds the average too
            self.ema = WeightAverage(self.model, self.sn.ema_decay)
            self.ema.load_state_dict(state["ema"])


class _RetrainLoop(_Loop):
    kind = "retrain"
    checkpoint_name = RETRAIN_CHECKPOINT
    cudnn = "autotune"  # one arch: its few shapes are autotuned on the first step and reused by every other

    def __init__(self, model: nn.Module, splits: Splits, cfg: ExperimentConfig, identity: dict[str, Any],
                 run_dir: Path, seed: int, device: torch.device, progress: bool, ctx: DistContext) -> None:
        super().__init__(model, cfg.retrain, cfg, splits, identity, run_dir, seed, device, progress, ctx)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits = self.net(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.recipe.label_smoothing)
        self.scaler.scale(loss).backward()
        return loss.detach(), logits.detach()

    def after_epoch(self) -> dict[str, Any]:
        return {"val_accuracy": self.accuracy(self.splits.val)}

    def extra_state(self) -> dict[str, Any]:
        return {"arch": self.identity["arch"], "geometry": self.identity["geometry"],
                "num_classes": self.identity["num_classes"]}


# ---- helpers ------------------------------------------------------------------------------------------------------


def _data_identity(data: DataConfig) -> dict[str, Any]:
    # Where the files are, and how they are decoded, do not make another run (DataConfig.identity).
    return data.identity()


def _plain(history: list[EpochStats]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(h) for h in history]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as 'key: old -> new' (nested mappings compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if old != new:
        show = (lambda v: repr(v) if len(repr(v)) < 60 else "...")  # noqa: E731
        return [f"{prefix.rstrip('.')}: {show(old)} -> {show(new)}"]
    return []


def _describe(kind: str, s: EpochStats, epochs: int) -> str:
    val = f" val_acc {s.val_accuracy:.4f}" if s.val_accuracy is not None else ""
    return (f"{kind} epoch {s.epoch}/{epochs}: loss {s.loss:.4f} acc {s.accuracy:.4f}{val} lr {s.lr:.4g} "
            f"{s.seconds:.0f} s {s.images_per_s:.0f} img/s")
