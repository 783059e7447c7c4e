from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

import latency_lut.table as table_module
from latency_lut import (
    Correction,
    CorruptTable,
    Fingerprint,
    FingerprintMismatch,
    LatencyTable,
    LutError,
    MissingEntry,
    Settings,
    arch_ops,
)
from search_space import SearchSpace

# A one-stage space; tests give it stages.
TINY = {
    "name": "one_stage",
    "input": {"size": 16, "channels": 1},
    "stem": {"kind": "small", "widths": [8]},
    "head": {"widths": [32]},
}


def test_predict_is_the_corrected_sum_of_entries(fashion_space: SearchSpace, synthetic_table) -> None:
    table = synthetic_table(fashion_space)
    table.correction = Correction(scale=1.25, overhead_us=-40.0, fitted_on=10)
    rng = np.random.default_rng(0)
    archs = [fashion_space.sample(rng) for _ in range(200)] + [fashion_space.largest(), fashion_space.smallest()]
    for arch in archs:
        total_us = sum(table.entries[op].median_us for op in arch_ops(arch, fashion_space.geometry))
        assert table.predict(arch, corrected=False) == pytest.approx(total_us / 1e3, rel=1e-12)
        assert table.predict(arch) == pytest.approx((1.25 * total_us - 40.0) / 1e3, rel=1e-12)
        assert sum(part.ms for part in table.breakdown(arch)) == pytest.approx(table.predict(arch), rel=1e-12)
    many = table.predict_many(archs)
    assert many.dtype == np.float64 and many.shape == (len(archs),)
    np.testing.assert_array_equal(many, [table.predict(a) for a in archs])
    np.testing.assert_array_equal(table.predict_many(archs, corrected=False), [table.predict(a, False) for a in archs])


def test_scaled_multiplies_every_corrected_prediction_and_leaves_the_original(fashion_space: SearchSpace,
                                                                              synthetic_table) -> None:
    table = synthetic_table(fashion_space)
    table.correction = Correction(scale=1.25, overhead_us=-40.0, fitted_on=10)
    slower = table.scaled(1.5)
    rng = np.random.default_rng(1)
    archs = [fashion_space.sample(rng) for _ in range(20)]
    np.testing.assert_allclose(slower.predict_many(archs), 1.5 * table.predict_many(archs), rtol=1e-12)
    assert slower.min_latency(fashion_space) == pytest.approx(1.5 * table.min_latency(fashion_space), rel=1e-12)
    assert table.correction.scale == 1.25 and slower.fingerprint == table.fingerprint
    with pytest.raises(LutError, match="positive"):
        table.scaled(0.0)


def test_min_and_max_latency_are_exact(tiny_space: SearchSpace, synthetic_table, all_archs) -> None:
    table = synthetic_table(tiny_space, seed=3)
    table.correction = Correction(scale=0.9, overhead_us=120.0, fitted_on=4)
    predictions = table.predict_many(list(all_archs(tiny_space)))
    assert len(predictions) == tiny_space.size() == 576
    assert table.min_latency(tiny_space) == pytest.approx(predictions.min(), rel=1e-12)
    assert table.max_latency(tiny_space) == pytest.approx(predictions.max(), rel=1e-12)


def test_min_and_max_bound_sampled_archs_of_a_large_space(imagenet_space: SearchSpace, synthetic_table) -> None:
    table = synthetic_table(imagenet_space)
    rng = np.random.default_rng(0)
    predictions = table.predict_many(imagenet_space.sample(rng) for _ in range(300))
    low, high = table.min_latency(imagenet_space), table.max_latency(imagenet_space)
    assert low < predictions.min() and predictions.max() < high
    assert low <= table.predict(imagenet_space.smallest()) and table.predict(imagenet_space.largest()) <= high


