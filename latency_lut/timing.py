"""Timing on a shared, noisy machine: runners, interleaved rounds and one robust statistic used everywhere.

Noise on a shared machine is one-sided (another process can only make a call slower) and comes in bursts. So
every measurement here is taken in blocks: a block is a few consecutive calls of one thing, a round visits every
thing once (in a shuffled order, so that a burst does not always hit the same one), and the estimate is the
*median of the fastest round* (the lowest of the per-round block medians). Tables, end-to-end validation and
`measure_model` all use this same statistic, so whatever bias it has is shared by what is predicted and what is
measured.

On CUDA a call is timed with events around it and a synchronize after it (one request at a time, as inference
serves it); on the CPU with `time.perf_counter_ns`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import logging
import math
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latency_lut.errors import LutError
from latency_lut.fingerprint import Settings, check_settings, resolve_device

_perf_ns = time.perf_counter_ns

# ---- the statistic -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Summary of blocks of timings of one thing, in microseconds.

    Attributes:
        median_us: the estimate: the median of the fastest round (lowest per-round median).
        p10_us: 10th percentile of every sample.
        p90_us: 90th percentile of every sample.
        n: number of samples.
        spread: how much slower the typical round was than the fastest (median of round medians / fastest - 1).
    """

    median_us: float
    p10_us: float
    p90_us: float
    n: int
    spread: float


def summarize(blocks: Sequence[Sequence[float]]) -> Stats:
    """`Stats` of timings in seconds grouped by round (one sequence of calls per round)."""
    medians = np.array([np.median(b) for b in blocks if len(b)], dtype=float)
    if medians.size == 0:
        raise ValueError("no timings to summarize")
    samples = np.concatenate([np.asarray(b, dtype=float) for b in blocks if len(b)])
    best = float(medians.min())
    return Stats(
        median_us=best * 1e6,
        p10_us=float(np.percentile(samples, 10)) * 1e6,
        p90_us=float(np.percentile(samples, 90)) * 1e6,
        n=int(samples.size),
        spread=float(np.median(medians) / best - 1.0) if best > 0 else 0.0,
    )


