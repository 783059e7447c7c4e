"""Ray Tune searcher: the shared contract plus ASHA mode and restore. One local Ray instance per test session."""

from __future__ import annotations

import pytest
from conftest import TINY, StandInFactory
from test_contract import SearcherContract

from searchers.standins import CostTrainerFactory

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


class TestRayContract(SearcherContract):
    n_trials = 6
    deterministic = False  # trials finish in whatever order Ray's workers take

    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        from searchers.ray_searcher import RaySearcher

        return RaySearcher(space, predictor, target, evaluator_factory=StandInFactory(str(TINY)), run_dir=run_dir,
                           seed=seed, progress=False, **kw)


def test_asha_mode_trains_and_stops_early(tiny_space, predictor, target, tmp_path):
    from searchers.ray_searcher import RaySearcher

    searcher = RaySearcher(tiny_space, predictor, target, trainer_factory=CostTrainerFactory(str(TINY)),
                           mode="asha", asha_epochs=4, run_dir=tmp_path, seed=0, progress=False)
    result = searcher.run(6)
    assert sum(t.state == "COMPLETE" for t in result.trials) == 6
    assert result.best is not None and result.best.feasible


def test_asha_refuses_multi_objective(tiny_space, predictor, target, tmp_path):
    from searchers.ray_searcher import RaySearcher

    with pytest.raises(ValueError, match="single-objective only"):
        RaySearcher(tiny_space, predictor, target, trainer_factory=CostTrainerFactory(str(TINY)), mode="asha",
                    objectives="multi", run_dir=tmp_path)


def test_restore_completes_the_requested_trials(tiny_space, predictor, target, tmp_path):
    """A finished experiment restored with the same command does not run trials again."""
    from searchers.ray_searcher import RaySearcher

    def make():
        return RaySearcher(tiny_space, predictor, target, evaluator_factory=StandInFactory(str(TINY)),
                           run_dir=tmp_path, seed=0, progress=False)

    first = make().run(4)
    again = make().run(4)
    assert [t.arch for t in again.trials] == [t.arch for t in first.trials]
    assert sum(t.state == "COMPLETE" for t in again.trials) == 4