def test_missing_entry_names_the_op(fashion_space: SearchSpace, synthetic_table) -> None:
    full = synthetic_table(fashion_space)
    arch = fashion_space.reference("shufflenet_v2_x0_5")
    gone = arch_ops(arch, fashion_space.geometry)[5]
    entries = {op: e for op, e in full.entries.items() if op != gone}
    table = LatencyTable(full.fingerprint, full.geometry, entries)
    for predict in (table.predict, lambda a: table.predict_many([a]), table.breakdown):
        with pytest.raises(MissingEntry, match=str(gone).replace("(", r"\(").replace(")", r"\)")) as info:
            predict(arch)
        assert info.value.signature == gone and isinstance(info.value, ValueError)
    with pytest.raises(MissingEntry):
        table.min_latency(fashion_space)
    assert table.missing(fashion_space) == [gone]
    # Archs that avoid the op still predict, also after a failure filled part of the caches.
    other = fashion_space.smallest()
    assert gone not in arch_ops(other, fashion_space.geometry)
    assert table.predict(other) == pytest.approx(full.predict(other))


def test_save_load_round_trip_is_atomic(tmp_path: Path, fashion_space: SearchSpace, synthetic_table) -> None:
    table = synthetic_table(fashion_space)
    table.correction = Correction(scale=1.1, overhead_us=3.0, fitted_on=20, space="fashion_mnist")
    path = tmp_path / "luts" / "t.json"
    table.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["t.json"]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert set(data["entries"][0]) == {"op", "median_us", "p10_us", "p90_us", "n"}
    assert isinstance(data["entries"][0]["op"], dict) and data["entries"][0]["op"]["kind"]
    loaded = LatencyTable.load(path, expect=table.fingerprint)
    assert dict(loaded.entries) == dict(table.entries)
    assert loaded.correction == table.correction and loaded.geometry == table.geometry
    arch = fashion_space.reference("shufflenet_v2_x0_5")
    assert loaded.predict(arch) == table.predict(arch)


def test_fingerprint_mismatch_lists_the_fields(tmp_path: Path, fashion_space: SearchSpace, synthetic_table) -> None:
    table = synthetic_table(fashion_space, settings=Settings(threads=1, num_classes=10))
    path = tmp_path / "t.json"
    table.save(path)
    with pytest.raises(FingerprintMismatch) as info:
        LatencyTable.load(path, expect=Settings(threads=2, num_classes=10))
    message = str(info.value)
    assert "threads: table 1, now 2" in message and str(path) in message and "\n" not in message
    assert info.value.differences == ["threads: table 1, now 2"]
    other = dataclasses.replace(table.fingerprint, device_name="Some Other CPU", torch_version="0.0")
    with pytest.raises(FingerprintMismatch, match="device_name.*torch_version"):
        LatencyTable.load(path, expect=other)
    assert len(LatencyTable.load(path, expect=other, allow_mismatch=True)) == len(table)
    assert len(LatencyTable.load(path, expect=Settings(threads=1, num_classes=10))) == len(table)


