"""Timing on a shared, noisy machine: runners, interleaved rounds, and the statistics of a measurement.

Noise on a shared machine is one-sided (another process can only make a call slower) and comes in bursts. So
every measurement here is taken in blocks: a block is a few consecutive calls of one thing, and a round visits
every thing once (in a shuffled order, so that a burst does not always hit the same one).

Two statistics come out of that. An op's table entry is the *median of its fastest round* (the lowest of the
per-round block medians): a burst falls on one round and is left out, so the entries are what the op costs on a
quiet machine. A whole network's latency, what a budget promises, is a percentile over every call of every round
(`Measurement.p50_ms`, `p90_ms`, `p99_ms`; `Settings.statistic` chooses), and a table's correction maps the sum of
its entries to that percentile.

Shipped files are measured as they are deployed (`measure_file`): `model.onnx` in ONNX Runtime (on the execution
provider of the runtime), `model.pt2` as its torch.export module (eager), or that module captured as a CUDA graph
(cudagraph).

On CUDA a call is timed with events around it and a synchronize after it (one request at a time, as inference
serves it); ONNX Runtime on CUDA runs on its own stream, so its calls are timed on the host clock around the run and
a device synchronize. On the CPU with `time.perf_counter_ns`.
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
from latency_lut.fingerprint import ORT_PROVIDERS, SHIPPED_FILES, Settings, check_settings, is_ort, resolve_device

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


STATISTICS = ("p50", "p90", "p99")  # what a latency budget promises: a percentile over every call of a measurement


@dataclass(frozen=True)
class Measurement:
    """End-to-end timing of one model (what `measure_model` and `measure_file` return), in milliseconds.

    The percentiles are over every call of every round. `best_round_ms`, the median of the fastest round, is what
    the tables' op entries use (a burst of other load falls on one round and is left out); a promise on a whole
    network is one of the percentiles, chosen by `latency.statistic`.

    Attributes:
        p50_ms: median of every call.
        p90_ms: 90th percentile of every call.
        p99_ms: 99th percentile of every call.
        p10_ms: 10th percentile of every call.
        best_round_ms: the median of the fastest round.
        samples_ms: every call's time, round by round.
        round_medians_ms: the median of each round, in order.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    p10_ms: float
    best_round_ms: float
    samples_ms: tuple[float, ...]
    round_medians_ms: tuple[float, ...]

    @property
    def calls(self) -> int:
        return len(self.samples_ms)

    @property
    def noise(self) -> float:
        """Relative round-to-round spread: median of the round medians over the fastest, minus 1."""
        return float(np.median(self.round_medians_ms) / self.best_round_ms - 1.0)

    def value(self, statistic: str) -> float:
        """The percentile `statistic` ("p50", "p90" or "p99") in milliseconds."""
        if statistic not in STATISTICS:
            raise LutError(f"statistic {statistic!r} is not one of {list(STATISTICS)}")
        return float(getattr(self, f"{statistic}_ms"))

    def summary(self) -> dict[str, float | int]:
        """The statistics as plain data (no samples), for model cards and reports."""
        return {"p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "p10_ms": self.p10_ms,
                "best_round_ms": self.best_round_ms, "calls": self.calls, "rounds": len(self.round_medians_ms)}

    @classmethod
    def from_blocks(cls, blocks: Sequence[Sequence[float]]) -> Measurement:
        """From timings in seconds grouped by round."""
        rounds = [np.asarray(b, dtype=float) * 1e3 for b in blocks if len(b)]
        if not rounds:
            raise ValueError("no timings to summarize")
        medians = [float(np.median(r)) for r in rounds]
        samples = np.concatenate(rounds)
        p10, p50, p90, p99 = (float(v) for v in np.percentile(samples, [10, 50, 90, 99]))
        return cls(p50_ms=p50, p90_ms=p90, p99_ms=p99, p10_ms=p10, best_round_ms=min(medians),
                   samples_ms=tuple(float(t) for t in samples), round_medians_ms=tuple(medians))


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


