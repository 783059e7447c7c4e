from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from latency_lut import Entry, Fingerprint, LatencyTable, Settings, enumerate_ops
from latency_lut.timing import Budget
from search_space import Arch, SearchSpace, Stage, Unit

# Small enough to enumerate every arch (2 stems x 12 x 12 x 2 heads = 576); depths 1 and 2 (some archs have no
# stride-1 unit), two splits that round to different channels, and a 16x16 input so ops run in microseconds.
TINY_YAML = """\
name: tiny
input: {size: 16, channels: 1}
stem: {kind: small, widths: [8, 12]}
channels: {multiple: 4, split_multiple: 2}
stages:
  - {depths: [1, 2], widths: [8, 16], splits: [0.5], kernels: [3, 5]}
  - {depths: [1, 2], widths: [16, 24], splits: [0.375, 0.625], kernels: [3]}
head: {widths: [32, 48]}
"""

# The fastest possible timing: one call per op, no warm-up, one round (tests check bookkeeping, not latency).
TINY_BUDGET = Budget(rounds=1, block_s=0.0, min_calls=1, max_calls=1, warmup=0)


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture
def tiny_space(tiny_yaml: Path) -> SearchSpace:
    return SearchSpace.from_yaml(tiny_yaml)


@pytest.fixture(scope="session")
def tiny_budget() -> Budget:
    return TINY_BUDGET


@pytest.fixture(scope="session")
def all_archs():
    return _all_archs


@pytest.fixture(scope="session")
def synthetic_table():
    return _synthetic_table


def _all_archs(space: SearchSpace) -> Iterator[Arch]:
    """Every arch of a (small) space, by brute force."""
    per_stage = []
    for c in space.stages:
        units = [Unit(split=s, kernel=k) for s in c.splits for k in c.kernels]
        options = []
        for width in c.widths:
            for depth in c.depths:
                options += [Stage(width=width, units=combo) for combo in itertools.product(units, repeat=depth)]
        per_stage.append(options)
    for stem in space.stem_widths:
        for stages in itertools.product(*per_stage):
            for head in space.head_widths:
                yield Arch(stem=stem, stages=stages, head=head)


def _synthetic_table(space: SearchSpace, seed: int = 0, settings: Settings | None = None) -> LatencyTable:
    """A table with random entries for every op of `space` (no timing)."""
    rng = np.random.default_rng(seed)
    fingerprint = Fingerprint.current("cpu", settings or Settings(), space.geometry)
    entries = {}
    for op in enumerate_ops(space):
        median = float(rng.uniform(10, 1000))
        entries[op] = Entry(median_us=median, p10_us=median * 0.95, p90_us=median * 1.1, n=9)
    return LatencyTable(fingerprint, space.geometry, entries, info={"spaces": [space.name]})
