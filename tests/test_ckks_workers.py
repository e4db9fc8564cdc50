"""``ckks?workers=k``: one image's costly stages split over forked helper processes."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="ckks needs TenSEAL: pip install secureinfer[ckks]")

from secureinfer.errors import ConfigError
from secureinfer.layers import AvgPool2d, Conv2d, Flatten, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.ckks.backend import _scratch_dir

TOL = 1e-2
BASE = "ckks?flood_bits=0"


def channels_net(seed: int = 0) -> list:
    """conv 1->4 (pad 1), square, pool, conv 4->16 (pad 1), square, flatten, 256->10: the
    second convolution has many base differences (giant steps) to split."""
    rng = np.random.default_rng(seed)
    c1 = Conv2d("c1", (1, 8, 8), weight=rng.normal(0, 0.3, (4, 1, 3, 3)),
                bias=rng.normal(0, 0.1, 4), padding=(1, 1))
    pool = AvgPool2d("pool", c1.out_shape, kernel=2, stride=2)
    c2 = Conv2d("c2", pool.out_shape, weight=rng.normal(0, 0.2, (16, 4, 3, 3)),
                bias=rng.normal(0, 0.1, 16), padding=(1, 1))
    n = int(np.prod(c2.out_shape))
    return [c1, Poly("sq1", c1.out_shape), pool, c2, Poly("sq2", c2.out_shape),
            Flatten("flat", c2.out_shape),
            Linear("fc", (n,), weight=rng.normal(0, 1 / np.sqrt(n), (10, n)),
                   bias=rng.normal(0, 0.1, 10))]


def _calib(layers: list, n: int = 16, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *layers[0].in_shape))


@pytest.fixture(scope="module")
def models():
    layers = channels_net()
    one = compile_layers(layers, BASE, calibration=_calib(layers))
    two = compile_layers(layers, BASE + "&workers=2", calibration=_calib(layers))
    return one, two


def _run(sm, x, parties=None):
    client, server, _ = parties or sm.setup()
    return client.decrypt(server.evaluate(client.encrypt(x)))


def test_split_plan_keeps_the_layouts_and_adds_at_most_a_key_per_split(models) -> None:
    one, two = models
    assert one.plan["split_stages"] == 0 and one.plan["workers"] == 1
    assert two.plan["split_stages"] >= 1 and two.plan["workers"] == 2
    assert two.plan["rotations_per_input"] == one.plan["rotations_per_input"]
    assert two.plan["plaintext_products"] == one.plan["plaintext_products"]
    assert set(one.plan["rotation_steps"]) <= set(two.plan["rotation_steps"])
    assert two.plan["galois_keys"] <= one.plan["galois_keys"] + two.plan["split_stages"]
    parts = [st["giant_parts"] for st in two.plan["grid_stages"] if st["giant_parts"]]
    assert parts and all(len(p) == 2 and min(p) >= 1 for p in parts)
    # a helper part's chain ends on its own smallest giant: at most one key per helper part
    assert two.plan["galois_keys"] <= one.plan["galois_keys"] + sum(len(p) - 1 for p in parts)


def test_helpers_compute_their_parts(models) -> None:
    one, two = models
    x = _calib(one.layers, 3, seed=9)
    ref = one.reference(x)
    parties = two.setup()
    pool = parties.server.ctx.pool
    assert pool is not None and pool.broken is None
    y = _run(two, x, parties)
    np.testing.assert_allclose(y, ref, atol=TOL)
    np.testing.assert_allclose(y, _run(one, x), atol=TOL)
    # a real helper process ran the other part (no fallback to one process)
    assert pool.broken is None and len(pool._procs) == 1 and pool._procs[0].is_alive()
    assert pool._procs[0].pid != os.getpid()


def test_a_dead_helper_loses_no_request(models) -> None:
    one, two = models
    x = _calib(one.layers, 2, seed=4)
    parties = two.setup()
    np.testing.assert_allclose(_run(two, x, parties), one.reference(x), atol=TOL)
    pool = parties.server.ctx.pool
    scratch = _scratch_dir(64 << 20)
    before = set(os.listdir(scratch))
    os.kill(pool._procs[0].pid, signal.SIGKILL)
    pool._procs[0].join(timeout=10)
    with pytest.warns(RuntimeWarning, match="unreachable|died"):
        y = _run(two, x, parties)
    np.testing.assert_allclose(y, one.reference(x), atol=TOL)
    assert pool.broken is not None
    assert not [f for f in set(os.listdir(scratch)) - before
                if f.startswith("secureinfer-ckks-part-")]  # no scratch file left behind
    np.testing.assert_allclose(_run(two, x, parties), one.reference(x), atol=TOL)


def test_concurrent_requests_share_one_server(models) -> None:
    one, two = models
    client, server, _ = two.setup()
    xs = [_calib(one.layers, 1, seed=s) for s in (1, 2, 3)]
    msgs = [client.encrypt(x) for x in xs]
    outs: dict[int, bytes] = {}

    def work(i: int) -> None:
        outs[i] = server.evaluate(msgs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(client.decrypt(outs[i]), one.reference(x), atol=TOL)
    assert server.ctx.pool.broken is None and len(server.ctx.pool._procs) == 1  # helper used


def test_workers_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="workers"):
        compile_layers(channels_net(), BASE + "&workers=0", calibration=_calib(channels_net()))


def test_lazy_split_plan_round_trips_through_the_artifact(tmp_path) -> None:
    """A deployed server re-plans from its artifact: the same lazy chain and split, so the
    client's keys and output level match."""
    import secureinfer

    layers = channels_net()
    sm = compile_layers(layers, BASE + "&workers=2", calibration=_calib(layers), deploy=True)
    assert sm.plan["lazy_squares"] >= 1 and sm.plan["split_stages"] >= 1
    sm.save(tmp_path)
    server_model = secureinfer.load_server(tmp_path)
    client_model = secureinfer.load_client(tmp_path)
    assert client_model.plan == sm.plan
    client = client_model.owner()
    server = server_model.server(client.keys.public_keys())
    x = _calib(layers, 2, seed=7)
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))),
                               sm.reference(x), atol=TOL)


