"""Shared fixtures: the tiny space, a small latency table written by the test, fast stand-in evaluators."""

from __future__ import annotations

import sys
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


# ---- scale-out: a throwaway PostgreSQL server, a two-node Ray cluster, search.py on the tiny synthetic job -----

ROOT = TINY.parents[2]
SEARCH = ROOT / "search.py"


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 for this test session (skips where it cannot start)."""
    from searchers.local_clusters import InfrastructureUnavailable, LocalPostgres

    try:
        server = LocalPostgres()  # finds the programs and the account to run them as
    except InfrastructureUnavailable as e:
        pytest.skip(f"no local PostgreSQL server can start here: {e}")
    server.start()  # installed but failing to start is a failure, not a skip
    yield server
    server.stop()


_databases = iter(range(10**6))


@pytest.fixture
def pg_url(postgres) -> str:
    """A fresh database of the session's server, as the URL `--storage` takes."""
    pytest.importorskip("psycopg", reason='the PostgreSQL driver is not installed (pip install -e ".[postgres]")')
    return postgres.create_database(f"study{next(_databases)}")


@pytest.fixture
def ray_cluster():
    """A Ray cluster of two nodes (one CPU each) on this machine, with token authentication."""
    from searchers.local_clusters import LocalRayCluster

    cluster = LocalRayCluster(nodes=2, cpus_per_node=1).start()  # Ray is a dependency: failing to start fails
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def job_config(tmp_path_factory) -> Path:
    """The synthetic experiment cut to seconds: search.py's whole job, with trials that take a moment each."""
    from tests.tiny_job import tiny_job_config

    return tiny_job_config(tmp_path_factory.mktemp("job"), trials=6, bn_calibration_images=64)


@pytest.fixture(scope="session")
def job_lut(tmp_path_factory) -> Path:
    """A calibrated table of the tiny space in search.py's default CPU runtime, ONNX Runtime."""
    from tests.tiny_job import tiny_table

    return tiny_table(tmp_path_factory.mktemp("lut"), "onnxruntime")


@pytest.fixture(scope="session")
def job_target(job_lut) -> float:
    """Every arch meets it, with room for a busy machine (the latency promise is tested elsewhere)."""
    from latency_lut import LatencyTable

    return round(3 * LatencyTable.load(job_lut).max_latency(SearchSpace.from_yaml(TINY)), 3)


def search_command(job_config: Path, job_lut: Path, job_target: float, run_dir: Path, *extra: str) -> list[str]:
    """`python search.py ...` on the tiny job, as a user types it."""
    return [sys.executable, str(SEARCH), "--config", str(job_config), "--target-ms", str(job_target), "--device",
            "cpu", "--lut", str(job_lut), "--run-dir", str(run_dir), "--threads", "1", *extra]


def job_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a search.py process: this checkout first on the path, also for its helper processes."""
    import os

    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env
