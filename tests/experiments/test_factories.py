"""The picklable factories Ray workers build their evaluator and trainer from."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC  # noqa: I001 (tests/experiments/conftest.py)

from experiments.factories import ScratchTrainerFactory, SupernetEvaluatorFactory
from experiments.training import train_supernet
from search_space import Supernet


def test_scratch_trainer_reports_every_epoch_and_resumes(space, tmp_path, one_thread):
    factory = pickle.loads(pickle.dumps(ScratchTrainerFactory(str(SYNTHETIC), "quick")))
    arch = space.sample(np.random.default_rng(0))
    reports: list[tuple[int, float]] = []
    final = factory().train(arch, 2, str(tmp_path / "cand"), lambda e, acc: reports.append((e, acc)))
    assert [e for e, _ in reports] == [0, 1] and reports[-1][1] == final and 0.0 <= final <= 1.0
    again: list[tuple[int, float]] = []
    assert factory().train(arch, 2, str(tmp_path / "cand"), lambda e, acc: again.append((e, acc))) == final
    assert again == []  # already trained: nothing is redone


def test_supernet_evaluator_factory_builds_the_same_evaluator(cfg, splits, space, tmp_path, one_thread):
    torch.manual_seed(0)
    supernet = Supernet(space, splits.num_classes)
    short = replace(cfg, supernet=replace(cfg.supernet, epochs=1))
    train_supernet(supernet, splits, short, tmp_path, progress=False)
    factory = SupernetEvaluatorFactory(str(SYNTHETIC), "quick", str(tmp_path / "supernet.pt"))
    factory = pickle.loads(pickle.dumps(factory))
    arch = space.largest()
    first, second = factory(), factory()
    assert first.evaluate(arch) == second.evaluate(arch)
    assert 0.0 <= first.evaluate(arch) <= 1.0
    # Replicas: the factory's evaluator scores with all of them (the same checkpoint twice scores as one).
    twice = SupernetEvaluatorFactory(str(SYNTHETIC), "quick", str(tmp_path / "supernet.pt"),
                                     replica_checkpoints=(str(tmp_path / "supernet.pt"),))
    evaluator = pickle.loads(pickle.dumps(twice))()
    assert len(evaluator.supernets) == 2
    assert evaluator.evaluate(arch) == pytest.approx(first.evaluate(arch), abs=1e-12)
