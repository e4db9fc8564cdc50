"""The client's shifted input copies, on and off, side by side in one process.

``python benchmarks/bench_ckks_shifts.py [--networks lenet5,tenseal_cnn,lenet] [--runs 5]``

For each network of ``_cnn.py`` (seeded random weights), two compiled models:
``ckks?flood_bits=0&input_shifts=1`` (one input ciphertext, the server rotates the first
layer's input) and ``ckks?flood_bits=0`` (the planner's copies). Their evaluations are
interleaved run by run so that both see the same machine load; the table gives the
medians, compile and setup (keygen, key transfer, plaintext encoding) times, client
encryption, input bytes, rotations and Galois keys.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import _cnn
import numpy as np
import secureinfer
import torch

CONFIGS = {"one ciphertext": "ckks?flood_bits=0&input_shifts=1",
           "shifted copies": "ckks?flood_bits=0"}


def _setup(net: torch.nn.Module, shape: tuple[int, ...], config: str, calib: np.ndarray,
           x: np.ndarray) -> dict[str, Any]:
    start = time.perf_counter()
    sm = secureinfer.compile(net, config, input_shape=shape, calibration=calib)
    compiled = time.perf_counter()
    client, server, _ = sm.setup()
    ready = time.perf_counter()
    msg = client.encrypt(x)
    encrypt_s = time.perf_counter() - ready
    server.evaluate(msg)  # warm-up
    return {"sm": sm, "client": client, "server": server, "msg": msg, "times": [],
            "compile_s": compiled - start, "setup_s": ready - compiled, "encrypt_s": encrypt_s}


def compare(name: str, runs: int) -> list[dict[str, Any]]:
    """Both configs on network ``name``, evaluations interleaved."""
    net, shape = _cnn.build(name)
    rng = np.random.default_rng(1)
    calib, x = rng.random((32, *shape)), rng.random((1, *shape))
    ref = net(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    systems = {label: _setup(net, shape, cfg, calib, x) for label, cfg in CONFIGS.items()}
    for _ in range(runs):
        for s in systems.values():
            start = time.perf_counter()
            out = s["server"].evaluate(s["msg"])
            s["times"].append(time.perf_counter() - start)
            s["error"] = float(np.abs(s["client"].decrypt(out) - ref).max())
    rows = []
    for label, s in systems.items():
        plan = s["sm"].plan
        rows.append({"network": name, "variant": label, "evaluate_s": statistics.median(s["times"]),
                     "compile_s": s["compile_s"], "setup_s": s["setup_s"],
                     "encrypt_s": s["encrypt_s"], "input_mb": len(s["msg"]) / 1e6,
                     "input_cts": plan["input_ciphertexts_per_message"],
                     "rotations": plan["rotations_per_input"], "keys": plan["galois_keys"],
                     "error": s["error"]})
    del systems
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--networks", default="lenet5,tenseal_cnn")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'network':11s} {'variant':15s} {'eval s':>7s} {'compile':>7s} {'setup':>6s} "
          f"{'encrypt':>7s} {'in cts':>6s} {'in MB':>6s} {'rot':>4s} {'keys':>4s} {'err':>8s}")
    for name in args.networks.split(","):
        for r in compare(name, args.runs):
            print(f"{r['network']:11s} {r['variant']:15s} {r['evaluate_s']:7.3f} "
                  f"{r['compile_s']:7.1f} {r['setup_s']:6.1f} {r['encrypt_s']:7.2f} "
                  f"{r['input_cts']:6d} {r['input_mb']:6.1f} {r['rotations']:4d} "
                  f"{r['keys']:4d} {r['error']:8.1e}", flush=True)


if __name__ == "__main__":
    main()
