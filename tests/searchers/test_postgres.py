"""One Optuna study in PostgreSQL shared by several workers: exact totals, unique numbers, killed workers' trials
run again, and one line for a database that cannot be used. A throwaway server runs on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, job_env, search_command

from searchers.optuna_searcher import open_database

pytestmark = pytest.mark.scaleout

HERE = Path(__file__).resolve().parent


def _study(url: str, name: str = "shufflenas") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_database(url, heartbeat_s=None))


def _states(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _worker_script(url: str, folder: Path, target: float, n_trials: int, seconds: float, host: str | None,
                   heartbeat_s: int) -> str:
    """A worker process: OptunaSearcher on the tiny space with an evaluator that takes `seconds` per arch."""
    return textwrap.dedent(f"""
        import socket, sys, time
        sys.path.insert(0, {str(HERE)!r})
        if {host!r}:  # a worker of another machine: only its heartbeat can tell that it died
            socket.gethostname = lambda: {host!r}
        from pathlib import Path
        from conftest import StandInEvaluator, TINY, write_table
        from latency_lut import LatencyTable
        from search_space import SearchSpace
        from searchers.optuna_searcher import OptunaSearcher

        class Slow(StandInEvaluator):
            def evaluate(self, arch):
                time.sleep({seconds!r})
                return super().evaluate(arch)

        space = SearchSpace.from_yaml(TINY)
        folder = Path({str(folder)!r})
        table = LatencyTable.load(write_table(space, folder / f"lut{{sys.argv[1]}}.json"))
        (folder / f"ready{{sys.argv[1]}}").touch()
        while not all((folder / f"ready{{s}}").exists() for s in sys.argv[2:]):  # start together
            time.sleep(0.01)
        OptunaSearcher(space, table, Slow(space), {target!r}, storage={url!r}, seed=int(sys.argv[1]),
                       progress=False, heartbeat_s={heartbeat_s}).run({n_trials})
    """)


def _wait_for_running_trial(url: str, pid: int, name: str = "shufflenas",
                            timeout: float = 240) -> optuna.trial.FrozenTrial:
    """The first RUNNING trial of process `pid` that is being evaluated (its arch decided and feasible: an
    infeasible one completes at once), once it has completed one trial before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = _study(url, name)
        except KeyError:  # not created yet
            time.sleep(0.2)
            continue
        mine = [t for t in study.trials if t.system_attrs.get("shufflenas:worker", {}).get("pid") == pid]
        running = [t for t in mine if t.state.name == "RUNNING" and t.user_attrs.get("feasible")]
        if running and any(t.state.name == "COMPLETE" for t in mine):
            return running[0]
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never ran a trial")


def _check_exact(study: optuna.Study, n_trials: int) -> None:
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1
    assert _states(study).get("COMPLETE") == n_trials, _states(study)
    assert "RUNNING" not in _states(study)


def test_two_workers_share_one_study_with_exact_totals(pg_url, target, tmp_path):
    script = _worker_script(pg_url, tmp_path, target, n_trials=14, seconds=0.1, host=None, heartbeat_s=10)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(s), "1", "2"], cwd=ROOT) for s in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = _study(pg_url)
    _check_exact(study, 14)
    workers = {t.system_attrs["shufflenas:worker"]["pid"] for t in study.trials if t.state.name == "COMPLETE"}
    assert workers == {p.pid for p in procs}  # both took part


def test_a_worker_of_another_machine_killed_mid_trial_is_found_by_its_heartbeat(pg_url, target, tmp_path):
    """Kill -9 a worker on "another machine" mid-trial: its heartbeat stops, and the other worker runs its arch."""
    n = 8  # the victim's trials take 3 s: the kill lands while the trial it was found in still runs
    victim = subprocess.Popen([sys.executable, "-c", _worker_script(pg_url, tmp_path, target, n, 3.0, "elsewhere", 1),
                               "1", "1"], cwd=ROOT)
    lost = _wait_for_running_trial(pg_url, victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = subprocess.run([sys.executable, "-c", _worker_script(pg_url, tmp_path, target, n, 0.1, None, 1),
                               "2", "2"], cwd=ROOT, timeout=300)
    assert survivor.returncode == 0
    study = _study(pg_url)
    _check_exact(study, n)
    failed = study.trials[lost.number]
    assert failed.state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params  # the same arch, run to the end


def test_two_search_py_processes_share_one_postgres_study(pg_url, job_config, job_lut, job_target, tmp_path):
    """The README's several-machines command, twice on one machine: one study, exactly --trials trials."""
    procs = [subprocess.Popen(search_command(job_config, job_lut, job_target, tmp_path / f"machine{k}",
                                             "--storage", pg_url, "--trials", "8"),
                              cwd=tmp_path, env=job_env(), stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    study = _study(pg_url, "search")
    _check_exact(study, 8)
    for k in (1, 2):  # each machine ships from the whole study: the same records
        rows = (tmp_path / f"machine{k}" / "trials.csv").read_text().splitlines()
        assert sum(",COMPLETE," in r for r in rows) == 8


@pytest.fixture
def slow_trials_config(job_config, tmp_path) -> Path:
    """The tiny job with trials of about a second (evaluation two images at a time), long enough to be killed in."""
    raw = yaml.safe_load(job_config.read_text())
    raw["evaluate"].update(batch_size=2, bn_calibration_images=128)
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_search_py_worker_killed_mid_trial_then_rerun(pg_url, slow_trials_config, job_lut, job_target, tmp_path):
    """kill -9 one search.py mid-trial; a second one recovers its trial at once; the rerun of the first finishes."""
    job_config = slow_trials_config
    command = search_command(job_config, job_lut, job_target, tmp_path / "machine1", "--storage", pg_url,
                             "--trials", "6")
    victim = subprocess.Popen(command, cwd=tmp_path, env=job_env(), stderr=subprocess.DEVNULL)
    lost = _wait_for_running_trial(pg_url, victim.pid, name="search")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    other = subprocess.run(search_command(job_config, job_lut, job_target, tmp_path / "machine2", "--storage",
                                          pg_url, "--trials", "6"), cwd=tmp_path, env=job_env(), capture_output=True,
                           text=True)
    assert other.returncode == 0, other.stderr
    study = _study(pg_url, "search")
    _check_exact(study, 6)
    failed = study.trials[lost.number]
    assert failed.state.name == "FAIL"
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert retry.state.name == "COMPLETE" and retry.params == failed.params  # the same arch, run to the end
    # The same command resumes: nothing left to search, it ships from the study.
    again = subprocess.run(command, cwd=tmp_path, env=job_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    _check_exact(_study(pg_url, "search"), 6)
    assert (tmp_path / "machine1" / "report.md").exists()


def test_search_py_with_an_unreachable_database_says_so_in_one_line(job_config, job_lut, job_target, tmp_path):
    from searchers.local_clusters import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/study"
    done = subprocess.run(search_command(job_config, job_lut, job_target, tmp_path / "run", "--storage", url),
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True)
    assert done.returncode == 2
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert "Traceback" not in done.stderr
    assert "the database cannot be reached" in line and "Connection refused" in line and url in line
