from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import yaml

from search_space import REFERENCES, SearchSpace, SpaceError, parse_arch, reference_arch, space_to_dict
from search_space.__main__ import main as cli_main

TINY = {
    "name": "tiny",
    "input": {"size": 32, "channels": 3},
    "stem": {"kind": "small", "widths": [8, 16]},
    "channels": {"multiple": 4, "split_multiple": 2},
    "stages": [
        {"depths": [1, 2], "widths": [16, 24], "splits": [0.25, 0.5], "kernels": [3, 5]},
        {"depths": [1], "widths": [32], "splits": [0.5], "kernels": [3, 7]},
    ],
    "head": {"widths": [64]},
}


def _enumerate(space: SearchSpace):
    """Every arch of a small space, by brute force over the define-by-run tree."""
    out = []

    def walk(prefix: dict):
        try:
            arch = space.decide(lambda name, choices: prefix[name] if name in prefix else _Branch.raise_(name, choices))
        except _Branch as b:
            for c in b.choices:
                walk({**prefix, b.name: c})
            return
        out.append(arch)

    walk({})
    return out


class _Branch(Exception):
    def __init__(self, name, choices):
        self.name, self.choices = name, choices

    @staticmethod
    def raise_(name, choices):
        raise _Branch(name, choices)


def test_size_counts_every_arch_exactly():
    space = SearchSpace.from_dict(TINY)
    archs = _enumerate(space)
    assert len(set(archs)) == len(archs) == space.size()
    # 2 stems * (2 widths * (4 + 16)) * (1 width * 2) * 1 head
    assert space.size() == 2 * 40 * 2


