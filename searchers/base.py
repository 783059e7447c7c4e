"""What every searcher shares: the interfaces it is given, the records it keeps, the results it writes.

A searcher is given a space, a latency predictor (a `latency_lut.LatencyTable` or anything with the same three
methods) and something that scores archs. It never imports training code: evaluators arrive as small picklable
factories, so Ray workers can build their own from paths instead of receiving pickled closures.
"""

from __future__ import annotations

import abc
import csv
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

from search_space import Arch, SearchSpace
from search_space.files import atomic_write


@runtime_checkable
class LatencyPredictor(Protocol):
    """Predicts a network's latency in milliseconds (the LUT)."""

    def predict(self, arch: Arch) -> float: ...

    def min_latency(self, space: SearchSpace) -> float: ...

    def max_latency(self, space: SearchSpace) -> float: ...


class Evaluator(Protocol):
    """Scores one arch: validation accuracy in [0, 1] (e.g. supernet weights + BatchNorm recalibration)."""

    def evaluate(self, arch: Arch) -> float: ...


class CandidateTrainer(Protocol):
    """Trains one arch from scratch for a few epochs, calling `report(epoch, val_accuracy)` after each (ASHA mode).

    `workdir` is an absolute directory owned by this candidate, so an interrupted training can resume there.
    """

    def train(self, arch: Arch, epochs: int, workdir: str, report: Callable[[int, float], None]) -> float: ...


# Factories are called where the work runs (a Ray worker, or this process) and must pickle cheaply.
EvaluatorFactory = Callable[[], Evaluator]
TrainerFactory = Callable[[], CandidateTrainer]


class InfeasibleTarget(ValueError):
    """No arch of the space can meet the latency target on this table."""


class StorageUnavailable(ValueError):
    """The study storage cannot be opened: its database does not answer, or its driver is not installed."""


class ClusterUnavailable(ValueError):
    """The Ray cluster cannot be joined: nothing answers at the address, or the cluster refuses this driver."""


class SearchFailed(RuntimeError):
    """Trials failed for good (their retries spent): not bad input, but what the user needs is one line saying
    which trial failed and where its log is; the study keeps what finished, and the same command continues."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial as every searcher records it (a row of trials.csv)."""

    number: int
    arch: str  # Arch.encode()
    predicted_ms: float  # LUT latency
    feasible: bool  # predicted_ms <= target
    accuracy: float  # validation accuracy; NaN when not evaluated (infeasible)
    params: int
    mflops: float
    state: str  # COMPLETE, FAIL, RUNNING, ...
    seconds: float  # wall time of the evaluation
    node: str = ""  # where it ran: "host/pid" of an Optuna worker process, "ip/node-id" of a Ray node

    @property
    def evaluated(self) -> bool:
        return not math.isnan(self.accuracy)


@dataclass(frozen=True)
class SearchResult:
    """Every trial, the best feasible one and the feasible Pareto front (accuracy up, latency down)."""

    target_ms: float
    trials: tuple[TrialRecord, ...]

    @property
    def feasible(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "COMPLETE" and t.feasible and t.evaluated]

    @property
    def best(self) -> TrialRecord | None:
        """The most accurate feasible trial (ties: the faster, then the earlier)."""
        ranked = self.top(1)
        return ranked[0] if ranked else None

    def top(self, k: int) -> list[TrialRecord]:
        """The k most accurate feasible trials with distinct archs."""
        seen: set[str] = set()
        out = []
        for t in sorted(self.feasible, key=lambda t: (-t.accuracy, t.predicted_ms, t.number)):
            if t.arch not in seen:
                seen.add(t.arch)
                out.append(t)
        return out[:k]

    @property
    def pareto(self) -> list[TrialRecord]:
        """Feasible trials that no other feasible trial beats on both accuracy and latency; distinct archs."""
        front: list[TrialRecord] = []
        best_acc = -math.inf
        for t in sorted(self.top(len(self.trials)), key=lambda t: (t.predicted_ms, -t.accuracy)):
            if t.accuracy > best_acc:
                front.append(t)
                best_acc = t.accuracy
        return front

    @property
    def infeasible_share(self) -> float:
        done = [t for t in self.trials if t.state == "COMPLETE"]
        return sum(not t.feasible for t in done) / len(done) if done else 0.0

    def write_csv(self, path: str | Path) -> None:
        """All trials to a CSV file, written atomically."""
        names = [f.name for f in fields(TrialRecord)]
        rows = [asdict(t) for t in self.trials]
        atomic_write(path, lambda f: _write_rows(f, names, rows))


