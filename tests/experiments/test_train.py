"""Supernet training and retraining on the synthetic experiment: learning, bitwise resume, refused run directories."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import experiments.training as train_module
from experiments.checkpoints import (
    MODEL_FILE,
    RETRAIN_CHECKPOINT,
    SUPERNET_CHECKPOINT,
    RunDirError,
    load_model,
    load_supernet,
    replica_dir,
)
from experiments.config import load_experiment
from experiments.training import (
    WeightAverage,
    cosine_factor,
    parameter_groups,
    retrain,
    train_supernet,
    train_supernets,
)
from search_space import Supernet

SYNTHETIC = Path(__file__).resolve().parents[2] / "experiments" / "synthetic.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs at one thread (see conftest)."""


def with_epochs(cfg, epochs: int, **supernet):
    return dataclasses.replace(
        cfg,
        supernet=dataclasses.replace(cfg.supernet, epochs=epochs, **supernet),
        retrain=dataclasses.replace(cfg.retrain, epochs=epochs),
    )


def fresh_supernet(space, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    return Supernet(space, 10)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("preset", ["quick", "sandwich", "fair"])
def test_supernet_training_lowers_the_loss(space, splits, tmp_path, preset):
    cfg = load_experiment(SYNTHETIC, preset)
    supernet = fresh_supernet(space)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    history = train_supernet(supernet, splits, cfg, tmp_path, progress=False)
    assert [h.epoch for h in history] == [1, 2, 3]
    assert history[-1].loss < history[0].loss - 0.3, [h.loss for h in history]
    assert history[-1].accuracy > history[0].accuracy
    assert history[-1].lr == pytest.approx(0.0, abs=1e-9)  # the cosine ends at 0
    assert not torch.equal(before["conv1.0.weight"], supernet.state_dict()["conv1.0.weight"])
    assert (tmp_path / SUPERNET_CHECKPOINT).exists() and (tmp_path / "supernet.json").exists()


def test_a_fair_step_follows_the_mean_gradient_of_its_archs_without_distillation(space, splits, cfg):
    fair = dataclasses.replace(cfg.supernet, sampling="fair", distill=True)  # distill is for the sandwich rule only
    archs = space.sample_fair(np.random.default_rng(0))
    supernet = fresh_supernet(space)
    images = torch.randn(8, space.geometry.in_channels, space.geometry.input_size, space.geometry.input_size)
    labels = torch.randint(0, 10, (8,))
    loop = SimpleNamespace(sn=fair, recipe=fair, net=supernet, archs=lambda: archs,
                           autocast=contextlib.nullcontext, scaler=torch.amp.GradScaler("cpu", enabled=False))
    train_module._SupernetLoop.step(loop, images, labels)
    got = {n: p.grad.clone() for n, p in supernet.named_parameters() if p.grad is not None}
    supernet.zero_grad(set_to_none=True)
    for arch in archs:
        loss = F.cross_entropy(supernet(images, arch), labels, label_smoothing=fair.label_smoothing)
        (loss / len(archs)).backward()
    want = {n: p.grad for n, p in supernet.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_loads_with_weights_only_and_holds_the_run_state(space, splits, cfg, tmp_path):
    train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / SUPERNET_CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "rng", "arch_rng", "fingerprint", "identity"} <= set(ckpt)
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert ckpt["arch_rng"]["bit_generator"] == "PCG64"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed away
    supernet = load_supernet(tmp_path / SUPERNET_CHECKPOINT)
    assert_same_state(supernet.state_dict(), ckpt["model"])
    assert supernet.space == space


def test_a_checkpoint_whose_weights_no_longer_fit_is_refused_in_one_line(space, splits, cfg, tmp_path):
    """A supernet saved before the shared weights changed shape (e.g. layout 1, before channel ids)."""
    train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)
    ckpt = torch.load(tmp_path / SUPERNET_CHECKPOINT, weights_only=True)
    ckpt["model"]["conv5.0.weight"] = ckpt["model"]["conv5.0.weight"][:, :8]
    torch.save(ckpt, tmp_path / SUPERNET_CHECKPOINT)
    with pytest.raises(RunDirError, match="weights do not fit this Supernet"):
        load_supernet(tmp_path / SUPERNET_CHECKPOINT)
    with pytest.raises(RunDirError, match="delete it to start over"):
        train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)


