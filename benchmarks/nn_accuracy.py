"""Accuracy of the HE-friendly training recipes: the README table of ``secureinfer.nn``.

For each architecture and seed: a ReLU network, a square network and a PolyAct network
trained from scratch, then the ReLU network converted to PolyAct and distilled (at once,
and with the gradual ReLU -> polynomial schedule). Also the 8-bit quantized accuracy of
every polynomial model (the integer network BFV and FE compute).

    python benchmarks/nn_accuracy.py                       # digits, mlp and cnn, 3 seeds
    python benchmarks/nn_accuracy.py --dataset digits28 --archs cnn --json out.json
    python benchmarks/nn_accuracy.py --archs mlp --hidden 64,64,64,64   # 4 activations
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from secureinfer.data import load
from secureinfer.nn import train

VARIANTS = (
    ("ReLU", {"activation": "relu"}),
    ("square", {"activation": "square"}),
    ("poly", {"activation": "poly"}),
    ("poly + distillation", {"activation": "poly", "distill_from": "teacher"}),
    ("poly + distillation, gradual", {"activation": "poly", "distill_from": "teacher",
                                      "gradual": True}),
)


def run(dataset: str, archs: list[str], seeds: list[int], epochs: int,
        hidden: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """Train every variant; one record per (arch, variant, seed)."""
    data = load(dataset)
    records = []
    for arch in archs:
        for seed in seeds:
            teacher = None
            for name, kw in VARIANTS:
                kw = dict(kw)
                if kw.get("distill_from") == "teacher":
                    kw["distill_from"] = teacher
                start = time.perf_counter()
                result = train(data, arch, seed=seed, epochs=epochs, hidden=hidden,
                               quant_bits=(8,), **kw)
                if name == "ReLU":
                    teacher = result.model
                quant = result.meta.get("quantization")
                records.append({"arch": arch, "variant": name, "seed": seed,
                                "accuracy": result.meta["test_accuracy"],
                                "accuracy_8bit": quant["report"][0]["accuracy"] if quant else None,
                                "seconds": round(time.perf_counter() - start, 2)})
                print(f"{arch} {name:30s} seed {seed}: {100 * records[-1]['accuracy']:.2f}%",
                      flush=True)
    return records


def _mean(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}"


def table(records: list[dict[str, Any]], archs: list[str]) -> str:
    """Markdown: mean ± std accuracy per variant and arch, gap to ReLU, 8-bit accuracy."""
    def pick(arch: str, variant: str, key: str) -> list[float]:
        return [r[key] for r in records if r["arch"] == arch and r["variant"] == variant]

    head = "| activation | " + " | ".join(
        f"{a}: float | {a}: vs ReLU | {a}: 8-bit" for a in archs) + " |"
    lines = [head, "|" + " --- |" * (1 + 3 * len(archs))]
    for variant, _ in VARIANTS:
        cells = []
        for arch in archs:
            acc = pick(arch, variant, "accuracy")
            gap = statistics.mean(acc) - statistics.mean(pick(arch, "ReLU", "accuracy"))
            q8 = [v for v in pick(arch, variant, "accuracy_8bit") if v is not None]
            cells += [_mean(acc), "" if variant == "ReLU" else f"{100 * gap:+.2f}",
                      _mean(q8) if q8 else "n/a"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--archs", default="mlp,cnn")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", help="hidden widths, e.g. 64,64,64,64 (default: the arch's)")
    ap.add_argument("--json", metavar="FILE", help="also write the records here")
    args = ap.parse_args()
    archs = args.archs.split(",")
    hidden = tuple(int(h) for h in args.hidden.split(",")) if args.hidden else None
    records = run(args.dataset, archs, [int(s) for s in args.seeds.split(",")], args.epochs,
                  hidden)
    print(f"\n{args.dataset}, hidden {args.hidden or 'default'}, {args.epochs} epochs, "
          f"mean ± std over seeds {args.seeds} (test accuracy, %)\n")
    print(table(records, archs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "epochs": args.epochs, "hidden": hidden,
                       "records": records}, f, indent=2)


if __name__ == "__main__":
    main()
