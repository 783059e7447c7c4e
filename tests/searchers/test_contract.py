"""The contract of `searchers.base.Searcher`, which every searcher passes: feasible winners and complete records,
seeded order, a clear error for an infeasible target before any work, and a rerun that redoes nothing.

The suite only uses the interface (`run`, `completed`, `result`), so a new searcher passes it by subclassing
SearcherContract with its own `make`; `ExhaustiveSearcher` below shows how small an implementation can be.
"""

from __future__ import annotations

import math

import pytest
from conftest import TINY, StandInEvaluator, StandInFactory

from searchers.base import InfeasibleTarget, Searcher, SearchResult, TrialRecord, describe
from searchers.optuna_searcher import SAMPLERS, OptunaSearcher


class SearcherContract:
    """Subclasses provide `make(space, predictor, target, run_dir, seed, **kw)` returning a Searcher."""

    n_trials = 10
    deterministic = True

    def make(self, space, predictor, target, run_dir, seed=0, **kw) -> Searcher:
        raise NotImplementedError

    def test_winners_are_feasible_and_records_complete(self, tiny_space, predictor, target, tmp_path):
        searcher = self.make(tiny_space, predictor, target, tmp_path)
        assert isinstance(searcher, Searcher)
        result = searcher.run(self.n_trials)
        assert isinstance(result, SearchResult)
        done = [t for t in result.trials if t.state == "COMPLETE"]
        assert len(done) == self.n_trials
        assert result.best is not None and result.best.predicted_ms <= target
        for t in result.top(3) + result.pareto:
            assert t.feasible and t.predicted_ms <= target and not math.isnan(t.accuracy)
        for t in done:
            arch = type(tiny_space.largest()).decode(t.arch)
            assert t.predicted_ms == pytest.approx(predictor.predict(arch))
            assert t.feasible == (t.predicted_ms <= target)
            assert t.evaluated == t.feasible  # infeasible archs are never evaluated
            assert t.params == tiny_space.cost(arch, 10).params
        accs = [t.accuracy for t in result.pareto]
        lats = [t.predicted_ms for t in result.pareto]
        assert accs == sorted(accs) and lats == sorted(lats)
        result.write_csv(tmp_path / "trials.csv")
        assert len((tmp_path / "trials.csv").read_text().splitlines()) == len(result.trials) + 1

    def test_seeded(self, tiny_space, predictor, target, tmp_path):
        if not self.deterministic:
            pytest.skip("this searcher's library does not promise a seeded order")
        a = self.make(tiny_space, predictor, target, tmp_path / "a", seed=3).run(6)
        b = self.make(tiny_space, predictor, target, tmp_path / "b", seed=3).run(6)
        assert [t.arch for t in a.trials] == [t.arch for t in b.trials]

    def test_infeasible_target_fails_before_any_work(self, tiny_space, predictor, tmp_path):
        searcher = self.make(tiny_space, predictor, predictor.min_latency(tiny_space) * 0.9, tmp_path)
        with pytest.raises(InfeasibleTarget, match="cannot be met: the fastest arch"):
            searcher.run(self.n_trials)
        assert not tmp_path.exists() or not list(tmp_path.iterdir())  # no study, no Ray experiment was created

    def test_target_that_never_binds_gives_a_notice(self, tiny_space, predictor, tmp_path, capsys):
        self.make(tiny_space, predictor, predictor.max_latency(tiny_space) * 1.5, tmp_path).run(2)
        assert "does not bind" in capsys.readouterr().err

    def test_a_rerun_of_a_finished_search_redoes_nothing(self, tiny_space, predictor, target, tmp_path):
        first = self.make(tiny_space, predictor, target, tmp_path).run(4)
        again = self.make(tiny_space, predictor, target, tmp_path)
        assert again.completed() == 4
        assert _key(again.result()) == _key(first)  # the stored search, read without running
        assert _key(again.run(4)) == _key(first)


def _key(result: SearchResult) -> list[tuple]:
    """A search's trials, comparable (NaN accuracy is not equal to itself)."""
    return [(t.number, t.arch, t.state, t.accuracy if t.evaluated else None) for t in result.trials]


class ExhaustiveSearcher(Searcher):
    """The smallest Searcher: the space's archs in a fixed order, kept in a CSV file of TrialRecords."""

    def __init__(self, space, predictor, target_ms, evaluator, run_dir, archs):
        self.space, self.predictor, self.target_ms = space, predictor, target_ms
        self.evaluator, self.path, self.archs = evaluator, run_dir / "trials.csv", archs

    def completed(self) -> int:
        return len(self.result().trials)

    def search(self, n_trials: int) -> None:
        trials = list(self.result().trials)
        for arch in self.archs[len(trials):n_trials]:
            a = describe(self.space, arch, self.predictor.predict(arch), self.target_ms, 10)
            accuracy = self.evaluator.evaluate(arch) if a["feasible"] else math.nan
            trials.append(TrialRecord(number=len(trials), accuracy=accuracy, state="COMPLETE", seconds=0.0, **a))
            SearchResult(self.target_ms, tuple(trials)).write_csv(self.path)  # after each trial: resumable

    def result(self) -> SearchResult:
        if not self.path.exists():
            return SearchResult(self.target_ms, ())
        import csv

        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        kinds = {"number": int, "predicted_ms": float, "feasible": lambda v: v == "True", "accuracy": float,
                 "params": int, "mflops": float, "seconds": float}
        return SearchResult(self.target_ms, tuple(TrialRecord(**{k: kinds.get(k, str)(v) for k, v in r.items()})
                                                  for r in rows))


class TestExhaustiveContract(SearcherContract):
    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        import numpy as np
        from conftest import all_archs

        archs = all_archs(space)
        np.random.default_rng(seed).shuffle(archs)
        return ExhaustiveSearcher(space, predictor, target, StandInEvaluator(space), run_dir, archs)


class TestOptunaContract(SearcherContract):
    sampler = "tpe"

    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        return OptunaSearcher(space, predictor, StandInEvaluator(space), target, sampler=self.sampler,
                              run_dir=run_dir, seed=seed, progress=False, **kw)


class TestOptunaRandomContract(TestOptunaContract):
    sampler = "random"


class TestOptunaNSGA2Contract(TestOptunaContract):
    sampler = "nsga2"


class TestOptunaGPContract(TestOptunaContract):
    sampler = "gp"
    n_trials = 8


class TestOptunaMultiObjectiveContract(TestOptunaContract):
    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        return super().make(space, predictor, target, run_dir, seed, objectives="multi", **kw)


def test_every_sampler_is_covered():
    covered = {c.sampler for c in (TestOptunaContract, TestOptunaRandomContract, TestOptunaNSGA2Contract,
                                   TestOptunaGPContract)}
    assert covered == set(SAMPLERS)
    assert TINY.exists() and StandInFactory(str(TINY))().evaluate(StandInFactory(str(TINY))().space.largest()) > 0
