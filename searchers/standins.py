"""Fast, deterministic stand-ins for the expensive parts of a search: for tests and dry runs of the machinery.

They live in the package (not in tests/) because Ray workers must be able to import whatever a trial needs.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable

from search_space import Arch, SearchSpace


def _score(space: SearchSpace, arch: Arch) -> float:
    """Bigger archs score higher, with a small arch-specific jitter so that ties are rare."""
    jitter = (zlib.crc32(arch.encode().encode()) % 1000) / 1e5
    return 1.0 - 1.0 / math.log(space.cost(arch, 10).macs) + jitter


class CostEvaluator:
    """Scores an arch from its size alone (no training); records the archs it was asked about.

    `seconds` of sleep per arch stand in for a real evaluation's time, so that trials overlap and can be
    interrupted midway.
    """

    def __init__(self, space: SearchSpace, seconds: float = 0.0) -> None:
        self.space = space
        self.seconds = seconds
        self.calls: list[str] = []

    def evaluate(self, arch: Arch) -> float:
        self.calls.append(arch.encode())
        if self.seconds:
            time.sleep(self.seconds)
        return _score(self.space, arch)


class CostTrainer:
    """Accuracy rises with the epochs towards the size-based score, reported after each epoch."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def train(self, arch: Arch, epochs: int, workdir: str, report: Callable[[int, float], None]) -> float:
        ceiling = _score(self.space, arch)
        for epoch in range(epochs):
            report(epoch, ceiling * (epoch + 1) / epochs)
        return ceiling


class CostEvaluatorFactory:
    """Picklable factory: builds a CostEvaluator from the space file's path where the trial runs."""

    def __init__(self, space_path: str, seconds: float = 0.0) -> None:
        self.space_path = str(space_path)
        self.seconds = seconds

    def __call__(self) -> CostEvaluator:
        return CostEvaluator(SearchSpace.from_yaml(self.space_path), self.seconds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.space_path!r}, seconds={self.seconds!r})"


class CostTrainerFactory(CostEvaluatorFactory):
    def __call__(self) -> CostTrainer:  # type: ignore[override]
        return CostTrainer(SearchSpace.from_yaml(self.space_path))


class BrokenEvaluatorFactory(CostEvaluatorFactory):
    """Builds an evaluator that fails on every arch: a search whose trials fail for good."""

    def __call__(self) -> CostEvaluator:
        evaluator = super().__call__()

        def evaluate(arch: Arch) -> float:
            raise MemoryError(f"{arch.encode()}: out of memory while scoring")

        evaluator.evaluate = evaluate  # type: ignore[method-assign]
        return evaluator
