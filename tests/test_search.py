"""search.py end to end on the tiny synthetic experiment: artifacts, the latency promise on the shipped files (real
measurements and scripted ones), budgets relative to a reference and families of budgets, shared supernets,
resumption after an interruption inside each step, and every kind of bad input (one line, exit code 2)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

import search
from latency_lut import LatencyTable, MeasuredArchs, Settings, measure_file, profile, validate
from latency_lut.timing import Budget, Measurement
from search_space import Arch, SearchSpace
from tests.tiny_job import TINY, tiny_job_config, tiny_table

# Measurements of a few hundred milliseconds: the tests check what is measured and decided, not how precisely.
QUICK = Budget(rounds=2, block_s=0.01, min_calls=3, max_calls=20, warmup=2)


@pytest.fixture(autouse=True)
def quick_measurements(monkeypatch):
    monkeypatch.setattr(search, "MEASURE_BUDGET", QUICK)


@pytest.fixture(autouse=True)
def measurements_of_this_test(monkeypatch, tmp_path):
    """Each test's runs keep their whole-arch measurements apart from other tests' (a budget relative to a reference
    measured in a quiet moment of another test would not bind alike under this test's load); runs within a test
    share them, as runs on one machine do."""
    beside = tmp_path / "measured" / "table.json"
    monkeypatch.setattr(search, "measured_archs",
                        lambda run_, space, settings: MeasuredArchs(beside, search.machine(run_, settings)))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The synthetic experiment, cut to the bone so a whole run takes seconds."""
    return tiny_job_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def lut(tmp_path_factory) -> Path:
    """A calibrated ONNX Runtime table of the tiny space (the default runtime on a CPU), shared by this module."""
    return tiny_table(tmp_path_factory.mktemp("lut"), "onnxruntime")


@pytest.fixture(scope="module")
def lut_eager(tmp_path_factory) -> Path:
    return tiny_table(tmp_path_factory.mktemp("lut"), "eager")


@pytest.fixture(scope="module")
def bounds(lut) -> tuple[float, float]:
    table = LatencyTable.load(lut)
    space = SearchSpace.from_yaml(TINY)
    return table.min_latency(space), table.max_latency(space)


@pytest.fixture(scope="module")
def loose(bounds) -> float:
    """Every arch meets it with room for a busy machine: runs about the artifacts, not about the promise."""
    return round(3 * bounds[1], 3)


@pytest.fixture(scope="module")
def binding(bounds) -> float:
    """Part of the space is over it (by the table)."""
    low, high = bounds
    return round(low + 0.7 * (high - low), 4)


def run(args: list[str], capsys) -> tuple[int, str]:
    code = search.main(args)
    return code, capsys.readouterr().err


def base_args(config: Path, lut: Path, target, run_dir: Path) -> list[str]:
    return ["--config", str(config), "--target-ms", str(target), "--device", "cpu", "--lut", str(lut),
            "--run-dir", str(run_dir), "--threads", "1"]


def winner_cards(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "winners").rglob("model_card.json"))
            if ".staging" not in p.parts]


