"""Benchmark ``fe-quad`` (quadratic functional encryption) on quadratic networks.

Two checks, printed and optionally written as JSON (``--out``):

1. ``digits`` quadratic MLP ``64 -> 16 -> BatchNorm -> x^2 -> 10`` trained here with torch:
   every test image goes through keygen (once), encrypt, evaluate (functional decryption:
   the server learns the 10 logits) and decrypt; the decisions must equal those of the
   quantized clear model (``clear?bits=N``) and the logits the scheme's integer reference.
2. The MNIST-shaped network of Ryffel et al. (NeurIPS 2019), ``784 -> 40 -> x^2 -> 10``,
   on ``digits28`` (28x28), trained quickly: per-image latency at 128-bit security.

Run: ``python benchmarks/bench_fe_quad.py [--bits 5] [--n28 20] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

import secureinfer
from _models import fit
from secureinfer import data
from secureinfer.nn.activations import Square


def train(ds: data.Dataset, hidden: int, epochs: int, seed: int = 0) -> nn.Module:
    """Flatten -> Linear -> BatchNorm -> x^2 -> Linear, trained with Adam."""
    torch.manual_seed(seed)
    n_in = int(np.prod(ds.input_shape))
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.BatchNorm1d(hidden),
                          Square(), nn.Linear(hidden, ds.num_classes))
    return fit(model, ds, epochs, 3e-3)


def run_images(sm: secureinfer.SecureModel, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Keygen once, then every image alone through encrypt, evaluate and decrypt."""
    client, server, _ = sm.setup()
    outs, walls = [], []
    for i in range(len(x)):
        start = time.perf_counter()
        outs.append(client.decrypt(server.evaluate(client.encrypt(x[i:i + 1])))[0])
        walls.append(time.perf_counter() - start)
    return np.array(outs), walls


def figures(sm: secureinfer.SecureModel, walls: list[float]) -> dict[str, Any]:
    """Per-image latencies (core meter, median per phase) and message sizes."""
    meter = sm.meter
    return {
        "keygen_s": meter.call_latency("keygen"),
        "encrypt_s": meter.per_sample_latency("encrypt"),
        "evaluate_s": meter.per_sample_latency("evaluate"),
        "decrypt_s": meter.per_sample_latency("decrypt"),
        "all_phases_mean_s": statistics.fmean(walls),
        "all_phases_median_s": statistics.median(walls),
        "all_phases_max_s": max(walls),
        "input_bytes": meter.per_sample_bytes("input"),
        "public_key_bytes": meter.per_sample_bytes("public_keys"),
        "functional_key_bytes": meter.per_sample_bytes("functional_keys"),
        "pairings_per_image": sm.plan["pairings_per_input"],
        "dlog": {k: sm.plan["dlog"][k] for k in ("bound", "table_bits", "max_steps")},
        "reveals": sm.reveals,
    }


def digits_check(bits: int) -> dict[str, Any]:
    """The whole digits test set: decisions equal the quantized clear model's."""
    ds = data.load("digits")
    model = train(ds, hidden=16, epochs=60)
    config = f"fe_quad?bits={bits}"
    sm = secureinfer.compile(model, config, input_shape=ds.input_shape,
                             calibration=ds.x_train)
    clear = secureinfer.compile(model, f"clear?bits={bits}", input_shape=ds.input_shape,
                                calibration=ds.x_train)
    sm.setup()  # the discrete-log table is loaded (or built) once, before timing
    sm.meter.reset()
    got, walls = run_images(sm, ds.x_test)
    ref_q = clear.reference(ds.x_test)
    result = {
        "network": "digits 64 -> 16 -> BatchNorm -> x^2 -> 10",
        "config": config,
        "security_bits": sm.scheme.security_bits,
        "images": len(ds.x_test),
        "accuracy": float((got.argmax(1) == ds.y_test).mean()),
        "float_accuracy": float((sm.predict_clear(ds.x_test).argmax(1) == ds.y_test).mean()),
        "decisions_equal_quantized_clear": bool((got.argmax(1) == ref_q.argmax(1)).all()),
        "logits_equal_reference": bool(np.array_equal(got, sm.reference(ds.x_test))),
    }
    result.update(figures(sm, walls))
    return result


def mnist_shaped(bits: int, n: int) -> dict[str, Any]:
    """784 -> 40 -> x^2 -> 10 on 28x28 inputs: per-image latency."""
    ds = data.load("digits28")
    model = train(ds, hidden=40, epochs=30)
    config = f"fe_quad?bits={bits}"
    sm = secureinfer.compile(model, config, input_shape=ds.input_shape,
                             calibration=ds.x_train)
    sm.setup()
    sm.meter.reset()
    x, y = ds.x_test[:n], ds.y_test[:n]
    got, walls = run_images(sm, x)
    result = {
        "network": "digits28 784 -> 40 -> BatchNorm -> x^2 -> 10",
        "config": config,
        "security_bits": sm.scheme.security_bits,
        "images": n,
        "accuracy": float((got.argmax(1) == y).mean()),
        "logits_equal_reference": bool(np.array_equal(got, sm.reference(x))),
        "reference_accuracy_full_test": float(
            (sm.reference(ds.x_test).argmax(1) == ds.y_test).mean()),
        "float_accuracy_full_test": float(
            (sm.predict_clear(ds.x_test).argmax(1) == ds.y_test).mean()),
    }
    result.update(figures(sm, walls))
    return result


def show(result: dict[str, Any]) -> None:
    """Print one result block."""
    print(f"\n== {result['network']} ({result['config']}, "
          f"{result['security_bits']}-bit security, {result['images']} images)")
    for key, value in result.items():
        if key in ("network", "config", "security_bits", "images"):
            continue
        if isinstance(value, float):
            value = f"{value:.4f}"
        print(f"  {key:32s} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=5, help="quantization bits (fe_quad?bits=)")
    parser.add_argument("--n28", type=int, default=20, help="28x28 images to time")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    results = [digits_check(args.bits), mnist_shaped(args.bits, args.n28)]
    for result in results:
        show(result)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
