"""The batch-1 GPU runtimes (cudagraph, ort-cuda, ort-tensorrt): refused in one line where they cannot run, and,
on a CUDA machine (tests marked gpu), profiled, validated and measured on their shipped files for real."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from latency_lut import (
    Budget,
    LatencyTable,
    LutError,
    Settings,
    arch_ops,
    enumerate_ops,
    measure_file,
    measure_model,
    profile,
)
from latency_lut.__main__ import main
from latency_lut.fingerprint import CUDA_RUNTIMES, RUNTIMES, SHIPPED_FILES, check_settings, is_ort
from latency_lut.ops import call_op
from latency_lut.profiler import default_method
from latency_lut.timing import export_onnx, ort_session, runtime_of_file
from search_space import SearchSpace

ROOT = Path(__file__).resolve().parents[2]
FASHION = ROOT / "experiments" / "spaces" / "fashion_mnist.yaml"
CUDA = torch.cuda.is_available()


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def unread(tmp_path_factory) -> Path:
    """model.pt2 and model.onnx that are not models: a runtime that cannot run here is refused before the file is
    read (reading a program takes seconds)."""
    folder = tmp_path_factory.mktemp("unread")
    for name in ("model.pt2", "model.onnx"):
        (folder / name).write_bytes(b"not read")
    return folder


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """model.pt2 of the fashion space's smallest network as search.py ships it, and its model.onnx (the fast
    exporter: the file is the same graph, and the tests here check where it runs, not how it was made)."""
    from experiments.export import export_program

    space = SearchSpace.from_yaml(FASHION)
    folder = tmp_path_factory.mktemp("shipped")
    model = space.build(space.smallest(), num_classes=10).eval()
    export_program(model, folder / "model.pt2")
    (folder / "model.onnx").write_bytes(export_onnx(model, torch.randn(1, 1, 28, 28)))
    return folder


# ---- what each runtime is ----------------------------------------------------------------------------------------


def test_every_runtime_ships_a_file_and_the_gpu_ones_are_measured_op_by_op() -> None:
    assert set(SHIPPED_FILES) == set(RUNTIMES)
    assert SHIPPED_FILES["cudagraph"] == "model.pt2"
    assert SHIPPED_FILES["ort-cuda"] == SHIPPED_FILES["ort-tensorrt"] == "model.onnx"
    for runtime in RUNTIMES:
        assert default_method(Settings(runtime=runtime)) == ("insitu" if runtime == "eager" else "isolated")


def test_a_files_runtime_follows_the_device() -> None:
    assert runtime_of_file("w/model.onnx") == "onnxruntime" and runtime_of_file("w/model.pt2") == "eager"
    assert runtime_of_file("w/model.onnx", "cuda:0") == "ort-cuda" and runtime_of_file("w/model.pt2", "cuda") == "eager"


# ---- refused where they cannot run (this runs everywhere) --------------------------------------------------------


@pytest.mark.parametrize("runtime", CUDA_RUNTIMES)
def test_a_gpu_runtime_on_the_cpu_is_one_line(tiny_yaml: Path, tmp_path: Path, capsys, runtime: str) -> None:
    code, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--runtime", runtime, "--out", tmp_path / "t.json")
    one_line_error(code, err, f"runtime {runtime} runs on a CUDA device only, not on cpu")
    assert not (tmp_path / "t.json").exists()


@pytest.mark.skipif(CUDA, reason="checks the message where CUDA is absent")
@pytest.mark.parametrize("runtime", CUDA_RUNTIMES)
def test_a_gpu_runtime_without_cuda_is_one_line(tiny_yaml: Path, tmp_path: Path, capsys, runtime: str) -> None:
    code, err = run_cli(capsys, "profile", "--space", tiny_yaml, "--runtime", runtime, "--device", "cuda",
                        "--out", tmp_path / "t.json")
    one_line_error(code, err, "CUDA is not available")


@pytest.mark.parametrize(("args", "needle"), [
    (["model.pt2", "--runtime", "cudagraph"], "runtime cudagraph runs on a CUDA device only"),
    (["model.onnx", "--runtime", "ort-cuda"], "runtime ort-cuda runs on a CUDA device only"),
    (["model.onnx", "--runtime", "cudagraph"], "runs in onnxruntime, not in runtime cudagraph"),
    (["model.pt2", "--runtime", "ort-tensorrt"], "runs in eager, not in runtime ort-tensorrt"),
])
def test_measure_refuses_a_runtime_that_cannot_run_the_file_here(unread: Path, capsys, args: list[str],
                                                                  needle: str) -> None:
    code, err = run_cli(capsys, "measure", unread / args[0], *args[1:])
    one_line_error(code, err, needle)


@pytest.mark.skipif(CUDA, reason="checks the message where CUDA is absent")
def test_measure_on_cuda_without_cuda_is_one_line(unread: Path, capsys) -> None:
    code, err = run_cli(capsys, "measure", unread / "model.pt2", "--device", "cuda", "--runtime", "cudagraph")
    one_line_error(code, err, "CUDA is not available")


@pytest.mark.parametrize("runtime", ["ort-cuda", "ort-tensorrt"])
def test_onnxruntime_without_the_runtimes_provider_is_one_line(runtime: str) -> None:
    """On a CUDA device with the CPU-only onnxruntime (as here), the runtime says what to install."""
    from latency_lut.fingerprint import ORT_PROVIDERS

    if ORT_PROVIDERS[runtime] in _ort_providers():
        pytest.skip(f"this onnxruntime has {ORT_PROVIDERS[runtime]}")
    with pytest.raises(LutError, match=f"runtime {runtime} needs ONNX Runtime's {ORT_PROVIDERS[runtime]}.*"
                                       r"onnxruntime-gpu"):
        check_settings(torch.device("cuda", 0), Settings(runtime=runtime))


@pytest.mark.parametrize("runtime", ["ort-cuda", "ort-tensorrt"])
def test_onnxruntime_gpu_runtimes_take_float32_contiguous_only(runtime: str) -> None:
    with pytest.raises(LutError, match=f"runtime {runtime}: dtype bfloat16"):
        check_settings(torch.device("cuda", 0), Settings(runtime=runtime, dtype="bfloat16"))
    with pytest.raises(LutError, match="channels_last"):
        check_settings(torch.device("cuda", 0), Settings(runtime=runtime, memory_format="channels_last"))


def test_cudagraph_takes_every_cuda_dtype_and_channels_last() -> None:
    for dtype in ("float32", "float16", "bfloat16"):
        check_settings(torch.device("cuda", 0), Settings(runtime="cudagraph", dtype=dtype,
                                                         memory_format="channels_last"))


def test_a_provider_that_does_not_start_is_refused_not_silently_replaced() -> None:
    """ONNX Runtime falls back to the CPU when the CUDA provider is missing or fails to load; a table of those times
    would say nothing about the GPU, so the session is refused."""
    if "CUDAExecutionProvider" in _ort_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    model = export_onnx(torch.nn.Conv2d(1, 4, 3), torch.randn(1, 1, 8, 8))
    with pytest.raises(LutError, match="did not start CUDAExecutionProvider.*CPUExecutionProvider"):
        ort_session(model, 1, "ort-cuda")


@pytest.mark.parametrize("runtime", CUDA_RUNTIMES)
def test_search_refuses_a_gpu_runtime_on_the_cpu_before_any_work(tmp_path: Path, capsys, runtime: str) -> None:
    import search

    code = search.main(["--target-ms", "5", "--device", "cpu", "--runtime", runtime, "--config",
                        str(ROOT / "experiments" / "synthetic.yaml"), "--run-dir", str(tmp_path / "run")])
    one_line_error(code, capsys.readouterr().err, f"--runtime {runtime} runs on a cuda device only")
    assert not (tmp_path / "run").exists()


def test_search_names_the_gpu_extra_when_onnxruntime_is_missing(tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    import search

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=r"runtime ort-cuda: onnxruntime is not installed.*\.\[gpu\]"):
        search._check_runtime_installed("ort-cuda")


def test_the_experiment_file_accepts_every_runtime(tmp_path: Path) -> None:
    import dataclasses

    from experiments.config import load_experiment

    cfg = load_experiment(ROOT / "experiments" / "synthetic.yaml", "quick")
    for runtime in RUNTIMES:
        assert dataclasses.replace(cfg.latency, runtime=runtime).runtime == runtime
    with pytest.raises(ValueError, match="latency.runtime: 'tensorrt' is not one of"):
        dataclasses.replace(cfg.latency, runtime="tensorrt")


# ---- on a GPU: the real paths ------------------------------------------------------------------------------------

GPU_BUDGET = Budget(rounds=2, block_s=0.0, min_calls=3, max_calls=3, warmup=2)
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _gpu_runtimes() -> list:
    out = [pytest.param("cudagraph", marks=gpu)]
    for runtime, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "TensorrtExecutionProvider")):
        skip = pytest.mark.skipif(provider not in _ort_providers(), reason=f"needs onnxruntime-gpu with {provider}")
        out.append(pytest.param(runtime, marks=[*gpu, skip]))
    return out


@pytest.mark.parametrize("runtime", _gpu_runtimes())
def test_gpu_runtime_profiles_isolated_ops_and_its_per_run_cost(tmp_path: Path, tiny_space: SearchSpace,
                                                                tiny_budget: Budget, runtime: str) -> None:
    settings = Settings(runtime=runtime, num_classes=10)
    table = profile(tiny_space, tmp_path / "t.json", "cuda", settings, budget=tiny_budget, progress=False)
    assert set(table.entries) == set(enumerate_ops(tiny_space)) and table.info["complete"] is True
    assert table.info["method"] == "isolated" and table.fingerprint.runtime == runtime
    assert table.fingerprint.device_kind == "cuda"
    assert (table.fingerprint.runtime_version != "") == is_ort(runtime)
    for op, e in table.entries.items():
        assert math.isfinite(e.median_us) and e.median_us >= 0, op
    assert table.entries[call_op(tiny_space.geometry)].median_us > 0  # one session run or graph replay: not free
    arch = tiny_space.largest()
    ops = arch_ops(arch, tiny_space.geometry)  # the call op once, the arch's ops with the per-run cost taken off
    assert table.predict_many([arch], corrected=False)[0] == pytest.approx(
        sum(table.entries[op].median_us for op in ops) / 1e3)
    m = measure_model(tiny_space.build(arch, 10), (1, 16, 16), "cuda", settings, repeats=2, budget=GPU_BUDGET)
    assert len(m.samples_ms) == 6 and m.p50_ms > 0
    assert LatencyTable.load(tmp_path / "t.json").predict(arch) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "memory_format"), [("float32", "contiguous"), ("bfloat16", "channels_last")])
def test_a_captured_graph_computes_what_the_module_computes(dtype: str, memory_format: str) -> None:
    from latency_lut.timing import CudaGraphRunner

    space = SearchSpace.from_yaml(FASHION)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    net = space.build(space.reference("shufflenet_v2_x0_5"), 10).eval().to("cuda", getattr(torch, dtype),
                                                                             memory_format=fmt)
    x = torch.randn(1, 1, 28, 28, device="cuda", dtype=getattr(torch, dtype)).contiguous(memory_format=fmt)
    runner = CudaGraphRunner(net, x)
    runner.graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = net(x)
    assert torch.allclose(runner.y.float(), expected.float(), atol=1e-2 if dtype == "bfloat16" else 1e-5)
    times = runner.time(5)
    assert times.shape == (5,) and np.all(times > 0)


@pytest.mark.parametrize("runtime", _gpu_runtimes())
def test_gpu_runtime_measures_its_shipped_file(shipped: Path, capsys, runtime: str) -> None:
    settings = Settings(runtime=runtime, num_classes=10)
    path = shipped / SHIPPED_FILES[runtime]
    m = measure_file(path, "cuda", settings, GPU_BUDGET)
    assert m.calls == 6 and 0 < m.p50_ms <= m.p99_ms
    assert main(["measure", str(path), "--device", "cuda", "--runtime", runtime, "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["runtime"] == runtime and result["fingerprint"]["device_kind"] == "cuda"
    assert result["fingerprint"]["runtime"] == runtime and result["p50_ms"] > 0
