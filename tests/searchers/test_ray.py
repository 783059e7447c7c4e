"""Ray Tune searcher: the shared contract plus ASHA mode and restore. One local Ray instance per test session."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, StandInFactory, job_env
from test_contract import SearcherContract

from searchers.standins import CostTrainerFactory

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    if ray.is_initialized():  # a whole-run test that ran search.py in this process started its own
        ray.shutdown()
    # Workers import this checkout's modules (where another install of the package is on the path, too).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


class TestRayContract(SearcherContract):
    n_trials = 6
    deterministic = False  # trials finish in whatever order Ray's workers take

    def make(self, space, predictor, target, run_dir, seed=0, **kw):
        from searchers.ray_searcher import RaySearcher

        return RaySearcher(space, predictor, target, evaluator_factory=StandInFactory(str(TINY)), run_dir=run_dir,
                           seed=seed, progress=False, **kw)


@pytest.mark.slow  # a minute or more: .ci/run runs it
def test_asha_mode_trains_and_stops_early(tiny_space, predictor, tmp_path):
    """Every arch trains (the target does not bind); ASHA stops the weaker ones before asha_epochs."""
    import optuna

    from searchers.optuna_searcher import make_storage
    from searchers.ray_searcher import RaySearcher

    searcher = RaySearcher(tiny_space, predictor, predictor.max_latency(tiny_space) * 1.5,
                           trainer_factory=CostTrainerFactory(str(TINY)), mode="asha", asha_epochs=4, asha_grace=1,
                           run_dir=tmp_path, seed=0, progress=False)
    result = searcher.run(8)
    assert sum(t.state == "COMPLETE" for t in result.trials) == 8
    assert result.best is not None and result.best.feasible
    study = optuna.load_study(study_name="shufflenas", storage=make_storage(None, tmp_path))
    epochs = sorted(t.user_attrs["epochs"] for t in study.trials)
    assert epochs[0] < 4 and epochs[-1] == 4, epochs  # some were stopped early, the best trained to the end
    stopped = [t for t in study.trials if t.user_attrs["epochs"] < 4]
    for t in stopped:  # a stopped trial's record holds its truncated accuracy: below what it would have reached
        assert t.user_attrs["accuracy"] < result.best.accuracy


def test_asha_refuses_multi_objective(tiny_space, predictor, target, tmp_path):
    from searchers.ray_searcher import RaySearcher

    with pytest.raises(ValueError, match="single-objective only"):
        RaySearcher(tiny_space, predictor, target, trainer_factory=CostTrainerFactory(str(TINY)), mode="asha",
                    objectives="multi", run_dir=tmp_path)


@pytest.mark.slow  # a minute or more: .ci/run runs it
def test_interrupted_experiment_resumes_where_it_stopped(tiny_space, predictor, target, tmp_path):
    """Ctrl-C a search midway (in its own process); the same search here restores it and runs only the rest."""
    import optuna

    from searchers.optuna_searcher import make_storage

    n = 8
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import ray
        from conftest import TINY, write_table
        from pathlib import Path
        from latency_lut import LatencyTable
        from search_space import SearchSpace
        from searchers.ray_searcher import RaySearcher
        from searchers.standins import CostEvaluatorFactory

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        space = SearchSpace.from_yaml(TINY)
        table = LatencyTable.load(write_table(space, Path({str(tmp_path)!r}) / "lut.json"))
        try:
            RaySearcher(space, table, {target!r}, evaluator_factory=CostEvaluatorFactory(str(TINY), seconds=0.5),
                        run_dir={str(tmp_path)!r}, seed=0, progress=False, max_concurrent=1).run({n})
        except KeyboardInterrupt:
            sys.exit(130)
    """)
    storage = make_storage(None, tmp_path)

    def complete() -> list:
        try:
            study = optuna.load_study(study_name="shufflenas", storage=storage)
        except KeyError:
            return []
        return [t for t in study.trials if t.state.name == "COMPLETE"]

    driver = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=job_env())
    deadline = time.monotonic() + 300
    while len(complete()) < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=120) == 130  # interrupted, not finished
    before = {t.number: t.params for t in complete()}
    assert 3 <= len(before) < n

    from searchers.ray_searcher import RaySearcher

    result = RaySearcher(tiny_space, predictor, target, evaluator_factory=StandInFactory(str(TINY)),
                         run_dir=tmp_path, seed=0, progress=False, max_concurrent=1).run(n)
    done = [t for t in result.trials if t.state == "COMPLETE"]
    assert len(done) == n
    after = {t.number: t.params for t in complete()}
    assert {k: after[k] for k in before} == before  # nothing finished was lost or run again
    assert not any(t.state == "RUNNING" for t in result.trials)


def test_trials_that_fail_for_good_end_the_search_with_one_line_naming_the_first(tiny_space, predictor, target,
                                                                                 tmp_path):
    from searchers.base import SearchFailed
    from searchers.ray_searcher import RaySearcher
    from searchers.standins import BrokenEvaluatorFactory

    searcher = RaySearcher(tiny_space, predictor, predictor.max_latency(tiny_space) * 1.5,
                           evaluator_factory=BrokenEvaluatorFactory(str(TINY)), run_dir=tmp_path, seed=0,
                           progress=False, max_failures=0)
    with pytest.raises(SearchFailed, match=r"Ray trial\(s\) failed after 0 retries; the first: .*out of memory while "
                                           r"scoring.*rerun the same command") as failed:
        searcher.run(2)
    assert "\n" not in str(failed.value)


def test_no_cluster_at_an_address_fails_at_once_in_one_line():
    from searchers.base import ClusterUnavailable
    from searchers.local_clusters import free_port
    from searchers.ray_searcher import check_cluster

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterUnavailable, match=f"no Ray cluster answers at {address}.*ray start --head"):
        check_cluster(address)
    with pytest.raises(ClusterUnavailable, match="expected host:port"):
        check_cluster("somewhere")
