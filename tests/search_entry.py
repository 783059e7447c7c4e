"""search.py as the data-parallel tests launch it (under torchrun or with torchrun's environment set by hand).

The same `search.main`, with measurements of a few hundred milliseconds (the tests check what is decided, not how
precisely), and optional faults:

    SHUFFLENAS_TEST_INTERRUPT=retrain   rank 0 raises KeyboardInterrupt at its second retraining step, while the
                                        other ranks wait for it inside the step's gradient all-reduce
    SHUFFLENAS_TEST_CONFIG_RANK1=PATH   rank 1 loads this experiment file instead of the command line's (as a
                                        machine with other files would)
    SHUFFLENAS_TEST_UNSHARED=1          rank 1 sees other checkpoints than rank 0 (as a machine that does not
                                        share the run directory and the supernet store would)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's search.py, wherever it is started

import search  # noqa: E402
from latency_lut.timing import Budget  # noqa: E402

QUICK = Budget(rounds=2, block_s=0.01, min_calls=3, max_calls=20, warmup=2)


def interrupt_retraining_on_rank_0() -> None:
    from experiments import training as train

    original = train._RetrainLoop.step
    calls = 0

    def step(self, images, labels):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(self, images, labels)

    train._RetrainLoop.step = step


if __name__ == "__main__":
    search.MEASURE_BUDGET = QUICK
    if os.environ.get("SHUFFLENAS_TEST_INTERRUPT") == "retrain" and os.environ.get("RANK") == "0":
        interrupt_retraining_on_rank_0()
    if os.environ.get("SHUFFLENAS_TEST_UNSHARED") and os.environ.get("RANK") == "1":
        real_sees = search.sees
        search.sees = lambda order: {**real_sees(order), "bytes": 12345}
    argv = sys.argv[1:]
    if os.environ.get("SHUFFLENAS_TEST_CONFIG_RANK1") and os.environ.get("RANK") == "1":
        argv[argv.index("--config") + 1] = os.environ["SHUFFLENAS_TEST_CONFIG_RANK1"]
    sys.exit(search.main(argv))
