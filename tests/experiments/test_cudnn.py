"""cuDNN while training: heuristic for the supernet (new shapes every step), autotuned for retraining (fixed shapes)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import experiments.training as train_module
from experiments.cudnn import MODES, cudnn_mode
from experiments.training import retrain, train_supernet
from search_space import Supernet


@pytest.fixture(autouse=True)
def _restore_cudnn():
    before = torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("mode", sorted(MODES))
def test_on_cuda_the_mode_holds_inside_and_is_restored_after(mode: str) -> None:
    torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = True, mode != "autotune"
    before = torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark
    with cudnn_mode(torch.device("cuda", 0), mode):
        assert (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == MODES[mode]
    assert (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == before
    with pytest.raises(KeyboardInterrupt), cudnn_mode("cuda", mode):
        raise KeyboardInterrupt  # an interrupted training leaves the process as it found it
    assert (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == before


def test_autotuning_only_for_fixed_shapes_and_off_means_no_cudnn() -> None:
    assert MODES == {"autotune": (True, True), "heuristic": (True, False), "off": (False, False)}


def test_on_the_cpu_nothing_changes_and_an_unknown_mode_is_refused() -> None:
    torch.backends.cudnn.benchmark = True
    with cudnn_mode("cpu", "off"):
        assert torch.backends.cudnn.enabled and torch.backends.cudnn.benchmark
    with pytest.raises(ValueError, match="cuDNN mode 'fast' is not one of"), cudnn_mode("cpu", "fast"):
        pass


def test_the_supernet_trains_without_autotuning_and_retraining_with_it(space, splits, cfg, tmp_path, monkeypatch):
    seen: list = []

    class Stop(Exception):
        pass

    @contextlib.contextmanager
    def spy(device, mode):
        seen.append((torch.device(device).type, mode))
        yield

    def first_epoch(self, epoch, bar):  # what runs inside the setting; stopped there, the test needs no training
        seen.append(self.kind)
        raise Stop

    monkeypatch.setattr(train_module, "cudnn_mode", spy)
    monkeypatch.setattr(train_module._Loop, "_epoch", first_epoch)
    torch.manual_seed(0)
    with pytest.raises(Stop):
        train_supernet(Supernet(space, 10), splits, cfg, tmp_path / "sn", progress=False)
    with pytest.raises(Stop):
        retrain(space, space.smallest(), splits, cfg, tmp_path / "re", progress=False)
    assert seen == [("cpu", "heuristic"), "supernet", ("cpu", "autotune"), "retrain"]