@dataclass(frozen=True)
class Measurement:
    """End-to-end timing of one model (what `measure_model` returns), in milliseconds.

    Attributes:
        median_ms: the estimate: the median of the fastest round.
        p10_ms: 10th percentile of every sample.
        p90_ms: 90th percentile of every sample.
        samples_ms: every call's time, round by round.
        round_medians_ms: the median of each round, in order.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples_ms: tuple[float, ...]
    round_medians_ms: tuple[float, ...]

    @property
    def noise(self) -> float:
        """Relative round-to-round spread: median of the round medians over the fastest, minus 1."""
        return float(np.median(self.round_medians_ms) / self.median_ms - 1.0)

    @classmethod
    def from_blocks(cls, blocks: Sequence[Sequence[float]]) -> Measurement:
        """From timings in seconds grouped by round."""
        rounds = [np.asarray(b, dtype=float) * 1e3 for b in blocks if len(b)]
        if not rounds:
            raise ValueError("no timings to summarize")
        medians = [float(np.median(r)) for r in rounds]
        samples = np.concatenate(rounds)
        return cls(
            median_ms=min(medians),
            p10_ms=float(np.percentile(samples, 10)),
            p90_ms=float(np.percentile(samples, 90)),
            samples_ms=tuple(float(t) for t in samples),
            round_medians_ms=tuple(medians),
        )


# ---- runners -----------------------------------------------------------------------------------------------------


class Runner:
    """Something that can be called repeatedly and timed; subclasses time `calls` consecutive calls.

    `time(calls)` returns an array of seconds: shape (calls,) for a whole call, or (calls, ops) for a chain of
    ops timed one by one.
    """

    def time(self, calls: int) -> np.ndarray:
        raise NotImplementedError

    def call_seconds(self, times: np.ndarray) -> np.ndarray:
        """Seconds per whole call (chains sum their ops)."""
        return times if times.ndim == 1 else times.sum(axis=1)


class EagerRunner(Runner):
    """One PyTorch module on one input, in inference mode."""

    def __init__(self, module: nn.Module | Any, x: torch.Tensor) -> None:
        self.module = module
        self.x = x
        self.cuda = x.device.type == "cuda"

    def time(self, calls: int) -> np.ndarray:
        out = np.empty(calls)
        with torch.inference_mode():
            if self.cuda:
                for i in range(calls):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    self.module(self.x)
                    end.record()
                    end.synchronize()
                    out[i] = start.elapsed_time(end) / 1e3
            else:
                clock = _perf_ns
                module, x = self.module, self.x
                for i in range(calls):
                    t = clock()
                    module(x)
                    out[i] = clock() - t
                out *= 1e-9
        return out


class ChainRunner(Runner):
    """A network run as its ops in turn, each op timed where it runs (its input made by the op before it)."""

    def __init__(self, ops: Sequence[nn.Module], x: torch.Tensor) -> None:
        self.ops = list(ops)
        self.x = x
        self.cuda = x.device.type == "cuda"

    def time(self, calls: int) -> np.ndarray:
        n = len(self.ops)
        out = np.empty((calls, n))
        with torch.inference_mode():
            if self.cuda:
                for i in range(calls):
                    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
                    y = self.x
                    events[0].record()
                    for j, op in enumerate(self.ops):
                        y = op(y)
                        events[j + 1].record()
                    events[-1].synchronize()
                    out[i] = [events[j].elapsed_time(events[j + 1]) / 1e3 for j in range(n)]
            else:
                clock = _perf_ns
                ops, stamps = self.ops, [0] * (n + 1)
                for i in range(calls):
                    y = self.x
                    stamps[0] = clock()
                    for j, op in enumerate(ops):
                        y = op(y)
                        stamps[j + 1] = clock()
                    out[i] = np.diff(stamps)
                out *= 1e-9
        return out


class OrtRunner(Runner):
    """An ONNX Runtime session with its input and output bound once (no copies per run)."""

    def __init__(self, model: bytes | str | Path, x: np.ndarray, threads: int) -> None:
        import onnxruntime as ort

        self.session = ort_session(model, threads)
        self.x = np.ascontiguousarray(x)
        self.value = ort.OrtValue.ortvalue_from_numpy(self.x)  # shares self.x's memory: both are kept alive here
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.value)
        for output in self.session.get_outputs():
            self.binding.bind_output(output.name, "cpu")
        self.session.run_with_iobinding(self.binding)  # let ORT allocate the outputs once, then reuse them
        for output, value in zip(self.session.get_outputs(), self.binding.get_outputs(), strict=True):
            self.binding.bind_ortvalue_output(output.name, value)

    def time(self, calls: int) -> np.ndarray:
        out = np.empty(calls)
        clock, run, binding = _perf_ns, self.session.run_with_iobinding, self.binding
        for i in range(calls):
            t = clock()
            run(binding)
            out[i] = clock() - t
        return out * 1e-9


# ---- interleaved rounds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long to time each thing.

    Attributes:
        rounds: interleaved rounds (the estimate is the fastest round's median).
        block_s: target seconds per block; the calls per block follow from a warm-up estimate.
        min_calls: fewest calls in a block.
        max_calls: most calls in a block.
        warmup: untimed calls before the first round (allocations, oneDNN primitives, cuDNN plans).
    """

    rounds: int = 3
    block_s: float = 0.03
    min_calls: int = 3
    max_calls: int = 50
    warmup: int = 2

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_calls < 1 or self.max_calls < self.min_calls or self.warmup < 0:
            raise LutError(f"timing budget {self}: need rounds >= 1, 1 <= min_calls <= max_calls, warmup >= 0")
        if not (self.block_s >= 0 and math.isfinite(self.block_s)):
            raise LutError(f"timing budget: block_s {self.block_s} must be a non-negative number of seconds")


