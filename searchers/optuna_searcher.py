"""Constrained architecture search with Optuna: TPE, NSGA-II, GP or random, single- or multi-objective.

The study lives in a storage (by default a journal file in the run directory), so rerunning the same command
resumes it, and several processes or machines running the same command share it (a PostgreSQL URL for machines):
each process asks the storage for trials, the total of complete trials ends at exactly the requested number
across all of them, and the trial of a worker that was killed is run again by the others.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search_space import SearchSpace
from searchers.base import Evaluator, LatencyPredictor, Searcher, SearchResult, StorageUnavailable
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


HEARTBEAT_S = 10  # a database-backed trial's worker writes a heartbeat this often (seconds) ...
GRACE_BEATS = 6  # ... and a trial whose heartbeat is this many intervals old is taken for dead and run again
MAX_RETRIES = 2  # runs of one arch after the first whose worker died: an arch that kills its worker is dropped
POLL_S = 0.5  # how often a worker with nothing to start looks again (the last trials run elsewhere)
WORKER_ATTR = "shufflenas:worker"  # system attribute: the host and process that runs a trial


def make_storage(spec: str | Path | None, run_dir: str | Path,
                 heartbeat_s: int | None = HEARTBEAT_S) -> optuna.storages.BaseStorage:
    """An Optuna storage from what the user named.

    None: a journal file `study.journal` in the run directory. A path (no '://'): a journal file there, safe for
    several processes on one machine. A URL (postgresql://, mysql://, sqlite:///): an RDB storage; use a server
    database to share one study between machines (SQLite is not meant for parallel writers). Database trials carry
    a heartbeat every `heartbeat_s` seconds (None: none), so a trial whose worker died on any machine is run again.

    Raises:
        StorageUnavailable: the database's driver is not installed, or the database does not answer.
    """
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if spec is None:
        spec = Path(run_dir) / "study.journal"
    spec = str(spec)
    if "://" in spec:
        return open_database(spec, heartbeat_s)
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def open_database(url: str, heartbeat_s: int | None = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage at `url`, connected now so that a bad URL fails here, in one line.

    Raises:
        StorageUnavailable: no driver for the URL's database, or the database cannot be reached.
    """
    import sqlalchemy
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise StorageUnavailable(f"storage {url!r} is not a database URL ({e})") from None
    shown = parsed.render_as_string(hide_password=True)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a worker outlives a database restart
    if parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # seconds: an unroutable host fails, not hangs
    beat: dict[str, Any] = {}
    if heartbeat_s:
        beat = {"heartbeat_interval": int(heartbeat_s), "grace_period": GRACE_BEATS * int(heartbeat_s),
                "heartbeat_stale_trial_callback": RequeueDeadTrial()}
    try:
        for attempt in range(3):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs=engine_kwargs, **beat)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                # Workers that start together on an empty database race to create its tables: the loser finds
                # them made and opens them on the next attempt.
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    except ImportError:
        if parsed.get_backend_name() == "postgresql":
            hint = 'install the PostgreSQL driver: pip install -e ".[postgres]" (psycopg 3)'
        else:
            hint = f"install a Python driver for {parsed.get_backend_name()}"
        raise StorageUnavailable(f"storage {shown}: no database driver is installed; {hint}") from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageUnavailable(f"storage {shown} is not a database URL SQLAlchemy knows (e.g. postgresql://, "
                                 f"mysql://, sqlite:///; a journal file is a plain path)") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise StorageUnavailable(f"storage {shown}: the database cannot be reached "
                                 f"({reason[0] if reason else type(e).__name__})") from None


class RequeueDeadTrial:
    """Queue the arch of a trial whose worker died again (Optuna's failed-trial callback), MAX_RETRIES at most.

    A class, not a closure: the storage holding it is pickled into Ray's searcher state.
    """

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retries = int(trial.user_attrs.get("retries", 0)) + 1
        if "arch" not in trial.user_attrs or retries > MAX_RETRIES:  # died while choosing, or keeps killing workers
            return
        study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.user_attrs.get("retry_of", trial.number),
                                                            "retries": retries})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return trial.system_attrs.get(WORKER_ATTR) or {}


def _local_and_dead(trial: optuna.trial.FrozenTrial, host: str) -> bool:
    worker = _worker(trial)
    return bool(worker) and worker.get("host") == host and not _pid_alive(int(worker.get("pid", -1)))


def recover_stale_trials(study: optuna.Study) -> int:
    """Fail the trials that killed workers left RUNNING and queue their archs again; return how many of this host.

    A killed process (kill -9, a lost machine) cannot mark its trial, and without this its arch would be lost and
    the study would wait for it forever. A trial of this host is recovered at once when its process is gone; one
    of another machine when its heartbeat stops (database storages only), after the grace period. Live workers
    sharing the storage are never touched.
    """
    if is_heartbeat_enabled(study._storage):  # noqa: SLF001
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # runs RequeueDeadTrial on each
        _fail_unclaimed(study)
    host = socket.gethostname()
    recovered = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _local_and_dead(t, host):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):  # noqa: SLF001
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker recovered it first
            continue
        RequeueDeadTrial()(study, t)
        recovered += 1
    return recovered


