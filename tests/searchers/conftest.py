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


@pytest.fixture(scope="session")
def predictor(tiny_space):
    return CostPredictor(tiny_space)


@pytest.fixture(scope="session")
def target(predictor) -> float:
    """A target that binds: about a third of the tiny space meets it."""
    return predictor._min + 0.3 * (predictor._max - predictor._min)
