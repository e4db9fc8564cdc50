"""The shared bounded discrete logarithm (``secureinfer.plugins.fe_common.dlog``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymcl", reason="the FE schemes need pymcl: pip install secureinfer[fe]")

from secureinfer.errors import RangeError  # noqa: E402
from secureinfer.plugins.fe_common import dlog  # noqa: E402
from secureinfer.plugins.fe_common.dlog import (  # noqa: E402
    DlogOutOfRange,
    DlogTable,
    cache_dir,
    table_bits_for,
)
from secureinfer.plugins.fe_common.groups import group  # noqa: E402

BOUND = 20_000


@pytest.fixture(params=["G1", "GT"])
def ops(request):
    return group(request.param)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty disk cache and an empty in-memory cache."""
    monkeypatch.setattr(dlog, "_MEMORY", {})
    monkeypatch.setenv(dlog.CACHE_ENV_VAR, str(tmp_path))
    return tmp_path


def test_solves_negative_zero_and_edges(ops, fresh):
    g = ops.generator()
    table = DlogTable(ops, g, BOUND)
    values = [0, 1, -1, 7, -7, BOUND, -BOUND, BOUND - 1, -(BOUND - 1), 12345, -16384]
    got = table.solve_many([ops.pow(g, v) for v in values])
    assert got.dtype == np.int64
    assert got.tolist() == values
    assert table.solve(ops.pow(g, -4321)) == -4321


def test_random_values_round_trip(fresh):
    ops = group("G1")
    g = ops.generator()
    values = np.random.default_rng(0).integers(-BOUND, BOUND + 1, size=200)
    table = DlogTable(ops, g, BOUND, table_bits=10)  # many giant steps on purpose
    assert table.max_steps > 30
    np.testing.assert_array_equal(table.solve_many([ops.pow(g, int(v)) for v in values]),
                                  values)


def test_out_of_range_raises_instead_of_hanging(ops, fresh):
    g = ops.generator()
    table = DlogTable(ops, g, BOUND)
    for value in (BOUND + 1, -BOUND - 1, 10**12, -(10**15)):  # timed: bench_refusals.py
        with pytest.raises(DlogOutOfRange) as info:
            table.solve_many([ops.pow(g, 3), ops.pow(g, value)])
        assert info.value.index == 1
        assert info.value.bound == BOUND
        assert isinstance(info.value, RangeError)


def test_not_a_power_of_the_generator_raises(fresh):
    ops = group("G1")
    table = DlogTable(ops, ops.generator(), 1000)
    stranger = ops.cls.hash(b"not a small multiple of g")
    with pytest.raises(DlogOutOfRange):
        table.solve(stranger)


def test_empty_input(fresh):
    ops = group("G1")
    assert DlogTable(ops, ops.generator(), 100).solve_many([]).shape == (0,)


def test_table_cached_on_disk_and_reused(fresh):
    ops = group("G1")
    g = ops.generator()
    first = DlogTable(ops, g, BOUND)
    assert first.source == "built"
    assert first.cache_path is not None and first.cache_path.is_file()
    assert first.cache_path.parent == fresh / "dlog"
    assert DlogTable(ops, g, BOUND).source == "memory"
    dlog._MEMORY.clear()
    again = DlogTable(ops, g, BOUND)
    assert again.source == "disk"
    assert again.solve(ops.pow(g, -999)) == -999
    # a larger bound with the same table size shares the file
    dlog._MEMORY.clear()
    wider = DlogTable(ops, g, 3 * BOUND, table_bits=first.table_bits)
    assert wider.source == "disk" and wider.solve(ops.pow(g, 2 * BOUND)) == 2 * BOUND


def test_corrupt_or_foreign_cache_file_is_rebuilt(fresh):
    ops = group("G1")
    g = ops.generator()
    path = DlogTable(ops, g, BOUND).cache_path
    dlog._MEMORY.clear()
    path.write_bytes(b"garbage, not an npz file")
    table = DlogTable(ops, g, BOUND)
    assert table.source == "built"
    assert table.solve(ops.pow(g, 42)) == 42
    # a well-formed file whose entries are wrong fails the spot check
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["exps"] = np.roll(arrays["exps"], 1)
    np.savez(path, **arrays)
    dlog._MEMORY.clear()
    assert DlogTable(ops, g, BOUND).source == "built"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(dlog.CACHE_ENV_VAR, str(tmp_path))
    assert cache_dir() == tmp_path / "dlog"
    monkeypatch.delenv(dlog.CACHE_ENV_VAR)
    assert cache_dir().name == "dlog" and "secureinfer" in str(cache_dir())


def test_memory_only_table(monkeypatch):
    monkeypatch.setattr(dlog, "_MEMORY", {})
    ops = group("GT")
    table = DlogTable(ops, ops.generator(), 500, cache=False)
    assert table.cache_path is None
    assert table.solve(ops.pow(ops.generator(), -250)) == -250


def test_table_size_follows_the_bound():
    assert table_bits_for(100) == 8  # the minimum
    assert table_bits_for(2**20 - 1, target_steps=8) == 18  # 2B+1 <= 8 * 2**18
    assert table_bits_for(2**40) == 22  # capped
    assert table_bits_for(2**40, max_table_bits=20) == 20
