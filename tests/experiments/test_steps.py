"""The pipeline of steps with small fake steps: numbering from the list, a done step loaded and not made, a step
whose measurements come from another machine made again, and the seconds in steps.json."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from experiments.steps import MachineFile, Pipeline, Step

HERE = {"device_name": "This CPU", "runtime": "onnxruntime"}
ELSEWHERE = {"device_name": "Another CPU", "runtime": "onnxruntime"}


@dataclass
class Calls:
    made: int = 0
    loaded: int = 0


@dataclass(frozen=True)
class Measure(Step):
    """A measurement kept in a MachineFile: done only on the machine that took it."""

    name: ClassVar[str] = "measure"
    artifact: ClassVar[str] = "measure.json"
    file: MachineFile
    calls: Calls = field(default_factory=Calls)

    def done(self) -> bool:
        return self.file.current()

    def load(self) -> float:
        self.calls.loaded += 1
        return self.file.read()["ms"]

    def make(self) -> float:
        self.calls.made += 1
        return self.file.write({"ms": 1.5})["ms"]


@dataclass(frozen=True)
class Count(Step):
    """Nothing to keep: made every time."""

    name: ClassVar[str] = "count"
    artifact: ClassVar[str] = "nothing"
    calls: Calls = field(default_factory=Calls)

    def make(self) -> int:
        self.calls.made += 1
        return self.calls.made


@dataclass(frozen=True)
class Half(Step):
    """Work an interrupted make left: resumed, not done."""

    name: ClassVar[str] = "half"
    artifact: ClassVar[str] = "half.txt"
    path: Path

    def started(self) -> bool:
        return self.path.exists()

    def done(self) -> bool:
        return self.path.exists() and self.path.read_text() == "ab"

    def load(self) -> str:
        return self.path.read_text()

    def make(self) -> str:
        self.path.write_text("ab")
        return "ab"


def pipeline(tmp_path: Path) -> tuple[Pipeline, io.StringIO]:
    out = io.StringIO()
    return Pipeline((Count, Measure, Half), tmp_path / "steps.json", out=out), out


def test_the_progress_lines_are_numbered_from_the_list(tmp_path):
    steps, out = pipeline(tmp_path)
    assert steps.names == ["count", "measure", "half"]
    steps.run(Half(tmp_path / "half.txt"))
    steps.run(Count(), key="0.5ms")
    assert out.getvalue().splitlines() == ["[3/3] half", "[1/3] count 0.5ms"]


def test_a_step_outside_the_list_and_a_name_listed_twice_are_refused(tmp_path):
    steps, _ = pipeline(tmp_path)

    @dataclass(frozen=True)
    class Stray(Count):
        name: ClassVar[str] = "stray"

    with pytest.raises(ValueError, match="stray"):
        steps.run(Stray())
    with pytest.raises(ValueError, match="once"):
        Pipeline((Count, Count), tmp_path / "steps.json")


def test_a_done_step_is_loaded_not_made_again(tmp_path):
    calls = Calls()
    file = MachineFile(tmp_path / "measure.json", HERE)
    first, out = pipeline(tmp_path)
    assert first.run(Measure(file, calls)) == 1.5
    assert (calls.made, calls.loaded) == (1, 0)
    # A rerun of the job: a new pipeline over the same run directory.
    again, out = pipeline(tmp_path)
    again.load()
    assert again.run(Measure(file, calls)) == 1.5
    assert (calls.made, calls.loaded) == (1, 1)
    assert out.getvalue() == "[2/3] measure (loaded)\n"
    assert json.loads(file.path.read_text())["machine"] == HERE


def test_measurements_of_another_machine_are_taken_again(tmp_path):
    calls = Calls()
    path = tmp_path / "measure.json"
    path.write_text(json.dumps({"ms": 99.0, "machine": ELSEWHERE}))
    steps, out = pipeline(tmp_path)
    assert steps.run(Measure(MachineFile(path, HERE), calls)) == 1.5
    assert (calls.made, calls.loaded) == (1, 0) and out.getvalue() == "[2/3] measure\n"
    assert json.loads(path.read_text()) == {"ms": 1.5, "machine": HERE}
    # Back on the other machine, this machine's measurement is not believed either.
    assert MachineFile(path, ELSEWHERE).read() is None


def test_a_hand_broken_measurement_file_reads_as_absent(tmp_path):
    path = tmp_path / "measure.json"
    for text in ("{not json", "[1, 2]", json.dumps({"ms": 1.0})):
        path.write_text(text)
        assert MachineFile(path, HERE).read() is None


def test_a_step_left_half_done_says_it_resumes(tmp_path):
    path = tmp_path / "half.txt"
    path.write_text("a")
    steps, out = pipeline(tmp_path)
    assert steps.run(Half(path)) == "ab"
    assert out.getvalue() == "[3/3] half (resuming)\n"


def test_seconds_add_up_per_step_across_keys_and_reruns(tmp_path):
    steps, _ = pipeline(tmp_path)
    calls = Calls()
    steps.run(Count(calls), key="a")
    steps.add("count: part", 2.0)  # kept with the next step's seconds
    steps.run(Count(calls), key="b")
    stored = json.loads((tmp_path / "steps.json").read_text())
    assert calls.made == 2 and set(stored) == {"count", "count: part"} and stored["count: part"] == 2.0
    again, _ = pipeline(tmp_path)
    again.load()
    again.add("count: part", 1.0)
    assert again.seconds["count: part"] == 3.0


def test_a_step_that_fails_records_no_time(tmp_path):
    @dataclass(frozen=True)
    class Broken(Count):
        def make(self) -> int:
            raise ValueError("bad input")

    steps, _ = pipeline(tmp_path)
    with pytest.raises(ValueError, match="bad input"):
        steps.run(Broken())
    assert "count" not in steps.seconds and not (tmp_path / "steps.json").exists()