class Searcher(abc.ABC):
    """How candidates are chosen: the interface every searcher implements (after Optuna's `BaseSampler`).

    A searcher is built with a space, a latency predictor and a target (its `space`, `predictor` and `target_ms`
    attributes) plus whatever scores archs; building it checks the options and touches nothing else (no files, no
    connections). Its trials live in a storage that outlives the process, so that `run` resumes and several workers
    can share one search. `run` is the template every caller uses; implementations provide the three abstract
    methods, each called at one point of it:

    1. `completed()`: by `run`, after the target is checked, to learn whether any work remains;
    2. `search(n_trials)`: by `run`, only when fewer than `n_trials` trials are complete;
    3. `result()`: by `run` at the end, and by anyone who wants the stored trials without running more.

    Bad input and unreachable infrastructure raise ValueError subclasses (`InfeasibleTarget`,
    `StorageUnavailable`, `ClusterUnavailable`) with a one-line message naming the values and the fix.
    """

    space: SearchSpace
    predictor: LatencyPredictor
    target_ms: float

    def run(self, n_trials: int) -> SearchResult:
        """Search (or resume) until the storage holds `n_trials` complete trials in total; return every trial.

        Raises:
            ValueError: `n_trials` is below 1.
            InfeasibleTarget: no arch meets the target (raised before any file or connection is made).
        """
        if n_trials < 1:
            raise ValueError(f"n_trials {n_trials} must be at least 1")
        notice = check_target(self.predictor, self.space, self.target_ms)
        if notice:
            print(notice, file=sys.stderr)
        if self.completed() < n_trials:
            self.search(n_trials)
        return self.result()

    @abc.abstractmethod
    def completed(self) -> int:
        """The number of complete trials in the storage, counting earlier runs and other workers.

        Called by `run` once the target is known to be feasible; the first call may create the storage.
        """

    @abc.abstractmethod
    def search(self, n_trials: int) -> None:
        """Run trials until the storage holds `n_trials` complete ones, resuming what an earlier run left.

        Called by `run` only when `completed() < n_trials`. A trial whose worker died is run again, so the total
        of complete trials ends exactly at `n_trials`.
        """

    @abc.abstractmethod
    def result(self) -> SearchResult:
        """Every trial in the storage so far, as TrialRecords, with this searcher's target.

        Called by `run` when the search is done; may also be called on its own to read a stored search.
        """


def _write_rows(f, names: Sequence[str], rows: Iterable[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=names)
    writer.writeheader()
    writer.writerows(rows)


def check_target(predictor: LatencyPredictor, space: SearchSpace, target_ms: float) -> str | None:
    """Fail before any work when no arch can meet `target_ms`; return a notice when every arch does.

    Raises:
        InfeasibleTarget: the target is not positive or below the space's fastest arch on this table.
    """
    if not math.isfinite(target_ms) or target_ms <= 0:
        raise InfeasibleTarget(f"target {target_ms} ms: must be a positive number of milliseconds")
    fastest = predictor.min_latency(space)
    if target_ms < fastest:
        raise InfeasibleTarget(
            f"target {target_ms:g} ms cannot be met: the fastest arch of space {space.name!r} takes "
            f"{fastest:.3f} ms on this latency table"
        )
    slowest = predictor.max_latency(space)
    if target_ms >= slowest:
        return (f"notice: every arch of space {space.name!r} meets {target_ms:g} ms (the slowest takes "
                f"{slowest:.3f} ms): the latency constraint does not bind")
    return None


def describe(space: SearchSpace, arch: Arch, predicted_ms: float, target_ms: float, num_classes: int) -> dict:
    """The user attributes every searcher stores with a trial."""
    cost = space.cost(arch, num_classes)
    return {
        "arch": arch.encode(),
        "predicted_ms": float(predicted_ms),
        "feasible": bool(predicted_ms <= target_ms),
        "params": cost.params,
        "mflops": cost.mflops,
    }
