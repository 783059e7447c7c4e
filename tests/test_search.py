"""search.py end to end on the tiny synthetic experiment: artifacts, resume after an interruption at each step,
and every kind of bad input (one line on stderr, exit code 2, nothing lost)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import search
from latency_lut import LatencyTable, Settings, profile, validate
from search_space import Arch, SearchSpace

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic.yaml"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The synthetic experiment, cut to the bone so a whole run takes seconds."""
    folder = tmp_path_factory.mktemp("config")
    raw = yaml.safe_load(SYNTHETIC.read_text())
    raw["space"] = str(ROOT / "experiments" / "spaces" / "tiny.yaml")
    raw["data"]["synthetic_size"] = 256
    raw["supernet"].update(epochs=1)
    raw["retrain"].update(epochs=1)
    raw["evaluate"].update(bn_calibration_images=32)
    raw["search"].update(trials=3, top_k=1)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def lut(tmp_path_factory) -> Path:
    """A calibrated CPU table of the tiny space, shared by the runs of this module."""
    path = tmp_path_factory.mktemp("lut") / "tiny.json"
    space = SearchSpace.from_yaml(ROOT / "experiments" / "spaces" / "tiny.yaml")
    profile(space, path, "cpu", Settings(num_classes=10), progress=False)
    validate(path, space, n=6, calibrate_frac=0.5, progress=False)
    return path


@pytest.fixture(scope="module")
def bounds(lut) -> tuple[float, float]:
    table = LatencyTable.load(lut)
    space = SearchSpace.from_yaml(ROOT / "experiments" / "spaces" / "tiny.yaml")
    return table.min_latency(space), table.max_latency(space)


@pytest.fixture(scope="module")
def target(bounds) -> float:
    """Every arch meets it, with room for a busy machine: runs that measure for real do not depend on the noise.
    The latency promise itself is tested with a binding target and scripted measurements."""
    return round(3 * bounds[1], 3)


def run(args: list[str], capsys) -> tuple[int, str]:
    code = search.main(args)
    return code, capsys.readouterr().err


def base_args(config: Path, lut: Path, target: float, run_dir: Path) -> list[str]:
    return ["--config", str(config), "--target-ms", str(target), "--device", "cpu", "--lut", str(lut),
            "--run-dir", str(run_dir), "--threads", "1"]


