"""Fixtures shared by the training and evaluation tests: the synthetic experiment, its data and space."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experiments.config import load_experiment
from experiments.data import load_splits
from search_space import SearchSpace

SYNTHETIC = Path(__file__).resolve().parents[2] / "experiments" / "synthetic.yaml"


@pytest.fixture(scope="module")
def one_thread():
    # Bitwise comparisons need the same kernels in every run; one thread also keeps the tests off a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cfg():
    return load_experiment(SYNTHETIC, "quick")


@pytest.fixture(scope="module")
def splits(cfg):
    return load_splits(cfg.data, cfg.seed)


@pytest.fixture(scope="module")
def space(cfg):
    return SearchSpace.from_yaml(cfg.space)
