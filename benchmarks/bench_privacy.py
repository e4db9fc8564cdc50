"""What output privacy costs on the digits model: HE outputs flooded or re-randomized.

For each config, with the privacy option forced (on: what a deployed model gets by
default; off: what a one-process run gets), one run of the digits test samples
(``secureinfer.runner.run``): evaluate latency per image, accuracy, max |error| against the
float model, the public key bytes, and the plan's ring degree and chain. CKKS:
``flood_bits`` 16 and 0; BFV: ``flood_bits`` 40 (re-randomized, slot-masked and flooded),
``flood_bits=0`` (re-randomized and slot-masked only) and ``rerandomize=false``.

Run: ``python benchmarks/bench_privacy.py [--limit 60] [--arch mlp]``. Prints a table.
"""

from __future__ import annotations

import argparse

from secureinfer.registry import resolve
from secureinfer.runner import run

CONFIGS = ("ckks?flood_bits=16", "ckks?flood_bits=0",
           "ckks?packing=batch&flood_bits=16", "ckks?packing=batch&flood_bits=0",
           "bfv?rerandomize=true&flood_bits=40", "bfv?rerandomize=true&flood_bits=0",
           "bfv?rerandomize=false")


def _chain(plan: dict) -> str:
    bits = plan.get("coeff_mod_bits") or plan.get("coeff_modulus_bits") or []
    t = plan.get("plain_modulus_bits")
    return ",".join(map(str, bits)) + (f"; t {','.join(map(str, t))}" if t else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="test samples per run")
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    args = parser.parse_args()
    print(f"digits ({args.arch}), {args.limit} test samples, one run each")
    print(f"| config | evaluate ms/img | accuracy | max abs err | public keys MB | N | "
          f"chain |\n|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        reason = resolve(config).availability()
        if reason:
            print(f"| `{config}` | skipped: {reason} |")
            continue
        r = run(config, limit=args.limit, progress=False, arch=args.arch)
        plan = r["plan"]
        keys = (r["bytes"]["public_keys"] or 0) / 1e6
        print(f"| `{config}` | {r['latency_s']['evaluate'] * 1e3:.1f} | {r['accuracy']:.4f} | "
              f"{r['max_abs_error']:.2g} | {keys:.1f} | {plan.get('poly_modulus_degree', '')} "
              f"| {_chain(plan)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
