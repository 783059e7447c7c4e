"""cuDNN's choice of convolution algorithm while training: autotuned for one network, heuristic for a supernet.

With `torch.backends.cudnn.benchmark` on, the first convolution of every new shape (input, weight, stride, dtype,
memory format) times cuDNN's candidate algorithms, forward and both backward passes, and keeps the fastest. A plain
network meets its few shapes on the first step, so autotuning is paid once and every later step runs the fastest
kernels: retraining turns it on. A weight-sharing supernet trains another arch on almost every step, and its sliced
convolutions (width, split, kernel) meet new shapes through most of the first epoch: autotuning each would cost more
than the steps that reuse it save, so supernet training turns it off and cuDNN picks by heuristics.

Even with autotuning off, cuDNN builds an execution plan for every new shape (cached for the process): that is the
one-time cost a supernet's first epoch still pays on a GPU (`benchmarks/cuda_check.py first-epoch` measures it).
On the CPU these settings do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cudnn_autotune(device: str | torch.device, enabled: bool) -> Iterator[None]:
    """Within the body, autotune cuDNN convolutions (`enabled`) or pick them by heuristics; restored afterwards.

    Args:
        device: where training runs; on anything but CUDA the body runs with the settings unchanged.
        enabled: True for a network whose shapes are fixed (retraining), False for a supernet.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