def test_whole_run_produces_every_artifact(config, lut, loose, tmp_path, capsys):
    code, err = run(base_args(config, lut, loose, tmp_path / "run"), capsys)
    assert code == 0, err
    out = tmp_path / "run"
    for name in ("report.md", "pareto.png", "trials.csv", "run.json", "steps.json", "ship.json"):
        assert (out / name).stat().st_size > 0, name
    (winner,) = [p for p in (out / "winners").iterdir()]
    card = json.loads((winner / "model_card.json").read_text())
    arch = Arch.decode(card["arch"])
    assert card["runtime"] == "onnxruntime" and card["shipped_file"] == "model.onnx" and card["statistic"] == "p50"
    m = card["measured"]
    assert m["ms"] == m["p50_ms"] <= loose and m["p50_ms"] <= m["p90_ms"] <= m["p99_ms"] and m["calls"] > 0
    assert m["machine"]["device_kind"] == "cpu" and m["machine"]["runtime"] == "onnxruntime"
    assert 0.0 <= card["test_accuracy"] <= 1.0 and card["onnx_max_abs_diff"] <= 1e-4
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    model = torch.export.load(winner / "model.pt2").module()
    session = ort.InferenceSession(str(winner / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x})[0], model(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-4)
    report = (out / "report.md").read_text()
    assert arch.encode() in report and "onnxruntime" in report and "p50" in report
    assert "does not bind" in report
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("eager", marks=pytest.mark.slow)])
def test_a_real_measurement_rejects_what_an_optimistic_table_promised(config, lut, lut_eager, bounds, tmp_path,
                                                                      capsys, monkeypatch, runtime):
    """The table is scaled down until it puts every arch within a budget that most archs measure over, and nothing
    recalibrates it: the shipped files, measured for real, reject the candidates the table let through, and
    winners/ holds only files that measured within the budget. Candidates are scored by the true table's
    prediction (the slower, the better), so the best ones are the slow ones; only the scores are scripted, never a
    measurement."""
    from experiments.evaluate import Evaluator

    space = SearchSpace.from_yaml(TINY)
    source = lut if runtime == "onnxruntime" else lut_eager
    table = LatencyTable.load(source)
    monkeypatch.setattr(Evaluator, "evaluate", lambda self, arch: table.predict(arch))
    slowest = table.max_latency(space)
    # The budget lies 30% of the way from the smallest arch's latency to the largest's, as the device measures them
    # now (the table may have been profiled under another load), each the lowest of interleaved measurements so
    # that load touches both alike: the slow archs, which score best, measure over it.
    settings = Settings(runtime=runtime, num_classes=10)
    files = [search.export_shipped(space.build(arch, 10), runtime, tmp_path / name)
             for name, arch in (("smallest", space.smallest()), ("largest", space.largest()))]
    small, large = (min(ms) for ms in zip(*[[measure_file(f, "cpu", settings, QUICK).p50_ms for f in files]
                                            for _ in range(3)], strict=True))
    target = round(small + 0.3 * (large - small), 4)
    optimistic = tmp_path / "optimistic.json"
    table.scaled(0.9 * target / slowest).save(optimistic)  # every arch is predicted within it
    raw = yaml.safe_load(config.read_text())
    raw["latency"]["calibrate_archs"] = 0
    raw["search"]["trials"] = 6
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    args = base_args(cfg, optimistic, target, tmp_path / "run") + ["--runtime", runtime]
    code, err = run(args, capsys)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Candidates whose shipped file measured over the budget" in report, report + err
    ship = json.loads((tmp_path / "run" / "ship.json").read_text())
    verdicts = [v["ms"] for v in ship["measured"].values()] + [c["measured_ms"] for c in ship["shipped"].values()]
    assert max(verdicts) > target
    cards = winner_cards(tmp_path / "run")
    assert (code == 0) == bool(cards), err
    for card in cards:
        assert card["runtime"] == runtime and card["measured_ms"] <= target
        shipped = next((tmp_path / "run" / "winners").rglob(card["shipped_file"]))
        again = measure_file(shipped, "cpu", Settings(runtime=runtime, num_classes=10), QUICK)
        assert again.p50_ms < 2 * target  # the file in winners/ is the one that was measured


def test_killed_between_export_and_verdict_leaves_no_unverified_winner(config, lut, loose, tmp_path, capsys,
                                                                       monkeypatch):
    real = search.measure_shipped

    def killed(run_, path, settings):
        if ".staging" in Path(path).parts:
            raise KeyboardInterrupt
        return real(run_, path, settings)

    monkeypatch.setattr(search, "measure_shipped", killed)
    args = base_args(config, lut, loose, tmp_path / "run")
    code, err = run(args, capsys)
    assert code == 130, err
    assert winner_cards(tmp_path / "run") == []  # exported, not yet measured: nothing in winners/
    monkeypatch.setattr(search, "measure_shipped", real)
    code, err = run(args, capsys)
    assert code == 0, err
    (card,) = winner_cards(tmp_path / "run")
    assert card["measured_ms"] <= loose
    assert not (tmp_path / "run" / "winners" / ".staging").exists()


