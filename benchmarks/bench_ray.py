"""Throughput of ``secureinfer serve --ray`` with 1 and with 2 replicas, ckks and bfv, on the
28x28 cnn (the network of ``bench_serve.py``), on a local Ray cluster of 2 CPUs.

For each scheme and replica count, key owners send requests in parallel for a fixed time;
the table gives the requests per second, the ratio to 1 replica, the mean round trip and the
server's own time per request, and the message sizes (the inputs to the k-machine
projection in the README). The machine is shared: figures are noisy.

    python benchmarks/bench_ray.py [--seconds 20] [--schemes ckks,bfv]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _networks import random_cnn  # noqa: E402
from secureinfer import data, remote  # noqa: E402
from secureinfer.model import compile_layers  # noqa: E402
from secureinfer.scheme import Calibration  # noqa: E402

CONFIGS = {"ckks": "ckks?packing=single", "bfv": "bfv?packing=single"}
#: Key owners sending at once; bfv's Galois keys for this cnn are about 600 MB per owner.
OWNERS = {"ckks": 4, "bfv": 2}


def measure(url: str, x: np.ndarray, seconds: float, owners: int) -> dict[str, Any]:
    """``owners`` key owners in parallel for ``seconds``: requests, round trips, sizes."""
    sessions = [remote.connect(url, timeout=600) for _ in range(owners)]
    messages = [s.client.encrypt(x) for s in sessions]
    for s, m in zip(sessions, messages):
        s.evaluate(m)  # warm-up: every replica that answers opens the keys once
    for s in sessions:
        s.round_trips.clear()
        s.server_seconds.clear()
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while time.monotonic() < stop:
                sessions[i].evaluate(messages[i])
        except BaseException as exc:  # noqa: BLE001 - counted
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(owners)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    trips = [t for s in sessions for t in s.round_trips]
    server = [t for s in sessions for t in s.server_seconds]
    out = {"requests": len(trips), "per_s": len(trips) / wall,
           "round_trip_s": statistics.mean(trips), "server_s": statistics.mean(server),
           "input_bytes": len(messages[0]),
           "output_bytes": sessions[0].bytes_received["output"] // max(1, len(
               sessions[0].round_trips) + 1),
           "keys_bytes": sessions[0].bytes_sent["keys"], "errors": len(errors)}
    for s in sessions:
        s.close()
    return out


def main() -> None:
    import ray
    from ray import serve

    from secureinfer.serve import Settings
    from secureinfer.serve.cluster import deploy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--schemes", default="ckks,bfv")
    args = p.parse_args()
    ds = data.load("digits28")
    layers = random_cnn()
    calib = Calibration.from_data(layers, ds.x_train[:256].astype(np.float64))
    x = ds.x_test[:1].astype(np.float64)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    rows = []
    try:
        for name in args.schemes.split(","):
            sm = compile_layers(layers, CONFIGS[name], calibration=calib, deploy=True)
            with tempfile.TemporaryDirectory() as tmp:
                sm.save(Path(tmp) / "artifact")
                base = None
                for replicas in (1, 2):
                    url = deploy(Settings(artifact=Path(tmp) / "artifact",
                                          keys_dir=Path(tmp) / "keys",
                                          max_request_bytes=1 << 30), port=18741,
                                 replicas=replicas)
                    r = measure(url, x, args.seconds, OWNERS[name])
                    serve.delete("secureinfer")
                    base = base or r["per_s"]
                    rows.append((name, replicas, r, r["per_s"] / base))
                    print(f"# {name} x{replicas}: {r}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("| scheme | replicas | req/s | vs 1 | round trip ms | server ms/req | input KiB "
          "| output KiB | keys MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, replicas, r, ratio in rows:
        print(f"| {name} | {replicas} | {r['per_s']:.2f} | {ratio:.2f}x | "
              f"{r['round_trip_s'] * 1e3:.0f} | {r['server_s'] * 1e3:.0f} | "
              f"{r['input_bytes'] / 1024:.0f} | {r['output_bytes'] / 1024:.0f} | "
              f"{r['keys_bytes'] / 2 ** 20:.1f} | {r['errors']} |")


if __name__ == "__main__":
    main()