def measure_interleaved(runners: Sequence[Runner], budget: Budget, rng: np.random.Generator,
                        on_block: Callable[[], None] | None = None) -> list[list[np.ndarray]]:
    """Time every runner in `budget.rounds` interleaved rounds (`on_block` is called after each block).

    Returns:
        per runner, one array of timings (seconds) per round, as `Runner.time` returns them.
    """
    calls = []
    for runner in runners:
        first = runner.call_seconds(runner.time(max(budget.warmup, 1)))
        estimate = float(np.min(first))
        wanted = math.ceil(budget.block_s / estimate) if estimate > 0 else budget.max_calls
        calls.append(int(min(max(wanted, budget.min_calls), budget.max_calls)))
    out: list[list[np.ndarray]] = [[] for _ in runners]
    for _ in range(budget.rounds):
        for k in rng.permutation(len(runners)):
            out[k].append(runners[k].time(calls[k]))
            if on_block is not None:
                on_block()
    return out


_PINNED: list[str] = []


def pin_allocator() -> str:
    """Keep freed memory in the process heap (glibc: fix the mmap and trim thresholds at 1 GiB); idempotent.

    By default glibc serves large blocks (activations of a few hundred kB) with fresh mmap pages, or trims the
    heap after a free, and adapts its thresholds to the history of the process. A block then costs page faults on
    one call and none on the next, depending on what ran before: the same unit took 0.76 ms in one process and
    1.45 ms in another. Pinning the thresholds gives every measurement (ops, networks, `measure_model`) the steady
    state of a warm inference server. It is process-wide and cannot be undone (the process keeps its heap).

    Returns:
        what was done, for the record ("" where the C library is not glibc).
    """
    if _PINNED:
        return _PINNED[0]
    done = ""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        for size in (1 << 30, 32 << 20):  # older glibc caps the mmap threshold at 32 MiB
            if mallopt(m_mmap_threshold, size) == 1 and mallopt(m_trim_threshold, 2 * size) == 1:
                done = f"glibc mmap threshold {size >> 20} MiB, trim threshold {2 * size >> 20} MiB"
                break
    _PINNED.append(done)
    return done


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """Run the body with `threads` intra-op threads, restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- ONNX --------------------------------------------------------------------------------------------------------


def export_onnx(module: nn.Module, x: torch.Tensor) -> bytes:
    """An ONNX model of `module` (in eval mode) for input `x`, as bytes.

    The TorchScript-based exporter takes ~30 ms for one unit where the dynamo exporter takes ~1 s, and ONNX Runtime
    runs both graphs equally fast once it has optimised them, so the fast one is used while torch still has it
    (it is deprecated in torch 2.9+); the dynamo exporter is the fallback.
    """
    module = module.eval()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                buffer = io.BytesIO()
                torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"], output_names=["y"])
                return buffer.getvalue()
            except Exception:  # the legacy exporter is gone or cannot trace this module: use dynamo
                program = torch.onnx.export(module, (x,), dynamo=True, verbose=False, input_names=["x"],
                                            output_names=["y"])
                return program.model_proto.SerializeToString()
    finally:
        logger.setLevel(level)


def ort_session(model: bytes | str | Path, threads: int) -> Any:
    """An ONNX Runtime session on the CPU execution provider: `threads` intra-op threads, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, NoSuchFile, ...)
        where = "model bytes" if isinstance(model, bytes) else str(model)
        raise LutError(f"{where}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None


# ---- end to end --------------------------------------------------------------------------------------------------


def input_shape_for(input_shape: Sequence[int], settings: Settings) -> tuple[int, ...]:
    """(C, H, W) or (N, C, H, W) as the full input shape at `settings.batch_size`."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        return (settings.batch_size, *shape)
    if len(shape) == 4 and shape[0] == settings.batch_size:
        return shape
    raise LutError(f"input shape {shape}: expected (C, H, W) or (batch {settings.batch_size}, C, H, W)")


def make_runner(model: nn.Module | str | Path, shape: tuple[int, ...], device: torch.device,
                settings: Settings, seed: int = 0) -> Runner:
    """A runner for a whole model under `settings`: eager on `device`, or ONNX Runtime on an .onnx file or an export.

    The model is put in eval mode and, for eager, moved to the device, dtype and memory format (in place).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    if settings.runtime == "onnxruntime":
        if isinstance(model, nn.Module):
            model = export_onnx(model, x)
        elif not Path(model).is_file():
            raise LutError(f"{model}: no such ONNX file")
        return OrtRunner(model, x.numpy(), settings.threads)
    if not isinstance(model, nn.Module):
        raise LutError(f"{model}: the eager runtime measures a torch module, not a file (use runtime onnxruntime)")
    fmt = settings.torch_memory_format
    model.eval().to(device=device, dtype=settings.torch_dtype, memory_format=fmt)
    x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=fmt)
    return EagerRunner(model, x)


