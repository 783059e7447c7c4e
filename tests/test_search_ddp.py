"""search.py data-parallel: two gloo processes on the CPU, launched by torchrun or with its environment set by hand.

Every rank trains the supernet and the winners together (DDP); rank 0 alone measures, searches, exports and reports.
Bad input on one rank ends every rank with exit code 2, Ctrl-C on rank 0 in the middle of a training step ends
them all with 130 (no rank hangs), and the same command then finishes the job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import search
from tests.search_entry import QUICK
from tests.tiny_job import tiny_job_config, tiny_table

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).resolve().parent / "search_entry.py"  # search.main with quick measurements
TIMEOUT_S = 600  # a rank that waits for ever fails the test instead of hanging it
STEP_LINE = "] lut"  # rank 0's "[1/8] lut": the steps are rank 0's alone


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The synthetic experiment cut to the bone; no calibration measurements (the budget does not bind)."""
    return tiny_job_config(tmp_path_factory.mktemp("config"), calibrate_archs=0)


@pytest.fixture(scope="module")
def lut(tmp_path_factory) -> Path:
    """A calibrated ONNX Runtime table of the tiny space, measured quickly (its accuracy does not matter here)."""
    return tiny_table(tmp_path_factory.mktemp("lut"), "onnxruntime", archs=4, budget=QUICK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(config: Path, lut: Path, target, tmp_path: Path, run_dir: str = "run") -> list[str]:
    return ["--config", str(config), "--target-ms", str(target), "--device", "cpu", "--lut", str(lut),
            "--run-dir", str(tmp_path / run_dir), "--supernet-store", str(tmp_path / "store"), "--threads", "1"]


@dataclasses.dataclass
class Rank:
    code: int
    err: str


def by_hand(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, nproc: int = 2) -> list[Rank]:
    """Start `nproc` processes with the environment torchrun gives them (rank 0 then hosts the store); each one's
    exit code and stderr."""
    port, procs, logs = free_port(), [], []
    for rank in range(nproc):
        log = open(tmp_path / f"rank{rank}-{port}.err", "w+")  # noqa: SIM115 (closed below)
        rank_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                    "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, str(ENTRY), *args], cwd=ROOT, env=rank_env,
                                      stdout=subprocess.DEVNULL, stderr=log))
        logs.append(log)
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ranks = []
    for code, log in zip(codes, logs, strict=True):
        log.seek(0)
        ranks.append(Rank(code, log.read()))
        log.close()
    return ranks


def torchrun(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`torchrun --nproc_per_node 2 search.py ARGS`, each worker's stderr in a file; torchrun's result and them."""
    logs = tmp_path / f"torchrun-{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "--log-dir", str(logs), "--redirects", "3", str(ENTRY), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    files = sorted(logs.rglob("stderr.log"), key=lambda p: int(p.parent.name))
    return done, [f.read_text() for f in files]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torchrun_asking_for_cuda_where_there_is_none(config, tmp_path):
    """Every rank finds it out itself, says so in one line and exits with 2; torchrun then reports its workers'
    failure in its own words and exits with 1."""
    args = args_for(config, tmp_path / "table.json", 5.0, tmp_path)
    args[args.index("--device") + 1] = "cuda"
    done, errs = torchrun(args, tmp_path)
    assert done.returncode == 1 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]
    assert len(errs) == 2
    # torchrun stops the other worker as soon as one fails, so a rank may be ended before it prints its line.
    lines = [line for err in errs for line in error_lines(err)]
    assert 1 <= len(lines) <= 2 and all("CUDA is not available" in line for line in lines), errs
    assert all(len(error_lines(err)) <= 1 and "Traceback" not in err for err in errs), errs
    assert not (tmp_path / "run").exists()


def test_bad_input_found_by_rank_0_alone_ends_every_rank(config, tmp_path):
    """Rank 0 alone loads the latency table, after the process group is up and while rank 1 waits for its orders:
    its one line and exit code 2, and rank 1 ends with 2 too, silently."""
    table = tmp_path / "table.json"
    table.write_text("{}")
    leader, follower = by_hand(args_for(config, table, 5.0, tmp_path), tmp_path)
    assert leader.code == 2 and follower.code == 2, (leader.err, follower.err)
    (line,) = error_lines(leader.err)
    assert "not a valid latency table" in line and "Traceback" not in leader.err, leader.err
    assert follower.err.strip() == "", follower.err


@pytest.mark.slow
def test_a_run_directory_checked_by_rank_0_before_the_process_group(config, tmp_path):
    """Rank 0 alone checks the run directory, before the process group exists: rank 1 ends with it, silently."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": "another.yaml"}))
    leader, follower = by_hand(args_for(config, tmp_path / "table.json", 5.0, tmp_path), tmp_path)
    assert leader.code == 2 and follower.code == 2, (leader.err, follower.err)
    (line,) = error_lines(leader.err)
    assert "holds another experiment" in line, leader.err
    assert follower.err.strip() == "", follower.err


