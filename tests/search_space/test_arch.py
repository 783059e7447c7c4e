from __future__ import annotations

import numpy as np
import pytest

from search_space import Arch, SearchSpace, Stage, Unit


def _many(space: SearchSpace, n: int = 300, seed: int = 0) -> list[Arch]:
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("space_name", ["imagenet_space", "fashion_space"])
def test_encode_decode_round_trip(space_name, request):
    space = request.getfixturevalue(space_name)
    for arch in _many(space) + [space.largest(), space.smallest()]:
        code = arch.encode()
        assert Arch.decode(code) == arch
        assert Arch.decode(code).encode() == code  # canonical
        assert Arch.from_dict(arch.to_dict()) == arch
        assert space.from_params(space.params(arch)) == arch


def test_reference_codes_are_short_and_exact(imagenet_space):
    arch = imagenet_space.reference("shufflenet_v2_x1_0")
    assert arch.encode() == "s24_w116-k3r0.5x4_w232-k3r0.5x8_w464-k3r0.5x4_h1024"
    assert arch.depths == (4, 8, 4)


def test_codes_distinguish_archs(fashion_space):
    archs = set(_many(fashion_space, 500))
    assert len({a.encode() for a in archs}) == len(archs)


def test_split_that_is_not_a_short_decimal_round_trips():
    arch = Arch(stem=24, stages=(Stage(width=48, units=(Unit(split=1 / 3, kernel=5), Unit(0.5, 3))),), head=64)
    assert Arch.decode(arch.encode()) == arch


@pytest.mark.parametrize(
    "code",
    ["", "s24", "x24_w48-k3r0.5_h64", "s24_w48_h64", "s24_w48-k3_h64", "s24_w48-k3r0.5y2_h64", "s24_q48-k3r0.5_h64",
     "s24_w48-k3r0.5.5_h64", "sx_w48-k3r0.5_h64"],
)
def test_decode_rejects_bad_codes(code):
    with pytest.raises(ValueError, match="arch code"):
        Arch.decode(code)


def test_from_dict_rejects_unknown_keys():
    data = Arch(stem=24, stages=(Stage(48, (Unit(0.5, 3),)),), head=64).to_dict()
    data["stages"][0]["units"][0]["groups"] = 2
    with pytest.raises(ValueError, match="unknown key"):
        Arch.from_dict(data)
