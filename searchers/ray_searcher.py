"""Constrained architecture search with Ray Tune: how a search outgrows one machine.

The search algorithm is Optuna (`OptunaSearch`) with a define-by-run space function that predicts each arch's
latency and calls `trial.set_constraint`, since OptunaSearch has no constraint argument. Trials run as Ray tasks
with the resources asked for; each builds its evaluator from a small picklable factory (paths, not closures over
a supernet). Ray's own `get_best_result` ignores constraints, so winners come from the Optuna study's feasible
trials. A second mode trains candidates from scratch for a few epochs under the ASHA scheduler.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

# Ray's console tables would drown our progress line; this must be set before ray.tune is imported.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import ConcurrencyLimiter  # noqa: E402
from ray.tune.search import Searcher as TuneSearcher  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from search_space import Arch, SearchSpace  # noqa: E402
from searchers.base import (  # noqa: E402
    ClusterUnavailable,
    EvaluatorFactory,
    LatencyPredictor,
    Searcher,
    SearchFailed,
    SearchResult,
    TrainerFactory,
)
from searchers.objective import constrain, directions, record_from_trial  # noqa: E402
from searchers.optuna_searcher import (  # noqa: E402
    DEFAULT_STUDY,
    check_choices,
    completed,
    make_sampler,
    make_storage,
)

MODES = ("supernet", "asha")

# Built once per Ray worker process: a supernet evaluator is expensive to load and the same for every trial.
_WORKER_CACHE: dict[Any, Any] = {}


def _cached(factory: Any) -> Any:
    key = repr(factory)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = factory()
    return _WORKER_CACHE[key]


def _node() -> str:
    """The Ray node this code runs on: its IP and the start of its id (nodes of one machine share the IP)."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


def _evaluate_trial(config: dict[str, Any], factory: EvaluatorFactory) -> None:
    """Ray trainable: score one arch with inherited weights (feasible archs only)."""
    start = time.perf_counter()
    accuracy = math.nan
    if config["feasible"]:
        accuracy = float(_cached(factory).evaluate(Arch.decode(config["arch"])))
    tune.report({"accuracy": 0.0 if math.isnan(accuracy) else accuracy, "raw_accuracy": accuracy,
                 "latency": config["predicted_ms"], "seconds": time.perf_counter() - start, "node": _node()})


def _train_trial(config: dict[str, Any], factory: TrainerFactory, epochs: int, workdir: str) -> None:
    """Ray trainable for ASHA: train from scratch, report validation accuracy after every epoch."""
    arch = Arch.decode(config["arch"])
    if not config["feasible"]:
        tune.report({"accuracy": 0.0, "raw_accuracy": math.nan, "latency": config["predicted_ms"], "epoch": -1,
                     "seconds": 0.0, "node": _node()})
        return
    start = time.perf_counter()

    def report(epoch: int, accuracy: float) -> None:
        tune.report({"accuracy": accuracy, "raw_accuracy": accuracy, "latency": config["predicted_ms"],
                     "epoch": epoch, "seconds": time.perf_counter() - start, "node": _node()})

    # The candidate's own absolute directory: a retried or restored trial resumes its training there.
    _cached(factory).train(arch, epochs, str(Path(workdir) / arch.encode()), report)


class _RecordingOptunaSearch(OptunaSearch):
    """OptunaSearch that also stores, with each study trial, what Ray reported: accuracy, time, node, epochs.

    The study is the record of the search (Ray's result grid ignores the constraint), so what a trial's record
    needs is written there, before the trial is told complete.

    It also keeps the study's total exact: it suggests nothing more once the study's complete trials and this
    driver's live ones make `n_trials`. A restored experiment's sample count dates from its last save, and trials the
    lost driver started after that save would otherwise be added again. Trials left RUNNING by a lost driver, which
    this one does not run, are failed (only the driver writes a Ray search's study).
    """

    def __init__(self, *args: Any, n_trials: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._n_trials = n_trials

    def suggest(self, trial_id: str) -> dict | str | None:
        cap = getattr(self, "_n_trials", None)  # None: an experiment saved without it
        if trial_id not in self._ot_trials and cap is not None and self._taken() >= cap:
            return TuneSearcher.FINISHED
        return super().suggest(trial_id)

    def _taken(self) -> int:
        live = {t._trial_id for tid, t in self._ot_trials.items() if tid not in self._completed_trials}  # noqa: SLF001
        taken = 0
        for t in self._ot_study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.RUNNING and t._trial_id not in live:  # noqa: SLF001
                self._ot_study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
            else:
                taken += t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        return taken

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A restored experiment reruns a trial that the study had finished before Ray saved its state: the study
        # keeps the first result.
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if result and ot_trial is not None and trial_id not in self._completed_trials:
            attrs = {"accuracy": result.get("raw_accuracy"), "seconds": result.get("seconds"),
                     "node": result.get("node"), "epochs": result.get("epoch", -1) + 1}
            for key, value in attrs.items():
                if value is not None:
                    try:
                        ot_trial.set_user_attr(key, value)
                    except optuna.exceptions.UpdateFinishedTrialError:  # told already, before a restore
                        break
        super().on_trial_complete(trial_id, result=result, error=error)


def check_cluster(address: str) -> None:
    """Fail in one line, at once, when nothing listens at a Ray cluster's host:port (ray.init would wait minutes).

    Raises:
        ClusterUnavailable: the address is malformed or nothing answers there.
    """
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"Ray address {address!r}: expected host:port (the head's --port) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ClusterUnavailable(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start its head there with "
            f"`RAY_AUTH_MODE=token ray start --head --port {port}`, or leave out --ray-address to run Ray on this "
            f"machine alone") from None