def test_resume_after_stopping_matches_an_uninterrupted_run_bitwise(space, splits, cfg, tmp_path):
    two = with_epochs(cfg, 2)
    straight = fresh_supernet(space)
    straight_history = train_supernet(straight, splits, two, tmp_path / "a", progress=False)

    first = fresh_supernet(space)
    train_supernet(first, splits, two, tmp_path / "b", progress=False, stop_after=1)
    assert torch.load(tmp_path / "b" / SUPERNET_CHECKPOINT, weights_only=True)["epoch"] == 1
    resumed = fresh_supernet(space, seed=123)  # a new object with other weights: the checkpoint must win
    resumed_history = train_supernet(resumed, splits, two, tmp_path / "b", progress=False)

    assert_same_state(straight.state_dict(), resumed.state_dict())
    assert [h.loss for h in resumed_history] == [h.loss for h in straight_history]
    a = torch.load(tmp_path / "a" / SUPERNET_CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / SUPERNET_CHECKPOINT, weights_only=True)
    assert a["arch_rng"] == b["arch_rng"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])


class Killed(Exception):
    pass


def test_resume_after_a_crash_mid_epoch_matches_an_uninterrupted_run(space, splits, cfg, tmp_path, monkeypatch):
    sandwich = with_epochs(cfg, 2, sampling="sandwich")  # several backward passes per step, distillation
    straight = fresh_supernet(space)
    train_supernet(straight, splits, sandwich, tmp_path / "a", progress=False)

    real_make_loader = train_module.make_loader

    def dying_make_loader(dataset, **kwargs):
        loader = real_make_loader(dataset, **kwargs)
        if kwargs.get("epoch") != 1:
            return loader

        def batches():
            for i, batch in enumerate(loader):
                if i == 5:
                    raise Killed  # as if the process were killed halfway through the second epoch
                yield batch

        class Dying:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                return batches()

        return Dying()

    monkeypatch.setattr(train_module, "make_loader", dying_make_loader)
    with pytest.raises(Killed):
        train_supernet(fresh_supernet(space), splits, sandwich, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_module, "make_loader", real_make_loader)

    resumed = fresh_supernet(space)
    train_supernet(resumed, splits, sandwich, tmp_path / "b", progress=False)
    assert_same_state(straight.state_dict(), resumed.state_dict())


def test_the_weight_average_resumes_bitwise_and_is_what_candidates_are_scored_with(space, splits, cfg, tmp_path):
    averaged = with_epochs(cfg, 2, ema_decay=0.9)
    straight = fresh_supernet(space)
    train_supernet(straight, splits, averaged, tmp_path / "a", progress=False)
    first = fresh_supernet(space)
    train_supernet(first, splits, averaged, tmp_path / "b", progress=False, stop_after=1)
    resumed = fresh_supernet(space, seed=123)
    train_supernet(resumed, splits, averaged, tmp_path / "b", progress=False)
    assert_same_state(straight.state_dict(), resumed.state_dict())

    ckpt = torch.load(tmp_path / "a" / SUPERNET_CHECKPOINT, weights_only=True)
    assert ckpt["ema"]["updates"] == ckpt["scheduler"]["last_epoch"] > 0  # one update per optimiser step
    # The trained object and load_supernet both hold the average, which is not the last step's weights.
    loaded = load_supernet(tmp_path / "a" / SUPERNET_CHECKPOINT)
    assert_same_state(loaded.state_dict(), straight.state_dict())
    for name, p in straight.named_parameters():
        assert torch.equal(p, ckpt["ema"]["params"][name])
    assert not torch.equal(ckpt["model"]["conv1.0.weight"], ckpt["ema"]["params"]["conv1.0.weight"])
    # Buffers are the trained ones: BatchNorm statistics are re-estimated per candidate anyway.
    assert torch.equal(ckpt["model"]["conv1.1.running_mean"], straight.state_dict()["conv1.1.running_mean"])


