"""What output privacy costs on the digits model: HE outputs flooded or re-randomized.

For each pair of configs (privacy on, the default; and off), one run of the digits test
samples (``secureinfer.runner.run``): evaluate latency per image, accuracy, max |error|
against the scheme's reference, and the plan's ring degree and chain. CKKS: ``flood_bits``
16 (default) and 0; BFV: ``rerandomize`` true (default) and false.

Run: ``python benchmarks/bench_privacy.py [--limit 60] [--arch mlp]``. Prints a table.
"""

from __future__ import annotations

import argparse

from secureinfer.registry import resolve
from secureinfer.runner import run

PAIRS = (("ckks", "ckks?flood_bits=0"), ("ckks?packing=batch", "ckks?packing=batch&flood_bits=0"),
         ("bfv", "bfv?rerandomize=false"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60, help="test samples per run")
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    args = parser.parse_args()
    print(f"digits ({args.arch}), {args.limit} test samples, one run each")
    print(f"{'config':<36} {'evaluate ms/img':>15} {'accuracy':>9} {'max |err|':>10} "
          f"{'N':>6}  chain")
    for pair in PAIRS:
        for config in pair:
            reason = resolve(config).availability()
            if reason:
                print(f"{config:<36} skipped: {reason}")
                continue
            r = run(config, limit=args.limit, progress=False, arch=args.arch)
            plan = r["plan"]
            chain = plan.get("coeff_mod_bits") or plan.get("coeff_modulus_bits")
            print(f"{config:<36} {r['latency_s']['evaluate'] * 1e3:>15.2f} "
                  f"{r['accuracy']:>9.4f} {r['max_abs_error']:>10.3g} "
                  f"{plan.get('poly_modulus_degree', ''):>6}  {chain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
