from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from latency_lut import OpSignature, arch_ops, enumerate_ops, probe_archs
from latency_lut.ops import network_ops, op_names
from search_space import SearchSpace


def test_enumeration_equals_the_ops_of_every_arch_of_a_tiny_space(tiny_space: SearchSpace, all_archs) -> None:
    from_archs = set()
    for arch in all_archs(tiny_space):
        from_archs.update(arch_ops(arch, tiny_space.geometry))
    assert set(enumerate_ops(tiny_space)) == from_archs


@pytest.mark.parametrize("space_name", ["imagenet_space", "fashion_space"])
def test_enumeration_covers_sampled_archs(space_name: str, request: pytest.FixtureRequest) -> None:
    space: SearchSpace = request.getfixturevalue(space_name)
    ops = enumerate_ops(space)
    assert len(ops) == len(set(ops)) and ops == sorted(ops)
    known = set(ops)
    rng = np.random.default_rng(0)
    for arch in [space.largest(), space.smallest(), *space.contained_references().values()]:
        assert set(arch_ops(arch, space.geometry)) <= known
    for _ in range(500):
        arch = space.sample(rng)
        missing = set(arch_ops(arch, space.geometry)) - known
        assert not missing, f"{arch.encode()}: {sorted(missing)[:3]}"


def test_imagenet_enumeration_counts(imagenet_space: SearchSpace) -> None:
    counts = Counter((op.kind, op.stride, op.size) for op in enumerate_ops(imagenet_space))
    # stage2's first unit: 3 stem widths x 8 widths x 3 splits x 3 kernels; later stages: 8 x 8 x 3 x 3.
    assert counts[("unit", 2, 56)] == 3 * 8 * 9
    assert counts[("unit", 2, 28)] == counts[("unit", 2, 14)] == 8 * 8 * 9
    assert counts[("unit", 1, 28)] == counts[("unit", 1, 14)] == counts[("unit", 1, 7)] == 8 * 9
    assert counts[("stem", 2, 224)] == 3 and counts[("head", 0, 7)] == 8 * 2 and counts[("call", 0, 224)] == 1


def test_probes_are_archs_of_the_space_that_cover_every_op(fashion_space: SearchSpace) -> None:
    ops = enumerate_ops(fashion_space)
    probes = probe_archs(fashion_space, ops)
    covered = set()
    for probe in probes:
        fashion_space.validate(probe)
        covered.update(arch_ops(probe, fashion_space.geometry))
    assert covered == set(ops)
    # The greedy cover is near the lower bound: each probe holds one first unit of stage 3 (4 x 4 widths x 9).
    assert len(probes) == 4 * 4 * 9


def test_probes_for_a_subset_cover_it(tiny_space: SearchSpace) -> None:
    ops = [op for op in enumerate_ops(tiny_space) if op.kind == "unit" and op.stride == 1]
    probes = probe_archs(tiny_space, ops)
    covered = set().union(*(arch_ops(p, tiny_space.geometry) for p in probes))
    assert set(ops) <= covered
    assert probe_archs(tiny_space, []) == []


def test_an_op_no_arch_holds_is_refused(tiny_space: SearchSpace) -> None:
    alien = OpSignature("unit", 8, 8, 8, stride=1, kernel=7, left=4)
    with pytest.raises(ValueError, match="cannot produce"):
        probe_archs(tiny_space, [alien])


def test_network_ops_in_turn_are_the_network(fashion_space: SearchSpace) -> None:
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    arch = fashion_space.sample(rng)
    net = fashion_space.build(arch, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        y = x
        for op in network_ops(net):
            y = op(y)
        torch.testing.assert_close(y, net(x), rtol=0, atol=0)
    assert len(network_ops(net)) + 1 == len(arch_ops(arch, fashion_space.geometry)) == len(op_names(arch))


def test_signature_round_trips_and_rejects_bad_fields() -> None:
    op = OpSignature("unit", 116, 116, 28, stride=1, kernel=3, left=58)
    assert OpSignature.from_dict(op.to_dict()) == op
    assert "left=58" in str(op)
    with pytest.raises(ValueError, match="unknown fields"):
        OpSignature.from_dict({**op.to_dict(), "split": 0.5})
    with pytest.raises(ValueError, match="kind"):
        OpSignature("conv", 1, 1, 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        OpSignature("unit", 116, 116, 28.0)  # type: ignore[arg-type]
