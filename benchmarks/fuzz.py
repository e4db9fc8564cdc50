"""Fuzz every parser of received bytes for a while; report cases tried and failures.

The same targets and mutations as ``tests/test_fuzz.py`` (``secureinfer.testing.fuzz``),
drawn from a seeded random generator instead of hypothesis, round-robin over the targets
so each gets the same share of the time. A failure is an exception that is not a
``SecureInferError``, a case over ``MAX_CASE_SECONDS``, or an allocation over the case's
limit; the first few of each target are printed with the mutation that made them.

Run: ``python benchmarks/fuzz.py [--minutes 5] [--schemes clear,ckks,...] [--seed 0]``.
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict

from tqdm import tqdm

from secureinfer.testing.fuzz import (
    MUTATIONS,
    Failure,
    Setups,
    build_targets,
    default_configs,
    mutate,
    run_case,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--schemes", default="", help="comma-separated configs "
                        "(default: every installed scheme)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=3, help="failures printed per target")
    args = parser.parse_args(argv)
    configs = [c for c in args.schemes.split(",") if c] or default_configs()
    start = time.perf_counter()
    targets = build_targets(Setups(configs))
    setup_s = time.perf_counter() - start
    rng = random.Random(args.seed)
    tried: Counter[str] = Counter()
    failures: dict[str, list[Failure]] = defaultdict(list)
    deadline = time.perf_counter() + 60 * args.minutes
    with tqdm(desc="fuzz cases", unit="case") as bar:
        while time.perf_counter() < deadline:
            for target in targets:
                how = rng.choice(MUTATIONS)
                data = mutate(target, rng.randrange(1 << 16), how, rng.randrange(1 << 32),
                              rng.randrange(1 << 32))
                failure = run_case(target, data, how)
                tried[target.name] += 1
                if failure is not None:
                    failures[target.name].append(failure)
                bar.update()
    print(f"\nschemes: {', '.join(configs)}; setup {setup_s:.1f} s; "
          f"{args.minutes:g} min of cases")
    width = max(len(t.name) for t in targets)
    print(f"{'target':<{width}}  {'cases':>8}  {'failures':>8}")
    for target in targets:
        print(f"{target.name:<{width}}  {tried[target.name]:>8}  "
              f"{len(failures[target.name]):>8}")
    print(f"{'total':<{width}}  {sum(tried.values()):>8}  "
          f"{sum(map(len, failures.values())):>8}")
    for name, found in failures.items():
        for failure in found[: args.show]:
            print(f"  FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
