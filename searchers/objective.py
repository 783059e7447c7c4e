"""The objective every searcher optimises: predict latency first, evaluate only what is feasible.

The latency constraint goes through Optuna's own mechanism (`trial.set_constraint`), so that TPE, NSGA-II and GP
learn where the feasible region is instead of only seeing bad scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from search_space import Arch, SearchSpace
from searchers.base import Evaluator, LatencyPredictor, TrialRecord, describe

OBJECTIVES = ("single", "multi")
CONSTRAINT = "latency"  # the name under which the constraint (predicted - target, ms) is stored


def suggest_arch(space: SearchSpace, trial: Any) -> Arch:
    """Sample an arch through an Optuna trial, with the space's stable parameter names."""
    return space.decide(lambda name, choices: trial.suggest_categorical(name, list(choices)))


def constrain(space: SearchSpace, trial: Any, predictor: LatencyPredictor, target_ms: float,
              num_classes: int) -> tuple[Arch, dict[str, Any]]:
    """Suggest an arch, predict its latency, set the constraint and the descriptive attributes on `trial`."""
    arch = suggest_arch(space, trial)
    predicted = float(predictor.predict(arch))
    trial.set_constraint(CONSTRAINT, predicted - target_ms)
    attrs = describe(space, arch, predicted, target_ms, num_classes)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return arch, attrs


@dataclass
class Objective:
    """Callable objective for `study.optimize`.

    Single objective: maximise accuracy subject to predicted latency <= target. Multi-objective: maximise accuracy
    and minimise predicted latency, subject to the same constraint. Infeasible archs are not evaluated: they score 0
    accuracy, and the constraint tells the sampler why.
    """

    space: SearchSpace
    predictor: LatencyPredictor
    evaluator: Evaluator
    target_ms: float
    objectives: str = "single"
    num_classes: int = 10
    on_trial: Callable[[dict[str, Any]], None] | None = None  # progress hook, called with the trial's attributes

    def __post_init__(self) -> None:
        if self.objectives not in OBJECTIVES:
            raise ValueError(f"objectives {self.objectives!r} is not one of {list(OBJECTIVES)}")

    def __call__(self, trial: Any) -> float | tuple[float, float]:
        arch, attrs = constrain(self.space, trial, self.predictor, self.target_ms, self.num_classes)
        start = time.perf_counter()
        accuracy = float(self.evaluator.evaluate(arch)) if attrs["feasible"] else math.nan
        trial.set_user_attr("accuracy", accuracy)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        if self.on_trial is not None:
            self.on_trial({**attrs, "accuracy": accuracy})
        score = 0.0 if math.isnan(accuracy) else accuracy
        return (score, attrs["predicted_ms"]) if self.objectives == "multi" else score


def directions(objectives: str) -> list[str]:
    return ["maximize", "minimize"] if objectives == "multi" else ["maximize"]


def record_from_trial(trial: Any) -> TrialRecord:
    """A TrialRecord from an Optuna FrozenTrial (trials that died before predicting get NaN fields)."""
    a = trial.user_attrs
    worker = trial.system_attrs.get("shufflenas:worker") or {}
    accuracy = a.get("accuracy")
    if accuracy is None and trial.values and a.get("feasible"):  # a trial Ray told before its record was written
        accuracy = trial.values[0]
    return TrialRecord(
        number=trial.number,
        arch=a.get("arch", ""),
        predicted_ms=float(a.get("predicted_ms", math.nan)),
        feasible=bool(a.get("feasible", False)),
        accuracy=math.nan if accuracy is None else float(accuracy),
        params=int(a.get("params", 0)),
        mflops=float(a.get("mflops", math.nan)),
        state=trial.state.name,
        seconds=float(a.get("seconds", math.nan)),
        node=f"{worker['host']}/{worker['pid']}" if worker else str(a.get("node", "")),
    )
