"""A job as an ordered list of typed steps, each naming its artifact, how a rerun knows it is done, and how it loads it.

As a make or Snakemake rule names its output, a `Step` says what it leaves (`artifact`), whether that is there and
current (`done`), how to read it back (`load`) and how to produce it (`make`, which writes its artifact atomically).
A step's inputs are its dataclass fields, given when it is built. The driver, `Pipeline`, decides what runs: a done
step is loaded, any other is made (a step whose work resumes by itself, a training or a study, then continues where
it stopped). The numbering of the progress lines ("[3/8] check") comes from the order the pipeline lists the steps
in, and the seconds of each step go to RUN_DIR/steps.json.

A measurement holds only on the machine that took it: a `MachineFile` is a JSON file stamped with the fingerprint of
that machine (device, software, settings), and on any other machine it reads as absent, so a step whose artifact is
one is done only where it was measured.
"""

from __future__ import annotations

import abc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Generic, TypeVar

from search_space.files import atomic_write

T = TypeVar("T")


class Step(abc.ABC, Generic[T]):
    """One step of a job. Subclasses are frozen dataclasses whose fields are the step's inputs.

    The contract: `done()` is cheap and changes no artifact (it may raise on bad input, such as a file of another
    experiment); when it is true, `load()` returns what `make()` returned when it made the artifact. `make()` writes
    its artifact atomically (a kill leaves the old one or the new one), and continues whatever an interrupted
    `make()` left (`started()`).
    """

    name: ClassVar[str]  # the step's name in progress lines, steps.json and the report
    artifact: ClassVar[str]  # what the step leaves, and so how a rerun knows it is done

    def done(self) -> bool:
        """Whether the artifact is there and current, so that a rerun loads it. By default never: made every time."""
        return False

    def started(self) -> bool:
        """Whether an interrupted `make` left part of the work, which the next one continues."""
        return False

    def load(self) -> T:
        """What the finished artifact holds (called only when `done()`)."""
        raise NotImplementedError(f"step {self.name!r} leaves nothing to load")

    @abc.abstractmethod
    def make(self) -> T:
        """Do the step's work (or finish it), write its artifact, and return what `load` would."""


@dataclass
class Pipeline:
    """Runs steps of `order`, numbered from it, and keeps each step's wall time (summed over its runs) in `path`."""

    order: Sequence[type[Step]]
    path: Path  # RUN_DIR/steps.json
    seconds: dict[str, float] = field(default_factory=dict)
    out: IO[str] | None = None  # where progress lines go; None: stderr

    def __post_init__(self) -> None:
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline steps {names}: each name must appear once")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.order]

    def number(self, step: Step) -> str:
        """`[i/n]`: the step's place in `order`."""
        names = self.names
        if step.name not in names:
            raise ValueError(f"step {step.name!r} is not one of the pipeline's ({', '.join(names)})")
        return f"[{names.index(step.name) + 1}/{len(names)}]"

    def run(self, step: Step[T], key: str | None = None) -> T:
        """Load `step`'s artifact when it is done, else make it; print its progress line and record its seconds.

        `key` names one of several runs of the same step (a budget, a search round) in the progress line; their
        seconds add up under the step's name.
        """
        done = step.done()
        how = " (loaded)" if done else " (resuming)" if step.started() else ""
        label = f" {key}" if key else ""
        print(f"{self.number(step)} {step.name}{label}{how}", file=self.out or sys.stderr, flush=True)
        start = time.perf_counter()
        result = step.load() if done else step.make()
        self.add(step.name, time.perf_counter() - start)
        self.save()
        return result

    def add(self, name: str, seconds: float) -> None:
        """Count `seconds` to `name` (a step, or a part of one such as "ship: retraining")."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def save(self) -> None:
        atomic_write(self.path, lambda f: json.dump(self.seconds, f, indent=1))

    def load(self) -> None:
        """The seconds an earlier run of this job recorded: a resumed job adds to them."""
        if self.path.exists():
            self.seconds = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}


@dataclass(frozen=True)
class MachineFile:
    """A JSON object of measurements, stamped with the machine that took them (its "machine" field).

    On another machine (another fingerprint: device, software or settings) the file reads as absent, so whatever
    it holds is measured again there rather than believed.
    """

    path: Path
    here: dict[str, Any]  # the fingerprint of the machine measuring now

    def read(self) -> dict[str, Any] | None:
        """The stored object when this machine measured it, else None."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError:  # written atomically, so only a hand edit breaks it: measure again
            return None
        return data if isinstance(data, dict) and data.get("machine") == self.here else None

    def current(self) -> bool:
        return self.read() is not None

    def write(self, data: dict[str, Any]) -> dict[str, Any]:
        """Store `data` stamped with this machine, atomically; returns what was stored."""
        stamped = {**data, "machine": self.here}
        atomic_write(self.path, lambda f: json.dump(stamped, f, indent=1))
        return stamped
