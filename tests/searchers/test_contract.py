"""The contract every searcher passes: seeded, feasible winners, clear infeasible-target error, exact resume."""

from __future__ import annotations

import math

import pytest
from conftest import TINY, StandInEvaluator, StandInFactory

from searchers.base import InfeasibleTarget, SearchResult
from searchers.optuna_searcher import SAMPLERS, OptunaSearcher


class SearcherContract:
    """Subclasses provide `make(space, predictor, target, run_dir, seed, **kw)` returning a searcher with .run(n)."""

    n_trials = 10
    deterministic = True

    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        raise NotImplementedError

    def test_winners_are_feasible_and_records_complete(self, tiny_space, predictor, target, tmp_path):
        result = self.make(tiny_space, predictor, target, tmp_path).run(self.n_trials)
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