def test_corrupt_or_truncated_files_are_refused(tmp_path: Path, fashion_space: SearchSpace, synthetic_table) -> None:
    path = tmp_path / "t.json"
    synthetic_table(fashion_space).save(path)
    text = path.read_text()
    cases = {
        "truncated": text[: len(text) // 2],
        "empty": "",
        "garbage": "\x00\x01 not json",
        "list": "[1, 2]",
        "no entries": json.dumps({k: v for k, v in json.loads(text).items() if k != "entries"}),
        "bad entry": text.replace('"median_us": ', '"median_us": -', 1),
        "bad op": text.replace('"kind": "unit"', '"kind": "conv"', 1),
        "future schema": text.replace('"schema_version": 1', '"schema_version": 99', 1),
    }
    for name, broken in cases.items():
        bad = tmp_path / f"{name.replace(' ', '_')}.json"
        bad.write_text(broken)
        with pytest.raises(CorruptTable, match=bad.name) as info:
            LatencyTable.load(bad)
        assert isinstance(info.value, ValueError), name
    with pytest.raises(LutError, match="cannot read"):
        LatencyTable.load(tmp_path / "absent.json")


def test_fingerprint_of_this_machine(fashion_space: SearchSpace) -> None:
    settings = Settings(threads=1, batch_size=4, num_classes=10)
    fp = Fingerprint.current("cpu", settings, fashion_space.geometry)
    assert fp.device_kind == "cpu" and fp.device_name and fp.compute_capability == ""
    assert (fp.input_size, fp.in_channels, fp.stem_kind) == (28, 1, "small")
    assert fp.settings == settings
    assert Fingerprint.from_dict(fp.to_dict()) == fp
    with pytest.raises(ValueError, match="unknown fields"):
        Fingerprint.from_dict({**fp.to_dict(), "extra": 1})


def test_predict_many_equals_predict_over_sampled_archs_of_both_spaces(imagenet_space: SearchSpace,
                                                                        fashion_space: SearchSpace, synthetic_table,
                                                                        monkeypatch) -> None:
    # Its speed against `predict` is measured in benchmarks/bench_lut.py (not timed here: the machine is shared).
    monkeypatch.setattr(table_module, "_CHUNK", 700)  # several chunks, the last one short
    for seed, space in enumerate((imagenet_space, fashion_space)):
        table = synthetic_table(space, seed=seed)
        table.correction = Correction(scale=0.97, overhead_us=310.0, fitted_on=20)
        rng = np.random.default_rng(seed)
        archs = [space.sample(rng) for _ in range(3000)] + [space.largest(), space.smallest()]
        expected = np.array([table.predict(a) for a in archs])
        uncorrected = np.array([table.predict(a, corrected=False) for a in archs])
        fresh = synthetic_table(space, seed=seed)  # nothing learnt from `predict` yet
        fresh.correction = table.correction
        np.testing.assert_allclose(fresh.predict_many(iter(archs)), expected, rtol=1e-9, atol=0)
        np.testing.assert_allclose(fresh.predict_many(archs, corrected=False), uncorrected, rtol=1e-9, atol=0)
        # Once its ops are known, predict_many reads arrays: no per-arch path.
        monkeypatch.setattr(type(fresh), "_arch_us", lambda self, arch: pytest.fail("predict_many went arch by arch"))
        monkeypatch.setattr(type(fresh), "_learn", lambda self, arch: pytest.fail("predict_many learnt a known op"))
        np.testing.assert_allclose(fresh.predict_many(archs[::-1]), expected[::-1], rtol=1e-9, atol=0)
        monkeypatch.undo()
        monkeypatch.setattr(table_module, "_CHUNK", 700)
    assert table.predict_many([]).shape == (0,)


def test_predict_many_learns_new_splits_and_widths_between_calls(synthetic_table) -> None:
    # Two spaces of one geometry: the second brings splits, widths and kernels that the first call never saw.
    first = {**TINY, "stages": [{"depths": [1, 2], "widths": [16], "splits": [0.5], "kernels": [3]}]}
    second = {**TINY, "stages": [{"depths": [2, 3], "widths": [16, 24], "splits": [0.25, 0.75], "kernels": [3, 5]}]}
    spaces = [SearchSpace.from_dict(first), SearchSpace.from_dict(second)]
    tables = [synthetic_table(space, seed=k) for k, space in enumerate(spaces)]
    table = LatencyTable(tables[0].fingerprint, tables[0].geometry, {**tables[1].entries, **tables[0].entries})
    rng = np.random.default_rng(0)
    for space in spaces:
        archs = [space.sample(rng) for _ in range(200)]
        np.testing.assert_allclose(table.predict_many(archs), [table.predict(a) for a in archs], rtol=1e-9, atol=0)


def test_correction_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        Correction(scale=0.0)
    with pytest.raises(ValueError, match="overhead"):
        Correction(overhead_us=math.nan)
    stage = {"depths": [1], "widths": [16], "splits": [0.5], "kernels": [3]}
    space = SearchSpace.from_dict({**TINY, "stages": [stage]})
    op = arch_ops(space.smallest(), space.geometry)[0]
    with pytest.raises(ValueError, match="factor"):
        Correction(op_factors=((op, 0.0),))


def _with_factors(table: LatencyTable, seed: int = 0) -> tuple[LatencyTable, dict]:
    """A copy of `table` with a random factor (0.5 to 2) for about half its ops, and the factors."""
    rng = np.random.default_rng(seed)
    ops = sorted(op for op in table.entries if op.kind != "call")
    factors = {op: float(rng.uniform(0.5, 2.0)) for op in ops if rng.random() < 0.5}
    correction = Correction(scale=1.2, overhead_us=30.0, fitted_on=50, op_factors=tuple(sorted(factors.items())),
                            ridge=0.01)
    return LatencyTable(table.fingerprint, table.geometry, table.entries, correction), factors


def test_op_factors_weigh_each_op_in_every_prediction(tiny_space: SearchSpace, fashion_space: SearchSpace,
                                                      synthetic_table, all_archs, tmp_path: Path) -> None:
    table, factors = _with_factors(synthetic_table(fashion_space))
    rng = np.random.default_rng(0)
    archs = [fashion_space.sample(rng) for _ in range(200)]
    for arch in archs[:50]:
        ops = arch_ops(arch, fashion_space.geometry)
        weighed = sum(table.entries[op].median_us * factors.get(op, 1.0) for op in ops)
        assert table.predict(arch) == pytest.approx((1.2 * weighed + 30.0) / 1e3, rel=1e-12)
        # uncorrected: the plain sum of the entries, factors and all left out
        plain = sum(table.entries[op].median_us for op in ops)
        assert table.predict(arch, corrected=False) == pytest.approx(plain / 1e3, rel=1e-12)
        assert sum(part.ms for part in table.breakdown(arch)) == pytest.approx(table.predict(arch), rel=1e-12)
    np.testing.assert_array_equal(table.predict_many(archs), [table.predict(a) for a in archs])
    np.testing.assert_array_equal(table.predict_many(archs, corrected=False),
                                  [table.predict(a, corrected=False) for a in archs])
    np.testing.assert_allclose(table.scaled(1.5).predict_many(archs), 1.5 * table.predict_many(archs), rtol=1e-12)

    path = tmp_path / "t.json"
    table.save(path)
    loaded = LatencyTable.load(path)
    assert loaded.correction == table.correction
    np.testing.assert_array_equal(loaded.predict_many(archs), table.predict_many(archs))

    small, _ = _with_factors(synthetic_table(tiny_space, seed=3), seed=1)
    predictions = small.predict_many(list(all_archs(tiny_space)))
    assert small.min_latency(tiny_space) == pytest.approx(predictions.min(), rel=1e-12)
    assert small.max_latency(tiny_space) == pytest.approx(predictions.max(), rel=1e-12)

    # a new correction replaces the factors in every later prediction
    table.correction = Correction(scale=1.2, overhead_us=30.0)
    assert table.predict(archs[0]) == pytest.approx(1.2 * table.predict(archs[0], corrected=False) + 0.03, rel=1e-12)


def test_malformed_op_factors_are_refused(tmp_path: Path, fashion_space: SearchSpace, synthetic_table) -> None:
    table, _ = _with_factors(synthetic_table(fashion_space))
    path = tmp_path / "t.json"
    table.save(path)
    good = json.loads(path.read_text())
    for bad in ([{"op": good["correction"]["op_factors"][0]["op"]}],  # no factor
                [{**good["correction"]["op_factors"][0], "factor": -1.0}],
                good["correction"]["op_factors"][:1] * 2,  # an op twice
                {"not": "a list"}):
        data = {**good, "correction": {**good["correction"], "op_factors": bad}}
        path.write_text(json.dumps(data))
        with pytest.raises(CorruptTable, match="factor"):
            LatencyTable.load(path)