def test_a_p90_promise_is_fitted_measured_and_reported(config, lut, tmp_path, capsys):
    """--statistic p90: the table is one of its own (fitted to p90), the verdict compares p90, the card names it."""
    space = SearchSpace.from_yaml(TINY)
    table = tmp_path / "p90.json"
    profile(space, table, "cpu", Settings(runtime="onnxruntime", num_classes=10, statistic="p90"), progress=False)
    validate(table, space, n=6, calibrate_frac=0.5, progress=False)
    assert LatencyTable.load(table).fingerprint.statistic == "p90"
    target = round(3 * LatencyTable.load(table).max_latency(space), 3)
    code, err = run(base_args(config, table, target, tmp_path / "run") + ["--statistic", "p90"], capsys)
    assert code == 0, err
    (card,) = winner_cards(tmp_path / "run")
    assert card["statistic"] == "p90" and card["measured_ms"] == card["measured"]["p90_ms"]
    assert "p90 over every call" in (tmp_path / "run" / "report.md").read_text()
    # The p50 table does not serve a p90 promise.
    code, err = run(base_args(config, lut, target, tmp_path / "other") + ["--statistic", "p90"], capsys)
    _one_line_error(code, err, "statistic")


def test_cached_verdicts_of_another_machine_are_measured_again(config, lut, loose, tmp_path, capsys):
    args = base_args(config, lut, loose, tmp_path / "run")
    assert run(args, capsys)[0] == 0
    path = tmp_path / "run" / "ship.json"
    state = json.loads(path.read_text())
    for verdict in state["measured"].values():
        verdict["machine"]["device_name"] = "Another CPU"
        verdict["ms"] = 1e6
    path.write_text(json.dumps(state))
    assert run(args, capsys)[0] == 0
    state = json.loads(path.read_text())
    assert all(v["ms"] < 1e6 and v["machine"]["device_name"] != "Another CPU" for v in state["measured"].values())


# ---- budgets relative to a reference, families, shared supernets --------------------------------------------------


