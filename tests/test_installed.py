"""Installed use: the wheel, installed apart from the checkout, runs a synthetic search from an empty folder through
its `shufflenas` console script, writing its run under that folder and its caches under $SHUFFLENAS_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel installed into a folder of its own (its dependencies come from this environment)."""
    folder = tmp_path_factory.mktemp("installed")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(folder / "dist"), str(ROOT)],
                   check=True, capture_output=True, cwd=folder)
    (wheel,) = (folder / "dist").glob("shufflenas-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(folder / "site"), str(wheel)], check=True,
                   capture_output=True, cwd=folder)
    return folder / "site"


def shufflenas(installed: Path, cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(installed), SHUFFLENAS_HOME=str(home), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(installed / "bin" / "shufflenas"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # a whole job with its own latency table: minutes; .ci/run runs it
def test_the_installed_tools_run_a_search_from_an_empty_folder(installed, tmp_path):
    work, home = tmp_path / "empty", tmp_path / "home"
    work.mkdir()
    done = shufflenas(installed, work, home, "--help")
    assert done.returncode == 0 and "search" in done.stdout and "measure" in done.stdout
    where = shufflenas(installed, work, home, "search", "--help")
    assert where.returncode == 0 and "--target-ms" in where.stdout
    config = installed / "experiments" / "synthetic.yaml"
    assert config.exists()  # the experiment files ship with the package
    done = shufflenas(installed, work, home, "search", "--config", str(config), "--target-ms", "1.5xlargest",
                      "--device", "cpu", "--trials", "2", "--threads", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    (card_path,) = (run_dir / "winners").rglob("model_card.json")
    card = json.loads(card_path.read_text())
    assert card["measured_ms"] <= card["target_ms"]
    assert list((home / "luts").glob("tiny-cpu-onnxruntime-*.json")) and list((home / "supernets").iterdir())
    assert not (installed / "runs").exists() and not (installed / "luts").exists()  # nothing beside the code
    measured = shufflenas(installed, work, home, "measure", str(card_path.parent / "model.onnx"), "--rounds", "1",
                         "--json")
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["p50_ms"] > 0


def test_an_unknown_tool_is_one_line(installed, tmp_path):
    done = shufflenas(installed, tmp_path, tmp_path / "home", "serch")
    assert done.returncode == 2 and done.stderr.startswith("error: shufflenas: unknown tool 'serch'")
    assert done.stderr.count("\n") == 1