def _refused(address: str, error: BaseException) -> ClusterUnavailable:
    mode = os.environ.get("RAY_AUTH_MODE")
    now = f"RAY_AUTH_MODE is {mode!r} here" if mode else "RAY_AUTH_MODE is not set here"
    if address == "auto":  # no port was checked: nothing may run here at all
        return ClusterUnavailable(
            f"could not join a Ray cluster on this machine (--ray-address auto; {type(error).__name__}): start one "
            f"with `RAY_AUTH_MODE=token ray start --head`, or, if one runs, set RAY_AUTH_MODE=token for search.py "
            f"with the cluster's token ({now})")
    return ClusterUnavailable(
        f"the Ray cluster at {address} refused this driver ({type(error).__name__}; Ray 2.60 clusters require a "
        f"token and {now}): set RAY_AUTH_MODE=token for search.py, as for every node, with the cluster's token "
        f"(~/.ray/auth_token as `ray start --head` wrote it, or RAY_AUTH_TOKEN)")


@dataclass
class RaySearcher(Searcher):
    """Constrained search with Ray Tune and OptunaSearch.

    Attributes:
        space, predictor, target_ms: as for OptunaSearcher.
        evaluator_factory: builds the evaluator inside a Ray worker (mode "supernet").
        trainer_factory: builds the candidate trainer inside a Ray worker (mode "asha").
        mode: "supernet" (inherited weights) or "asha" (train from scratch, ASHA stops the weak early).
        sampler, objectives, storage, study_name, seed, num_classes: as for OptunaSearcher. ASHA is single
            objective only: its truncated results would mislead a multi-objective sampler.
        run_dir: absolute run directory; Ray's experiment state goes to run_dir/ray (the driver's disk).
        ray_address: join an existing cluster ("auto" or "host:port"); None starts a local instance.
        cpus_per_trial, gpus_per_trial: resources of one trial (fractions allowed).
        max_concurrent: trials at once.
        asha_epochs, asha_grace: ASHA's max_t and grace period, in epochs.
        max_failures: retries of a trial whose worker or node died (Ray reruns it from its last checkpoint).
    """

    space: SearchSpace
    predictor: LatencyPredictor
    target_ms: float
    evaluator_factory: EvaluatorFactory | None = None
    trainer_factory: TrainerFactory | None = None
    mode: str = "supernet"
    sampler: str = "tpe"
    objectives: str = "single"
    storage: str | Path | None = None
    run_dir: str | Path = "runs/search"
    study_name: str = DEFAULT_STUDY
    seed: int = 0
    num_classes: int = 10
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    asha_epochs: int = 4
    asha_grace: int = 1
    progress: bool = True
    enqueue_references: bool = True
    max_failures: int = 2

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()  # Ray runs trials in their own working directories
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {list(MODES)}")
        check_choices(self.sampler, self.objectives)
        if self.mode == "asha" and self.objectives != "single":
            raise ValueError("ASHA mode is single-objective only: truncated results would mislead the Pareto front")
        if self.mode == "supernet" and self.evaluator_factory is None:
            raise ValueError("mode 'supernet' needs an evaluator_factory")
        if self.mode == "asha" and self.trainer_factory is None:
            raise ValueError("mode 'asha' needs a trainer_factory")

    def _storage(self) -> optuna.storages.BaseStorage:
        # No heartbeat: the driver alone writes the study, and a lost node's trial is retried by Ray.
        return make_storage(self.storage, self.run_dir, heartbeat_s=None)

    def _study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(study_name=self.study_name, storage=self._storage(),
                                   directions=directions(self.objectives), load_if_exists=True)

    def _define(self, trial: optuna.Trial) -> dict[str, Any]:
        _, attrs = constrain(self.space, trial, self.predictor, self.target_ms, self.num_classes)
        return attrs  # constants merged into the Ray trial's config

    def _trainable(self) -> Any:
        if self.mode == "supernet":
            fn = tune.with_parameters(_evaluate_trial, factory=self.evaluator_factory)
        else:
            fn = tune.with_parameters(_train_trial, factory=self.trainer_factory, epochs=self.asha_epochs,
                                      workdir=str(self.run_dir / "candidates"))
        return tune.with_resources(fn, {"cpu": self.cpus_per_trial, "gpu": self.gpus_per_trial})

    def _init_ray(self) -> None:
        import ray
        import ray.exceptions

        # Ray raises AuthenticationError for a refused token where it has one (token clusters, 2.5x); older ones only
        # ConnectionError.
        AuthenticationError = getattr(ray.exceptions, "AuthenticationError", ConnectionError)  # noqa: N806

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if not self.ray_address:
            ray.init(**kwargs)
            return
        check_cluster(self.ray_address)
        try:
            ray.init(address=self.ray_address, **kwargs)
        except (ConnectionError, AuthenticationError) as e:  # the port answers: the cluster refused us
            raise _refused(self.ray_address, e) from None

    def completed(self) -> int:
        return completed(self._study())

    def search(self, n_trials: int) -> None:
        """Run (or resume) the Tune experiment until the study holds `n_trials` complete trials.

        An experiment Ray saved is restored: its unfinished and errored trials run again. One that Ray had no
        time to save (the driver was killed at once) is started anew for what the study still lacks.
        """
        self._init_ray()
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        storage_path = self.run_dir / "ray"
        name = f"{self.study_name}-{self.mode}"
        experiment = storage_path / name
        trainable = self._trainable()
        if tune.Tuner.can_restore(str(experiment)):
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
        else:
            tuner = self._new_tuner(n_trials, trainable, storage_path, name)
        grid = tuner.fit()
        if grid.errors:
            first = grid.errors[0]
            first = getattr(first, "cause", None) or first  # a worker's exception comes wrapped in Ray's
            raise SearchFailed(f"{len(grid.errors)} Ray trial(s) failed after {self.max_failures} retries; the first: "
                               f"{type(first).__name__}: {' '.join(str(first).split())[:300]} (Ray's logs: "
                               f"{storage_path / name}); rerun the same command to retry them")
        if self.completed() < n_trials:
            # Tune stops on Ctrl-C after saving the experiment, and returns: the search is not done, say so.
            raise KeyboardInterrupt

    def _new_tuner(self, n_trials: int, trainable: Any, storage_path: Path, name: str) -> tune.Tuner:
        study = self._study()  # RUNNING trials of a driver that died are failed by the search's first suggestion
        multi = self.objectives == "multi"
        metric: Any = ["accuracy", "latency"] if multi else "accuracy"
        mode: Any = ["max", "min"] if multi else "max"
        points = []
        if self.enqueue_references and len(study.trials) == 0:
            points = [self.space.params(a) for a in self.space.contained_references().values()
                      if self.predictor.predict(a) <= self.target_ms]
        search = _RecordingOptunaSearch(
            space=self._define, metric=metric, mode=mode, sampler=make_sampler(self.sampler, self.seed),
            study_name=self.study_name, storage=self._storage(), seed=self.seed,
            points_to_evaluate=points or None, n_trials=n_trials,
        )
        scheduler = None
        if self.mode == "asha":
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=self.asha_epochs,
                                      grace_period=self.asha_grace, reduction_factor=2)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(search, max_concurrent=self.max_concurrent),
                scheduler=scheduler,
                num_samples=n_trials - completed(study),
                # Ray needs one metric/mode for its own bookkeeping; the multi-objective view is the study's.
                metric=None if multi else "accuracy",
                mode=None if multi else "max",
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage_path), verbose=0,
                callbacks=[_ProgressCallback(n_trials, completed(study))] if self.progress else [],
                # A trial whose worker or node died runs again (from its checkpoint, if it wrote one).
                failure_config=tune.FailureConfig(max_failures=self.max_failures),
            ),
        )

    def result(self) -> SearchResult:
        """The study's trials (Ray's result grid would ignore the constraint)."""
        trials = self._study().get_trials(deepcopy=False)
        return SearchResult(self.target_ms, tuple(record_from_trial(t) for t in trials))


class _ProgressCallback(tune.Callback):
    """Our own one-line progress for Ray (its console output is switched off)."""

    def __init__(self, total: int, initial: int = 0) -> None:
        self.total = total
        self.initial = initial
        self.best = math.nan
        self.bar: Any = None  # made on first use: Tuner pickles its callbacks, and a bar holds sys.stderr

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "bar": None}

    def _bar(self) -> Any:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc="search (ray)", unit="trial",
                            dynamic_ncols=True)
        return self.bar

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        acc = (trial.last_result or {}).get("raw_accuracy", math.nan)
        if not math.isnan(acc) and (math.isnan(self.best) or acc > self.best):
            self.best = acc
        self._bar().set_postfix(best=f"{self.best:.4f}", refresh=False)
        self._bar().update(1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.close()
