"""Supernets shared across runs: trained once per (space, data, recipe, seed), keyed like a cache, locked.

A supernet depends on the space, the data, the training recipe and the seed, and on nothing a search adds: not the
latency budget, the device it will be deployed on, or the runtime. So search.py keeps supernets in a store outside
the run directory, one folder per replica, named after what determines it::

    <store>/<space>-<data>-<recipe fingerprint>-s<seed>/supernet.pt, supernet.json

A second search on the same data, with another budget, device or runtime, finds the folder and trains nothing.
Training holds a lock file beside the folder (`filelock`, an OS lock: released when the process dies), so two
processes never train the same supernet: the second waits, then loads what the first trained. A trainer killed
mid-way leaves its last epoch's checkpoint, and whoever takes the lock next continues from it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from experiments.config import ExperimentConfig, fingerprint
from experiments.data import Splits
from experiments.train import SUPERNET_CHECKPOINT, load_supernet, space_to_dict, train_supernet
from search_space import SearchSpace, Supernet

HOME_VARIABLE = "SHUFFLENAS_HOME"  # where shared latency tables and supernets live (like TORCH_HOME)


def cache_home() -> Path:
    """$SHUFFLENAS_HOME, else $XDG_CACHE_HOME/shufflenas, else ~/.cache/shufflenas."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "shufflenas"


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


def supernet_identity(space: SearchSpace, cfg: ExperimentConfig, num_classes: int, seed: int) -> dict[str, Any]:
    """What one supernet depends on, as `train_supernet` records it in its checkpoint."""
    from experiments.train import _data_identity

    return {"kind": "supernet", "space": space_to_dict(space), "num_classes": num_classes,
            "data": _data_identity(cfg.data), "recipe": cfg.supernet.identity(), "seed": seed}


def entry_for(store: Path, space: SearchSpace, cfg: ExperimentConfig, num_classes: int, seed: int) -> SupernetEntry:
    identity = supernet_identity(space, cfg, num_classes, seed)
    name = f"{space.name}-{cfg.data.name}-{fingerprint({k: v for k, v in identity.items() if k != 'seed'})}-s{seed}"
    return SupernetEntry(Path(store) / name, identity)


def shared_supernets(space: SearchSpace, splits: Splits, cfg: ExperimentConfig, store: str | Path, *,
                     device: str | torch.device, progress: bool = True) -> tuple[list[Supernet], list[Path]]:
    """The recipe's `supernet.replicas` supernets from `store`, each trained there first if it is not yet.

    Replica k has seed `cfg.seed + k`. A finished supernet is loaded; an unfinished one is continued from its last
    checkpoint; one that another process is training is waited for.

    Returns:
        the supernets (eval mode) and their checkpoint files, the first replica first.
    """
    supernets, paths = [], []
    for k in range(cfg.supernet.replicas):
        seed = cfg.seed + k
        entry = entry_for(Path(store), space, cfg, splits.num_classes, seed)
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                supernet = Supernet(space, splits.num_classes)
            train_supernet(supernet, splits, cfg, entry.folder, seed=seed, device=device, progress=progress)
        finally:
            lock.release()
        supernets.append(supernet.eval())
        paths.append(entry.checkpoint)
    return supernets, paths


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
