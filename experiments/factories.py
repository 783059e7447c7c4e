"""Picklable factories that build a search's expensive parts where a trial runs (a Ray worker, or this process).

A Ray trial receives one of these (a few paths and numbers), never a supernet or a dataset: each worker process
loads what it needs once, from files, and keeps it for its later trials.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from search_space import Arch


@dataclass(frozen=True)
class SupernetEvaluatorFactory:
    """Builds an `experiments.evaluate.Evaluator` from an experiment file and a supernet checkpoint.

    Attributes:
        config: the experiment YAML (absolute path).
        preset: its preset.
        checkpoint: the trained supernet checkpoint (absolute path).
        replica_checkpoints: the checkpoints of the recipe's further replicas, scored with it by their mean.
        seed: picks the calibration images, as in the driver.
        device: where the worker scores candidates.
        threads: torch threads in the worker (Ray gives each trial its CPUs; 1 keeps trials from fighting).
    """

    config: str
    preset: str | None
    checkpoint: str
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    replica_checkpoints: tuple[str, ...] = ()

    def __call__(self):
        import torch

        from experiments.checkpoints import load_supernet
        from experiments.config import load_experiment
        from experiments.data import load_splits
        from experiments.evaluate import Evaluator

        torch.set_num_threads(self.threads)
        cfg = load_experiment(self.config, self.preset)
        splits = load_splits(cfg.data, self.seed)
        supernets = [load_supernet(path, device=self.device) for path in (self.checkpoint, *self.replica_checkpoints)]
        return Evaluator(supernets, splits, cfg.evaluate, seed=self.seed, device=self.device)


@dataclass(frozen=True)
class ScratchTrainerFactory:
    """Builds a trainer that trains candidates from scratch for a few epochs (Ray Tune's ASHA mode)."""

    config: str
    preset: str | None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def __call__(self) -> ScratchTrainer:
        import torch

        from experiments.config import load_experiment
        from experiments.data import load_splits
        from search_space import SearchSpace

        torch.set_num_threads(self.threads)
        cfg = load_experiment(self.config, self.preset)
        return ScratchTrainer(SearchSpace.from_yaml(cfg.space), load_splits(cfg.data, self.seed), cfg, self.seed,
                              self.device)


class ScratchTrainer:
    """Trains one arch with the experiment's retraining recipe, cut to `epochs`, resumable in its workdir."""

    def __init__(self, space, splits, cfg, seed: int, device: str) -> None:
        self.space, self.splits, self.cfg, self.seed, self.device = space, splits, cfg, seed, device

    def train(self, arch: Arch, epochs: int, workdir: str, report: Callable[[int, float], None]) -> float:
        from experiments.training import retrain

        cfg = replace(self.cfg, retrain=replace(self.cfg.retrain, epochs=epochs, from_supernet=False))
        result = retrain(self.space, arch, self.splits, cfg, Path(workdir), seed=self.seed, device=self.device,
                         progress=False, on_epoch=lambda stats: report(stats.epoch - 1, float(stats.val_accuracy)))
        return result.val_accuracy
