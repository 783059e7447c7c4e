from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import latency_lut.profiler as profile_module
from latency_lut import (
    Budget,
    FingerprintMismatch,
    LatencyTable,
    LutError,
    Settings,
    enumerate_ops,
    measure_model,
    measure_model_fresh,
    profile,
    validate,
)
from latency_lut.ops import arch_ops, call_op
from latency_lut.timing import export_onnx
from latency_lut.validation import sample_archs
from search_space import Arch, SearchSpace

ROOT = Path(__file__).resolve().parents[2]


def _check_complete(table: LatencyTable, space: SearchSpace) -> None:
    assert set(table.entries) == set(enumerate_ops(space))
    for op, e in table.entries.items():
        assert math.isfinite(e.median_us) and e.n >= 1, op
    assert table.info["complete"] is True and space.name in table.info["spaces"]


@pytest.mark.parametrize(("runtime", "method"), [("eager", "insitu"), ("eager", "isolated"), ("onnxruntime", None)])
def test_profile_measures_every_op(tmp_path: Path, tiny_space: SearchSpace, tiny_budget: Budget, runtime: str,
                                   method: str | None) -> None:
    out = tmp_path / "tiny.json"
    settings = Settings(runtime=runtime, num_classes=10)
    table = profile(tiny_space, out, "cpu", settings, method=method, budget=tiny_budget, progress=False)
    _check_complete(table, tiny_space)
    assert table.info["method"] == (method or "isolated")
    loaded = LatencyTable.load(out, expect=settings)
    assert dict(loaded.entries) == dict(table.entries)
    arch = tiny_space.largest()
    assert loaded.predict(arch) > loaded.predict(tiny_space.smallest()) * 0.5 > 0


