"""Optuna-specific behaviour: resume after interruption or kill, shared storage across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import CostPredictor, StandInEvaluator

from searchers.base import StorageUnavailable
from searchers.optuna_searcher import OptunaSearcher, make_storage, recover_stale_trials

ROOT = Path(__file__).resolve().parents[2]


class InterruptingEvaluator(StandInEvaluator):
    def __init__(self, space, after: int) -> None:
        super().__init__(space)
        self.after = after

    def evaluate(self, arch):
        if len(self.calls) == self.after:
            raise KeyboardInterrupt
        return super().evaluate(arch)


def _searcher(space, predictor, target, run_dir, evaluator=None, **kw):
    return OptunaSearcher(space, predictor, evaluator or StandInEvaluator(space), target, run_dir=run_dir,
                          progress=False, **kw)


def test_interrupted_search_resumes_to_exactly_n_trials(tiny_space, predictor, target, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _searcher(tiny_space, predictor, target, tmp_path, InterruptingEvaluator(tiny_space, after=3)).run(12)
    first = _searcher(tiny_space, predictor, target, tmp_path).result()
    done_before = {t.number: t.arch for t in first.trials if t.state == "COMPLETE"}
    assert 3 <= len(done_before) < 12
    result = _searcher(tiny_space, predictor, target, tmp_path).run(12)
    done = [t for t in result.trials if t.state == "COMPLETE"]
    assert len(done) == 12
    assert {t.number: t.arch for t in done if t.number in done_before} == done_before  # nothing lost or redone
    assert _searcher(tiny_space, predictor, target, tmp_path).run(12).trials == result.trials  # already finished


@pytest.mark.parametrize("decided", [True, False], ids=["arch decided", "died while choosing"])
def test_trial_of_a_killed_process_is_failed_and_its_arch_run_again(tiny_space, predictor, target, tmp_path,
                                                                     decided):
    from searchers.objective import suggest_arch

    searcher = _searcher(tiny_space, predictor, target, tmp_path)
    study = searcher.study()
    trial = study.ask()
    if decided:
        trial.set_user_attr("arch", suggest_arch(tiny_space, trial).encode())
    else:
        trial.suggest_categorical("stem.width", [8, 12])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    study._storage.set_trial_system_attr(trial._trial_id, "shufflenas:worker",
                                         {"host": socket.gethostname(), "pid": int(dead.stdout)})
    assert recover_stale_trials(study) == 1
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL
    result = searcher.run(5)
    assert sum(t.state == "COMPLETE" for t in result.trials) == 5
    assert not any(t.state == "RUNNING" for t in result.trials)
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == trial.number]
    if decided:  # the same arch, run to the end
        assert [(t.state.name, t.params) for t in retries] == [("COMPLETE", study.trials[trial.number].params)]
    else:  # half an arch is no arch: the slot goes to a fresh sample
        assert retries == []


def test_live_trials_of_other_workers_are_left_alone(tiny_space, predictor, target, tmp_path):
    study = _searcher(tiny_space, predictor, target, tmp_path).study()
    trial = study.ask()
    import os
    import socket

    study._storage.set_trial_system_attr(trial._trial_id, "shufflenas:worker",
                                         {"host": socket.gethostname(), "pid": os.getpid()})
    assert recover_stale_trials(study) == 0


def test_two_processes_share_one_storage_without_duplicates(tiny_space, target, tmp_path):
    journal = tmp_path / "shared.journal"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from conftest import StandInEvaluator, TINY, write_table
        from latency_lut import LatencyTable
        from search_space import SearchSpace
        from searchers.optuna_searcher import OptunaSearcher

        class Slow(StandInEvaluator):  # 20 ms per trial: long enough for the two workers to overlap
            def evaluate(self, arch):
                time.sleep(0.02)
                return super().evaluate(arch)

        space = SearchSpace.from_yaml(TINY)
        folder = Path({str(tmp_path)!r})
        table = LatencyTable.load(write_table(space, folder / f"lut{{sys.argv[1]}}.json"))
        (folder / f"ready{{sys.argv[1]}}").touch()  # start together: on a busy machine one import can take seconds
        while not all((folder / f"ready{{s}}").exists() for s in (1, 2)):
            time.sleep(0.01)
        OptunaSearcher(space, table, Slow(space), {target!r}, storage={str(journal)!r},
                       run_dir={str(tmp_path)!r}, seed=int(sys.argv[1]), progress=False).run(16)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(seed)], cwd=ROOT) for seed in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="shufflenas", storage=make_storage(journal, tmp_path))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 16
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    workers = {t.system_attrs["shufflenas:worker"]["pid"] for t in study.trials}
    assert len(workers) == 2


def test_study_of_another_search_is_refused(tiny_space, predictor, target, tmp_path):
    _searcher(tiny_space, predictor, target, tmp_path).run(2)
    with pytest.raises(ValueError, match="belongs to another search"):
        _searcher(tiny_space, predictor, target * 1.1, tmp_path).run(2)


def test_references_are_tried_first(fashion_space_and_predictor, tmp_path):
    space, predictor = fashion_space_and_predictor
    ref = space.reference("shufflenet_v2_x0_5")
    target = predictor.predict(ref) * 1.01
    result = OptunaSearcher(space, predictor, StandInEvaluator(space), target, run_dir=tmp_path,
                            progress=False).run(3)
    assert result.trials[0].arch == ref.encode()


@pytest.fixture(scope="module")
def fashion_space_and_predictor():
    from search_space import SearchSpace

    space = SearchSpace.from_yaml(ROOT / "experiments/spaces/fashion_mnist.yaml")

    class Approx(CostPredictor):  # the fashion space is too large to enumerate: smallest/largest bound it
        def __init__(self, space):
            self.space = space
            self._min, self._max = self.predict(space.smallest()), self.predict(space.largest())

    return space, Approx(space)


def test_database_without_its_driver_names_the_extra(tiny_space, predictor, target, tmp_path, monkeypatch):
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails, as where the driver is not installed
    searcher = _searcher(tiny_space, predictor, target, tmp_path, storage="postgresql://u@127.0.0.1:1/study")
    with pytest.raises(StorageUnavailable, match=r'no database driver is installed.*pip install -e "\.\[postgres\]"'):
        searcher.run(2)


def test_unreachable_database_fails_in_one_line(tiny_space, predictor, target, tmp_path):
    pytest.importorskip("psycopg")
    from searchers.local_clusters import free_port

    url = f"postgresql://u:secret@127.0.0.1:{free_port()}/study"
    with pytest.raises(StorageUnavailable, match="the database cannot be reached") as caught:
        _searcher(tiny_space, predictor, target, tmp_path, storage=url).run(2)
    assert "\n" not in str(caught.value) and "secret" not in str(caught.value)  # one line, password hidden


def test_storage_that_is_not_a_url_of_a_database(tiny_space, predictor, target, tmp_path):
    with pytest.raises(StorageUnavailable, match="is not a database URL"):
        _searcher(tiny_space, predictor, target, tmp_path, storage="nonsense://").run(2)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_no_worker_claimed_within_the_grace_period_is_failed(tmp_path, monkeypatch):
    """A worker killed between creating its trial and the heartbeat's first beat: Optuna never sees that trial go
    stale, so it would hold a slot for ever; it is failed once the grace period has passed, and a claimed one
    (a live worker's) is left alone."""
    import time

    from searchers import optuna_searcher
    from searchers.optuna_searcher import WORKER_ATTR, open_database

    monkeypatch.setattr(optuna_searcher, "GRACE_BEATS", 1)
    study = optuna.create_study(storage=open_database(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_s=1))
    orphan, claimed = study.ask(), study.ask()
    study._storage.set_trial_system_attr(claimed._trial_id, WORKER_ATTR, {"host": "elsewhere", "pid": 1})
    assert recover_stale_trials(study) == 0
    assert [t.state.name for t in study.trials] == ["RUNNING", "RUNNING"]  # within the grace period
    time.sleep(1.5)
    recover_stale_trials(study)
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING"]
    assert study.trials[orphan.number].state.name == "FAIL" and claimed.number == 1