def _fail_unclaimed(study: optuna.Study) -> None:
    """Fail the RUNNING trials that no worker claimed (WORKER_ATTR) within the heartbeat's grace period.

    A worker killed between creating a trial and its heartbeat's first beat leaves a trial that Optuna never takes
    for stale (it has no beat to be old), and that would hold a slot of the budget for ever. Nothing was chosen for
    it yet, so nothing is queued again. The age is read on this machine's clock against the creator's, and the
    grace period (a minute by default) is far longer than any clock skew it needs to absorb.
    """
    grace = GRACE_BEATS * (study._storage.get_heartbeat_interval() or HEARTBEAT_S)  # noqa: SLF001
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if WORKER_ATTR in t.system_attrs or t.datetime_start is None:
            continue
        if (now - t.datetime_start).total_seconds() > grace:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker failed it first
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)  # noqa: SLF001


def is_heartbeat_enabled(storage: optuna.storages.BaseStorage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled as enabled

    return enabled(storage)


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _taken(study: optuna.Study, before: int | None = None) -> tuple[int, int]:
    """Complete trials, and trials that hold a slot of the budget: complete ones and running ones that may still
    complete (numbered below `before`, if given). One read of the storage.

    A running trial counts when its worker can be known to be alive or dead: always with a heartbeat (a dead one
    is failed after the grace period), and on this host by its process id. Without a heartbeat, another machine's
    running trial does not count: waiting for it could mean waiting forever.
    """
    heartbeat = is_heartbeat_enabled(study._storage)  # noqa: SLF001
    host = socket.gethostname()
    done = taken = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if before is not None and t.number >= before:
            continue
        done += t.state == TrialState.COMPLETE
        local_alive = _worker(t).get("host") == host and not _local_and_dead(t, host)
        taken += t.state == TrialState.COMPLETE or heartbeat or local_alive
    return done, taken


@dataclass
class OptunaSearcher(Searcher):
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
        heartbeat_s: heartbeat interval of database trials, in seconds (None: no heartbeat); a trial whose
            heartbeat is GRACE_BEATS intervals old is taken for dead and its arch is run again.
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
    heartbeat_s: int | None = HEARTBEAT_S
    _study: optuna.Study | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choices(self.sampler, self.objectives)

    def study(self) -> optuna.Study:
        """Create or load the study (same name and storage resumes it)."""
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(
                study_name=self.study_name,
                storage=make_storage(self.storage, self.run_dir, self.heartbeat_s),
                sampler=make_sampler(self.sampler, self.seed, self.objectives),
                directions=directions(self.objectives),
                load_if_exists=True,
            )
            _check_same_search(self._study, self)
        return self._study

    def completed(self) -> int:
        study = self.study()
        recover_stale_trials(study)
        return completed(study)

    def search(self, n_trials: int) -> None:
        """Take trials one at a time while the budget has a free slot; wait while the last ones run elsewhere.

        The total of complete trials ends at exactly `n_trials` across every worker of the study: a worker starts
        a trial only while complete and running trials leave a slot, and a trial that two workers started for the
        same last slot at the same moment is handed back (pruned, its queued arch queued again) by the later one.
        """
        study = self.study()
        if self.enqueue_references and len(study.trials) == 0:
            for arch in self.space.contained_references().values():
                if self.predictor.predict(arch) <= self.target_ms:
                    study.enqueue_trial(self.space.params(arch), skip_if_exists=True)
        bar = Progress(n_trials, completed(study), self.sampler) if self.progress else None
        objective = Objective(self.space, self.predictor, self.evaluator, self.target_ms, self.objectives,
                              self.num_classes, on_trial=bar.update_trial if bar else None)
        worker = {"host": socket.gethostname(), "pid": os.getpid()}

        def tagged(trial: optuna.Trial) -> Any:
            trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, worker)  # noqa: SLF001
            if _taken(study, before=trial.number)[1] >= n_trials:  # another worker took the last slot just now
                frozen = trial.storage.get_trial(trial._trial_id)  # noqa: SLF001
                if "fixed_params" in frozen.system_attrs:  # a queued arch: queue it again for whoever runs next
                    study.enqueue_trial(frozen.system_attrs["fixed_params"], user_attrs=dict(frozen.user_attrs))
                trial.set_user_attr("surplus", True)
                raise optuna.TrialPruned("the budget was full when this trial started")
            return objective(trial)

        try:
            while True:
                done, taken = _taken(study)
                if done >= n_trials:
                    break
                if taken >= n_trials:  # the last trials run elsewhere: they end, or die and come back
                    recover_stale_trials(study)
                    time.sleep(POLL_S)
                    continue
                study.optimize(tagged, n_trials=1, gc_after_trial=False)  # fails stale trials with a heartbeat
        finally:
            if bar:
                bar.close()

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
