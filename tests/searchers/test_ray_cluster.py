"""search.py on a Ray cluster of two nodes on this machine, as the README starts one: trials on both nodes, a lost
worker node, a lost head, and one line for a cluster that is not there or refuses the driver's token."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from conftest import job_env, search_command

from searchers.optuna_searcher import make_storage

pytestmark = pytest.mark.scaleout

TRIALS = 6


def _study(run_dir: Path) -> optuna.Study | None:
    journal = run_dir / "search" / "study.journal"
    if not journal.exists():
        return None
    try:
        return optuna.load_study(study_name="search", storage=make_storage(journal, run_dir))
    except KeyError:
        return None


def _complete(run_dir: Path) -> int:
    study = _study(run_dir)
    return 0 if study is None else sum(t.state.name == "COMPLETE" for t in study.trials)


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def _check_run(run_dir: Path) -> list[dict]:
    """Exactly TRIALS complete, uniquely numbered trials, and the shipped winner is the best of them."""
    rows = _rows(run_dir)
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(done) == TRIALS, [r["state"] for r in rows]
    assert len({r["number"] for r in rows}) == len(rows)
    best = max(done, key=lambda r: (float(r["accuracy"]), -float(r["predicted_ms"]), -int(r["number"])))
    (winner,) = (run_dir / "winners").iterdir()
    assert winner.name == f"1-{best['arch']}"
    return rows


def _command(job_config, job_lut, job_target, run_dir, cluster) -> list[str]:
    return search_command(job_config, job_lut, job_target, run_dir, "--searcher", "ray", "--ray-address",
                          cluster.address, "--trials", str(TRIALS))


def _wait(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_search_py_runs_trials_on_both_nodes(ray_cluster, job_config, job_lut, job_target, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(_command(job_config, job_lut, job_target, run_dir, ray_cluster), cwd=tmp_path,
                          env=ray_cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _check_run(run_dir)
    nodes = {r["node"] for r in rows if r["state"] == "COMPLETE"}
    assert len(nodes) == 2, nodes  # "ip/node-id": both nodes of this machine ran trials


@pytest.fixture(scope="module")
def long_trials_config(tmp_path_factory) -> Path:
    """The tiny job with 32x the images: each trial scores for seconds, so a node can be lost in the middle of one."""
    from tests.tiny_job import tiny_job_config

    return tiny_job_config(tmp_path_factory.mktemp("long"), trials=TRIALS, bn_calibration_images=2048, images=8192)


def test_a_worker_node_lost_mid_search_is_survived(ray_cluster, long_trials_config, job_lut, job_target, tmp_path):
    run_dir = tmp_path / "run"
    driver = subprocess.Popen(_command(long_trials_config, job_lut, job_target, run_dir, ray_cluster), cwd=tmp_path,
                              env=ray_cluster.env(), stderr=subprocess.PIPE, text=True)
    _wait(lambda: _complete(run_dir) >= 1 and ray_cluster.running(1, "ImplicitFunc.train"),
          what="a trial scoring on the worker node")
    ray_cluster.stop_node(1)
    err = driver.communicate(timeout=600)[1]
    assert driver.returncode == 0, err
    _check_run(run_dir)  # exact totals: the lost trial ran again on the head
    lost = list((run_dir / "search" / "ray").rglob("error.txt"))  # Ray's record of the trial it lost
    assert lost, "no trial was lost with the node"


def test_a_rerun_after_the_head_is_lost_resumes(ray_cluster, job_config, job_lut, job_target, tmp_path):
    run_dir = tmp_path / "run"
    command = _command(job_config, job_lut, job_target, run_dir, ray_cluster)
    env = {**ray_cluster.env(), "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}  # the driver gives up sooner
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _complete(run_dir) >= 2, what="two complete trials")
    ray_cluster.stop()  # the head and every node: the cluster is gone
    try:
        driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a driver that waits for its cluster forever is interrupted, as a user would
        driver.kill()
        driver.communicate()
    assert driver.returncode != 0
    study = _study(run_dir)
    before = {t.number: t.params for t in study.trials if t.state.name == "COMPLETE"}
    assert 2 <= len(before) < TRIALS
    ray_cluster.start()  # the same cluster again, at the same address
    done = subprocess.run(command, cwd=tmp_path, env=ray_cluster.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _check_run(run_dir)
    after = {t.number: t.params for t in _study(run_dir).trials if t.state.name == "COMPLETE"}
    assert {n: after[n] for n in before} == before  # nothing finished before was lost or redone


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    return line


def test_no_cluster_at_the_address_says_so_in_one_line(job_config, job_lut, job_target, tmp_path):
    from searchers.local_clusters import free_port

    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(search_command(job_config, job_lut, job_target, tmp_path / "run", "--searcher", "ray",
                                         "--ray-address", address), cwd=tmp_path, env=job_env(), capture_output=True,
                          text=True)
    line = _one_line_error(done)
    assert f"no Ray cluster answers at {address}" in line and "ray start --head" in line


@pytest.mark.parametrize("auth", ["wrong token", "no auth mode"])
def test_a_cluster_that_refuses_the_driver_says_to_set_the_token(ray_cluster, job_config, job_lut, job_target,
                                                                 tmp_path, auth):
    env = ray_cluster.env()
    if auth == "wrong token":
        env["RAY_AUTH_TOKEN"] = "0" * 32
    else:
        del env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]
        env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    done = subprocess.run(_command(job_config, job_lut, job_target, tmp_path / "run", ray_cluster), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    line = _one_line_error(done)
    assert f"the Ray cluster at {ray_cluster.address} refused this driver" in line
    assert "set RAY_AUTH_MODE=token" in line