def test_whole_run_produces_every_artifact(config, lut, target, tmp_path, capsys):
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert code == 0, err
    out = tmp_path / "run"
    for name in ("report.md", "pareto.png", "trials.csv", "run.json", "steps.json"):
        assert (out / name).stat().st_size > 0, name
    (winner,) = (out / "winners").iterdir()
    card = json.loads((winner / "model_card.json").read_text())
    arch = Arch.decode(card["arch"])
    assert card["measured_ms"] <= target and card["predicted_ms"] <= target
    assert "does not bind" in (out / "report.md").read_text()
    assert 0.0 <= card["test_accuracy"] <= 1.0 and card["fingerprint"]["device_kind"] == "cpu"
    assert card["onnx_max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    model = torch.export.load(winner / "model.pt2").module()
    session = ort.InferenceSession(str(winner / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x})[0], model(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-4)
    report = (out / "report.md").read_text()
    assert arch.encode() in report and f"{target:g} ms" in report
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("step", ["lut", "supernet", "search", "ship"])
def test_interrupted_at_each_step_resumes(config, lut, target, tmp_path, capsys, monkeypatch, step):
    """Kill (KeyboardInterrupt) inside a step, rerun the same command: it finishes, and nothing done is redone."""
    table = tmp_path / "lut.json"
    if step == "lut":
        table_data = json.loads(lut.read_text())
        table_data["entries"] = table_data["entries"][: len(table_data["entries"]) // 2]
        table_data["correction"] = None
        table.write_text(json.dumps(table_data))
    else:
        shutil.copy(lut, table)
    targets = {"lut": (search, "latency_table"), "supernet": (search, "train_or_load_supernets"),
               "search": (search, "make_searcher"), "ship": (search, "ship")}
    module, name = targets[step]
    real = getattr(module, name)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
    args = base_args(config, table, target, tmp_path / "run")
    code, err = run(args, capsys)
    assert code == 130 and "rerun the same command" in err
    monkeypatch.setattr(module, name, real)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.pt")}
    code, err = run(args, capsys)
    assert code == 0, err
    for p, mtime in before.items():  # checkpoints finished before the interruption were not rewritten
        assert p.stat().st_mtime_ns == mtime, p
    assert (tmp_path / "run" / "report.md").exists()
    steps = json.loads((tmp_path / "run" / "steps.json").read_text())
    assert {"lut", "supernet", "search", "ship"} <= set(steps)


def test_rerun_after_success_redoes_nothing(config, lut, target, tmp_path, capsys):
    args = base_args(config, lut, target, tmp_path / "run")
    assert run(args, capsys)[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.suffix in (".pt", ".onnx", ".pt2")}
    assert run(args, capsys)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(config, lut, tmp_path, capsys):
    args = base_args(config, lut, 5.0, tmp_path / "run")
    args[args.index("--device") + 1] = "cuda"
    _one_line_error(*run(args, capsys), "CUDA")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-3", "0", "nan"])
def test_bad_target(config, lut, tmp_path, capsys, value):
    _one_line_error(*run(base_args(config, lut, value, tmp_path / "run"), capsys), "--target-ms")


def test_unmeetable_target_names_the_fastest(config, lut, tmp_path, capsys):
    code, err = run(base_args(config, lut, 0.001, tmp_path / "run"), capsys)
    _one_line_error(code, err, "cannot be met: the fastest arch")
    assert not (tmp_path / "run" / "supernet").exists()  # failed before any training


def test_unknown_config_key(config, lut, tmp_path, capsys):
    raw = yaml.safe_load(config.read_text())
    raw["supernet"]["epochz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    _one_line_error(*run(base_args(bad, lut, 5.0, tmp_path / "run"), capsys), "supernet.epochz")


def test_missing_data(config, lut, tmp_path, capsys):
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"name": "fashion_mnist", "root": str(tmp_path / "nowhere")}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    _one_line_error(*run(base_args(bad, lut, 5.0, tmp_path / "run"), capsys), str(tmp_path / "nowhere"))


def test_lut_from_another_device(config, lut, tmp_path, capsys):
    data = json.loads(lut.read_text())
    data["fingerprint"]["device_name"] = "Some Other CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    _one_line_error(*run(base_args(config, other, 5.0, tmp_path / "run"), capsys), "Some Other CPU")
    assert json.loads(other.read_text()) == data  # the table was not touched


def test_run_dir_of_another_experiment(config, lut, target, tmp_path, capsys):
    args = base_args(config, lut, target, tmp_path / "run")
    assert run(args, capsys)[0] == 0
    other = base_args(config, lut, target, tmp_path / "run")
    other += ["--seed", "7"]
    _one_line_error(*run(other, capsys), "holds another experiment")
    assert (tmp_path / "run" / "report.md").exists()  # nothing lost


class ScriptedMeasure:
    """Stands in for the device: the first `over` archs measured come out 20% over the target, every time they are
    measured; the others as the table predicts."""

    def __init__(self, lut: Path, over: int, target: float) -> None:
        self.table = LatencyTable.load(lut)
        self.over = over
        self.target = target
        self.archs: list[str] = []  # distinct, in the order first measured

    def __call__(self, run, model, settings, repeats=search.REPEATS, purpose="ship"):
        if purpose == "calibrate":  # the calibration finds the table right
            return _measured(self.table.predict(model.arch))
        code = model.arch.encode()
        if code not in self.archs:
            self.archs.append(code)
        over = self.archs.index(code) < self.over
        value = 1.2 * self.target if over else self.table.predict(model.arch)
        return _measured(value)


def _measured(ms: float):
    return type("M", (), {"median_ms": ms, "p10_ms": ms, "p90_ms": ms})()


def test_latency_promise_skips_candidates_over_the_target(config, lut, bounds, tmp_path, capsys, monkeypatch):
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)  # binds: part of the space is over it
    fake = ScriptedMeasure(lut, over=1, target=target)
    monkeypatch.setattr(search, "measure", fake)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert code == 0, err
    ship = json.loads((tmp_path / "run" / "ship.json").read_text())
    first = fake.archs[0]
    assert ship["measured"][first]["median_ms"] > target and first not in ship["shipped"]
    (shipped,) = ship["shipped"].values()
    assert shipped["measured_ms"] <= target
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"`{first}`" in report.split("## The latency promise")[1]  # the rejected candidate is named


def test_search_is_rerun_with_a_margin_when_nothing_measures_within(config, lut, bounds, tmp_path, capsys,
                                                                      monkeypatch):
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)
    fake = ScriptedMeasure(lut, over=3, target=target)  # every candidate of the first round (3 trials, top_k 1) is over
    monkeypatch.setattr(search, "measure", fake)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert "searching again with the table's target at" in err
    assert (tmp_path / "run" / "trials-r1.csv").exists()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "search round 1: every candidate measured over" in report
    if code == 0:  # the second round found an arch the scripted device accepts
        ship = json.loads((tmp_path / "run" / "ship.json").read_text())
        assert all(s["measured_ms"] <= target for s in ship["shipped"].values())
    else:
        _one_line_error(code, err, "no candidate measured within")


