"""Supernets shared across runs: trained once per (space, data, recipe, seed), keyed like a cache, locked.

A supernet depends on the space, the data, the training recipe and the seed, and on nothing a search adds: not the
latency budget, the device it will be deployed on, or the runtime. So search.py keeps supernets in a store outside
the run directory, one folder per replica, named after what determines it::

    <store>/<space>-<data>-<recipe fingerprint>-s<seed>/supernet.pt, supernet.json
    <store>/<space>-<data>-<recipe fingerprint>-s<seed>-w<N>/...      trained by N data-parallel processes

A second search on the same data, with another budget, device or runtime, finds the folder and trains nothing.
Training holds a lock file beside the folder (`filelock`, an OS lock: released when the process dies), so two
processes never train the same supernet: the second waits, then loads what the first trained. A trainer killed
mid-way leaves its last epoch's checkpoint, and whoever takes the lock next continues from it.

Data-parallel training (torchrun) is another training: the recipe's batch size is per process, so N processes take
steps of N x batch_size images, N times fewer of them. Its supernets get folders of their own (`-w<N>`). Only rank 0
takes the lock; the other ranks train the entry it names (`train_entry`), together with it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from experiments.checkpoints import SUPERNET_CHECKPOINT, load_supernet
from experiments.config import ExperimentConfig, fingerprint
from experiments.data import Splits
from experiments.distributed import DistContext
from experiments.training import train_supernet
from search_space import SearchSpace, Supernet, space_to_dict
from search_space.files import cache_home


def default_store() -> Path:
    return cache_home() / "supernets"


@dataclass(frozen=True)
class SupernetEntry:
    """One supernet of the store: its folder and what determined it."""

    folder: Path
    identity: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.folder / SUPERNET_CHECKPOINT

    def finished(self, epochs: int) -> bool:
        """Whether its training is over: a checkpoint, and a supernet.json recording `epochs` epochs or more
        (written after the last epoch's checkpoint, so a trainer killed between the two has not finished)."""
        summary = self.folder / "supernet.json"
        if not (self.checkpoint.exists() and summary.exists()):
            return False
        try:
            history = json.loads(summary.read_text()).get("history", [])
        except (json.JSONDecodeError, AttributeError):
            return False
        return len(history) >= epochs


def supernet_identity(space: SearchSpace, cfg: ExperimentConfig, num_classes: int, seed: int) -> dict[str, Any]:
    """What one supernet depends on, as `train_supernet` records it in its checkpoint."""
    return {"kind": "supernet", "space": space_to_dict(space), "num_classes": num_classes,
            "data": cfg.data.identity(), "recipe": cfg.supernet.identity(), "seed": seed}


def entry_for(store: Path, space: SearchSpace, cfg: ExperimentConfig, num_classes: int, seed: int,
              world_size: int = 1) -> SupernetEntry:
    """The store's folder for one supernet; `world_size` data-parallel processes train another one (see above)."""
    identity = supernet_identity(space, cfg, num_classes, seed)
    name = f"{space.name}-{cfg.data.name}-{fingerprint({k: v for k, v in identity.items() if k != 'seed'})}-s{seed}"
    return SupernetEntry(Path(store) / (name if world_size == 1 else f"{name}-w{world_size}"), identity)


def replica_entries(store: str | Path, space: SearchSpace, cfg: ExperimentConfig, num_classes: int,
                    world_size: int = 1) -> list[SupernetEntry]:
    """The store's folders for the recipe's `supernet.replicas` supernets, replica k with seed `cfg.seed + k`."""
    return [entry_for(Path(store), space, cfg, num_classes, cfg.seed + k, world_size)
            for k in range(cfg.supernet.replicas)]


def shared_supernets(space: SearchSpace, splits: Splits, cfg: ExperimentConfig, store: str | Path, *,
                     device: str | torch.device, progress: bool = True, ctx: DistContext | None = None,
                     announce: Callable[[SupernetEntry], None] | None = None) -> tuple[list[Supernet], list[Path]]:
    """The recipe's `supernet.replicas` supernets from `store`, each trained there first if it is not yet.

    Replica k has seed `cfg.seed + k`. A finished supernet is loaded; an unfinished one is continued from its last
    checkpoint; one that another process is training is waited for.

    Args:
        ctx: this process among data-parallel ones: rank 0 calls this, and the others call `train_entry` with
            each entry it announces; None is a single process.
        announce: called with each entry once its lock is held, just before it is trained (or loaded, which under
            DDP is also done together); rank 0 tells the other ranks here.

    Returns:
        the supernets (eval mode) and their checkpoint files, the first replica first.
    """
    ctx = ctx or DistContext()
    supernets, paths = [], []
    for k, entry in enumerate(replica_entries(store, space, cfg, splits.num_classes, ctx.world_size)):
        seed = entry.identity["seed"]
        entry.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(entry.folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"supernet {entry.folder.name} is being trained by another process; waiting for it",
                  file=sys.stderr, flush=True)
            lock.acquire()
        try:
            if progress and cfg.supernet.replicas > 1:
                print(f"supernet replica {k + 1}/{cfg.supernet.replicas} (seed {seed}): {entry.folder}",
                      file=sys.stderr, flush=True)
            if announce is not None:
                announce(entry)
            supernet = train_entry(entry.folder, seed, space, splits, cfg, device=device, progress=progress, ctx=ctx)
        finally:
            lock.release()
        supernets.append(supernet)
        paths.append(entry.checkpoint)
    return supernets, paths


def train_entry(folder: Path, seed: int, space: SearchSpace, splits: Splits, cfg: ExperimentConfig, *,
                device: str | torch.device, progress: bool = True, ctx: DistContext | None = None) -> Supernet:
    """Train (or continue, or just load) the supernet in `folder`, its initial weights drawn with `seed`; under DDP
    every rank calls this with the same folder, and rank 0 holds the folder's lock. Returns it in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        supernet = Supernet(space, splits.num_classes)
    train_supernet(supernet, splits, cfg, folder, seed=seed, device=device, progress=progress, ctx=ctx)
    return supernet.eval()


def given_supernets(paths: Sequence[str | Path], space: SearchSpace, cfg: ExperimentConfig,
                    num_classes: int) -> list[Supernet]:
    """Supernets passed by path (a supernet.pt or the folder holding it), checked against this experiment.

    Raises:
        ValueError: a missing file, or a supernet of another space, data, class count or recipe (names which).
    """
    supernets = []
    for given in paths:
        path = Path(given)
        path = path / SUPERNET_CHECKPOINT if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"--supernet {given}: no supernet checkpoint there")
        stored = torch.load(path, map_location="cpu", weights_only=True).get("identity")
        if not isinstance(stored, dict) or stored.get("kind") != "supernet":
            raise ValueError(f"--supernet {given}: not a supernet checkpoint")
        want = supernet_identity(space, cfg, num_classes, int(stored.get("seed", 0)))
        diffs = [k for k in ("space", "num_classes", "data", "recipe") if stored.get(k) != want[k]]
        if diffs:
            raise ValueError(f"--supernet {given}: trained with another {', '.join(diffs)} than this experiment "
                             f"({Path(cfg.source).name}, preset {cfg.preset})")
        supernets.append(load_supernet(path).eval())
    return supernets
