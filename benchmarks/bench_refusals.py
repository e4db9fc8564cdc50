"""How long the FE discrete logarithm takes to refuse an out-of-range value.

A value outside the discrete-log bound must raise ``DlogOutOfRange`` instead of searching
forever. Two figures, each against its target (the former timing asserts of the unit tests):

1. ``DlogTable.solve_many`` on four out-of-range values (``bound + 1``, ``-bound - 1``,
   ``10**12``, ``-10**15``) after one in-range value, in G1 and GT: target < 10 s each.
2. A ``fe-ip`` server given a well-formed ciphertext of out-of-range integers (built with
   the authority's public key, bypassing the client's quantization): target < 20 s.

Run: ``python benchmarks/bench_refusals.py [--bound 20000] [--repeat 3]``. Prints a table
(median of ``--repeat`` runs) and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from secureinfer import codec
from secureinfer.codec import Kind
from secureinfer.layers import Flatten, Linear, Poly
from secureinfer.model import compile_layers
from secureinfer.plugins.fe_common import dlog
from secureinfer.plugins.fe_common.dlog import DlogOutOfRange, DlogTable
from secureinfer.plugins.fe_common.groups import fr, group, pack_elements, random_scalar


def time_table(name: str, bound: int) -> float:
    """Seconds for one table (in the group ``name``) to refuse four out-of-range values."""
    ops = group(name)
    g = ops.generator()
    table = DlogTable(ops, g, bound)
    start = time.perf_counter()
    for value in (bound + 1, -bound - 1, 10**12, -(10**15)):
        try:
            table.solve_many([ops.pow(g, 3), ops.pow(g, value)])
        except DlogOutOfRange as exc:
            assert exc.index == 1 and exc.bound == bound
        else:
            raise AssertionError(f"{value} outside the bound {bound} was solved")
    return time.perf_counter() - start


def time_server() -> float:
    """Seconds for a fe-ip server to refuse a ciphertext of out-of-range integers."""
    rng = np.random.default_rng(0)
    layers = [Flatten("flatten", (1, 4, 4)),
              Linear("fc1", (16,), weight=rng.normal(0, 0.4, (8, 16)),
                     bias=rng.normal(0, 0.1, 8)),
              Poly("act1", (8,)), Linear("fc2", (8,), weight=rng.normal(0, 0.4, (3, 8)),
                                         bias=np.zeros(3))]
    sm = compile_layers(layers, "fe-ip", calibration=rng.random((64, 1, 4, 4)))
    _, server, authority = sm.setup()
    ops = group("G1")
    g, rho = ops.generator(), random_scalar()
    body = [ops.law(h * fr(rho), ops.pow(g, 10**7)) for h in authority.secret.public.h]
    payload = codec.pack_fields({"count": 1, "ct": pack_elements(ops, [ops.pow(g, rho), *body])})
    message = sm._seal(Kind.INPUT, codec.pack_fields({"n": 1, "ct": payload}))
    start = time.perf_counter()
    try:
        server.evaluate(message)
    except DlogOutOfRange:
        return time.perf_counter() - start
    raise AssertionError("the server decrypted out-of-range integers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bound", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as cache:  # tables built here, not in the user's cache
        os.environ[dlog.CACHE_ENV_VAR] = cache
        for name in ("G1", "GT"):
            runs = [time_table(name, args.bound) for _ in range(args.repeat)]
            rows.append((f"DlogTable {name}, bound {args.bound}: 4 refusals",
                         statistics.median(runs), 10.0))
        runs = [time_server() for _ in range(args.repeat)]
        rows.append(("fe-ip server, out-of-range ciphertext", statistics.median(runs), 20.0))
    width = max(len(r[0]) for r in rows)
    print(f"{'case':<{width}}  {'median s':>9}  {'target s':>9}  ok")
    for label, seconds, target in rows:
        ok = "yes" if seconds < target else "NO"
        print(f"{label:<{width}}  {seconds:9.3f}  {target:9.1f}  {ok}")
    return 0 if all(s < t for _, s, t in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
