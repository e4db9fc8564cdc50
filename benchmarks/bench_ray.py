"""Throughput of ``secureinfer serve --ray`` with 1 and with 2 replicas, ckks and bfv, on the
28x28 cnn (the network of ``bench_serve.py``), on a local Ray cluster of 2 CPUs.

For each scheme and replica count, senders (threads of a few key owners) send requests in
parallel for a fixed time, after a warm-up in which every replica has opened every owner's
keys; the table gives the requests per second, the ratio to 1 replica, the mean round trip,
the server's own time and the replicas' CPU time per request, and the message sizes (the
inputs to the k-machine projection in the README).
A second table says where the CPU went during the measured window: the replicas, Ray's
HTTP proxy, the front, the rest of Ray, this process (the key owners encrypting and
sending) and everything else on the machine (other jobs), in cores (CPU-seconds per
second), read from ``/proc``. The machine is shared: figures are noisy.

    python benchmarks/bench_ray.py [--seconds 20] [--schemes ckks,bfv]
"""

from __future__ import annotations

import argparse
import os
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
#: Key owners, and requests in flight at once (each owner's share sent by its threads).
#: bfv's Galois keys for this cnn are about 600 MB per owner and an opened server about
#: 1.4 GB in each replica, so one bfv owner with two senders keeps both replicas busy.
OWNERS = {"ckks": 4, "bfv": 1}
SENDERS = {"ckks": 4, "bfv": 2}
#: Each replica's budget of opened keys: every owner's keys stay open (an owner whose keys
#: were evicted would be reopened from disk at every request, and that would be measured).
CACHE_MB = {"ckks": 1024.0, "bfv": 8192.0}
_TICK = os.sysconf("SC_CLK_TCK")
_ROLES = (("replicas", "ray::ServeReplica:secureinfer:SecureInfer"),
          ("proxy", "ray::ProxyActor"), ("front", "ray::ServeReplica:secureinfer:Front"))


def _processes() -> dict[int, tuple[int, str, float]]:
    """Every process: parent pid, command line, CPU seconds (user + system)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), cmd, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        cpu = [int(v) for v in fh.readline().split()[1:]]
    return (sum(cpu[:8]) - cpu[3] - cpu[4]) / _TICK  # user..steal, minus idle and iowait


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process (the load generator: the owners' senders), of
    its Ray descendants by role, and of the whole machine."""
    procs = _processes()
    me = os.getpid()
    mine: set[int] = {me}
    for _ in range(6):  # descendants: the driver starts Ray, the raylet its workers
        mine |= {p for p, (parent, _, _) in procs.items() if parent in mine}
    out = {"load generator": procs.get(me, (0, "", 0.0))[2], "replicas": 0.0, "proxy": 0.0,
           "front": 0.0, "other ray": 0.0}
    for pid in mine - {me}:
        _, cmd, cpu = procs[pid]
        role = next((r for r, prefix in _ROLES if cmd.startswith(prefix)), "other ray")
        out[role] += cpu
    out["machine"] = _busy_seconds()
    return out


def warm_up(url: str, sessions: list[Any], messages: list[bytes], replicas: int) -> None:
    """Send each owner's request until every replica has answered it (so each replica has
    opened each owner's keys before the measurement)."""
    import httpx

    with httpx.Client(timeout=600) as http:
        for s, m in zip(sessions, messages):
            seen: set[str] = set()
            for _ in range(20 * replicas):
                r = http.post(url + "/v1/infer", content=m, headers={"X-Key-Id": s.key_id})
                r.raise_for_status()
                seen.add(r.headers["x-replica-id"])
                if len(seen) == replicas:
                    break
            else:
                raise RuntimeError(f"only replicas {sorted(seen)} answered in the warm-up")


def measure(url: str, x: np.ndarray, seconds: float, owners: int, senders: int,
            replicas: int) -> dict[str, Any]:
    """``owners`` key owners sending ``senders`` requests at once for ``seconds``: requests,
    round trips, sizes, and the cores each role used meanwhile."""
    sessions = [remote.connect(url, timeout=600) for _ in range(owners)]
    messages = [s.client.encrypt(x) for s in sessions]
    warm_up(url, sessions, messages, replicas)
    for s in sessions:
        s.round_trips.clear()
        s.server_seconds.clear()
    cpu0 = cpu_by_role()
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while time.monotonic() < stop:
                sessions[i].evaluate(messages[i])
        except BaseException as exc:  # noqa: BLE001 - counted
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i % owners,)) for i in range(senders)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    cpu1 = cpu_by_role()
    cores = {k: (cpu1[k] - cpu0[k]) / wall for k in cpu0}
    cores["others"] = cores.pop("machine") - sum(cores.values())
    trips = [t for s in sessions for t in s.round_trips]
    server = [t for s in sessions for t in s.server_seconds]
    out = {"requests": len(trips), "per_s": len(trips) / wall,
           "round_trip_s": statistics.mean(trips), "server_s": statistics.mean(server),
           "input_bytes": len(messages[0]),
           "output_bytes": sessions[0].bytes_received["output"] // max(
               1, len(sessions[0].round_trips)),
           "keys_bytes": sessions[0].bytes_sent["keys"], "errors": len(errors),
           "cores": cores,
           "replica_cpu_s": (cpu1["replicas"] - cpu0["replicas"]) / max(1, len(trips))}
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
                                          max_request_bytes=1 << 30,
                                          cache_mb=CACHE_MB[name]), port=18741,
                                 replicas=replicas)
                    r = measure(url, x, args.seconds, OWNERS[name], SENDERS[name], replicas)
                    serve.delete("secureinfer")
                    base = base or r["per_s"]
                    rows.append((name, replicas, r, r["per_s"] / base))
                    print(f"# {name} x{replicas}: {r}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("| scheme | replicas | owners / senders | req/s | vs 1 | round trip ms | server ms/req "
          "| replica CPU-s/req | input KiB | output KiB | keys MiB | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, replicas, r, ratio in rows:
        print(f"| {name} | {replicas} | {OWNERS[name]} / {SENDERS[name]} | "
              f"{r['per_s']:.2f} | {ratio:.2f}x | {r['round_trip_s'] * 1e3:.0f} | {r['server_s'] * 1e3:.0f} | "
              f"{r['replica_cpu_s']:.2f} | "
              f"{r['input_bytes'] / 1024:.0f} | {r['output_bytes'] / 1024:.0f} | "
              f"{r['keys_bytes'] / 2 ** 20:.1f} | {r['errors']} |")
    roles = list(rows[0][2]["cores"]) if rows else []
    print("\n| scheme | replicas | " + " | ".join(f"{k} (cores)" for k in roles) + " |")
    print("|---|---|" + "---|" * len(roles))
    for name, replicas, r, _ in rows:
        print(f"| {name} | {replicas} | " + " | ".join(f"{r['cores'][k]:.2f}" for k in roles)
              + " |")


if __name__ == "__main__":
    main()
