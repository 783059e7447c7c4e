"""cuDNN's choice of convolution algorithm while training: autotuned for one network, heuristic for a supernet.

With `torch.backends.cudnn.benchmark` on ("autotune"), the first convolution of every new shape (input, weight,
stride, dtype, memory format) times cuDNN's candidate algorithms, forward and both backward passes, and keeps the
fastest. A plain network meets its few shapes on the first step, so autotuning is paid once and every later step runs
the fastest kernels: retraining autotunes. A weight-sharing supernet trains another arch on almost every step, and
its sliced convolutions (width, split, kernel) meet new shapes through most of the first epoch: autotuning each would
cost more than the steps that reuse it save, so supernet training picks by cuDNN's heuristics ("heuristic").

Even by heuristics, cuDNN builds an execution plan for every new shape (cached for the process): that one-time cost
is what a supernet's first epoch still pays on a GPU. "off" runs PyTorch's own convolution kernels, which need no
plans; `benchmarks/cuda_check.py first-epoch` measures the three modes on new shapes and on the same shapes again.
On the CPU the modes change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

MODES = {  # (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    "autotune": (True, True),
    "heuristic": (True, False),
    "off": (False, False),
}


@contextlib.contextmanager
def cudnn_mode(device: str | torch.device, mode: str) -> Iterator[None]:
    """Within the body, convolutions on CUDA run in `mode` ("autotune", "heuristic" or "off"); restored afterwards.

    Args:
        device: where training runs; on anything but CUDA the body runs with the settings unchanged.
        mode: "autotune" for a network whose shapes are fixed (retraining), "heuristic" for a supernet, "off" for
            PyTorch's own kernels.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"cuDNN mode {mode!r} is not one of {sorted(MODES)}")
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark
    torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = MODES[mode]
    try:
        yield
    finally:
        torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark = before
