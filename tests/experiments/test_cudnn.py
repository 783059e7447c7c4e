"""cuDNN autotuning while training: off for the supernet (new shapes every step), on for retraining (fixed shapes)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import experiments.train as train_module
from experiments.cudnn import cudnn_autotune
from experiments.train import retrain, train_supernet
from search_space import Supernet


@pytest.fixture(autouse=True)
def _restore_benchmark():
    before = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("enabled", [True, False])
def test_on_cuda_the_setting_holds_inside_and_is_restored_after(enabled: bool) -> None:
    torch.backends.cudnn.benchmark = not enabled
    with cudnn_autotune(torch.device("cuda", 0), enabled):
        assert torch.backends.cudnn.benchmark is enabled
    assert torch.backends.cudnn.benchmark is (not enabled)
    with pytest.raises(KeyboardInterrupt), cudnn_autotune("cuda", enabled):
        raise KeyboardInterrupt  # an interrupted training leaves the process as it found it
    assert torch.backends.cudnn.benchmark is (not enabled)


def test_on_the_cpu_nothing_changes() -> None:
    torch.backends.cudnn.benchmark = True
    with cudnn_autotune("cpu", False):
        assert torch.backends.cudnn.benchmark is True


def test_the_supernet_trains_without_autotuning_and_retraining_with_it(space, splits, cfg, tmp_path, monkeypatch):
    seen: list = []

    class Stop(Exception):
        pass

    @contextlib.contextmanager
    def spy(device, enabled):
        seen.append((torch.device(device).type, enabled))
        yield

    def first_epoch(self, epoch, bar):  # what runs inside the setting; stopped there, the test needs no training
        seen.append(self.kind)
        raise Stop

    monkeypatch.setattr(train_module, "cudnn_autotune", spy)
    monkeypatch.setattr(train_module._Loop, "_epoch", first_epoch)
    torch.manual_seed(0)
    with pytest.raises(Stop):
        train_supernet(Supernet(space, 10), splits, cfg, tmp_path / "sn", progress=False)
    with pytest.raises(Stop):
        retrain(space, space.smallest(), splits, cfg, tmp_path / "re", progress=False)
    assert seen == [("cpu", False), "supernet", ("cpu", True), "retrain"]