def test_interrupted_profile_resumes_without_redoing_or_losing(tmp_path: Path, tiny_space: SearchSpace,
                                                               tiny_budget: Budget,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[set] = []
    calls: list[int] = []
    stop_after: list[int | None] = [2]
    real_measure, real_call = profile_module.measure_probes, profile_module._measure_call

    def spy_measure(space, probes, todo, *args, **kwargs):
        if stop_after[0] is not None and len(measured) == stop_after[0]:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the third group
        found = real_measure(space, probes, todo, *args, **kwargs)
        measured.append(set(found))
        return found

    def spy_call(*args, **kwargs):
        calls.append(1)
        return real_call(*args, **kwargs)

    monkeypatch.setattr(profile_module, "measure_probes", spy_measure)
    monkeypatch.setattr(profile_module, "_measure_call", spy_call)
    out = tmp_path / "tiny.json"
    # save_every_s is long: only the save on the way out can have kept the entries.
    kwargs = dict(budget=tiny_budget, group=1, progress=False, save_every_s=3600.0)
    with pytest.raises(KeyboardInterrupt):
        profile(tiny_space, out, "cpu", Settings(num_classes=10), **kwargs)
    first = LatencyTable.load(out)
    first_ops = set().union(*measured)
    assert len(measured) == 2 and calls == [1]
    assert set(first.entries) == first_ops | {call_op(tiny_space.geometry)}
    assert first.info["complete"] is False
    assert 0 < len(first_ops) < len(enumerate_ops(tiny_space)) - 1

    measured.clear()
    stop_after[0] = None
    table = profile(tiny_space, out, "cpu", Settings(num_classes=10), **kwargs)
    second_ops = set().union(*measured)
    assert calls == [1]  # the call overhead was not measured again
    assert second_ops.isdisjoint(first.entries)  # nothing measured twice
    _check_complete(LatencyTable.load(out), tiny_space)
    for op, entry in first.entries.items():
        assert table.entries[op] == entry  # nothing lost or replaced

    measured.clear()
    profile(tiny_space, out, "cpu", Settings(num_classes=10), **kwargs)  # a complete table: nothing to do
    assert measured == [] and calls == [1]


def test_profile_saves_periodically(tmp_path: Path, tiny_space: SearchSpace, tiny_budget: Budget,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = []
    real_save = LatencyTable.save

    def spy_save(self, path):
        sizes.append(len(self))
        real_save(self, path)

    monkeypatch.setattr(LatencyTable, "save", spy_save)
    profile(tiny_space, tmp_path / "t.json", "cpu", Settings(num_classes=10), budget=tiny_budget, group=1,
            progress=False, save_every_s=0.0)
    assert len(sizes) > 3 and sizes == sorted(sizes)


def test_profile_refuses_a_table_of_other_settings_or_geometry(tmp_path: Path, tiny_space: SearchSpace,
                                                               fashion_space: SearchSpace,
                                                               tiny_budget: Budget) -> None:
    out = tmp_path / "t.json"
    profile(tiny_space, out, "cpu", Settings(num_classes=10), budget=tiny_budget, progress=False)
    with pytest.raises(FingerprintMismatch, match="threads: table 1, now 2"):
        profile(tiny_space, out, "cpu", Settings(num_classes=10, threads=2), budget=tiny_budget, progress=False)
    with pytest.raises(LutError, match="geometry|input_size"):
        profile(fashion_space, out, "cpu", Settings(num_classes=10), budget=tiny_budget, progress=False,
                allow_mismatch=True)
    with pytest.raises(LutError, match="method"):
        profile(tiny_space, out, "cpu", Settings(num_classes=10), method="isolated", budget=tiny_budget,
                progress=False)


def test_bad_settings_are_refused(tmp_path: Path, tiny_space: SearchSpace) -> None:
    out = tmp_path / "t.json"
    with pytest.raises(LutError, match="float16 on cpu"):
        profile(tiny_space, out, "cpu", Settings(dtype="float16"), progress=False)
    with pytest.raises(LutError, match="onnxruntime"):
        profile(tiny_space, out, "cpu", Settings(runtime="onnxruntime", dtype="bfloat16"), progress=False)
    with pytest.raises(LutError, match="insitu"):
        profile(tiny_space, out, "cpu", Settings(runtime="onnxruntime"), method="insitu", progress=False)
    with pytest.raises(LutError, match="expected cpu, cuda"):
        profile(tiny_space, out, "gpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(LutError, match="CUDA is not available"):
            profile(tiny_space, out, "cuda:0", progress=False)
    assert not out.exists()


def test_measure_model_eager_and_onnxruntime(tmp_path: Path, tiny_space: SearchSpace) -> None:
    torch.manual_seed(0)
    net = tiny_space.build(tiny_space.largest(), num_classes=10)
    budget = Budget(rounds=3, block_s=0.0, min_calls=4, max_calls=4, warmup=1)
    eager = measure_model(net, (1, 16, 16), "cpu", Settings(num_classes=10), repeats=3, budget=budget)
    assert len(eager.samples_ms) == 12 and len(eager.round_medians_ms) == 3
    assert eager.best_round_ms == min(eager.round_medians_ms) and eager.calls == 12
    low, high = min(eager.samples_ms), max(eager.samples_ms)
    assert low <= eager.p10_ms <= eager.p50_ms <= eager.p90_ms <= eager.p99_ms <= high
    assert eager.p50_ms == pytest.approx(float(np.median(eager.samples_ms))) and eager.noise >= 0
    assert eager.value("p90") == eager.p90_ms
    with pytest.raises(LutError, match="statistic"):
        eager.value("p75")

    ort_settings = Settings(runtime="onnxruntime", num_classes=10)
    from_module = measure_model(net, (2, 1, 16, 16), "cpu", dataclasses.replace(ort_settings, batch_size=2),
                                repeats=2, budget=budget)
    assert len(from_module.samples_ms) == 8
    path = tmp_path / "net.onnx"
    path.write_bytes(export_onnx(net, torch.randn(1, 1, 16, 16)))
    from_file = measure_model(path, (1, 16, 16), "cpu", ort_settings, repeats=2, budget=budget)
    assert from_file.p50_ms > 0
    with pytest.raises(LutError, match="no such ONNX file"):
        measure_model(tmp_path / "absent.onnx", (1, 16, 16), "cpu", ort_settings)
    with pytest.raises(LutError, match="input shape"):
        measure_model(net, (3, 1, 16, 16), "cpu", Settings())


class _NotIn(torch.nn.Module):
    """Refuses to run in the process that made it."""

    def __init__(self) -> None:
        super().__init__()
        self.maker = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() == self.maker:
            raise RuntimeError("ran in the process that made it")
        return x + 1


def test_measure_model_fresh_times_in_another_process(tiny_space: SearchSpace) -> None:
    budget = Budget(rounds=3, block_s=0.0, min_calls=4, max_calls=4, warmup=1)
    settings = Settings(num_classes=10)
    fresh = measure_model_fresh(_NotIn(), (1, 4, 4), "cpu", settings, repeats=3, budget=budget)
    assert len(fresh.samples_ms) == 12 and fresh.best_round_ms == min(fresh.round_medians_ms) > 0
    with pytest.raises(RuntimeError, match="ran in the process that made it"):
        measure_model(_NotIn(), (1, 4, 4), "cpu", settings, repeats=1, budget=budget)
    net = tiny_space.build(tiny_space.largest(), num_classes=10)
    assert measure_model_fresh(net, (1, 16, 16), "cpu", settings, repeats=2, budget=budget).p50_ms > 0
    with pytest.raises(LutError, match="input shape"):  # the child's errors are raised here
        measure_model_fresh(net, (3, 1, 16, 16), "cpu", settings)


def test_validate_fits_and_stores_a_correction(tmp_path: Path, tiny_space: SearchSpace, tiny_budget: Budget) -> None:
    out = tmp_path / "t.json"
    profile(tiny_space, out, "cpu", Settings(num_classes=10), budget=tiny_budget, progress=False)
    budget = Budget(rounds=2, block_s=0.0, min_calls=2, max_calls=2, warmup=1)
    report = validate(out, tiny_space, n=6, seed=1, calibrate_frac=0.5, report_dir=tmp_path / "report",
                      budget=budget, progress=False)
    assert Path(report["report"]).is_file() and Path(report["plot"]).stat().st_size > 1000
    saved = json.loads(Path(report["report"]).read_text())
    assert saved["held_out"]["n"] == 3 and saved["calibration"]["n"] == 3
    assert {r["role"] for r in saved["archs"]} == {"calibrate", "held_out"}
    table = LatencyTable.load(out)
    assert table.correction.fitted_on == 3 and table.correction.space == "tiny"
    for row in saved["archs"]:
        assert table.predict(Arch.decode(row["arch"])) == pytest.approx(row["predicted_ms"], rel=1e-9)


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path: Path) -> None:
    out = tmp_path / "fm.json"
    command = [sys.executable, "-m", "latency_lut", "profile", "--space", str(ROOT / "experiments/spaces/"
               "fashion_mnist.yaml"), "--num-classes", "10", "--out", str(out), "--quiet", "--rounds", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not out.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    first = LatencyTable.load(out)
    assert 0 < len(first) < 483 and first.info["complete"] is False
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    final = LatencyTable.load(out)
    assert len(final) == 483 and final.info["complete"] is True
    for op, entry in first.entries.items():
        assert final.entries[op] == entry


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("dtype", "memory_format"), [("float32", "contiguous"), ("float16", "channels_last")])
def test_cuda_profile_and_measure(tmp_path: Path, tiny_space: SearchSpace, tiny_budget: Budget, dtype: str,
                                  memory_format: str) -> None:
    settings = Settings(dtype=dtype, memory_format=memory_format, num_classes=10)
    table = profile(tiny_space, tmp_path / "t.json", "cuda", settings, budget=tiny_budget, progress=False)
    _check_complete(table, tiny_space)
    fp = table.fingerprint
    assert fp.device_kind == "cuda" and fp.compute_capability and fp.cuda_version and fp.dtype == dtype
    net = tiny_space.build(tiny_space.largest(), num_classes=10)
    m = measure_model(net, (1, 16, 16), "cuda:0", settings, repeats=2,
                      budget=Budget(rounds=2, block_s=0.0, min_calls=3, max_calls=3, warmup=2))
    assert len(m.samples_ms) == 6 and m.p50_ms > 0
    assert next(net.parameters()).dtype == getattr(torch, dtype)


def test_fit_correction_recovers_scale_and_overhead_and_bounds_a_noisy_fit() -> None:
    from latency_lut.validation import fit_correction

    raw = np.array([100.0, 200.0, 400.0, 800.0])
    scale, overhead, _ = fit_correction(raw, 1.3 * raw + 40.0)
    assert scale == pytest.approx(1.3, rel=1e-3) and overhead == pytest.approx(40.0, rel=1e-2)
    # Three close archs measured on a busy machine: a free fit says 10x the op sum minus 900 us, which predicts a
    # negative time for anything below 90 us of ops. The overhead stays above minus half the fastest measurement.
    scale, overhead, _ = fit_correction(np.array([100.0, 110.0, 120.0]), np.array([100.0, 200.0, 300.0]))
    assert overhead >= -50.0 - 1e-6
    # The other way round: the larger archs measured faster, and a free fit is flat (scale near 0, the overhead
    # explaining everything), which calls every arch equally fast. The overhead stays under half the fastest.
    scale, overhead, _ = fit_correction(np.array([100.0, 200.0, 300.0]), np.array([300.0, 290.0, 280.0]))
    assert overhead <= 140.0 + 1e-6 and scale * 100.0 + overhead > 0.5 * 280.0


def test_op_factors_learn_what_each_op_costs_inside_networks(fashion_space: SearchSpace, synthetic_table) -> None:
    from latency_lut.validation import MIN_OPS_FIT, fit

    table = synthetic_table(fashion_space)
    rng = np.random.default_rng(0)
    # In a network each op costs its entry times its own factor (0.6 to 1.6), then the line; 1% noise on top.
    inside = {op: float(rng.uniform(0.6, 1.6)) for op in table.entries}
    archs = sample_archs(fashion_space, 400, rng)

    def measured(arch: Arch) -> float:
        ops = arch_ops(arch, fashion_space.geometry)
        return (1.1 * sum(table.entries[op].median_us * inside[op] for op in ops) + 50.0) * rng.normal(1.0, 0.01)

    measured_us = np.array([measured(a) for a in archs])
    calibrate, held = archs[:300], archs[300:]
    within = {}
    for how in ("linear", "ops"):
        correction = fit(table, calibrate, measured_us[:300], how)
        fitted = LatencyTable(table.fingerprint, table.geometry, table.entries, correction)
        error = np.abs(fitted.predict_many(held) * 1e3 / measured_us[300:] - 1)
        within[how] = float(np.mean(error <= 0.05))
        assert bool(correction.op_factors) == (how == "ops") and (correction.ridge > 0) == (how == "ops")
    assert within["ops"] >= 0.9 and within["linear"] <= 0.75, within
    # Too few archs to tell ops apart: the line alone.
    few = fit(table, calibrate[:MIN_OPS_FIT - 1], measured_us[:MIN_OPS_FIT - 1], "ops")
    assert not few.op_factors and few.fitted_on == MIN_OPS_FIT - 1
    with pytest.raises(LutError, match="fit"):
        fit(table, calibrate, measured_us[:300], "cubic")