class CudaGraphRunner(Runner):
    """A module captured once as a CUDA graph on static input and output buffers; a call is one replay.

    As `torch.cuda.graphs` prescribes: a few warm-up calls on a side stream (cuDNN plans, allocations), then the
    capture, whose input and output tensors are the graph's fixed buffers. Replays are timed with CUDA events after
    synchronising, like `EagerRunner` on CUDA.
    """

    def __init__(self, module: nn.Module | Any, x: torch.Tensor, warmup: int = 3) -> None:
        if x.device.type != "cuda":
            raise LutError(f"runtime cudagraph captures CUDA graphs: the input is on {x.device}, not on a cuda device")
        self.module = module
        self.x = x.clone()  # the graph's static input
        self.graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(device=x.device)
        try:
            with torch.no_grad():
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for _ in range(max(warmup, 1)):
                        module(self.x)
                current.wait_stream(side)
                with torch.cuda.graph(self.graph):
                    self.y = module(self.x)  # the graph's static output
            torch.cuda.synchronize(x.device)
        except RuntimeError as e:  # an op that synchronises or allocates on the host cannot be captured
            raise LutError(f"runtime cudagraph: the model cannot be captured as a CUDA graph "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time(self, calls: int) -> np.ndarray:
        out = np.empty(calls)
        replay, start, end = self.graph.replay, self.start, self.end
        for i in range(calls):
            start.record()
            replay()
            end.record()
            end.synchronize()
            out[i] = start.elapsed_time(end) / 1e3
        return out


class OrtRunner(Runner):
    """An ONNX Runtime session with its input and output bound once (no copies per run).

    On the CPU the buffers are host memory; on CUDA (runtimes ort-cuda and ort-tensorrt) they are device memory on
    `device_index`, so a call moves no data between host and device, and each call ends with a device synchronize.
    """

    def __init__(self, model: bytes | str | Path, x: np.ndarray, threads: int, runtime: str = "onnxruntime",
                 device_index: int = 0) -> None:
        import onnxruntime as ort

        self.session = ort_session(model, threads, runtime, device_index)
        self.cuda = runtime != "onnxruntime"
        self.device_index = device_index
        where = ("cuda", device_index) if self.cuda else ("cpu", 0)
        self.x = np.ascontiguousarray(x)
        # On the CPU the value shares self.x's memory (both are kept alive here); on CUDA it is a device copy.
        self.value = ort.OrtValue.ortvalue_from_numpy(self.x, *where)
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.value)
        for output in self.session.get_outputs():
            self.binding.bind_output(output.name, *where)
        self.session.run_with_iobinding(self.binding)  # let ORT allocate the outputs once, then reuse them
        for output, value in zip(self.session.get_outputs(), self.binding.get_outputs(), strict=True):
            self.binding.bind_ortvalue_output(output.name, value)
        if self.cuda:
            torch.cuda.synchronize(device_index)

    def time(self, calls: int) -> np.ndarray:
        out = np.empty(calls)
        clock, run, binding = _perf_ns, self.session.run_with_iobinding, self.binding
        if self.cuda:
            synchronize, index = torch.cuda.synchronize, self.device_index
            for i in range(calls):
                t = clock()
                run(binding)
                synchronize(index)  # ORT's CUDA stream is not torch's: wait for the device, not for one stream
                out[i] = clock() - t
        else:
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


def ort_session(model: bytes | str | Path, threads: int, runtime: str = "onnxruntime", device_index: int = 0) -> Any:
    """An ONNX Runtime session: `threads` intra-op threads, sequential execution, on the runtime's provider.

    onnxruntime: CPUExecutionProvider. ort-cuda: CUDAExecutionProvider on `device_index` (ops it lacks on the CPU).
    ort-tensorrt: TensorrtExecutionProvider, then CUDA, then the CPU for what the one before does not take.

    Raises:
        LutError: a file ONNX Runtime cannot load, or a provider that did not start (ONNX Runtime falls back to the
            next provider silently when, say, the CUDA or TensorRT libraries are missing: that is refused here).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    cuda = ("CUDAExecutionProvider", {"device_id": device_index})
    providers: list[Any] = {
        "onnxruntime": ["CPUExecutionProvider"],
        "ort-cuda": [cuda, "CPUExecutionProvider"],
        "ort-tensorrt": [("TensorrtExecutionProvider", {"device_id": device_index}), cuda, "CPUExecutionProvider"],
    }[runtime]
    source = model if isinstance(model, bytes) else str(model)
    where = "model bytes" if isinstance(model, bytes) else str(model)
    try:
        with warnings.catch_warnings():  # a provider this build lacks: refused below, in one line
            warnings.simplefilter("ignore")
            session = ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, NoSuchFile, ...)
        raise LutError(f"{where}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
    wanted = ORT_PROVIDERS[runtime]
    if session.get_providers()[0] != wanted:
        raise LutError(f"runtime {runtime}: ONNX Runtime did not start {wanted} for {where} (it runs on "
                       f"{', '.join(session.get_providers())}); are the CUDA, cuDNN or TensorRT libraries that "
                       f"onnxruntime {ort.__version__} needs installed?")
    return session


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
    """A runner for a whole model under `settings`: eager or a captured CUDA graph on `device`, or ONNX Runtime (on
    the runtime's provider) on an .onnx file or an export.

    The model is put in eval mode and, for eager, moved to the device, dtype and memory format (in place).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    if is_ort(settings.runtime):
        if isinstance(model, nn.Module):
            model = export_onnx(model, x)
        elif not Path(model).is_file():
            raise LutError(f"{model}: no such ONNX file")
        return OrtRunner(model, x.numpy(), settings.threads, settings.runtime, device.index or 0)
    if not isinstance(model, nn.Module):
        raise LutError(f"{model}: the {settings.runtime} runtime measures a torch module here, not a file (a "
                       f"shipped file: measure_file)")
    fmt = settings.torch_memory_format
    model.eval().to(device=device, dtype=settings.torch_dtype, memory_format=fmt)
    x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=fmt)
    if settings.runtime == "cudagraph":
        return CudaGraphRunner(model, x)
    return EagerRunner(model, x)


