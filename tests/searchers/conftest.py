"""Shared fixtures: the tiny space, a small latency table written by the test, fast stand-in evaluators."""

from __future__ import annotations

from pathlib import Path

import pytest

from search_space import Arch, SearchSpace
from searchers.standins import CostEvaluator, CostEvaluatorFactory

TINY = Path(__file__).resolve().parents[2] / "experiments" / "spaces" / "tiny.yaml"


def all_archs(space: SearchSpace) -> list[Arch]:
    """Every arch of a small space, by walking the define-by-run tree."""
    out: list[Arch] = []

    class Branch(Exception):
        pass

    def walk(fixed: dict) -> None:
        pending: list = []

        def choose(name, choices):
            if name in fixed:
                return fixed[name]
            pending.append((name, choices))
            raise Branch

        try:
            out.append(space.decide(choose))
        except Branch:
            name, choices = pending[0]
            for c in choices:
                walk({**fixed, name: c})

    walk({})
    return out


# The stand-ins live in the package so that Ray workers can import them.
StandInEvaluator = CostEvaluator
StandInFactory = CostEvaluatorFactory


@pytest.fixture(scope="session")
def tiny_space() -> SearchSpace:
    return SearchSpace.from_yaml(TINY)


class CostPredictor:
    """Stand-in latency table: latency proportional to multiply-adds, exact min/max by enumeration."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        values = [self.predict(a) for a in all_archs(space)]
        self._min, self._max = min(values), max(values)

    def predict(self, arch: Arch) -> float:
        return self.space.cost(arch, 10).macs / 1e5

    def min_latency(self, space: SearchSpace) -> float:
        return self._min

    def max_latency(self, space: SearchSpace) -> float:
        return self._max


def write_table(space: SearchSpace, path: Path) -> Path:
    """A small latency table of every op of `space`, with made-up but size-dependent timings, saved to `path`."""
    from latency_lut import Entry, Fingerprint, LatencyTable, Settings, enumerate_ops

    fingerprint = Fingerprint.current("cpu", Settings(num_classes=10), space.geometry)
    table = LatencyTable(fingerprint, space.geometry)
    for op in enumerate_ops(space):
        us = 5.0 + op.size * op.size * (op.in_channels + op.out_channels) * (1 + op.kernel) / 400.0
        table.add(op, Entry(median_us=us, p10_us=0.9 * us, p90_us=1.2 * us, n=20))
    table.save(path)
    return path


@pytest.fixture(scope="session")
def predictor(tiny_space, tmp_path_factory):
    from latency_lut import LatencyTable

    return LatencyTable.load(write_table(tiny_space, tmp_path_factory.mktemp("lut") / "tiny.json"))


@pytest.fixture(scope="session")
def target(predictor, tiny_space) -> float:
    """A target that binds: about a third of the tiny space meets it."""
    low, high = predictor.min_latency(tiny_space), predictor.max_latency(tiny_space)
    return low + 0.3 * (high - low)
