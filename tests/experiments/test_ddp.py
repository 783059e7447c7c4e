"""Data-parallel training: two CPU processes with the gloo backend end with identical weights."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.checkpoints import MODEL_FILE, SUPERNET_CHECKPOINT
from experiments.config import load_experiment
from experiments.data import load_splits
from experiments.distributed import DistContext, context_from_env
from experiments.training import retrain, train_supernet
from search_space import SearchSpace, Supernet

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "experiments" / "synthetic.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ctx = DistContext(rank=rank, world_size=world_size, local_rank=rank)
        cfg = load_experiment(SYNTHETIC, "sandwich")  # several backward passes per step: the hard case for DDP
        cfg = dataclasses.replace(
            cfg,
            supernet=dataclasses.replace(cfg.supernet, epochs=2, ema_decay=0.9),  # the average, too, on every rank
            retrain=dataclasses.replace(cfg.retrain, epochs=1),
        )
        splits = load_splits(cfg.data, cfg.seed)
        space = SearchSpace.from_yaml(cfg.space)
        torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
        supernet = Supernet(space, splits.num_classes)
        history = train_supernet(supernet, splits, cfg, Path(out) / "sn", progress=False, ctx=ctx)
        result = retrain(space, space.largest(), splits, cfg, Path(out) / "rt", progress=False, ctx=ctx)
        torch.save(
            {
                "supernet": supernet.state_dict(),
                "losses": [h.loss for h in history],
                "retrained": result.model.state_dict(),
                "accuracies": (result.val_accuracy, result.test_accuracy),
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for part in ("supernet", "retrained"):
        a, b = ranks[0][part], ranks[1][part]
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{part}: ranks disagree on {different[:5]}"
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
    assert ranks[0]["accuracies"] == ranks[1]["accuracies"]
    # Only rank 0 writes; what it wrote is what both hold (the averaged weights, the trained buffers).
    saved = torch.load(tmp_path / "sn" / SUPERNET_CHECKPOINT, weights_only=True)
    assert saved["world_size"] == 2
    written = {**saved["model"], **saved["ema"]["params"]}
    assert all(torch.equal(written[k], v) for k, v in ranks[0]["supernet"].items())
    assert (tmp_path / "rt" / MODEL_FILE).exists()
    # Rank 0's initial weights won: the run differs from one that started from rank 1's.
    torch.manual_seed(101)
    rank1_init = Supernet(SearchSpace.from_yaml(load_experiment(SYNTHETIC).space), 10).state_dict()
    assert not torch.equal(rank1_init["fc.weight"], ranks[0]["supernet"]["fc.weight"])


def test_context_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert context_from_env() == DistContext(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = context_from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.distributed) == (1, 2, 1, False, True)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        context_from_env()


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The documented entry point under torchrun; a rerun finds the finished checkpoint and leaves it as it is."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "experiments.train", "supernet", "--config", str(SYNTHETIC), "--run-dir", str(tmp_path),
        "--no-progress", "--no-eval",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = torch.load(tmp_path / SUPERNET_CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 2
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / SUPERNET_CHECKPOINT, weights_only=True)["model"]["fc.weight"],
                       ckpt["model"]["fc.weight"])
