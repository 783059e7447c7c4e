"""Constrained architecture search with Optuna: TPE, NSGA-II, GP or random, single- or multi-objective.

The study lives in a storage (by default a journal file in the run directory), so rerunning the same command
resumes it, and several processes or machines running the same command share it: each process asks the storage
for trials, and the total of completed trials is capped at the requested number across all of them.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search_space import SearchSpace
from searchers.base import Evaluator, LatencyPredictor, SearchResult, check_target
from searchers.objective import OBJECTIVES, Objective, directions, record_from_trial

SAMPLERS = ("tpe", "nsga2", "gp", "random")
DEFAULT_STUDY = "shufflenas"


def make_sampler(name: str, seed: int, objectives: str = "single") -> optuna.samplers.BaseSampler:
    """A seeded Optuna sampler by name; the constrained ones read `trial.set_constraint` values."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if name == "tpe":
        # constant_liar keeps parallel workers from proposing the same arch while others are still running.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if name == "gp":
        # GP models a fixed set of parameters; units beyond a sampled depth fall back to random sampling, as intended.
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler {name!r} is not one of {list(SAMPLERS)}")


def check_choices(sampler: str, objectives: str) -> None:
    """The sampler and objectives names every Optuna-driven searcher accepts."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {list(SAMPLERS)}")
    if objectives not in OBJECTIVES:
        raise ValueError(f"objectives {objectives!r} is not one of {list(OBJECTIVES)}")


def make_storage(spec: str | Path | None, run_dir: str | Path) -> optuna.storages.BaseStorage:
    """An Optuna storage from what the user named.

    None: a journal file `study.journal` in the run directory. A path (no '://'): a journal file there, safe for
    several processes on one machine. A URL (postgresql://, mysql://, sqlite:///): an RDB storage; use a server
    database to share one study between machines (SQLite is not meant for parallel writers).
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if spec is None:
        spec = Path(run_dir) / "study.journal"
    spec = str(spec)
    if "://" in spec:
        return RDBStorage(spec)
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study: optuna.Study) -> int:
    """Fail the trials a killed process on this machine left RUNNING and queue their archs again.

    A process that is killed (not interrupted) cannot mark its trial; without this its arch would be lost and the
    study would wait for it forever. Only trials of this host whose process is gone are touched, so other live
    workers sharing the storage are safe.
    """
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.system_attrs.get("shufflenas:worker") or t.user_attrs.get("worker")
        if not worker or worker.get("host") != host or _pid_alive(int(worker.get("pid", -1))):
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001 (no public API for this)
        study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})
        recovered += 1
    return recovered


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


@dataclass
class OptunaSearcher:
    """Constrained search with an Optuna study.

    Attributes:
        space: the search space.
        predictor: the latency table (predicts ms).
        evaluator: scores feasible archs (validation accuracy).
        target_ms: the latency budget.
        sampler: "tpe", "nsga2", "gp" or "random".
        objectives: "single" (accuracy under the constraint) or "multi" (accuracy and latency).
        storage: None (journal in run_dir), a journal file path, or a database URL.
        run_dir: where the default storage lives.
        study_name: name of the study in the storage.
        seed: sampler seed.
        num_classes: classifier size, for params/FLOPs in the records.
        enqueue_references: try the space's torchvision reference archs first when they are feasible.
        progress: show a progress bar.
    """

    space: SearchSpace
    predictor: LatencyPredictor
    evaluator: Evaluator
    target_ms: float
    sampler: str = "tpe"
    objectives: str = "single"
    storage: str | Path | None = None
    run_dir: str | Path = "runs/search"
    study_name: str = DEFAULT_STUDY
    seed: int = 0
    num_classes: int = 10
    enqueue_references: bool = True
    progress: bool = True
    _study: optuna.Study | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choices(self.sampler, self.objectives)

    def study(self) -> optuna.Study:
        """Create or load the study (same name and storage resumes it)."""
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(
                study_name=self.study_name,
                storage=make_storage(self.storage, self.run_dir),
                sampler=make_sampler(self.sampler, self.seed, self.objectives),
                directions=directions(self.objectives),
                load_if_exists=True,
            )
            _check_same_search(self._study, self)
        return self._study

    def run(self, n_trials: int) -> SearchResult:
        """Run until the study holds `n_trials` completed trials (counting earlier runs and other workers)."""
        if n_trials < 1:
            raise ValueError(f"n_trials {n_trials} must be at least 1")
        notice = check_target(self.predictor, self.space, self.target_ms)  # before any work
        if notice:
            print(notice, file=sys.stderr)
        study = self.study()
        recover_stale_trials(study)
        if self.enqueue_references and len(study.trials) == 0:
            for arch in self.space.contained_references().values():
                if self.predictor.predict(arch) <= self.target_ms:
                    study.enqueue_trial(self.space.params(arch), skip_if_exists=True)
        remaining = n_trials - completed(study)
        if remaining > 0:
            bar = Progress(n_trials, completed(study), self.sampler) if self.progress else None
            objective = Objective(self.space, self.predictor, self.evaluator, self.target_ms, self.objectives,
                                  self.num_classes, on_trial=bar.update_trial if bar else None)
            worker = {"host": socket.gethostname(), "pid": os.getpid()}

            def tagged(trial: optuna.Trial) -> Any:
                trial.storage.set_trial_system_attr(trial._trial_id, "shufflenas:worker", worker)  # noqa: SLF001
                return objective(trial)

            try:
                study.optimize(
                    tagged,
                    n_trials=remaining,
                    callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))],
                    gc_after_trial=False,
                )
            finally:
                if bar:
                    bar.close()
        return self.result()

    def result(self) -> SearchResult:
        """Every trial of the study so far."""
        trials = self.study().get_trials(deepcopy=False)
        return SearchResult(self.target_ms, tuple(record_from_trial(t) for t in trials))


def _check_same_search(study: optuna.Study, searcher: OptunaSearcher) -> None:
    """A study is tied to one space, target and objectives: refuse to mix trials of different searches."""
    identity = {"space": searcher.space.name, "target_ms": searcher.target_ms, "objectives": searcher.objectives}
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", identity)
    elif stored != identity:
        raise ValueError(f"study {study.study_name!r} belongs to another search ({stored}), not {identity}; "
                         f"use another --run-dir, --storage or study name")


class Progress:
    """A tqdm bar over completed trials, showing the best feasible accuracy so far."""

    def __init__(self, total: int, initial: int, label: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=f"search ({label})", unit="trial", dynamic_ncols=True)
        self.best = math.nan
        self.infeasible = 0

    def update_trial(self, attrs: dict[str, Any]) -> None:
        if attrs["feasible"] and (math.isnan(self.best) or attrs["accuracy"] > self.best):
            self.best = attrs["accuracy"]
        self.infeasible += not attrs["feasible"]
        self.bar.set_postfix(best=f"{self.best:.4f}", infeasible=self.infeasible, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