def measure_model(model: nn.Module | str | Path, input_shape: Sequence[int], device: str | torch.device,
                  settings: Settings, repeats: int = 5, budget: Budget | None = None, seed: int = 0) -> Measurement:
    """Time a whole model end to end, with the statistic the tables use.

    Args:
        model: a torch module (eager, or exported for onnxruntime) or the path of an .onnx file (onnxruntime).
        input_shape: (C, H, W), or (N, C, H, W) with N equal to `settings.batch_size`.
        device: "cpu", "cuda" or "cuda:N" (onnxruntime: cpu only).
        settings: runtime, threads, dtype, memory format, batch size.
        repeats: rounds (the estimate is the median of the fastest round); overrides `budget.rounds`.
        budget: calls per round and warm-up (default: blocks of at least 0.2 s, 3 to 50 calls).
        seed: seed of the random input.

    Returns:
        the median of the fastest round, p10/p90 and every sample, in milliseconds.

    Raises:
        LutError: bad settings for the device, a missing ONNX file, an input shape that disagrees with the batch.
    """
    dev = resolve_device(device)
    check_settings(dev, settings)
    base = budget or Budget(block_s=0.2, min_calls=3, max_calls=50, warmup=3)
    budget = Budget(rounds=repeats, block_s=base.block_s, min_calls=base.min_calls, max_calls=base.max_calls,
                    warmup=base.warmup)
    pin_allocator()
    with thread_count(settings.threads):
        runner = make_runner(model, input_shape_for(input_shape, settings), dev, settings, seed)
        blocks = measure_interleaved([runner], budget, np.random.default_rng(seed))[0]
    return Measurement.from_blocks(blocks)


def measure_model_fresh(model: nn.Module, input_shape: Sequence[int], device: str | torch.device, settings: Settings,
                        repeats: int = 5, budget: Budget | None = None, seed: int = 0) -> Measurement:
    """`measure_model` in a process that has done nothing else: what a deployed model, or the table's profiler, sees.

    A process's past shows in its timings. On a 2-core CPU, a process that had just trained timed networks 1.26x
    slower (geometric mean, 1.02-1.42x) than a fresh one timed them in the same minutes, and releasing its freed
    memory (`malloc_trim`) did not close the gap (benchmarks/bench_fresh.py). On an H200, a search process measured
    candidates at about twice the table. So this sends `model` (on the CPU; the child moves it to `device`) to a
    child forked from a server that has only imported torch: the fork costs milliseconds, and the server starts once
    per process (`spawn` where there is no forkserver). Arguments and result are those of `measure_model`; its
    errors are raised here.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise LutError("measure_model_fresh: send the model on the CPU; the child moves it to the device")
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_context()) as pool:
        return pool.submit(measure_model, model, tuple(input_shape), str(device), settings, repeats, budget,
                           seed).result()


def _fresh_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["latency_lut.timing", "search_space"])  # in the server, once; not __main__
    return context