def test_an_interrupted_request_cannot_leak_into_the_next(models) -> None:
    """The server's own part raises after the helper got its input: the helper's answer must
    never be read as the next request's partial sum."""
    from secureinfer.plugins.ckks.layers import RotationKernel

    one, two = models
    parties = two.setup()
    pool = parties.server.ctx.pool
    x = _calib(one.layers, 1, seed=12)
    np.testing.assert_allclose(_run(two, x, parties), one.reference(x), atol=TOL)
    original = RotationKernel.parts_sum
    calls = []

    def once(self, item, parts):
        if not calls and len(self.chains) > 1:  # a split stage, the helper already at work
            calls.append(1)
            raise MemoryError("simulated")
        return original(self, item, parts)

    RotationKernel.parts_sum = once
    try:
        with pytest.warns(RuntimeWarning, match="interrupted"), pytest.raises(MemoryError):
            _run(two, x, parties)
    finally:
        RotationKernel.parts_sum = original
    x2 = _calib(one.layers, 1, seed=13)
    np.testing.assert_allclose(_run(two, x2, parties), one.reference(x2), atol=TOL)
    assert pool.broken is not None and not any(p.is_alive() for p in pool._procs)


def test_dropping_one_of_two_servers_stops_its_helper_at_once(models) -> None:
    import gc
    import time

    one, two = models
    x = _calib(one.layers, 1, seed=2)
    first, second = two.setup(), two.setup()
    for parties in (first, second):
        np.testing.assert_allclose(_run(two, x, parties), one.reference(x), atol=TOL)
    helper = first.server.ctx.pool._procs[0]
    assert helper.is_alive() and second.server.ctx.pool._procs[0].is_alive()
    start = time.monotonic()
    first.server.ctx.pool.close()
    assert time.monotonic() - start < 1.5  # the helper saw its pipe close (no 2 s join)
    assert not helper.is_alive()
    np.testing.assert_allclose(_run(two, x, second), one.reference(x), atol=TOL)
    del first
    gc.collect()
