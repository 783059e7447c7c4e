"""The command lines: a whole synthetic pipeline, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from experiments import evaluate as evaluate_cli
from experiments import train as train_cli

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "experiments" / "synthetic.yaml"
TINY_SPACE = ROOT / "experiments" / "spaces" / "tiny.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def experiment(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "exp.yaml"
    data = yaml.safe_load(SYNTHETIC.read_text())
    data["space"] = str(TINY_SPACE)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))
    return path


def test_supernet_then_finetune_then_evaluate(tmp_path, capsys):
    config = experiment(tmp_path, supernet={"epochs": 1}, retrain={"epochs": 1})
    common = ["--config", str(config), "--no-progress"]
    assert train_cli.main(["supernet", *common, "--run-dir", str(tmp_path / "sn")]) == 0
    summary = json.loads((tmp_path / "sn" / "supernet.json").read_text())
    assert set(summary["evaluation"]) == {"largest", "smallest"}
    supernet = str(tmp_path / "sn" / "supernet.pt")
    args = ["retrain", *common, "--run-dir", str(tmp_path / "ft"), "--arch", "smallest", "--supernet", supernet]
    assert train_cli.main(args) == 0
    assert (tmp_path / "ft" / "model.pt").exists()
    assert evaluate_cli.main(["--config", str(config), "--supernet", supernet, "--arch", "largest"]) == 0
    out = capsys.readouterr().out
    assert "val" in out and "test" in out and "MFLOPs" in out


def test_supernet_replicas_train_and_evaluate_together(tmp_path, capsys):
    config = experiment(tmp_path, supernet={"epochs": 1, "replicas": 2})
    common = ["--config", str(config), "--no-progress"]
    assert train_cli.main(["supernet", *common, "--run-dir", str(tmp_path / "sn")]) == 0
    replicas = [str(tmp_path / "sn" / "supernet.pt"), str(tmp_path / "sn" / "replica1" / "supernet.pt")]
    capsys.readouterr()
    assert evaluate_cli.main(["--config", str(config), "--supernet", *replicas, "--arch", "largest"]) == 0
    both = float(capsys.readouterr().out.split()[0])
    alone = []
    for path in replicas:
        assert evaluate_cli.main(["--config", str(config), "--supernet", path, "--arch", "largest"]) == 0
        alone.append(float(capsys.readouterr().out.split()[0]))
    assert both == pytest.approx(sum(alone) / 2, abs=1e-4)  # printed to 4 decimals


def assert_one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_unknown_key_exits_2_naming_file_and_key(tmp_path, capsys):
    config = experiment(tmp_path, supernet={"epoch": 3})
    assert train_cli.main(["supernet", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert_one_line_error(capsys, str(config), "supernet.epoch")


def test_missing_data_exits_2(tmp_path, capsys):
    config = experiment(tmp_path, data={"name": "fashion_mnist", "root": str(tmp_path / "nowhere")})
    assert train_cli.main(["supernet", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    assert_one_line_error(capsys, "nowhere")


def test_bad_arch_and_changed_config_exit_2(tmp_path, capsys):
    config = experiment(tmp_path, retrain={"epochs": 1})
    base = ["retrain", "--config", str(config), "--no-progress", "--run-dir", str(tmp_path / "r")]
    assert train_cli.main([*base, "--arch", "s999_w1-k3r0.5_h1"]) == 2
    assert_one_line_error(capsys, "--arch")
    assert train_cli.main([*base, "--arch", "shufflenet_v2_x0_5"]) == 2  # not in the tiny space
    assert_one_line_error(capsys, "shufflenet_v2_x0_5")
    assert train_cli.main([*base, "--arch", "smallest"]) == 0
    capsys.readouterr()
    assert train_cli.main([*base, "--arch", "smallest", "--seed", "5"]) == 2
    assert_one_line_error(capsys, "different configuration", "seed: 0 -> 5")


def test_real_entry_point_exit_code_and_stderr(tmp_path):
    config = experiment(tmp_path, retrain={"momentum": "high"})
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "retrain", "--config", str(config), "--run-dir",
         str(tmp_path / "r"), "--arch", "largest"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "retrain.momentum" in proc.stderr and str(config) in proc.stderr