def test_sampling_is_seeded_and_covers_every_choice(fashion_space):
    a = [fashion_space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [fashion_space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(1)
    seen: dict[str, Counter] = {}
    for _ in range(2000):
        for name, value in fashion_space.params(fashion_space.sample(rng)).items():
            seen.setdefault(name, Counter())[value] += 1
    assert set(seen["stem.width"]) == set(fashion_space.stem_widths)
    assert set(seen["head.width"]) == set(fashion_space.head_widths)
    for i, c in enumerate(fashion_space.stages):
        p = f"stage{i + 2}"
        assert set(seen[f"{p}.depth"]) == set(c.depths)
        assert set(seen[f"{p}.width"]) == set(c.widths)
        for j in range(max(c.depths)):
            assert set(seen[f"{p}.unit{j}.split"]) == set(c.splits)
            assert set(seen[f"{p}.unit{j}.kernel"]) == set(c.kernels)
    assert "stage2.unit4.split" not in seen  # beyond the deepest choice: never sampled


def test_fair_sampling_trains_every_choice_of_every_decision_once(fashion_space):
    rng = np.random.default_rng(3)
    for _ in range(20):
        archs = fashion_space.sample_fair(rng)
        assert len(archs) == 4  # the most choices of any decision: the stage widths, the depths of stage3
        for arch in archs:
            fashion_space.validate(arch)
        for i, c in enumerate(fashion_space.stages):
            # Four draws over three choices: each once, one of them twice; four over four: each exactly once.
            for choices, drawn in ((c.widths, [a.stages[i].width for a in archs]),
                                   (c.depths, [a.stages[i].depth for a in archs])):
                counts = Counter(drawn)
                assert set(counts) == set(choices) and max(counts.values()) <= 2
                assert len(choices) < 4 or max(counts.values()) == 1
        # Unit choices are balanced over the archs that reach the unit: the first two units of a stage always exist.
        kernels = Counter(a.stages[0].units[1].kernel for a in archs)
        assert set(kernels) == set(fashion_space.stages[0].kernels)
        assert Counter(a.stem for a in archs) == dict.fromkeys(fashion_space.stem_widths, 2)
    a = fashion_space.sample_fair(np.random.default_rng(5), count=6)
    assert a == fashion_space.sample_fair(np.random.default_rng(5), count=6) and len(a) == 6
    assert Counter(x.head for x in a) == dict.fromkeys(fashion_space.head_widths, 2)
    with pytest.raises(ValueError, match="count"):
        fashion_space.sample_fair(rng, count=0)


def test_sampled_archs_validate(imagenet_space):
    rng = np.random.default_rng(0)
    for _ in range(100):
        imagenet_space.validate(imagenet_space.sample(rng))


def test_largest_and_smallest_bound_cost():
    space = SearchSpace.from_dict(TINY)
    costs = [space.cost(a).macs for a in _enumerate(space)]
    assert space.cost(space.largest()).macs == max(costs)
    assert space.cost(space.smallest()).macs == min(costs)


def test_imagenet_space_holds_all_references_and_more(imagenet_space):
    assert set(imagenet_space.contained_references()) == set(REFERENCES)
    c = imagenet_space.stages[0]
    assert len(c.widths) > 4 and any(r != 0.5 for r in c.splits) and set(c.kernels) == {3, 5, 7}
    assert min(c.depths) < 4


def test_reference_outside_space_raises(fashion_space):
    with pytest.raises(ValueError, match="does not contain shufflenet_v2_x2_0"):
        fashion_space.reference("shufflenet_v2_x2_0")
    with pytest.raises(ValueError, match="unknown reference"):
        reference_arch("resnet50")


def test_space_to_dict_reads_back_as_the_same_space(imagenet_space, fashion_space):
    for space in (imagenet_space, fashion_space, SearchSpace.from_dict(TINY)):
        assert SearchSpace.from_dict(space_to_dict(space)) == space
        assert yaml.safe_load(yaml.safe_dump(space_to_dict(space))) == space_to_dict(space)  # plain data


def test_parse_arch_reads_codes_names_and_extremes(imagenet_space, fashion_space):
    arch = imagenet_space.sample(np.random.default_rng(0))
    assert parse_arch(imagenet_space, arch.encode()) == arch
    assert parse_arch(imagenet_space, "shufflenet_v2_x1_0") == reference_arch("shufflenet_v2_x1_0")
    assert parse_arch(imagenet_space, "largest") == imagenet_space.largest()
    assert parse_arch(imagenet_space, "smallest") == imagenet_space.smallest()
    with pytest.raises(ValueError, match="does not contain shufflenet_v2_x2_0"):
        parse_arch(fashion_space, "shufflenet_v2_x2_0")
    with pytest.raises(ValueError):
        parse_arch(fashion_space, arch.encode())  # an imagenet arch is not in the fashion_mnist space


def test_validate_names_the_offending_choice(fashion_space):
    arch = fashion_space.largest()
    stages = list(arch.stages)
    stages[1] = type(stages[1])(width=100, units=stages[1].units)
    with pytest.raises(ValueError, match="stage3: width 100"):
        fashion_space.validate(type(arch)(stem=arch.stem, stages=tuple(stages), head=arch.head))


def _bad(tmp_path, mutate, text=None):
    data = yaml.safe_load(yaml.safe_dump(TINY))
    if mutate:
        mutate(data)
    path = tmp_path / "space.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return path


BAD_CASES = {
    "syntax": (None, "stages: [\n  - {depths: [1]\n", "not valid YAML"),
    "unknown_top": (lambda d: d.update(colour="red"), None, "unknown key 'colour'"),
    "unknown_stage": (lambda d: d["stages"][0].update(group=2), None, r"stages\[0\] \(stage2\): unknown key 'group'"),
    "missing": (lambda d: d.pop("head"), None, "missing key 'head'"),
    "wrong_type": (lambda d: d["stages"][1].update(depths="two"), None,
                   r"stages\[1\] \(stage3\).depths: expected a list"),
    "float_width": (lambda d: d["stages"][0].update(widths=[16.5]), None, "expected integers"),
    "empty": (lambda d: d["stages"][0].update(kernels=[]), None, "kernels: the list of choices is empty"),
    "width_multiple": (lambda d: d["stages"][0].update(widths=[18]), None, "width 18 is not a multiple of 4"),
    "split_range": (lambda d: d["stages"][0].update(splits=[1.0]), None, "split 1.0 must lie strictly between"),
    "split_sides": (lambda d: d.update(channels={"multiple": 4, "split_multiple": 4}) or
                    d["stages"][1].update(widths=[4]), None, "leaves a side without channels"),
    "kernel": (lambda d: d["stages"][0].update(kernels=[4]), None, "kernel 4 is not one of"),
    "stem_kind": (lambda d: d["stem"].update(kind="cifar"), None, "stem.kind"),
    "odd_multiple": (lambda d: d.update(channels={"multiple": 3}), None, "must be even"),
    "repeated": (lambda d: d["head"].update(widths=[64, 64]), None, "repeated choices"),
    "reference": (lambda d: d.update(references=["shufflenet_v2_x1_0"]), None, "cannot contain shufflenet_v2_x1_0"),
    "unknown_reference": (lambda d: d.update(references=["mobilenet"]), None, "unknown reference 'mobilenet'"),
    "not_mapping": (None, "- 1\n- 2\n", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_space_files_raise_naming_file_and_field(tmp_path, case):
    mutate, text, message = BAD_CASES[case]
    path = _bad(tmp_path, mutate, text)
    with pytest.raises(SpaceError, match=message) as info:
        SearchSpace.from_yaml(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["syntax", "unknown_stage", "reference"])
def test_cli_bad_space_is_one_line_and_exit_2(tmp_path, capsys, case):
    mutate, text, message = BAD_CASES[case]
    assert cli_main(["show", str(_bad(tmp_path, mutate, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path) in err


def test_cli_missing_file(tmp_path, capsys):
    assert cli_main(["show", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read space file" in capsys.readouterr().err


def test_cli_show_and_sample(capsys):
    assert cli_main(["show", "experiments/spaces/imagenet.yaml", "--sample", "3", "--seed", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "7,274,586,695,026,000,896 architectures" in out[0]
    assert any("shufflenet_v2_x2_0" in line and "7.394 M params" in line and "583.3 MFLOPs" in line for line in out)
    codes = out[-3:]
    assert cli_main(["show", "experiments/spaces/imagenet.yaml", "--sample", "3", "--seed", "5"]) == 0
    assert capsys.readouterr().out.splitlines()[-3:] == codes


def test_size_matches_formula_for_shipped_space(fashion_space):
    expected = len(fashion_space.stem_widths) * len(fashion_space.head_widths)
    for c in fashion_space.stages:
        expected *= len(c.widths) * sum((len(c.splits) * len(c.kernels)) ** d for d in c.depths)
    assert fashion_space.size() == expected
    assert math.log10(fashion_space.size()) > 10
    assert list(itertools.islice(iter(fashion_space.stem_widths), 1))  # choices are sorted tuples