def test_the_table_is_rescaled_by_what_the_device_measures_now(config, lut, bounds, tmp_path, capsys, monkeypatch):
    """Calibration archs measured (up to) 25% over their prediction: the search sees every prediction that much
    higher, and a resumed run reuses the stored ratio instead of measuring again."""
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)
    ratio = min(1.25, 1.0 + 0.5 * (target / low - 1.0))  # the fastest arch still meets the target after it
    table = LatencyTable.load(lut)
    calls = {"calibrate": 0}

    def fake(run_, model, settings, repeats=search.REPEATS, purpose="ship"):
        if purpose == "calibrate":
            calls["calibrate"] += 1
            return _measured(ratio * table.predict(model.arch))
        return _measured(0.5 * target)

    monkeypatch.setattr(search, "measure", fake)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert code == 0, err
    stored = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert calls["calibrate"] == len(stored["archs"]) == 3 and stored["ratio"] == pytest.approx(ratio)
    rows = list(csv.DictReader((tmp_path / "run" / "trials.csv").open()))
    for row in rows:
        expected = ratio * table.predict(Arch.decode(row["arch"]))
        assert float(row["predicted_ms"]) == pytest.approx(expected, rel=1e-6)
    assert f"{ratio:.3f}x their table prediction" in (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "run" / "report.md").unlink()
    assert run(base_args(config, lut, target, tmp_path / "run"), capsys)[0] == 0
    assert calls["calibrate"] == 3  # reused, not measured again


def test_a_device_too_slow_for_any_arch_now_says_so_and_keeps_the_supernet(config, lut, bounds, tmp_path, capsys,
                                                                            monkeypatch):
    """The device measures 10x the table now: no arch can meet the target as it measures. One line says so, nothing
    of the calibration is stored (a rerun measures again), and the trained supernet is kept."""
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)
    table = LatencyTable.load(lut)

    def fake(run_, model, settings, repeats=search.REPEATS, purpose="ship"):
        return _measured(10 * table.predict(model.arch) if purpose == "calibrate" else 0.5 * target)

    monkeypatch.setattr(search, "measure", fake)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    _one_line_error(code, err, "cannot be met as the device measures now")
    assert "at least 10.00x" in err
    assert not (tmp_path / "run" / "calibration.json").exists()
    assert (tmp_path / "run" / "supernet" / "supernet.pt").exists()


def test_a_measurement_over_the_target_is_taken_again_and_the_fastest_decides(config, lut, bounds, tmp_path,
                                                                               capsys, monkeypatch):
    """A busy phase: the first measurement of each model says 4% over the target, the second 3% under. The second
    decides, before retraining and after export alike, and the model ships."""
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)
    seen: list[int] = []

    def fake(run_, model, settings, repeats=search.REPEATS, purpose="ship"):
        if purpose == "calibrate":
            return _measured(LatencyTable.load(lut).predict(model.arch))
        seen.append(repeats)
        return _measured(target * (1.04 if repeats == search.REPEATS else 0.97))

    monkeypatch.setattr(search, "measure", fake)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert code == 0, err
    assert seen == [search.REPEATS, search.NEAR_REPEATS] * 2  # before retraining, and the exported model
    ship = json.loads((tmp_path / "run" / "ship.json").read_text())
    (shipped,) = ship["shipped"].values()
    assert shipped["measured_ms"] == pytest.approx(0.97 * target)
    assert shipped["measured_rounds"] == search.REPEATS + search.NEAR_REPEATS


