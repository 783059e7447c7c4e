"""search.py's steps as a pipeline: the order they are numbered in, and the ship step, done per budget, with fake
measurements and retraining (whole runs are tests/test_search.py's)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import search

HERE = {"device_name": "This CPU"}


def test_the_steps_are_numbered_in_the_order_the_job_runs_them(tmp_path):
    assert search.STEPS == ["lut", "target", "check", "supernet", "calibrate", "search", "ship", "report"]
    steps = search.Pipeline(search.PIPELINE, tmp_path / "steps.json")
    assert steps.number(search.CheckStep(None, None, (), ())) == "[3/8]"
    for step in search.PIPELINE:
        assert step.artifact  # each names what it leaves
    listed = [line.split()[0] for line in search.__doc__.splitlines() if line.startswith("  ") and line[2] != " "]
    assert listed == search.STEPS  # --help lists them in the same order


@dataclass(frozen=True)
class Candidate:
    arch: str
    predicted_ms: float
    accuracy: float


class Device:
    """Scripted verdicts by arch (untrained, then trained), counting what it is asked to measure and retrain."""

    def __init__(self, untrained: dict[str, float], trained: dict[str, float]) -> None:
        self.untrained, self.trained = untrained, trained
        self.judged: list[str] = []
        self.retrained: list[str] = []

    def judge(self, arch: str) -> dict:
        self.judged.append(arch)
        return {"ms": self.untrained[arch]}

    def retrain(self, arch: str, candidate: Candidate, folder: Path) -> dict:
        self.retrained.append(arch)
        card = {"measured_ms": self.trained[arch], "measured": {"machine": HERE}}
        if card["measured_ms"] <= 1.0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "model_card.json").write_text(json.dumps(card))
        return card


def ship(tmp_path: Path, device: Device, here=HERE, label: str | None = None) -> search.ShipStep:
    candidates = tuple(Candidate(a, 0.9, acc) for a, acc in (("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)))
    return search.ShipStep(
        search.Shipping.load(tmp_path / "ship.json", here), candidates, target_ms=1.0, label=label, top_k=1,
        run_dir=tmp_path, decode=lambda code: code, cost=lambda arch: SimpleNamespace(params=1, mflops=2.0),
        judge=device.judge, retrain=device.retrain)


def test_a_shipped_budget_is_loaded_from_its_decisions(tmp_path):
    """a: over before training; b: over after training; c: shipped. A rerun decides again from ship.json alone."""
    device = Device({"a": 1.2, "b": 0.9, "c": 0.8, "d": 0.5}, {"b": 1.1, "c": 0.95})
    step = ship(tmp_path, device)
    assert not step.done()
    winners, rejected = step.make()
    assert [w["arch"] for w in winners] == ["c"] and winners[0]["folder"] == "winners/1-c"
    assert [(r["arch"], r["when"]) for r in rejected] == [("a", "before training"), ("b", "after training")]
    assert (device.judged, device.retrained) == (["a", "b", "c"], ["b", "c"])
    again = ship(tmp_path, device)
    assert again.done() and again.load() == (winners, rejected)
    assert (device.judged, device.retrained) == (["a", "b", "c"], ["b", "c"])  # nothing measured or trained again


def test_a_winner_whose_folder_is_gone_is_not_done(tmp_path):
    device = Device({"a": 0.5}, {"a": 0.5})
    ship(tmp_path, device).make()
    (tmp_path / "winners" / "1-a" / "model_card.json").unlink()
    step = ship(tmp_path, device)
    assert not step.done() and step.started()
    step.make()
    assert device.retrained == ["a", "a"] and device.judged == ["a"]


def test_verdicts_of_another_machine_are_measured_again(tmp_path):
    device = Device({"a": 0.5}, {"a": 0.5})
    ship(tmp_path, device).make()
    elsewhere = ship(tmp_path, device, here={"device_name": "Another CPU"})
    assert not elsewhere.done() and not elsewhere.started()
    elsewhere.make()
    assert device.judged == ["a", "a"] and device.retrained == ["a", "a"]


def test_each_budget_is_done_on_its_own(tmp_path):
    device = Device({"a": 0.5}, {"a": 0.5})
    ship(tmp_path, device, label="1ms").make()
    assert ship(tmp_path, device, label="1ms").done()
    other = ship(tmp_path, device, label="2ms")
    assert not other.done() and other.started()  # the verdict before training serves it; the winner is its own
    winners, _ = other.make()
    assert winners[0]["folder"] == "winners/2ms/1-a" and device.judged == ["a"]
