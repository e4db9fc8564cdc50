"""Benchmark ``secureinfer serve`` (issue 12): a real uvicorn process on 127.0.0.1.

1. Concurrency: 1, 4 and 16 clients (threads, each its own key owner with its own keys)
   on the ``digits`` default model under ``ckks``, ``bfv`` and ``fe-ip``. Each client
   sends pre-encrypted inputs back to back for ``--seconds``; requests/s over all clients
   and p50/p99 of the round trip (HTTP plus the server's evaluate). One answer per client
   is decrypted and compared with the reference.
2. HTTP overhead on the 28x28 cnn (Conv2d 1->4 k7 s3, x^2, 256->64, x^2, 64->10; random
   weights, ``ckks`` single packing): the round trip through the service against
   ``Server.evaluate`` in this process on the same ciphertext, interleaved (target:
   overhead at most 10 % of evaluate).
3. Sustained load (``--minutes N``; 0 skips it): 4 clients on the digits model under
   ``ckks`` for N minutes; errors (target 0) and the server's resident memory from the
   end of the first minute (or a tenth of the run) to the end (target growth at most 5 %).

Run: ``python benchmarks/bench_serve.py [--seconds 10] [--clients 1,4,16]
[--schemes ckks,bfv,fe-ip] [--minutes 10] [--out r.json]``. The machine may be shared, so
figures are noisy; the clients run on the same cores as the server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _networks import random_cnn
from secureinfer import data, remote
from secureinfer.model import SecureModel, compile_layers
from secureinfer.runner import load_network
from secureinfer.scheme import Calibration

TARGET_OVERHEAD = 0.10
TARGET_RSS_GROWTH = 0.05


# ----- the service ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``secureinfer serve DIR`` in a subprocess."""

    def __init__(self, artifact: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "secureinfer", "serve", str(artifact), "--port",
             str(self.port), "--keys-dir", str(artifact / "keys"), "--cache-mb", "8192"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("serve did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ----- 1. and 3.: clients in threads ---------------------------------------------------------


def load(service: Service, sm: SecureModel, x: np.ndarray, clients: int,
         seconds: float, sessions: list[remote.Session] | None = None) -> dict[str, Any]:
    """``clients`` key owners (new ones unless ``sessions`` are given, which stay open)
    posting pre-encrypted inputs for ``seconds``."""
    keep = sessions is not None
    sessions = sessions or [remote.connect(service.url) for _ in range(clients)]
    cts = [[s.client.encrypt(x[i:i + 1]) for i in range(4)] for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    errors: list[str] = []
    last: list[bytes | None] = [None] * clients
    stop = time.monotonic() + seconds

    def work(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                last[k] = sessions[k].evaluate(cts[k][i % 4])
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            times[k].append(time.perf_counter() - start)
            i += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    wrong = 0
    for k, s in enumerate(sessions):
        done = len(times[k])
        if done and last[k] is not None:
            got = s.client.decrypt(last[k])
            want = sm.reference(x[(done - 1) % 4:(done - 1) % 4 + 1])
            wrong += int(not np.allclose(got, want, atol=max(sm.scheme.capabilities.tolerance,
                                                              1e-9)))
        if not keep:
            s.close()
    flat = [t for ts in times for t in ts]
    return {"clients": clients, "requests": len(flat), "requests_per_s": len(flat) / wall,
            "p50_ms": 1e3 * percentile(flat, 50), "p99_ms": 1e3 * percentile(flat, 99),
            "errors": len(errors), "wrong": wrong, "first_error": errors[0] if errors else None}


def concurrency(schemes: list[str], levels: list[int], seconds: float) -> list[dict[str, Any]]:
    ds = data.load("digits")
    layers, calib, _ = load_network(None, ds, progress=False)
    x = ds.x_test[:4].astype(np.float64)
    rows = []
    for config in schemes:
        sm = compile_layers(layers, config, calibration=calib, deploy=True)
        with tempfile.TemporaryDirectory() as tmp:
            sm.save(tmp)
            service = Service(Path(tmp))
            try:
                for clients in levels:
                    row = {"scheme": config, **load(service, sm, x, clients, seconds)}
                    print(f"  {config:6s} {clients:2d} clients: {row['requests_per_s']:.2f} "
                          f"req/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
                          f"{row['errors']} errors", flush=True)
                    rows.append(row)
            finally:
                service.stop()
    return rows


def sustained(minutes: float) -> dict[str, Any]:
    ds = data.load("digits")
    layers, calib, _ = load_network(None, ds, progress=False)
    x = ds.x_test[:4].astype(np.float64)
    sm = compile_layers(layers, "ckks", calibration=calib, deploy=True)
    with tempfile.TemporaryDirectory() as tmp:
        sm.save(tmp)
        service = Service(Path(tmp))
        try:
            warm = min(60.0, minutes * 6.0)  # a tenth of the run, at most a minute
            sessions = [remote.connect(service.url) for _ in range(4)]  # the same 4 owners
            first = load(service, sm, x, 4, warm, sessions)
            rss_start = service.rss_mb()
            rest = load(service, sm, x, 4, minutes * 60 - warm, sessions)
            rss_end = service.rss_mb()
            for s in sessions:
                s.close()
        finally:
            service.stop()
    growth = (rss_end - rss_start) / rss_start
    return {"minutes": minutes, "requests": first["requests"] + rest["requests"],
            "errors": first["errors"] + rest["errors"], "wrong": first["wrong"] + rest["wrong"],
            "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth": growth,
            "ok": first["errors"] + rest["errors"] == 0 and growth <= TARGET_RSS_GROWTH}


# ----- 2. HTTP overhead on the 28x28 cnn -----------------------------------------------------


def overhead(runs: int) -> dict[str, Any]:
    ds = data.load("digits28")
    layers = random_cnn()
    calib = Calibration.from_data(layers, ds.x_train[:256].astype(np.float64))
    sm = compile_layers(layers, "ckks?packing=single", calibration=calib, deploy=True)
    with tempfile.TemporaryDirectory() as tmp:
        sm.save(tmp)
        service = Service(Path(tmp))
        try:
            session = remote.connect(service.url)
            keys = session.client.keys
            local = sm.server(keys.public_keys())  # the same keys, in this process
            ct = session.client.encrypt(ds.x_test[:1].astype(np.float64))
            session.evaluate(ct)
            local.evaluate(ct)  # warm-up, both
            http, inproc = [], []
            for _ in range(runs):
                start = time.perf_counter()
                out = session.evaluate(ct)
                http.append(time.perf_counter() - start)
                start = time.perf_counter()
                local.evaluate(ct)
                inproc.append(time.perf_counter() - start)
            ok = np.allclose(session.client.decrypt(out), sm.reference(ds.x_test[:1]),
                             atol=sm.scheme.capabilities.tolerance)
            session.close()
        finally:
            service.stop()
    ev, rt = statistics.median(inproc), statistics.median(http)
    return {"evaluate_ms": 1e3 * ev, "round_trip_ms": 1e3 * rt,
            "server_side_ms": 1e3 * statistics.median(session.server_seconds[1:]),
            "overhead_ms": 1e3 * (rt - ev), "overhead": (rt - ev) / ev,
            "input_bytes": len(ct), "output_bytes": len(out), "correct": bool(ok),
            "ok": (rt - ev) / ev <= TARGET_OVERHEAD}


# ----- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schemes", default="ckks,bfv,fe-ip")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    ap.add_argument("--overhead-runs", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=0.0, help="sustained run (0: skip)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: "
                                               "concurrency,overhead")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {}
    if "concurrency" not in skip:
        print("concurrency (digits default model):", flush=True)
        rows = concurrency(args.schemes.split(","), [int(c) for c in args.clients.split(",")],
                           args.seconds)
        result["concurrency"] = rows
        print("\n| scheme | clients | requests/s | p50 ms | p99 ms | errors | wrong |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| `{r['scheme']}` | {r['clients']} | {r['requests_per_s']:.2f} | "
                  f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['wrong']} |")
    if "overhead" not in skip:
        o = overhead(args.overhead_runs)
        result["overhead"] = o
        print(f"\nHTTP overhead, 28x28 cnn under ckks (median of {args.overhead_runs}): evaluate "
              f"{o['evaluate_ms']:.1f} ms in process, round trip {o['round_trip_ms']:.1f} ms "
              f"(of which {o['server_side_ms']:.1f} ms in the server's handler), "
              f"overhead {o['overhead_ms']:.1f} ms = {100 * o['overhead']:.1f} % of evaluate "
              f"(target <= {100 * TARGET_OVERHEAD:.0f} %: {'met' if o['ok'] else 'NOT met'}); "
              f"input {o['input_bytes']} B, output {o['output_bytes']} B; "
              f"correct: {o['correct']}")
    if args.minutes > 0:
        s = sustained(args.minutes)
        result["sustained"] = s
        print(f"\nsustained {s['minutes']} min, 4 clients, ckks: {s['requests']} requests, "
              f"{s['errors']} errors, {s['wrong']} wrong; server RSS {s['rss_start_mb']:.0f} -> "
              f"{s['rss_end_mb']:.0f} MB ({100 * s['rss_growth']:+.1f} %; target <= "
              f"{100 * TARGET_RSS_GROWTH:.0f} %: {'met' if s['ok'] else 'NOT met'})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