def measure_model(model: nn.Module | str | Path, input_shape: Sequence[int], device: str | torch.device,
                  settings: Settings, repeats: int = 5, budget: Budget | None = None, seed: int = 0) -> Measurement:
    """Time a whole model end to end, with the statistic the tables use.

    Args:
        model: a torch module (eager, cudagraph, or exported for ONNX Runtime's runtimes) or the path of an .onnx
            file (onnxruntime, ort-cuda, ort-tensorrt).
        input_shape: (C, H, W), or (N, C, H, W) with N equal to `settings.batch_size`.
        device: "cpu", "cuda" or "cuda:N" (onnxruntime: cpu only; cudagraph, ort-cuda, ort-tensorrt: cuda only).
        settings: runtime, threads, dtype, memory format, batch size.
        repeats: interleaved rounds; overrides `budget.rounds`.
        budget: calls per round and warm-up (default: blocks of at least 0.2 s, 3 to 50 calls).
        seed: seed of the random input.

    Returns:
        the percentiles over every call, the fastest round's median and every sample, in milliseconds.

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
    memory (`malloc_trim`) did not close the gap (benchmarks/bench_fresh.py). So this sends `model` (on the CPU; the
    child moves it to `device`) to a child forked from a server that has only imported torch: the fork costs
    milliseconds, and the server starts once per process (`spawn` where there is no forkserver). Arguments and
    result are those of `measure_model`; its errors are raised here.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise LutError("measure_model_fresh: send the model on the CPU; the child moves it to the device")
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_context()) as pool:
        return pool.submit(measure_model, model, tuple(input_shape), str(device), settings, repeats, budget,
                           seed).result()


# ---- shipped files -----------------------------------------------------------------------------------------------

# A measurement that decides whether a model ships: long enough blocks that p99 rests on a few hundred calls.
FILE_BUDGET = Budget(rounds=5, block_s=0.2, min_calls=20, max_calls=200, warmup=10)


def runtime_of_file(path: str | Path, device: str | torch.device = "cpu") -> str:
    """The runtime that executes a shipped file on `device` unless one is named, from its suffix.

    .pt2: eager. .onnx: onnxruntime on the CPU, ort-cuda on CUDA. The other runtimes of a file
    (`SHIPPED_FILES`) are chosen by name.
    """
    suffix = Path(path).suffix
    cuda = str(device).strip().lower().startswith("cuda")
    if suffix == ".onnx":
        return "ort-cuda" if cuda else "onnxruntime"
    if suffix == ".pt2":
        return "eager"
    raise LutError(f"{path}: not a shipped model file (expected one of {sorted(set(SHIPPED_FILES.values()))})")


def file_input_shape(path: str | Path, settings: Settings) -> tuple[int, ...]:
    """The (N, C, H, W) input a shipped file takes at `settings.batch_size`.

    Raises:
        LutError: no such file, a file the runtime does not run, or one whose input cannot take that batch.
    """
    path = Path(path)
    check_file_runtime(path, settings)
    if is_ort(settings.runtime):
        from latency_lut.fingerprint import ort_version

        ort_version()  # one line when onnxruntime is missing
        dims = list(ort_session(path, 1).get_inputs()[0].shape)  # read on the CPU provider, which every build has
        low, high = (settings.batch_size, settings.batch_size) if not isinstance(dims[0], int) else (dims[0],) * 2
    else:
        dims, low, high = _program_input(path)
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise LutError(f"{path}: input shape {dims} is not (batch, channels, height, width)")
    if isinstance(dims[0], int):
        low = high = dims[0]
    if not low <= settings.batch_size <= high:
        fixed = f"batch {low}" if low == high else f"batches {low}-{high}"
        raise LutError(f"{path}: takes {fixed}, not --batch-size {settings.batch_size}")
    return (settings.batch_size, *dims[1:])


def check_file_runtime(path: str | Path, settings: Settings) -> None:
    """Refuse a missing file, or one that `settings.runtime` does not run (without loading it).

    Raises:
        LutError: naming the file and the runtimes that run it.
    """
    path = Path(path)
    if not path.is_file():
        raise LutError(f"{path}: no such model file")
    runtime = runtime_of_file(path)  # refuses a file that is not a shipped model
    expected = SHIPPED_FILES[settings.runtime]
    if Path(expected).suffix != path.suffix:
        others = [r for r, name in SHIPPED_FILES.items() if Path(name).suffix == path.suffix and r != runtime]
        raise LutError(f"{path}: a {path.suffix} file runs in {runtime}, not in runtime {settings.runtime} (the "
                       f"{settings.runtime} runtime measures {expected}; a {path.suffix} file also runs in "
                       f"{', '.join(others)})")


def _program_input(path: Path) -> tuple[list[Any], int, int]:
    """A torch.export program's input dims (a symbol for a dynamic batch) and its batch range."""
    program = _load_program(path)
    (node,) = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in
               program.graph_signature.user_inputs]
    shape = list(node.meta["val"].shape)
    low, high = 1, 2**31
    if not isinstance(shape[0], int):
        symbol = shape[0].node.expr
        bounds = program.range_constraints.get(symbol)
        if bounds is not None:
            low, high = int(bounds.lower), int(min(bounds.upper, 2**31))
    return [d if isinstance(d, int) else str(d) for d in shape], low, high


