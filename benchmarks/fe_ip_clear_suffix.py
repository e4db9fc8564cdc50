"""What ``fe-ip`` gains when the layers after its first one may be any network.

``fe-ip`` runs the first affine layer under inner-product FE; the server learns its outputs
and runs the rest of the network in the clear. Since the clear suffix may hold ReLU and
max-pool (issue 16), the layers after the first need not be polynomial. For each dataset
(``digits``, ``digits28``) and architecture (``mlp``, ``cnn``), the same network is trained
with ReLU and with the polynomial activations of the default models (``square``) or
``poly``, then every test image runs through ``fe-ip`` (encrypt, evaluate, decrypt).

Run: ``python benchmarks/fe_ip_clear_suffix.py [--datasets digits,digits28]
[--archs mlp,cnn,mlp:64,64,64] [--activations relu,square,poly] [--epochs 30] [--limit N]
[--out r.json]``; ``ARCH:W,W,...`` gives the hidden Linear widths (deeper networks).
Prints a markdown table: float test accuracy, fe-ip accuracy on the same images, and the
gain of ReLU over each polynomial network.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import secureinfer
from secureinfer import data
from secureinfer.nn import train


def fe_ip_accuracy(model: Any, ds: data.Dataset, limit: int | None) -> tuple[float, float, int]:
    """(fe-ip accuracy, float accuracy) on the first ``limit`` test images, and their count."""
    sm = secureinfer.compile(model, "fe-ip", calibration=ds.x_train)
    client, server, _ = sm.setup()
    x = np.asarray(ds.x_test[:limit] if limit else ds.x_test, dtype=np.float64)
    y = ds.y_test[: len(x)]
    batch = max(1, int(sm.scheme.batch_size()))
    outs = []
    for start in tqdm(range(0, len(x), batch), desc="fe-ip", leave=False, file=sys.stderr):
        outs.append(client.decrypt(server.evaluate(client.encrypt(x[start:start + batch]))))
    logits = np.concatenate(outs)
    clear = sm.predict_clear(x)
    return float((logits.argmax(1) == y).mean()), float((clear.argmax(1) == y).mean()), len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="digits,digits28")
    ap.add_argument("--archs", default="mlp,cnn", help="ARCH or ARCH:W,W,... (hidden widths), "
                                                       "separated by ';' when widths are given")
    ap.add_argument("--activations", default="relu,square,poly")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="test images through fe-ip")
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args()
    rows = []
    for name in args.datasets.split(","):
        ds = data.load(name)
        for spec in args.archs.split(";" if ":" in args.archs else ","):
            arch, _, widths = spec.partition(":")
            hidden = tuple(int(w) for w in widths.split(",")) if widths else None
            for act in args.activations.split(","):
                started = time.perf_counter()
                result = train(ds, arch, act, epochs=args.epochs, seed=args.seed,
                               hidden=hidden, progress=False)
                fe, flt, n = fe_ip_accuracy(result.model, ds, args.limit)
                rows.append({"dataset": name, "arch": spec, "activation": act,
                             "float_accuracy": flt, "fe_ip_accuracy": fe, "images": n,
                             "seconds": round(time.perf_counter() - started, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print("| dataset | arch | activation after the first layer | float | fe-ip | ReLU gain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        relu = next((q for q in rows if q["dataset"] == r["dataset"] and q["arch"] == r["arch"]
                     and q["activation"] == "relu"), None)
        gain = "" if relu is None or r is relu else \
            f"{100 * (relu['fe_ip_accuracy'] - r['fe_ip_accuracy']):+.2f} pt"
        print(f"| {r['dataset']} | {r['arch']} | {r['activation']} | "
              f"{100 * r['float_accuracy']:.2f} % | {100 * r['fe_ip_accuracy']:.2f} % "
              f"({r['images']} images) | {gain} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
