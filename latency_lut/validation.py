"""Validation: measure sampled archs end to end, fit the table's correction, report the held-out error.

The archs are timed with the table's own settings, in interleaved rounds (each round visits every arch once, in a
new order), so a burst of machine noise spreads over many archs instead of masquerading as a
prediction error for one. The noise itself is reported two ways: the round-to-round spread, and the
*repeatability*, how far the estimate from the even rounds lies from the estimate from the odd rounds (the error
floor no table can beat on this machine).

The correction maps an arch's op entries to the table's statistic (``p50``, ``p90`` or ``p99`` over every call of a
measurement: `Settings.statistic`), in two parts fitted on a calibration share of the archs:

- one line, ``scale * sum + overhead``, by least squares on relative residuals (soft-L1 loss, robust to a stray
  measurement): the per-call cost, and the statistic against each op's fastest round;
- with ``fit="ops"`` (the default) and at least `MIN_OPS_FIT` calibration archs, a factor per op
  (`fit_op_factors`): what the op costs inside whole networks against its own entry, by ridge regression on what
  the line leaves over, the penalty chosen by cross-validation. An op timed alone (every ONNX Runtime entry) finds
  its weights hot in cache and misses what the runtime fuses or reorders across op boundaries, each op by its own
  amount, which one line cannot repair (benchmarks/results/lut_cpu.md compares the two fits on the same
  measurements).

The fitted correction is saved into the table; metrics are reported on the other, held-out archs, both before and
after it.
"""

from __future__ import annotations

import datetime
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from latency_lut.errors import LutError
from latency_lut.fingerprint import Settings, resolve_device
from latency_lut.ops import OpSignature, arch_ops
from latency_lut.table import Correction, LatencyTable, write_json_atomic
from latency_lut.timing import Budget, Measurement, make_runner, measure_interleaved, pin_allocator, thread_count
from search_space import Arch, SearchSpace

# Many short blocks rather than a few long ones, for the same time: a spell of other load then falls on a few of an
# arch's 24 blocks instead of on one of its 6, and two measurements of the same archs agree better
# (benchmarks/bench_validation_budget.py, benchmarks/results/lut_budget.md).
DEFAULT_BUDGET = Budget(rounds=24, block_s=0.0125, min_calls=1, max_calls=30, warmup=2)
FITS = ("ops", "linear")
MIN_OPS_FIT = 10  # fewer calibration archs than this fit the line alone (too few to tell ops apart)
RIDGE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # penalties the cross-validation chooses from
FACTOR_RANGE = (0.25, 4.0)  # an op's factor is kept within these


@dataclass(frozen=True)
class Metrics:
    """Prediction error over a set of archs.

    Attributes:
        n: archs.
        mape: mean absolute percentage error, percent.
        within_5: share of archs predicted within +-5% of the measurement.
        within_10: share within +-10%.
        max_error: largest absolute percentage error.
        bias: mean signed percentage error (positive: the table predicts too slow).
        kendall_tau: rank agreement between predicted and measured.
    """

    n: int
    mape: float
    within_5: float
    within_10: float
    max_error: float
    bias: float
    kendall_tau: float


def metrics(predicted: np.ndarray, measured: np.ndarray) -> Metrics:
    from scipy import stats

    error = (predicted - measured) / measured * 100
    tau = stats.kendalltau(predicted, measured).statistic if len(measured) > 1 else float("nan")
    return Metrics(
        n=int(len(measured)),
        mape=float(np.mean(np.abs(error))),
        within_5=float(np.mean(np.abs(error) <= 5)),
        within_10=float(np.mean(np.abs(error) <= 10)),
        max_error=float(np.max(np.abs(error))),
        bias=float(np.mean(error)),
        kendall_tau=float(tau),
    )