def test_a_rank_that_loaded_another_experiment_is_refused(config, tmp_path):
    """Every rank loads the experiment itself (on several machines: from its own files); rank 0 refuses to start
    when one trains something else."""
    raw = yaml.safe_load(config.read_text())
    raw["retrain"]["lr"] = 0.01
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    args = args_for(config, tmp_path / "table.json", 5.0, tmp_path)
    leader, follower = by_hand(args, tmp_path, env={"SHUFFLENAS_TEST_CONFIG_RANK1": str(other)})
    assert leader.code == 2 and follower.code == 2, (leader.err, follower.err)
    (line,) = error_lines(leader.err)
    assert "rank 1 loaded another experiment than rank 0" in line and "retrain" in line, leader.err


@pytest.mark.slow
def test_a_rank_that_sees_other_checkpoints_is_refused(config, lut, tmp_path):
    """Rank 0 orders the supernet trained and rank 1 sees another checkpoint for it (a machine without the shared
    folders): refused in one line before anyone trains."""
    leader, follower = by_hand(args_for(config, lut, 5.0, tmp_path), tmp_path, env={"SHUFFLENAS_TEST_UNSHARED": "1"})
    assert leader.code == 2 and follower.code == 2, (leader.err, follower.err)
    (line,) = error_lines(leader.err)
    assert "supernet: rank 1 sees" in line and "file system they all share" in line, leader.err
    assert not list((tmp_path / "store").rglob("supernet.pt"))


# ---- a whole job ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_mid_step_then_finished_by_torchrun_as_one_process_would(config, lut, tmp_path, capsys,
                                                                             monkeypatch):
    """Ctrl-C on rank 0 in the middle of a DDP retraining step, while rank 1 waits for it in the gradient
    all-reduce: both end with 130, and the same command under torchrun finishes the job. Rank 0 alone wrote the
    steps, winners/ and report.md; the supernet and the winner were trained by both processes; and a one-process
    run given that supernet searches exactly as rank 0 did."""
    args = args_for(config, lut, 100, tmp_path)
    leader, follower = by_hand(args, tmp_path, env={"SHUFFLENAS_TEST_INTERRUPT": "retrain"})
    assert (leader.code, follower.code) == (130, 130), (leader.err, follower.err)
    assert "rerun the same command" in leader.err and "Traceback" not in leader.err + follower.err
    (entry,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    assert entry.name.endswith("-w2")  # two processes train another supernet than one does
    trained = torch.load(entry / "supernet.pt", weights_only=True)
    assert trained["world_size"] == 2 and trained["epoch"] == 1
    assert not list((tmp_path / "run" / "winners").rglob("model_card.json"))

    done, (err0, err1) = torchrun(args, tmp_path)
    assert done.returncode == 0, err0[-3000:] + err1[-3000:]
    assert err0.count(STEP_LINE) == 1 and err0.count("done: report in") == 1, err0
    assert STEP_LINE not in err1 and "done: report" not in err1 and "error" not in err1, err1
    again = torch.load(entry / "supernet.pt", weights_only=True)
    assert torch.equal(again["model"]["fc.weight"], trained["model"]["fc.weight"])  # loaded, not trained again
    run = tmp_path / "run"
    (card_path,) = [p for p in (run / "winners").rglob("model_card.json") if ".staging" not in p.parts]
    card = json.loads(card_path.read_text())
    retrained = torch.load(run / "retrain" / card["arch"] / "retrain.pt", weights_only=True)
    assert retrained["world_size"] == 2
    assert (run / "report.md").exists() and (run / "pareto.png").exists()
    assert json.loads((run / "run.json").read_text())["world_size"] == 2

    # One process, given the supernet the two trained: the same trials, scores and winner.
    monkeypatch.setattr(search, "MEASURE_BUDGET", QUICK)
    single = args_for(config, lut, 100, tmp_path, run_dir="single") + ["--supernet", str(entry)]
    assert search.main(single) == 0, capsys.readouterr().err

    def trials(folder: Path) -> list[dict]:
        # what differs between processes by nature: the time taken and the process that scored a trial
        return [{k: v for k, v in row.items() if k not in ("seconds", "node")} for row in csv.DictReader(
            (folder / "trials.csv").open())]

    assert trials(tmp_path / "single") == trials(run)
    (single_card,) = [json.loads(p.read_text()) for p in (tmp_path / "single" / "winners").rglob("model_card.json")]
    assert single_card["arch"] == card["arch"]