def test_the_weight_average_warms_up_its_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(3.0)
    average.update(model)  # decay min(0.99, 2/11): the initial weights fade fast
    assert average.params["weight"] == pytest.approx(torch.full((1, 2), 1.0 * 2 / 11 + 3.0 * 9 / 11))
    for _ in range(2000):
        average.update(model)
    assert average.decay == 0.99 and average.params["weight"] == pytest.approx(torch.full((1, 2), 3.0))


def test_runs_without_the_weight_average_keep_the_fingerprint_they_had_before_it(space, splits, cfg, tmp_path):
    assert "ema_decay" not in cfg.supernet.identity()
    assert dataclasses.replace(cfg.supernet, ema_decay=0.99).identity()["ema_decay"] == 0.99
    train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)
    averaged = with_epochs(cfg, 1, ema_decay=0.99)
    with pytest.raises(RunDirError, match=r"recipe\.ema_decay"):
        train_supernet(fresh_supernet(space), splits, averaged, tmp_path, progress=False)


def test_replicas_train_with_consecutive_seeds_and_the_first_is_the_single_run(space, splits, cfg, tmp_path):
    single = fresh_supernet(space, seed=cfg.seed)
    train_supernet(single, splits, with_epochs(cfg, 1), tmp_path / "single", progress=False)
    two = with_epochs(cfg, 1, replicas=2)
    first, second = train_supernets(space, splits, two, tmp_path / "sn", progress=False)
    assert_same_state(first.state_dict(), single.state_dict())
    assert not torch.equal(first.conv1[0].weight, second.conv1[0].weight)
    assert replica_dir(tmp_path / "sn", 1) == tmp_path / "sn" / "replica1"
    assert (tmp_path / "sn" / "replica1" / SUPERNET_CHECKPOINT).exists()
    assert load_supernet(tmp_path / "sn" / "replica1" / SUPERNET_CHECKPOINT).state_dict().keys() == \
        second.state_dict().keys()
    # Replicas are not part of a run's fingerprint: one more keeps the two trained and trains only the third.
    stamps = [(replica_dir(tmp_path / "sn", k) / SUPERNET_CHECKPOINT).stat().st_mtime_ns for k in range(2)]
    three = train_supernets(space, splits, with_epochs(cfg, 1, replicas=3), tmp_path / "sn", progress=False)
    assert [(replica_dir(tmp_path / "sn", k) / SUPERNET_CHECKPOINT).stat().st_mtime_ns for k in range(2)] == stamps
    assert_same_state(three[1].state_dict(), second.state_dict())
    assert (tmp_path / "sn" / "replica2" / SUPERNET_CHECKPOINT).exists()


def test_a_finished_run_is_not_trained_again(space, splits, cfg, tmp_path):
    one = with_epochs(cfg, 1)
    first = train_supernet(fresh_supernet(space), splits, one, tmp_path, progress=False)
    again_net = fresh_supernet(space)
    again = train_supernet(again_net, splits, one, tmp_path, progress=False)
    assert again == first
    assert_same_state(again_net.state_dict(), load_supernet(tmp_path / SUPERNET_CHECKPOINT).state_dict())


def test_a_run_directory_from_another_configuration_is_refused(space, splits, cfg, tmp_path):
    train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)
    other = dataclasses.replace(with_epochs(cfg, 1), supernet=dataclasses.replace(cfg.supernet, epochs=1, lr=0.05))
    with pytest.raises(RunDirError, match=r"recipe\.lr: 0\.3 -> 0\.05"):
        train_supernet(fresh_supernet(space), splits, other, tmp_path, progress=False)
    with pytest.raises(RunDirError, match="seed"):
        train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, seed=7, progress=False)


