"""Candidate evaluation: BatchNorm recalibration and the Evaluator that searchers call."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiments.evaluate import EvalRecord, Evaluator, accuracy, calibration_batches, recalibrate_bn
from experiments.training import train_supernet
from search_space import Supernet

SYNTHETIC = Path(__file__).resolve().parents[2] / "experiments" / "synthetic.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs at one thread (see conftest)."""


@pytest.fixture(scope="module")
def supernet(space, splits, cfg, tmp_path_factory):
    torch.manual_seed(0)
    net = Supernet(space, 10)
    train_supernet(net, splits, cfg, tmp_path_factory.mktemp("supernet"), progress=False)
    return net.eval()


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_recalibration_is_the_plain_average_of_batch_statistics():
    bn = nn.BatchNorm2d(3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 4, 4, generator=g) * (i + 1) + i, torch.zeros(8)) for i in range(3)]
    recalibrate_bn(bn, batches)
    means = torch.stack([x.mean((0, 2, 3)) for x, _ in batches])
    variances = torch.stack([x.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for x, _ in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.1  # restored
    assert not bn.training


def test_recalibration_changes_the_statistics_and_is_deterministic(supernet, space, splits, cfg):
    arch = space.sample(np.random.default_rng(1))
    batches = calibration_batches(splits.train, cfg.evaluate, seed=0)
    extracted = supernet.extract(arch)
    before = bn_stats(extracted)
    shared_before = {k: v.clone() for k, v in supernet.state_dict().items()}

    first = recalibrate_bn(supernet, batches, arch)
    second = recalibrate_bn(supernet.extract(arch), batches)
    after = bn_stats(first)
    assert all(not torch.equal(before[k], after[k]) for k in after if "running_mean" in k)
    for key, value in bn_stats(second).items():
        assert torch.equal(value, after[key]), key
    for key, value in supernet.state_dict().items():
        assert torch.equal(value, shared_before[key]), f"the supernet's {key} changed"
    other = recalibrate_bn(supernet, calibration_batches(splits.train, cfg.evaluate, seed=1), arch)
    assert not torch.equal(bn_stats(other)["conv1.1.running_mean"], after["conv1.1.running_mean"])


def test_recalibration_rejects_missing_inputs(supernet, space):
    with pytest.raises(ValueError, match="needs the arch"):
        recalibrate_bn(supernet, [])
    with pytest.raises(ValueError, match="no calibration batches"):
        recalibrate_bn(supernet.extract(space.smallest()), [])


def test_evaluator_scores_in_range_deterministically_and_order_free(supernet, space, splits, cfg):
    evaluator = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    archs = [space.largest(), space.smallest(), space.sample(np.random.default_rng(3))]
    scores = [evaluator.evaluate(a) for a in archs]
    again = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    assert [again.evaluate(a) for a in reversed(archs)] == list(reversed(scores))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores) > 0.2  # the trained supernet beats chance (0.1) on this easy data
    assert [r.arch for r in evaluator.records] == [a.encode() for a in archs]
    assert all(r.seconds > 0 for r in evaluator.records)
    assert evaluator.mean_seconds == pytest.approx(sum(r.seconds for r in evaluator.records) / 3)


def test_evaluator_score_is_the_calibrated_plain_network_accuracy(supernet, space, splits, cfg):
    evaluator = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    arch = space.largest()
    plain = recalibrate_bn(supernet.extract(arch), calibration_batches(splits.train, cfg.evaluate, seed=cfg.seed))
    from experiments.data import make_loader

    val = make_loader(splits.val, batch_size=64, shuffle=False, augment=False, seed=0)
    assert evaluator.evaluate(arch) == accuracy(plain, val)
    # The loss comes from the same forward pass: the plain network's mean cross-entropy over the whole split.
    images, labels = map(torch.cat, zip(*val, strict=True))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(plain(images), labels).item()
    record = evaluator.score(arch)
    assert record.loss == pytest.approx(expected, rel=1e-5)
    assert record.accuracy == accuracy(plain, val)
    assert record.arch == arch.encode() and record.seconds > 0 and evaluator.records[-1] == record


def test_evaluator_is_safe_from_several_threads(supernet, space, splits, cfg):
    evaluator = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    archs = [space.sample(np.random.default_rng(i)) for i in range(4)]
    expected = [evaluator.evaluate(a) for a in archs]
    results: dict[int, EvalRecord] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, evaluator.score(archs[i])))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Each thread gets its own arch's record back, with the accuracy a lone call gives.
    assert [results[i].accuracy for i in range(4)] == expected
    assert [results[i].arch for i in range(4)] == [a.encode() for a in archs]
    assert len(evaluator.records) == 8


def test_replicas_score_an_arch_by_the_mean_of_their_scores(supernet, space, splits, cfg, tmp_path):
    torch.manual_seed(1)
    other = Supernet(space, 10)
    train_supernet(other, splits, cfg, tmp_path, seed=1, progress=False)
    other.eval()
    arch = space.sample(np.random.default_rng(4))
    alone = [Evaluator(net, splits, cfg.evaluate, seed=0) for net in (supernet, other)]
    scores = [(r.accuracy, r.loss) for r in (e.score(arch) for e in alone)]
    assert scores[0] != scores[1]
    both = Evaluator([supernet, other], splits, cfg.evaluate, seed=0).score(arch)
    assert both.accuracy == pytest.approx((scores[0][0] + scores[1][0]) / 2, abs=1e-12)
    assert both.loss == pytest.approx((scores[0][1] + scores[1][1]) / 2, abs=1e-12)
    assert Evaluator([supernet], splits, cfg.evaluate, seed=0).evaluate(arch) == scores[0][0]
    with pytest.raises(ValueError, match="no supernet"):
        Evaluator([], splits, cfg.evaluate)


def test_evaluator_before_any_call_has_no_cost(supernet, splits, cfg):
    evaluator = Evaluator(supernet, splits, cfg.evaluate, seed=cfg.seed)
    with pytest.raises(ValueError, match="nothing evaluated"):
        evaluator.mean_seconds  # noqa: B018