def fit_correction(raw_us: np.ndarray, measured_us: np.ndarray) -> tuple[float, float, str]:
    """Scale and overhead (us) minimising relative residuals of ``scale * raw + overhead`` against `measured`.

    Two or more archs: least squares with a soft-L1 loss (scale kept positive); one arch: scale only. The overhead
    is kept within plus or minus half the fastest measured arch: a few noisy measurements (a busy machine) otherwise
    fit a steep scale with a large negative overhead that predicts nothing, or a negative time, for the smallest
    archs; or a flat one, scale near 0, where the overhead alone predicts every arch at the same time.

    Returns:
        (scale, overhead_us, loss name).
    """
    from scipy import optimize

    raw_us, measured_us = np.asarray(raw_us, float), np.asarray(measured_us, float)
    if len(raw_us) == 1:
        return float(measured_us[0] / raw_us[0]), 0.0, "exact"
    ceiling = 0.5 * float(measured_us.min())
    floor = -ceiling
    design = np.stack([raw_us / measured_us, 1.0 / measured_us], axis=1)
    (scale, overhead), *_ = np.linalg.lstsq(design, np.ones_like(raw_us), rcond=None)
    if not scale > 0 or not floor < overhead < ceiling:
        scale, overhead = float(np.sum(measured_us) / np.sum(raw_us)), 0.0

    def residuals(p: np.ndarray) -> np.ndarray:
        return (p[0] * raw_us + p[1]) / measured_us - 1.0

    result = optimize.least_squares(residuals, [scale, overhead], loss="soft_l1", f_scale=0.02,
                                    bounds=([1e-6, floor], [np.inf, ceiling]))
    return float(result.x[0]), float(result.x[1]), "soft_l1"


def fit_op_factors(table: LatencyTable, archs: list[Arch], measured_us: np.ndarray, scale: float,
                   overhead_us: float, seed: int = 0,
                   ridge: float | None = None) -> tuple[tuple[tuple[OpSignature, float], ...], float]:
    """A factor per op of `archs` (the call op aside: it is in every network, as the overhead is), fitted to their
    measurements on top of the line ``scale * sum + overhead_us``.

    Unknowns u (one per op, factor 1 + u) minimise the relative residuals of
    ``scale * sum((1 + u_op) * entry_op) + overhead_us`` plus ``ridge * |u|^2``, which pulls each op towards its
    own entry in proportion to how little the measurements say about it (an op in one arch barely moves). The
    penalty, unless given, is the one of `RIDGE_GRID` with the smallest mean absolute error in 5-fold
    cross-validation over `archs`. Factors are clipped to `FACTOR_RANGE`.

    Returns:
        ((op, factor) pairs sorted by op, the penalty used).
    """
    plain = table.plain()
    op_lists = [arch_ops(a, table.geometry)[:-1] for a in archs]  # the call op is last
    ops = sorted({op for arch_op_list in op_lists for op in arch_op_list})
    column = {op: j for j, op in enumerate(ops)}
    counts = np.zeros((len(archs), len(ops)))
    for i, arch_op_list in enumerate(op_lists):
        for op in arch_op_list:
            counts[i, column[op]] += 1
    entries = np.array([plain.entries[op].median_us for op in ops])
    measured_us = np.asarray(measured_us, float)
    base_us = scale * plain.predict_many(archs, corrected=False) * 1e3 + overhead_us
    design = scale * counts * entries / measured_us[:, None]  # row i: each op's share of arch i, at factor 1
    target = (measured_us - base_us) / measured_us

    def solve(rows: np.ndarray, penalty: float) -> np.ndarray:
        a = design[rows]
        return np.linalg.solve(a.T @ a + penalty * np.eye(len(ops)), a.T @ target[rows])

    if ridge is None:
        folds = np.array_split(np.random.default_rng(seed).permutation(len(archs)), 5)
        errors = []
        for penalty in RIDGE_GRID:
            error = 0.0
            for fold in folds:
                rest = np.setdiff1d(np.arange(len(archs)), fold)
                error += float(np.abs(design[fold] @ solve(rest, penalty) - target[fold]).sum())
            errors.append(error)
        ridge = RIDGE_GRID[int(np.argmin(errors))]
    factors = np.clip(1.0 + solve(np.arange(len(archs)), ridge), *FACTOR_RANGE)
    return tuple((op, float(f)) for op, f in zip(ops, factors, strict=True)), float(ridge)


def fit(table: LatencyTable, archs: list[Arch], measured_us: np.ndarray, how: str = "ops", seed: int = 0,
        ridge: float | None = None) -> Correction:
    """The table's correction fitted to `archs` measured at `measured_us`: the line, then (`how="ops"`, at least
    `MIN_OPS_FIT` archs) the op factors; `ridge` fixes the penalty instead of cross-validating it."""
    if how not in FITS:
        raise LutError(f"fit {how!r} is not one of {list(FITS)}")
    raw_us = table.plain().predict_many(archs, corrected=False) * 1e3
    scale, overhead_us, loss = fit_correction(raw_us, measured_us)
    factors, penalty = (), 0.0
    if how == "ops" and len(archs) >= MIN_OPS_FIT:
        factors, penalty = fit_op_factors(table, archs, measured_us, scale, overhead_us, seed, ridge)
    return Correction(scale=scale, overhead_us=overhead_us, fitted_on=len(archs), space="", seed=seed,
                      fitted_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      loss=loss, op_factors=factors, ridge=penalty)