def test_a_damaged_checkpoint_is_refused_with_its_path(space, splits, cfg, tmp_path):
    (tmp_path / SUPERNET_CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match=SUPERNET_CHECKPOINT):
        train_supernet(fresh_supernet(space), splits, with_epochs(cfg, 1), tmp_path, progress=False)


def test_retrain_learns_resumes_and_saves_a_loadable_model(space, splits, cfg, tmp_path):
    two = with_epochs(cfg, 2)
    arch = space.largest()
    straight = retrain(space, arch, splits, two, tmp_path / "a", progress=False)
    assert straight.history[-1].loss < straight.history[0].loss
    assert straight.val_accuracy > 0.5 and 0.0 <= straight.test_accuracy <= 1.0  # chance is 0.1

    reported = []
    assert retrain(space, arch, splits, two, tmp_path / "b", progress=False, stop_after=1,
                   on_epoch=reported.append) is None
    assert not (tmp_path / "b" / MODEL_FILE).exists()
    resumed = retrain(space, arch, splits, two, tmp_path / "b", progress=False, on_epoch=reported.append)
    assert reported == resumed.history  # each epoch reported once, by the call that trained it
    assert reported[-1].val_accuracy == resumed.val_accuracy
    assert (resumed.val_accuracy, resumed.test_accuracy) == (straight.val_accuracy, straight.test_accuracy)
    a = torch.load(tmp_path / "a" / MODEL_FILE, weights_only=True)
    b = torch.load(tmp_path / "b" / MODEL_FILE, weights_only=True)
    assert_same_state(a["state_dict"], b["state_dict"])
    assert a["arch"] == arch.encode() and a["num_classes"] == 10 and a["geometry"] == space.geometry.to_dict()
    assert torch.load(tmp_path / "b" / RETRAIN_CHECKPOINT, weights_only=True)["arch"] == arch.encode()

    model = load_model(tmp_path / "a" / MODEL_FILE)
    images = torch.randn(4, 1, 28, 28)
    expected = space.build(arch, 10)
    expected.load_state_dict(a["state_dict"])
    assert torch.equal(model(images), expected.eval()(images))


def test_retrain_can_start_from_the_supernet(space, splits, cfg, tmp_path):
    supernet = fresh_supernet(space)
    train_supernet(supernet, splits, cfg, tmp_path / "sn", progress=False)
    arch = space.sample(__import__("numpy").random.default_rng(0))
    fine = dataclasses.replace(cfg, retrain=dataclasses.replace(cfg.retrain, epochs=1, from_supernet=True))
    with pytest.raises(ValueError, match="from_supernet"):
        retrain(space, arch, splits, fine, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="from_supernet"):
        retrain(space, arch, splits, with_epochs(cfg, 1), tmp_path / "x", init_from=supernet, progress=False)
    tuned = retrain(space, arch, splits, fine, tmp_path / "ft", init_from=supernet, progress=False)
    scratch = retrain(space, arch, splits, with_epochs(cfg, 1), tmp_path / "scratch", progress=False)
    # One epoch from the shared weights beats one epoch from a fresh init on this easy data.
    assert tuned.val_accuracy >= scratch.val_accuracy


def test_weight_decay_skips_batchnorm_and_biases(space):
    groups = parameter_groups(space.build(space.largest(), 10), 1e-4)
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])  # conv and linear weights
    assert all(p.ndim == 1 for p in no_decay["params"])  # BN weights and biases, the classifier bias
    net = space.build(space.largest(), 10)
    count = sum(1 for _ in net.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == count


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert cosine_factor(0, 100, 10) == pytest.approx(0.1)
    assert cosine_factor(9, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(10, 100, 10) == pytest.approx(1.0)
    assert cosine_factor(55, 100, 10) == pytest.approx(0.5)
    assert cosine_factor(100, 100, 10) == pytest.approx(0.0)
    factors = [cosine_factor(s, 100, 0) for s in range(100)]
    assert factors == sorted(factors, reverse=True)
