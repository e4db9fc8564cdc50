"""``secureinfer bench --ray``: the comparison matrix as Ray tasks.

Every (scheme, shard of the test set) pair is one task. A task loads the dataset and the
model, compiles the network for its scheme exactly as a local run does, and returns the
logits of its shard with its phase times; the driver compiles the same model once per
scheme for the clear reference and builds the same report as ``runner.run`` from the
concatenated logits. Agreement and accuracy therefore equal the local run's (for exact
schemes bit for bit; CKKS differs only by its noise). The report adds ``engine`` and
``workers`` (the cluster's CPUs). Needs the ``ray`` extra: ``pip install 'secureinfer[ray]'``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["bench_on_ray", "shard_bounds"]

_PHASES = ("keygen", "encrypt", "evaluate", "decrypt")


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, non-empty ``(start, stop)`` ranges covering ``range(n)``."""
    shards = max(1, min(shards, n))
    cuts = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def _shard(config: str, model: str | None, dataset: str, arch: str, allow_insecure: bool,
           start: int, stop: int) -> tuple[np.ndarray, dict[str, float], dict[str, int]]:
    """One shard under one scheme: its logits, phase seconds and message bytes."""
    from .data import load
    from .model import compile_layers
    from .registry import resolve
    from .runner import _batches, load_network

    scheme = resolve(config, allow_insecure=allow_insecure)
    ds = load(dataset)
    layers, calib, _ = load_network(model, ds, arch=arch, progress=False)
    sm = compile_layers(layers, scheme, calibration=calib)
    x = np.asarray(ds.x_test[start:stop], dtype=np.float64)
    client, server, _ = sm.setup()
    batch = max(1, int(sm.scheme.batch_size()))
    logits = np.concatenate([client.decrypt(server.evaluate(client.encrypt(x[sl])))
                             for sl in _batches(len(x), batch)])
    seconds = {p: float(sm.meter.total(p)) for p in _PHASES}
    sizes = {k: int((sm.meter.per_sample_bytes(k) or 0) * len(x)) for k in ("input", "output")}
    return logits, seconds, sizes


def bench_on_ray(configs: Sequence[str], *, model: str | None, dataset: str, arch: str,
                 limit: int | None, allow_insecure: bool, shards: int | None = None,
                 address: str | None = None) -> list[dict[str, Any]]:
    """Run every scheme of ``configs`` on the Ray cluster; one report dict per scheme.

    Args:
        shards: pieces of the test set per scheme (default: the cluster's CPUs).
        address: the Ray cluster (``None``: the running one or a new local one).

    Raises:
        BackendNotInstalledError: Ray is not installed.
    """
    from .data import load
    from .model import compile_layers
    from .registry import resolve
    from .runner import load_network, report
    from .serve.cluster import import_ray

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = load(dataset)
    n = min(limit, len(ds.x_test)) if limit else len(ds.x_test)
    bounds = shard_bounds(n, shards or workers)
    task = ray.remote(num_cpus=1)(_shard)
    pending = {c: [task.remote(c, model, dataset, arch, allow_insecure, a, b)
                   for a, b in bounds] for c in configs}
    layers, calib, model_name = load_network(model, ds, arch=arch, progress=False)
    results = []
    for config, refs in pending.items():
        parts = ray.get(refs)
        sm = compile_layers(layers, resolve(config, allow_insecure=allow_insecure),
                            calibration=calib)
        x = np.asarray(ds.x_test[:n], dtype=np.float64)
        logits = np.concatenate([p[0] for p in parts])
        r = report(sm, config, ds.name, model_name, x, ds.y_test[:n], logits)
        seconds = {p: sum(part[1][p] for part in parts) for p in _PHASES}
        r["latency_s"] = {p: round(seconds[p] / n, 6) if p != "keygen" else
                          round(seconds[p] / len(parts), 6) for p in _PHASES}
        busy = seconds["encrypt"] + seconds["evaluate"] + seconds["decrypt"]
        r["throughput_per_s"] = round(n / busy, 3) if busy > 0 else float("inf")
        r["bytes"].update({k: sum(part[2][k] for part in parts) / n
                           for k in ("input", "output")})
        r.update(engine="ray", workers=workers, shards=len(parts))
        results.append(r)
    return results