def sample_archs(space: SearchSpace, n: int, rng: np.random.Generator) -> list[Arch]:
    """`n` distinct archs drawn uniformly (gives up after 100 n draws on a tiny space)."""
    seen: dict[str, Arch] = {}
    for _ in range(100 * n):
        arch = space.sample(rng)
        seen.setdefault(arch.encode(), arch)
        if len(seen) == n:
            break
    return list(seen.values())


def measure_archs(space: SearchSpace, archs: list[Arch], device: str | torch.device, settings: Settings,
                  budget: Budget = DEFAULT_BUDGET, seed: int = 0, progress: bool = True) -> list[Measurement]:
    """Time every arch end to end in interleaved rounds (plain networks, random weights)."""
    dev = resolve_device(device)
    g = space.geometry
    shape = (settings.batch_size, g.in_channels, g.input_size, g.input_size)
    rng = np.random.default_rng(seed)
    pin_allocator()
    with thread_count(settings.threads):
        runners = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for arch in tqdm(archs, desc="build", unit="arch", disable=not progress, file=sys.stderr, leave=False):
                runners.append(make_runner(space.build(arch, settings.num_classes), shape, dev, settings, seed))
        bar = tqdm(total=budget.rounds * len(archs), desc="measure", unit="block", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            blocks = measure_interleaved(runners, budget, rng, on_block=bar.update)
        finally:
            bar.close()
    return [Measurement.from_blocks(b) for b in blocks]


def validate(lut: str | Path, space: SearchSpace, n: int = 50, seed: int = 0, calibrate_frac: float = 0.4,
             report_dir: str | Path | None = None, device: str | None = None, allow_mismatch: bool = False,
             budget: Budget = DEFAULT_BUDGET, progress: bool = True, save: bool = True,
             how: str = "ops") -> dict[str, Any]:
    """Measure `n` sampled archs, fit and store the table's correction, report held-out accuracy.

    Args:
        lut: the table file (its correction is replaced, atomically, when `save`).
        space: where the archs come from; must have the table's geometry and all its ops in the table.
        n: archs to measure.
        seed: sampling, weights, inputs, round order and the calibration split.
        calibrate_frac: share of the archs the correction is fitted on (0: keep the identity correction).
        report_dir: where the JSON report and the PNG scatter plot go (default: beside the table).
        device: where to measure (default: the table's device kind).
        allow_mismatch: measure even when this machine's fingerprint differs from the table's.
        budget: rounds and block length of the end-to-end timing.
        progress: progress bars on stderr.
        save: store the fitted correction in the table file.
        how: "ops" (the line, then a factor per op) or "linear" (the line alone); see `fit`.

    Returns:
        the report (also written as JSON).

    Raises:
        LutError: bad arguments, a table that does not fit the machine or the space, a missing entry.
    """
    started = time.perf_counter()
    lut = Path(lut)
    if n < 2:
        raise LutError(f"--n {n}: need at least 2 archs")
    if not 0.0 <= calibrate_frac < 1.0:
        raise LutError(f"--calibrate-frac {calibrate_frac}: must be in [0, 1)")
    if how not in FITS:
        raise LutError(f"--fit {how}: must be one of {list(FITS)}")
    table = LatencyTable.load(lut)
    settings = table.fingerprint.settings
    device = device or table.fingerprint.device_kind
    differences = table.check(settings, allow_mismatch=allow_mismatch, device=device, name=str(lut))
    if space.geometry != table.geometry:
        raise LutError(f"space {space.name!r} has geometry {space.geometry.to_dict()}, table {lut} has "
                       f"{table.geometry.to_dict()}")
    rng = np.random.default_rng(seed)
    archs = sample_archs(space, n, rng)
    raw_us = table.plain().predict_many(archs, corrected=False) * 1e3  # raises MissingEntry before any timing

    measured = measure_archs(space, archs, device, settings, budget, seed, progress)
    measured_us = np.array([m.value(settings.statistic) for m in measured]) * 1e3  # what the table predicts

    order = rng.permutation(len(archs))
    n_cal = int(round(calibrate_frac * len(archs)))
    if calibrate_frac > 0:
        n_cal = min(max(n_cal, 2), len(archs) - 1)
    calibrate, held_out = order[:n_cal], order[n_cal:]
    correction = Correction()
    if n_cal:
        correction = fit(table, [archs[i] for i in calibrate], measured_us[calibrate], how, seed)
        correction = replace(correction, space=space.name)
    fitted = LatencyTable(table.fingerprint, table.geometry, table.entries, correction)
    corrected_us = fitted.predict_many(archs) * 1e3

    report = {"table": str(lut), "space": space.name, "fingerprint": table.fingerprint.to_dict(),
              "fingerprint_differences": differences, "n": len(archs), "statistic": settings.statistic, "seed": seed,
              "budget": asdict(budget), "allocator": pin_allocator(), "fit": how,
              "correction": {k: v for k, v in correction.to_dict().items() if k != "op_factors"},
              "op_factors": len(correction.op_factors),
              **_accuracy(archs, measured, measured_us, raw_us, corrected_us, calibrate, held_out)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    out_dir = Path(report_dir) if report_dir is not None else lut.parent
    stem = f"validate-{lut.stem}"
    write_json_atomic(out_dir / f"{stem}.json", report)
    plot(report, out_dir / f"{stem}.png")
    report["report"] = str(out_dir / f"{stem}.json")
    report["plot"] = str(out_dir / f"{stem}.png")
    if save and n_cal:
        table.correction = correction
        table.save(lut)
    return report


def _accuracy(archs: list[Arch], measured: list[Measurement], measured_us: np.ndarray, raw_us: np.ndarray,
              corrected_us: np.ndarray, calibrate: np.ndarray, held_out: np.ndarray) -> dict[str, Any]:
    """The report's figures: held-out error before and after the correction, the noise, and every arch's row."""
    spread = np.array([m.noise for m in measured])
    halves = np.array([_half_disagreement(m) for m in measured])
    roles = set(calibrate.tolist())
    return {
        "held_out": asdict(metrics(corrected_us[held_out], measured_us[held_out])),
        "held_out_uncorrected": asdict(metrics(raw_us[held_out], measured_us[held_out])),
        "calibration": asdict(metrics(corrected_us[calibrate], measured_us[calibrate])) if len(calibrate) > 1
        else None,
        "noise": {
            "round_spread_median": float(np.median(spread)),
            "round_spread_p90": float(np.percentile(spread, 90)),
            "repeatability_median": float(np.median(halves)),
            "repeatability_p90": float(np.percentile(halves, 90)),
        },
        "archs": [
            {
                "arch": arch.encode(),
                "role": "calibrate" if i in roles else "held_out",
                "measured_ms": float(measured_us[i] / 1e3),
                "predicted_ms": float(corrected_us[i] / 1e3),
                "uncorrected_ms": float(raw_us[i] / 1e3),
                **{f"{k}_ms": measured[i].value(k) for k in ("p50", "p90", "p99")},
                "round_spread": float(spread[i]),
                "repeatability": float(halves[i]),
            }
            for i, arch in enumerate(archs)
        ],
    }


def _half_disagreement(m: Measurement) -> float:
    """|estimate from even rounds / estimate from odd rounds - 1| (0 with a single round)."""
    rounds = np.asarray(m.round_medians_ms)
    if len(rounds) < 2:
        return 0.0
    even, odd = rounds[0::2].min(), rounds[1::2].min()
    return float(abs(even / odd - 1.0))


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Predicted vs measured (held-out and calibration archs), with y = x and the +-10% band, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["archs"]
    measured = np.array([r["measured_ms"] for r in rows])
    predicted = np.array([r["predicted_ms"] for r in rows])
    held = np.array([r["role"] == "held_out" for r in rows])
    lo, hi = min(measured.min(), predicted.min()) * 0.9, max(measured.max(), predicted.max()) * 1.1
    line = np.linspace(lo, hi, 100)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
    ax.fill_between(line, line * 0.9, line * 1.1, color="tab:green", alpha=0.15, label="±10%")
    ax.plot(line, line, color="black", lw=1, label="y = x")
    ax.scatter(measured[~held], predicted[~held], s=18, color="tab:gray", label="calibration")
    ax.scatter(measured[held], predicted[held], s=22, color="tab:blue", label="held out")
    m = report["held_out"]
    fp = report["fingerprint"]
    ax.set_title(f"{report['space']} on {fp['device_name']} ({fp['runtime']}, {fp['threads']} thr, "
                 f"b{fp['batch_size']}, {fp['dtype']})\nheld out: MAPE {m['mape']:.1f}%, "
                 f"{m['within_10'] * 100:.0f}% within ±10%, Kendall τ {m['kendall_tau']:.2f}", fontsize=9)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