@pytest.mark.slow  # whole runs with retraining: .ci/run runs the slow tests of this file
def test_a_budget_relative_to_a_reference_is_measured_now_and_compared(config, lut, tmp_path, capsys):
    args = [*base_args(config, lut, "1.5xlargest", tmp_path / "run"), "--compare-references"]
    code, err = run(args, capsys)
    assert code == 0, err
    stored = json.loads((tmp_path / "run" / "targets.json").read_text())
    assert stored["reference"] == "largest" and stored["measured"]["ms"] > 0
    (card,) = winner_cards(tmp_path / "run")
    assert card["target_ms"] == pytest.approx(1.5 * stored["measured"]["ms"])
    assert card["measured_ms"] <= card["target_ms"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "largest measured" in report
    # the reference retrained with the winners' recipe, side by side with the winner
    trained = json.loads((tmp_path / "run" / "references" / "largest" / "result.json").read_text())["retrained"]
    assert 0.0 <= trained["test_accuracy"] <= 1.0 and trained["recipe"] == card["recipe"]
    assert "## Winners against the references" in report
    assert f"| largest (reference) | {stored['measured']['ms']:.3f} | {100 * trained['test_accuracy']:.2f}% |" in report
    assert f"`{card['arch']}` | {card['measured_ms']:.3f} | {100 * card['test_accuracy']:.2f}% |" in report
    # a rerun retrains nothing: the reference's result is kept
    stamp = (tmp_path / "run" / "references" / "largest" / "result.json").stat().st_mtime_ns
    code, err = run(args, capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "references" / "largest" / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("target", "names", "needle"), [
    ("1.5xlargest", "shufflenet_v2_x9", "--compare-references: 'shufflenet_v2_x9' is not a reference arch"),
    ("0.5", "", "--compare-references without names needs a budget relative to a reference"),
])
def test_bad_comparisons(config, lut, tmp_path, capsys, target, names, needle):
    args = [*base_args(config, lut, target, tmp_path / "run"), "--compare-references", *([names] if names else [])]
    _one_line_error(*run(args, capsys), needle)


def test_winners_are_fine_tuned_from_the_supernet_when_the_recipe_says_so(config, lut, loose, tmp_path, capsys,
                                                                           monkeypatch):
    from experiments import training

    raw = yaml.safe_load(config.read_text())
    raw["retrain"]["from_supernet"] = True
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    started = []
    real = training.retrain

    def recording(space, arch, *args, init_from=None, **kwargs):
        started.append(init_from.extract(arch).state_dict() if init_from is not None else None)
        return real(space, arch, *args, init_from=init_from, **kwargs)

    monkeypatch.setattr(training, "retrain", recording)
    code, err = run(base_args(cfg, lut, loose, tmp_path / "run"), capsys)
    assert code == 0, err
    assert started and all(weights is not None for weights in started)
    (card,) = winner_cards(tmp_path / "run")
    assert card["recipe"]["from_supernet"] is True
    assert "fine-tuned from the weights of" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow  # whole runs with retraining: .ci/run runs the slow tests of this file
def test_several_budgets_give_winners_for_each_within_its_own(config, lut, tmp_path, capsys):
    # Both budgets leave room for this machine's noise between measuring the largest arch and the winners' files.
    code, err = run(base_args(config, lut, "1.2xlargest,1.6xlargest", tmp_path / "run"), capsys)
    assert code == 0, err
    cards = winner_cards(tmp_path / "run")
    assert {c["target"] for c in cards} == {"1.2xlargest", "1.6xlargest"}
    for card in cards:
        assert card["measured_ms"] <= card["target_ms"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Winners: budget 1.2xlargest" in report and "## Winners: budget 1.6xlargest" in report
    rows = list(csv.DictReader((tmp_path / "run" / "trials.csv").open()))
    assert len(rows) == 5  # one study of ceil(1.5 x 3) trials served both budgets


def test_two_runs_with_different_budgets_train_one_supernet(config, lut, loose, tmp_path, capsys, monkeypatch):
    from experiments import supernets

    store = tmp_path / "store"
    trained = []
    real = supernets.train_supernet

    def counting(supernet, splits, cfg, folder, **kwargs):
        history = real(supernet, splits, cfg, folder, **kwargs)
        trained.append(len(history))
        return history

    monkeypatch.setattr(supernets, "train_supernet", counting)
    first = base_args(config, lut, loose, tmp_path / "a") + ["--supernet-store", str(store)]
    assert run(first, capsys)[0] == 0
    second = base_args(config, lut, round(loose / 2, 3), tmp_path / "b") + ["--supernet-store", str(store),
                                                                            "--runtime", "onnxruntime"]
    assert run(second, capsys)[0] == 0
    (folder,) = [p for p in store.iterdir() if p.is_dir()]
    assert (folder / "supernet.pt").exists()
    steps = json.loads((tmp_path / "b" / "steps.json").read_text())
    assert steps["supernet"] < 5.0  # loaded, not trained
    assert str(folder) in (tmp_path / "b" / "report.md").read_text()


def test_a_supernet_passed_by_path_specialises_without_training(config, lut, loose, tmp_path, capsys):
    from experiments.supernets import default_store

    assert run(base_args(config, lut, loose, tmp_path / "a"), capsys)[0] == 0
    (trained,) = [p for p in default_store().iterdir() if p.is_dir() and p.name.startswith("tiny-")]
    copy = tmp_path / "copied"
    shutil.copytree(trained, copy)
    args = base_args(config, lut, loose, tmp_path / "b") + ["--supernet", str(copy)]
    assert run(args, capsys)[0] == 0
    assert str(copy) in (tmp_path / "b" / "report.md").read_text()
    # One of another recipe is refused by name.
    raw = yaml.safe_load(config.read_text())
    raw["supernet"]["lr"] = 0.01
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    code, err = run(base_args(other, lut, loose, tmp_path / "c") + ["--supernet", str(copy)], capsys)
    _one_line_error(code, err, "another recipe")


@pytest.mark.parametrize(("value", "needle"), [
    ("", "--target-ms"), ("-3", "--target-ms"), ("0", "positive"), ("nan", "--target-ms"),
    ("0.5,0.4", "ascending"), ("0.4,,0.5", "--target-ms"), ("2xshufflenet_v2_x9", "not a reference arch"),
    ("0.5,largest", "same reference"),
])
def test_bad_budgets(config, lut, tmp_path, capsys, value, needle):
    _one_line_error(*run(base_args(config, lut, value, tmp_path / "run"), capsys), needle)


def test_a_budget_no_arch_meets_among_several_is_named(config, lut, loose, tmp_path, capsys):
    code, err = run(base_args(config, lut, f"0.0001,{loose}", tmp_path / "run"), capsys)
    _one_line_error(code, err, "budget 0.0001ms")
    assert "cannot be met: the fastest arch" in err


def test_unmeetable_target_names_the_fastest(config, lut, tmp_path, capsys):
    code, err = run(base_args(config, lut, 0.0001, tmp_path / "run"), capsys)
    _one_line_error(code, err, "cannot be met: the fastest arch")


# ---- resumption ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["lut", "supernet", "search", "ship"])
def test_interrupted_inside_each_step_resumes(config, lut, loose, tmp_path, capsys, monkeypatch, where):
    """A KeyboardInterrupt partway through a step (after it has written part of its work); the same command then
    finishes, and what was finished before the interruption is not redone."""
    table = tmp_path / "lut.json"
    if where == "lut":
        data = json.loads(lut.read_text())
        data["entries"] = data["entries"][: len(data["entries"]) // 2]
        data["correction"] = None
        table.write_text(json.dumps(data))
    else:
        shutil.copy(lut, table)
    store = tmp_path / "store"
    raw = yaml.safe_load(config.read_text())
    raw["supernet"]["epochs"] = 2
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    calls = {"n": 0}

    def after(n: int, real):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return wrapped

    if where == "lut":  # inside validation: the profile is done and saved
        import latency_lut

        monkeypatch.setattr(latency_lut, "validate", after(0, latency_lut.validate))
    elif where == "supernet":  # after the first of two epochs: its checkpoint is written
        from experiments.training import _SupernetLoop

        monkeypatch.setattr(_SupernetLoop, "_save", after(1, _SupernetLoop._save))
    elif where == "search":  # after two of three trials
        from experiments.evaluate import Evaluator

        monkeypatch.setattr(Evaluator, "evaluate", after(2, Evaluator.evaluate))
    else:  # after the untrained verdict, during retraining
        from experiments import training

        monkeypatch.setattr(training, "retrain", after(0, training.retrain))
    args = base_args(cfg, table, loose, tmp_path / "run") + ["--supernet-store", str(store)]
    code, err = run(args, capsys)
    assert code == 130 and "rerun the same command" in err
    monkeypatch.undo()
    monkeypatch.setattr(search, "MEASURE_BUDGET", QUICK)
    code, err = run(args, capsys)
    assert code == 0, err
    assert f"] {where} (resuming)" in err
    steps = json.loads((tmp_path / "run" / "steps.json").read_text())
    assert {"lut", "supernet", "search", "ship", "report"} <= set(steps)
    if where == "search":
        rows = list(csv.DictReader((tmp_path / "run" / "trials.csv").open()))
        done = [r for r in rows if r["state"] == "COMPLETE"]
        assert len(done) == 3 and len(rows) <= 4  # the two finished trials were kept; the interrupted one is not
        #                                           counted, and one more was run
    if where == "supernet":
        (folder,) = [p for p in store.iterdir() if p.is_dir()]
        history = json.loads((folder / "supernet.json").read_text())["history"]
        assert len(history) == 2


def test_rerun_after_success_redoes_nothing(config, lut, loose, tmp_path, capsys):
    """Every step that leaves an artifact is loaded; the budget (in milliseconds, binding nothing) needs no
    measurement, and the check and the report are made every run."""
    args = base_args(config, lut, loose, tmp_path / "run")
    assert run(args, capsys)[0] == 0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.suffix in (".pt", ".onnx", ".pt2")}
    code, err = run(args, capsys)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert re.findall(r"^\[\d/8\] .*$", err, flags=re.MULTILINE) == [
        "[1/8] lut (loaded)", "[2/8] target", "[3/8] check", "[4/8] supernet (loaded)", "[5/8] calibrate",
        "[6/8] search (loaded)", "[7/8] ship (loaded)", "[8/8] report"]


# ---- scripted measurements: the decisions themselves ---------------------------------------------------------------


def _measured(ms: float) -> Measurement:
    return Measurement(p50_ms=ms, p90_ms=ms, p99_ms=ms, p10_ms=ms, best_round_ms=ms, samples_ms=(ms,),
                       round_medians_ms=(ms,))


class Scripted:
    """Stands in for the device. `verdict(code, n)` gives the n-th verdict measurement of an arch (untrained and
    trained alike, n from 0); calibration and references measure what the table predicts times `calibrate`."""

    def __init__(self, lut: Path, verdict, calibrate: float = 1.0) -> None:
        self.path = lut
        self.table = LatencyTable.load(lut)
        self.verdict = verdict
        self.calibrate = calibrate
        self.calls: list[tuple[str, str]] = []  # (purpose, arch)

    def model(self, run_, model, settings, purpose="verdict"):
        code = model.arch.encode()
        if purpose != "verdict":
            self.calls.append((purpose, code))
            return _measured(self.calibrate * self.table.predict(model.arch))
        return self._verdict(code)

    def file(self, run_, path, settings):
        code = Path(path).parent.name.split("-", 1)[1]
        return self._verdict(code)

    def _verdict(self, code: str):
        n = sum(1 for p, c in self.calls if p == "verdict" and c == code)
        self.calls.append(("verdict", code))
        return _measured(self.verdict(code, n))

    def install(self, monkeypatch) -> Scripted:
        """Measure with this stand-in. Its measurements are kept apart from the real ones kept beside the table
        (`shared`, a file of this stand-in's own), so that no test reads another's, scripted or real."""
        beside = Path(tempfile.mkdtemp()) / self.path.name  # where the stand-in's table would lie
        self.shared = MeasuredArchs(beside, {}).path
        monkeypatch.setattr(search, "measured_archs",
                            lambda run_, space, settings: MeasuredArchs(beside, search.machine(run_, settings)))
        monkeypatch.setattr(search, "measure_model", self.model)
        monkeypatch.setattr(search, "measure_shipped", self.file)
        return self


def test_the_latency_promise_skips_candidates_over_the_budget(config, lut, binding, tmp_path, capsys, monkeypatch):
    first: list[str] = []

    def verdict(code, n):
        first.append(code) if not first else None
        return 1.2 * binding if code == first[0] else 0.5 * binding

    Scripted(lut, verdict).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    assert code == 0, err
    ship = json.loads((tmp_path / "run" / "ship.json").read_text())
    assert ship["measured"][first[0]]["ms"] > binding
    assert all(not key.endswith(first[0]) for key in ship["shipped"])
    (card,) = winner_cards(tmp_path / "run")
    assert card["measured_ms"] <= binding
    assert f"`{first[0]}`" in (tmp_path / "run" / "report.md").read_text().split("The latency promise")[1]


def test_search_is_rerun_with_a_margin_when_nothing_measures_within(config, lut, binding, tmp_path, capsys,
                                                                      monkeypatch):
    """Every candidate of the first round (3 trials, so at most 3 archs) measures 20% over the budget: the search
    runs again with the table's target lowered, and what ships measured within the budget."""
    first_round: list[str] = []

    def verdict(code, n):
        if code not in first_round and len(first_round) < 3:
            first_round.append(code)
        return 1.2 * binding if code in first_round else 0.5 * binding

    Scripted(lut, verdict).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    assert "searching again with the table's target at" in err
    assert (tmp_path / "run" / "trials-r1.csv").exists()
    assert "search round 1: every candidate measured over" in (tmp_path / "run" / "report.md").read_text()
    for card in winner_cards(tmp_path / "run"):
        assert card["measured_ms"] <= binding and card["arch"] not in first_round
    if code != 0:
        _one_line_error(code, err, "no candidate measured within")


def test_the_table_is_rescaled_by_what_the_device_measures_now(config, lut, bounds, binding, tmp_path, capsys,
                                                               monkeypatch):
    """Calibration archs measured 25% over their prediction: the search sees every prediction that much higher, and
    a resumed run on the same machine reuses the stored ratio instead of measuring again."""
    low, _ = bounds
    ratio = min(1.25, 1.0 + 0.5 * (binding / low - 1.0))  # the fastest arch still meets the budget after it
    device = Scripted(lut, lambda code, n: 0.5 * binding, calibrate=ratio).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    assert code == 0, err
    stored = json.loads((tmp_path / "run" / "calibration.json").read_text())
    calibrated = [c for c in device.calls if c[0] == "calibrate"]
    assert len(calibrated) == len(stored["archs"]) == 3 and stored["ratio"] == pytest.approx(ratio)
    table = LatencyTable.load(lut)
    for row in csv.DictReader((tmp_path / "run" / "trials.csv").open()):
        assert float(row["predicted_ms"]) == pytest.approx(ratio * table.predict(Arch.decode(row["arch"])), rel=1e-6)
    assert f"{ratio:.3f}x their table prediction" in (tmp_path / "run" / "report.md").read_text()
    (tmp_path / "run" / "report.md").unlink()
    assert run(base_args(config, lut, binding, tmp_path / "run"), capsys)[0] == 0
    assert len([c for c in device.calls if c[0] == "calibrate"]) == 3  # reused, not measured again


def test_a_second_run_with_the_table_measures_no_reference_and_calibrates_from_earlier_measurements(
        config, lut, binding, tmp_path, capsys, monkeypatch):
    """Two runs, two run folders, one table on one machine: the first measures the reference and the calibration
    archs, the second (a budget 2% larger) measures neither; another machine measures both again."""
    largest = LatencyTable.load(lut).predict(SearchSpace.from_yaml(TINY).largest())
    share = round(binding / largest, 3)  # the reference measures what the table predicts: this budget binds
    device = Scripted(lut, lambda code, n: 0.0, calibrate=1.0).install(monkeypatch)
    code, err = run(base_args(config, lut, f"{share}xlargest", tmp_path / "first"), capsys)
    assert code == 0, err
    first = [p for p, _ in device.calls if p != "verdict"]
    rows = json.loads((tmp_path / "first" / "calibration.json").read_text())["archs"]
    assert first.count("reference") == 1 and len(rows) == 3
    assert first.count("calibrate") == sum(not r["earlier"] for r in rows)  # the reference arch may be one of them
    device.calls.clear()
    code, err = run(base_args(config, lut, f"{1.02 * share:.4f}xlargest", tmp_path / "second"), capsys)
    assert code == 0, err
    assert [c for c in device.calls if c[0] != "verdict"] == []
    calibration = json.loads((tmp_path / "second" / "calibration.json").read_text())
    assert len(calibration["archs"]) == 3 and all(r["earlier"] for r in calibration["archs"])
    assert "on this device by an earlier run with this table" in (tmp_path / "second" / "report.md").read_text()
    monkeypatch.setattr(search, "machine", lambda run_, settings: {"device_name": "Another CPU"})
    code, err = run(base_args(config, lut, f"{1.02 * share:.4f}xlargest", tmp_path / "elsewhere"), capsys)
    assert code == 0, err
    elsewhere = [p for p, _ in device.calls if p != "verdict"]
    rows = json.loads((tmp_path / "elsewhere" / "calibration.json").read_text())["archs"]
    assert elsewhere.count("reference") == 1 and elsewhere.count("calibrate") == sum(not r["earlier"] for r in rows)
    assert len(rows) == 3 and not all(r["earlier"] for r in rows)


def test_a_device_too_slow_for_any_arch_now_says_so(config, lut, binding, tmp_path, capsys, monkeypatch):
    """The device measures 10x the table now: one line says so, nothing of the calibration is stored (a rerun
    measures again), and the trained supernet stays in the store."""
    from experiments.supernets import default_store

    device = Scripted(lut, lambda code, n: 0.5 * binding, calibrate=10.0).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    _one_line_error(code, err, "cannot be met as the device measures now")
    assert "at least 10.00x" in err
    assert not (tmp_path / "run" / "calibration.json").exists()
    assert not device.shared.exists()  # nor kept for later runs: they measure again
    assert any(default_store().glob("tiny-*/supernet.pt"))


def test_a_measurement_over_the_budget_is_taken_again_and_the_lowest_decides(config, lut, binding, tmp_path,
                                                                             capsys, monkeypatch):
    """A busy phase: each model's first measurement says 4% over the budget, the second 3% under. The second
    decides, before retraining and after export alike, and the model ships; the card keeps both tries."""
    Scripted(lut, lambda code, n: binding * (1.04 if n % 2 == 0 else 0.97)).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    assert code == 0, err
    (card,) = winner_cards(tmp_path / "run")
    assert card["measured_ms"] == pytest.approx(0.97 * binding)
    assert card["measured"]["tries_ms"] == pytest.approx([1.04 * binding, 0.97 * binding])


def test_a_model_over_the_budget_every_time_is_not_shipped(config, lut, binding, tmp_path, capsys, monkeypatch):
    """Over the budget by 20% in every one of its VERDICT_TRIES measurements: rejected before any retraining."""
    first: list[str] = []

    def verdict(code, n):
        first.append(code) if not first else None
        return 1.2 * binding if code == first[0] else 0.5 * binding

    device = Scripted(lut, verdict).install(monkeypatch)
    code, err = run(base_args(config, lut, binding, tmp_path / "run"), capsys)
    assert code == 0, err
    assert device.calls.count(("verdict", first[0])) == search.VERDICT_TRIES
    assert not (tmp_path / "run" / "retrain" / first[0]).exists()


# ---- bad input ----------------------------------------------------------------------------------------------------


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


def test_onnxruntime_on_cuda_is_refused(config, lut, tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: without it the device is refused first")
    args = base_args(config, lut, 5.0, tmp_path / "run") + ["--runtime", "onnxruntime"]
    args[args.index("--device") + 1] = "cuda"
    _one_line_error(*run(args, capsys), "--runtime onnxruntime")


def test_a_runtime_that_is_not_installed(config, lut, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    _one_line_error(*run(base_args(config, lut, 5.0, tmp_path / "run"), capsys), "onnxruntime is not installed")


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


def test_lut_of_another_runtime(config, lut_eager, tmp_path, capsys):
    _one_line_error(*run(base_args(config, lut_eager, 5.0, tmp_path / "run"), capsys), "runtime")


def test_run_dir_of_another_experiment(config, lut, loose, tmp_path, capsys):
    args = base_args(config, lut, loose, tmp_path / "run")
    assert run(args, capsys)[0] == 0
    _one_line_error(*run(args + ["--seed", "7"], capsys), "holds another experiment")
    assert (tmp_path / "run" / "report.md").exists()  # nothing lost


# ---- other searchers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("searcher", ["optuna", pytest.param("ray", marks=pytest.mark.slow)])
def test_supernet_replicas_score_candidates_by_their_mean(config, lut, loose, tmp_path, capsys, searcher):
    """With supernet.replicas: 2 both searchers score a candidate by the mean over the two trained supernets."""
    if searcher == "ray":
        pytest.importorskip("ray")
    from experiments.checkpoints import load_supernet
    from experiments.config import load_experiment
    from experiments.data import load_splits
    from experiments.evaluate import Evaluator
    from experiments.supernets import entry_for

    raw = yaml.safe_load(config.read_text())
    raw["supernet"]["replicas"] = 2
    raw["search"]["trials"] = 2
    replicated = tmp_path / "replicas.yaml"
    replicated.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    args = base_args(replicated, lut, loose, tmp_path / "run") + ["--searcher", searcher, "--supernet-store",
                                                                   str(store)]
    code, err = run(args, capsys)
    assert code == 0, err
    cfg = load_experiment(replicated)
    splits = load_splits(cfg.data, cfg.seed)
    space = SearchSpace.from_yaml(TINY)
    supernets = [load_supernet(entry_for(store, space, cfg, 10, cfg.seed + k).checkpoint) for k in range(2)]
    evaluator = Evaluator(supernets, splits, cfg.evaluate, seed=cfg.seed)
    with (tmp_path / "run" / "trials.csv").open() as f:
        trials = [row for row in csv.DictReader(f) if row["accuracy"] not in ("", "nan")]
    assert trials
    for row in trials:
        assert float(row["accuracy"]) == pytest.approx(evaluator.evaluate(Arch.decode(row["arch"])), abs=1e-9)
    assert "mean of 2 supernet replicas" in (tmp_path / "run" / "report.md").read_text()


def test_ray_searcher_end_to_end_with_its_progress_line(config, lut, loose, tmp_path, capsys):
    """search.py drives Ray Tune with the supernet; the progress bar must not stop Tune from pickling its state."""
    pytest.importorskip("ray")
    code, err = run(base_args(config, lut, loose, tmp_path / "run") + ["--searcher", "ray"], capsys)
    assert code == 0, err
    assert "search (ray)" in err
    assert len((tmp_path / "run" / "trials.csv").read_text().splitlines()) == 1 + 3
    assert len(winner_cards(tmp_path / "run")) == 1


@pytest.mark.slow  # .ci/run runs it
def test_ray_asha_mode_trains_candidates_from_scratch_without_a_supernet(config, lut, loose, tmp_path, capsys):
    pytest.importorskip("ray")
    store = tmp_path / "store"
    args = base_args(config, lut, loose, tmp_path / "run") + ["--searcher", "ray", "--ray-mode", "asha",
                                                               "--supernet-store", str(store)]
    code, err = run(args, capsys)
    assert code == 0, err
    out = tmp_path / "run"
    assert not store.exists()
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows if r["accuracy"])
    (card,) = winner_cards(out)
    assert card["shipped_file"] == "model.onnx"
    assert "trained from scratch" in (out / "report.md").read_text()


def test_asha_needs_the_ray_searcher(config, lut, loose, tmp_path, capsys):
    args = base_args(config, lut, loose, tmp_path / "run") + ["--ray-mode", "asha"]
    _one_line_error(*run(args, capsys), "ray_mode asha needs --searcher ray")
