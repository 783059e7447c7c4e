"""The shared supernet store: keyed by what determines a supernet, trained once, locked, resumed after a kill."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from experiments import supernets
from experiments.supernets import entry_for, given_supernets, shared_supernets

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def short(cfg):
    """Two epochs of four steps: a checkpoint after each, in about a second."""
    return dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, epochs=2, max_steps_per_epoch=4))


def _count_epochs(monkeypatch) -> list[int]:
    from experiments.training import _SupernetLoop

    epochs: list[int] = []
    real = _SupernetLoop._epoch

    def counting(self, epoch, bar):
        epochs.append(epoch)
        return real(self, epoch, bar)

    monkeypatch.setattr(_SupernetLoop, "_epoch", counting)
    return epochs


def test_the_key_is_what_determines_a_supernet(short, space, tmp_path):
    a = entry_for(tmp_path, space, short, 10, seed=0)
    assert a == entry_for(tmp_path, space, short, 10, seed=0)
    assert a.folder != entry_for(tmp_path, space, short, 10, seed=1).folder
    other = dataclasses.replace(short, supernet=dataclasses.replace(short.supernet, lr=0.01))
    assert a.folder != entry_for(tmp_path, space, other, 10, seed=0).folder
    # What a search adds does not change it: budget, device, runtime.
    searched = dataclasses.replace(short, latency=dataclasses.replace(short.latency, runtime="eager", target_ms=1.0))
    assert a.folder == entry_for(tmp_path, space, searched, 10, seed=0).folder


def test_trained_once_then_loaded(short, space, splits, tmp_path, monkeypatch, one_thread):
    """Trained once; then loaded, by the store or from its checkpoint alone (as a finished step is): the same
    weights."""
    from experiments.checkpoints import load_supernet

    epochs = _count_epochs(monkeypatch)
    entry = entry_for(tmp_path, space, short, splits.num_classes, short.seed)
    assert not entry.finished(short.supernet.epochs)
    first, paths = shared_supernets(space, splits, short, tmp_path, device="cpu", progress=False)
    assert epochs == [0, 1] and paths[0].exists()
    assert entry.finished(short.supernet.epochs) and not entry.finished(short.supernet.epochs + 1)
    again, _ = shared_supernets(space, splits, short, tmp_path, device="cpu", progress=False)
    assert epochs == [0, 1]  # nothing trained the second time
    for loaded in (again[0], load_supernet(entry.checkpoint)):
        for (k, v), w in zip(first[0].state_dict().items(), loaded.state_dict().values(), strict=True):
            assert (v == w).all(), k


def test_a_second_process_waits_for_the_trainer_then_reuses_its_supernet(short, space, splits, tmp_path, capfd,
                                                                         monkeypatch, one_thread):
    """The lock is held (as by a trainer in another process); the waiter blocks, and once the trainer has finished
    and released it, loads the supernet without training any epoch."""
    entry = entry_for(tmp_path, space, short, splits.num_classes, short.seed)
    entry.folder.parent.mkdir(parents=True, exist_ok=True)
    trainer_lock = FileLock(str(entry.folder) + ".lock")
    trainer_lock.acquire()
    shared_supernets(space, splits, short, tmp_path / "elsewhere", device="cpu", progress=False)  # warm imports
    done: list = []
    waiter = threading.Thread(target=lambda: done.append(
        shared_supernets(space, splits, short, tmp_path, device="cpu", progress=False)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not done  # waiting on the lock
    assert "being trained by another process; waiting" in capfd.readouterr().err
    from experiments.training import train_supernet
    from search_space import Supernet

    train_supernet(Supernet(space, splits.num_classes), splits, short, entry.folder, seed=short.seed, device="cpu",
                   progress=False)
    epochs = _count_epochs(monkeypatch)
    trainer_lock.release()
    waiter.join(timeout=60)
    assert done and epochs == []  # loaded what the trainer wrote


SCRIPT = """
import sys, dataclasses
from experiments.config import load_experiment
from experiments.data import load_splits
from experiments.supernets import shared_supernets
from search_space import SearchSpace
cfg = load_experiment(sys.argv[1], "quick")
cfg = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, epochs=8, max_steps_per_epoch=4))
shared_supernets(SearchSpace.from_yaml(cfg.space), load_splits(cfg.data, cfg.seed), cfg, sys.argv[2], device="cpu",
                 progress=False)
"""


def test_a_killed_trainer_is_continued_from_its_last_checkpoint(cfg, space, splits, tmp_path, monkeypatch,
                                                               one_thread):
    long = dataclasses.replace(cfg, supernet=dataclasses.replace(cfg.supernet, epochs=8, max_steps_per_epoch=4))
    entry = entry_for(tmp_path, space, long, splits.num_classes, long.seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT / "experiments" / "synthetic.yaml"),
                              str(tmp_path)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while not entry.checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert entry.checkpoint.exists(), "the trainer wrote no checkpoint"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not entry.finished(long.supernet.epochs)
    epochs = _count_epochs(monkeypatch)
    shared_supernets(space, splits, long, tmp_path, device="cpu", progress=False)
    assert epochs and epochs[0] > 0 and epochs[-1] == 7  # continued, not restarted
    assert entry.finished(long.supernet.epochs)


def test_a_supernet_of_another_recipe_passed_by_path_is_refused(short, space, splits, tmp_path, one_thread):
    _, (path,) = shared_supernets(space, splits, short, tmp_path, device="cpu", progress=False)
    assert len(given_supernets([path.parent], space, short, splits.num_classes)) == 1
    other = dataclasses.replace(short, supernet=dataclasses.replace(short.supernet, lr=0.01))
    with pytest.raises(ValueError, match="another recipe"):
        given_supernets([path], space, other, splits.num_classes)
    with pytest.raises(ValueError, match="no supernet checkpoint"):
        given_supernets([tmp_path / "absent"], space, short, splits.num_classes)


def test_the_store_defaults_to_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SHUFFLENAS_HOME", str(tmp_path))
    assert supernets.default_store() == tmp_path / "supernets"
