"""The picklable factories Ray workers build their evaluator and trainer from."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC  # noqa: I001 (tests/experiments/conftest.py)

from experiments.checkpoints import SUPERNET_CHECKPOINT, replica_dir
from experiments.factories import ScratchTrainerFactory, SupernetEvaluatorFactory
from experiments.training import train_supernets


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
    two = replace(cfg, supernet=replace(cfg.supernet, epochs=1, replicas=2))
    train_supernets(space, splits, two, tmp_path, progress=False)  # seeds cfg.seed and cfg.seed + 1
    paths = [str(replica_dir(tmp_path, k) / SUPERNET_CHECKPOINT) for k in range(2)]
    factory = pickle.loads(pickle.dumps(SupernetEvaluatorFactory(str(SYNTHETIC), "quick", paths[0])))
    arch = space.largest()
    first, second = factory(), factory()
    assert first.evaluate(arch) == second.evaluate(arch)
    assert 0.0 <= first.evaluate(arch) <= 1.0
    # Replicas: the factory's evaluator scores with both distinct supernets, by the mean of their scores.
    both = SupernetEvaluatorFactory(str(SYNTHETIC), "quick", paths[0], replica_checkpoints=(paths[1],))
    evaluator = pickle.loads(pickle.dumps(both))()
    assert len(evaluator.supernets) == 2
    weights = [s.state_dict() for s in evaluator.supernets]
    assert not torch.equal(weights[0]["fc.weight"], weights[1]["fc.weight"])  # two replicas, not one loaded twice
    alone = []
    for path in paths:
        single = SupernetEvaluatorFactory(str(SYNTHETIC), "quick", path)()
        record = single.score(arch)
        alone.append((record.accuracy, record.loss))
    assert alone[0][1] != alone[1][1]  # the replicas score differently, so the mean is of both
    record = evaluator.score(arch)
    assert record.accuracy == pytest.approx((alone[0][0] + alone[1][0]) / 2, abs=1e-12)
    assert record.loss == pytest.approx((alone[0][1] + alone[1][1]) / 2, abs=1e-12)