def test_a_model_measured_over_the_target_every_time_is_not_shipped(config, lut, bounds, tmp_path, capsys,
                                                                     monkeypatch):
    """Over the target by 20% in every one of its VERDICT_TRIES measurements: rejected before any retraining."""
    low, high = bounds
    target = round(low + 0.7 * (high - low), 3)
    fake = ScriptedMeasure(lut, over=1, target=target)
    calls: list[str] = []

    def counting(run_, model, settings, repeats=search.REPEATS, purpose="ship"):
        if purpose == "ship":
            calls.append(model.arch.encode())
        return fake(run_, model, settings, repeats, purpose)

    monkeypatch.setattr(search, "measure", counting)
    code, err = run(base_args(config, lut, target, tmp_path / "run"), capsys)
    assert code == 0, err
    first = fake.archs[0]
    assert calls.count(first) == search.VERDICT_TRIES
    assert first not in json.loads((tmp_path / "run" / "ship.json").read_text())["shipped"]


@pytest.mark.parametrize("searcher", ["optuna", "ray"])
def test_supernet_replicas_score_candidates_by_their_mean(config, lut, target, tmp_path, capsys, searcher):
    """With supernet.replicas: 2 both searchers score a candidate by the mean over the two trained supernets."""
    if searcher == "ray":
        pytest.importorskip("ray")
    from experiments.checkpoints import load_supernet
    from experiments.config import load_experiment
    from experiments.data import load_splits
    from experiments.evaluate import Evaluator

    raw = yaml.safe_load(config.read_text())
    raw["supernet"]["replicas"] = 2
    raw["search"]["trials"] = 2
    replicated = tmp_path / "replicas.yaml"
    replicated.write_text(yaml.safe_dump(raw))
    args = base_args(replicated, lut, target, tmp_path / "run") + ["--searcher", searcher]
    code, err = run(args, capsys)
    assert code == 0, err
    folder = tmp_path / "run" / "supernet"
    supernets = [load_supernet(folder / "supernet.pt"), load_supernet(folder / "replica1" / "supernet.pt")]
    cfg = load_experiment(replicated)
    evaluator = Evaluator(supernets, load_splits(cfg.data, cfg.seed), cfg.evaluate, seed=cfg.seed)
    with (tmp_path / "run" / "trials.csv").open() as f:
        trials = [row for row in csv.DictReader(f) if row["accuracy"] not in ("", "nan")]
    assert trials
    for row in trials:
        assert float(row["accuracy"]) == pytest.approx(evaluator.evaluate(Arch.decode(row["arch"])), abs=1e-9)
    assert "mean of 2 supernet replicas" in (tmp_path / "run" / "report.md").read_text()


def test_ray_searcher_end_to_end_with_its_progress_line(config, lut, target, tmp_path, capsys):
    """search.py drives Ray Tune with the supernet; the progress bar must not stop Tune from pickling its state."""
    pytest.importorskip("ray")
    args = base_args(config, lut, target, tmp_path / "run") + ["--searcher", "ray"]
    code, err = run(args, capsys)
    assert code == 0, err
    assert "search (ray)" in err
    assert len((tmp_path / "run" / "trials.csv").read_text().splitlines()) == 1 + 3
    (winner,) = (tmp_path / "run" / "winners").iterdir()
    assert (winner / "model_card.json").exists()


def test_ray_asha_mode_trains_candidates_from_scratch_without_a_supernet(config, lut, target, tmp_path, capsys):
    pytest.importorskip("ray")
    args = base_args(config, lut, target, tmp_path / "run") + ["--searcher", "ray", "--ray-mode", "asha"]
    code, err = run(args, capsys)
    assert code == 0, err
    out = tmp_path / "run"
    assert not (out / "supernet").exists()
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows if r["accuracy"])
    (winner,) = (out / "winners").iterdir()
    assert (winner / "model.onnx").stat().st_size > 0
    assert "trained from scratch" in (out / "report.md").read_text()


def test_asha_needs_the_ray_searcher(config, lut, target, tmp_path, capsys):
    args = base_args(config, lut, target, tmp_path / "run") + ["--ray-mode", "asha"]
    _one_line_error(*run(args, capsys), "ray_mode asha needs --searcher ray")
