from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latency_lut import LatencyTable, Settings
from latency_lut.__main__ import main
from search_space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = int(e.code)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_space_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "profile", "--space", tmp_path / "absent.yaml")
    assert_one_line_error(code, err, "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nstages: [\n")
    code, _, err = run_cli(capsys, "profile", "--space", broken)
    assert_one_line_error(code, err, "broken.yaml", "YAML")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: x\ninput: {size: 28, channels: 1}\n")
    code, _, err = run_cli(capsys, "validate", "--lut", tmp_path / "t.json", "--space", wrong)
    assert_one_line_error(code, err, "wrong.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_without_cuda(tiny_yaml: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--device", "cuda")
    assert_one_line_error(code, err, "CUDA is not available")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
        (["--dtype", "float16"], "float16 on cpu"),
        (["--dtype", "int8"], "invalid choice"),
        (["--runtime", "onnxruntime", "--dtype", "bfloat16"], "onnxruntime"),
        (["--threads", "0"], "must be at least 1"),
        (["--block-ms", "-1"], "block_s"),
    ],
)
def test_bad_profile_options(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                             fragment: str) -> None:
    code, _, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--out", tmp_path / "t.json", *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "t.json").exists()


def test_profile_show_validate(tiny_yaml: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lut = tmp_path / "t.json"
    code, out, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--num-classes", "10", "--out", lut,
                             "--rounds", "1", "--block-ms", "0", "--quiet")
    assert code == 0, err
    assert "31 entries" in out and len(LatencyTable.load(lut)) == 31
    code, out, err = run_cli(capsys, "show", "--lut", lut, "--space", tiny_yaml, "--arch",
                             "s8_w16-k5r0.5x2_w24-k3r0.375x2_h48")
    assert code == 0, err
    assert "31 of 31 ops measured" in out and "stage3.1" in out and "total" in out
    code, out, err = run_cli(capsys, "validate", "--lut", lut, "--space", tiny_yaml, "--n", "6",
                             "--calibrate-frac", "0.5", "--rounds", "1", "--block-ms", "0", "--quiet",
                             "--report-dir", tmp_path / "rep")
    assert code == 0, err
    assert "held_out" in out and "Kendall tau" in out
    assert (tmp_path / "rep" / "validate-t.json").is_file() and (tmp_path / "rep" / "validate-t.png").is_file()


def test_corrupt_and_mismatched_tables(tmp_path: Path, tiny_yaml: Path, tiny_space: SearchSpace, synthetic_table,
                                       capsys: pytest.CaptureFixture) -> None:
    lut = tmp_path / "t.json"
    table = synthetic_table(tiny_space, settings=Settings(num_classes=10))
    table.save(lut)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(lut.read_text()[:500])
    code, _, err = run_cli(capsys, "validate", "--lut", truncated, "--space", tiny_yaml)
    assert_one_line_error(code, err, "truncated.json", "corrupt or truncated")
    code, _, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--num-classes", "10", "--out", truncated)
    assert_one_line_error(code, err, "truncated.json")

    elsewhere = tmp_path / "elsewhere.json"
    table.fingerprint = dataclasses.replace(table.fingerprint, device_name="Another CPU", threads=4)
    table.save(elsewhere)
    code, _, err = run_cli(capsys, "validate", "--lut", elsewhere, "--space", tiny_yaml)
    # validate measures with the table's settings, so only the machine can differ
    assert_one_line_error(code, err, "elsewhere.json", "device_name: table 'Another CPU', now")
    code, _, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--num-classes", "10", "--threads", "4",
                           "--out", elsewhere)
    assert_one_line_error(code, err, "device_name", "--allow-mismatch")
    code, _, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--num-classes", "10", "--threads", "2",
                           "--out", elsewhere)
    assert_one_line_error(code, err, "device_name", "threads: table 4, now 2")


def test_real_exit_code_without_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["profile", "--space", str(tmp_path / "absent.yaml")],
                 ["profile", "--space", str(ROOT / "experiments/spaces/fashion_mnist.yaml"), "--device", "cuda:7"]):
        done = subprocess.run([sys.executable, "-m", "latency_lut", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """model.onnx and model.pt2 of a small fashion-space network, exported as search.py ships them, and an ONNX
    file fixed at batch 1."""
    from experiments.export import export_all
    from latency_lut.timing import export_onnx

    space = SearchSpace.from_yaml(Path(__file__).resolve().parents[2] / "experiments" / "spaces" / "fashion_mnist.yaml")
    model = space.build(space.smallest(), num_classes=10)
    folder = tmp_path_factory.mktemp("shipped")
    export_all(model, folder)
    (folder / "fixed.onnx").write_bytes(export_onnx(model, torch.randn(1, 1, 28, 28)))
    return folder


@pytest.mark.parametrize(("name", "runtime"), [("model.onnx", "onnxruntime"), ("model.pt2", "eager")])
def test_measure_each_shipped_file(shipped: Path, capsys: pytest.CaptureFixture, name: str, runtime: str) -> None:
    assert main(["measure", str(shipped / name), "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == runtime and result["calls"] >= 2 * 20
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["fingerprint"]["device_kind"] == "cpu" and result["fingerprint"]["runtime"] == runtime
    assert main(["measure", str(shipped / name), "--rounds", "1", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "batch 3" in out and "p99" in out


@pytest.mark.parametrize(("args", "needle"), [
    (["absent.onnx"], "no such model file"),
    (["model.pt2", "--runtime", "onnxruntime"], "runs in eager, not in runtime onnxruntime"),
    (["model.onnx", "--runtime", "eager"], "runs in onnxruntime, not in runtime eager"),
    (["fixed.onnx", "--batch-size", "4"], "takes batch 1, not --batch-size 4"),
    (["arch.yaml"], "not a shipped model file"),
])
def test_measure_bad_input(shipped: Path, capsys: pytest.CaptureFixture, args: list[str], needle: str) -> None:
    assert main(["measure", str(shipped / args[0]), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_measure_without_onnxruntime(shipped: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["measure", str(shipped / "model.onnx")]) == 2
    assert "onnxruntime is not installed" in capsys.readouterr().err