def _load_program(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as e:  # torch raises several types for a file that is not a program
        raise LutError(f"{path}: torch.export cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       ) from None


def file_runner(path: str | Path, device: torch.device, settings: Settings, seed: int = 0) -> Runner:
    """A runner for a shipped file: model.onnx in ONNX Runtime (on the runtime's provider), model.pt2 as its
    torch.export module (eager) or that module captured as a CUDA graph (cudagraph)."""
    shape = file_input_shape(path, settings)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if is_ort(settings.runtime):
        return OrtRunner(path, x.numpy(), settings.threads, settings.runtime, device.index or 0)
    module = _load_program(Path(path)).module()  # exported in eval mode; .eval() is not supported on it
    fmt = settings.torch_memory_format
    module.to(device=device, dtype=settings.torch_dtype)
    x = x.to(device=device, dtype=settings.torch_dtype).contiguous(memory_format=fmt)
    if settings.runtime == "cudagraph":
        return CudaGraphRunner(module, x)
    return EagerRunner(module, x)


def measure_file(path: str | Path, device: str | torch.device, settings: Settings, budget: Budget = FILE_BUDGET,
                 seed: int = 0) -> Measurement:
    """Time a shipped file (model.onnx or model.pt2) the way it is deployed, in this process.

    Raises:
        LutError: a missing file, a file of another runtime, an input that cannot take the batch, bad settings.
    """
    dev = resolve_device(device)
    check_settings(dev, settings)
    pin_allocator()
    with thread_count(settings.threads):
        runner = file_runner(path, dev, settings, seed)
        blocks = measure_interleaved([runner], budget, np.random.default_rng(seed))[0]
    return Measurement.from_blocks(blocks)


def measure_file_fresh(path: str | Path, device: str | torch.device, settings: Settings,
                       budget: Budget = FILE_BUDGET, seed: int = 0) -> Measurement:
    """`measure_file` in a fresh process (see `measure_model_fresh` for why); its errors are raised here."""
    check_file_runtime(path, settings)  # bad input is reported from here, before a process starts
    check_settings(resolve_device(device), settings)
    file_input_shape(path, settings)
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_context()) as pool:
        return pool.submit(measure_file, str(path), str(device), settings, budget, seed).result()


def _fresh_context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["latency_lut.timing", "search_space"])  # in the server, once; not __main__
    return context
