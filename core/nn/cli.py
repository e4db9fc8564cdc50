"""``secureinfer train``: train an HE-friendly network and save it as a model file;
``secureinfer prune``: prune a model file in the units a scheme evaluates."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import ConfigError
from .arch import ACTIVATIONS, ARCHS
from .training import DEFAULTS, TrainingDiverged

__all__ = ["add_prune_parser", "add_train_parser", "run_prune", "run_train"]

_DESCRIPTION = """\
Train an mlp or cnn with ReLU, square or trainable polynomial (poly) activations.
With --distill-from, a ReLU teacher of the same architecture (trained first, or read from a
model file) is converted (every ReLU becomes a polynomial fitted on its observed range) and
fine-tuned by knowledge distillation; --gradual blends each ReLU into its polynomial over
training. The saved model holds weights, architecture, calibrated ranges and quantization
parameters; `secureinfer run/bench --model FILE` and secureinfer.nn.load read it."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of "
                                         "integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} needs positive integers")
    return values


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``subparsers`` (from ``add_subparsers``); its
    ``func`` default is ``run_train``."""
    p = subparsers.add_parser("train", help="train an HE-friendly network",
                              description=_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits",
                   help="digits (default), digits28 or npz:PATH")
    p.add_argument("--arch", choices=ARCHS, default="mlp", help="network (default mlp)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="poly",
                   help="activation (default poly: trainable degree-2 polynomial)")
    p.add_argument("--distill-from", metavar="relu|FILE",
                   help="distil from a ReLU teacher: 'relu' trains one with the same arch, "
                        "or give a saved ReLU model file")
    p.add_argument("--gradual", action="store_true",
                   help="blend each ReLU into its polynomial over training (needs "
                        "--distill-from and --activation poly)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                   help=f"training epochs, also for the teacher (default {DEFAULTS['epochs']})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", metavar="FILE", help="save the model file (.npz) here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--hidden", type=_ints, metavar="W[,W...]",
                   help="hidden Linear widths (default 32 for mlp, 64 for cnn)")
    p.add_argument("--degree", type=int, default=2, help="poly degree (default 2)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help=f"Adam learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--range-weight", type=float, default=DEFAULTS["range_weight"],
                   help="weight of the activation range regulariser; 0 turns it off "
                        f"(default {DEFAULTS['range_weight']})")
    p.add_argument("--norm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm before every activation (default: on for more than two "
                        "activation layers)")
    p.add_argument("--bits", type=_ints, default=(4, 6, 8, 10, 12), metavar="B[,B...]",
                   help="bit widths of the quantization report (default 4,6,8,10,12)")
    p.set_defaults(func=run_train)
    return p


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.epochs < 1:
        return f"--epochs must be at least 1, got {args.epochs}"
    if not 1 <= args.degree <= 8:
        return f"--degree must be in 1..8, got {args.degree}"
    if not args.lr > 0 or args.range_weight < 0:
        return "--lr must be positive and --range-weight non-negative"
    if any(not 2 <= b <= 16 for b in args.bits):
        return f"--bits must be in 2..16, got {','.join(map(str, args.bits))}"
    if args.distill_from is not None and args.activation == "relu":
        return "--distill-from trains a polynomial student: use --activation poly or square"
    if args.gradual and (args.distill_from is None or args.activation != "poly"):
        return "--gradual blends a ReLU teacher into PolyAct: add --distill-from relu and " \
               "--activation poly"
    return None


def _summary(meta: dict[str, Any], out: str | None) -> str:
    lines = [f"{meta['arch']} / {meta['activation']} on {meta['dataset']}: test accuracy "
             f"{100 * meta['test_accuracy']:.2f}%"
             + (f" (ReLU teacher {100 * meta['teacher_accuracy']:.2f}%)"
                if meta.get("teacher_accuracy") is not None else "")
             + f", {meta['epochs']} epochs, seed {meta['seed']}, {meta['train_seconds']:.1f} s"]
    for row in (meta.get("quantization") or {}).get("report", []):
        lines.append(f"  {row['bits']:>2}-bit integers: {100 * row['accuracy']:.2f}% "
                     f"(largest integer {row['max_bound_bits']} bits)")
    lines.append(f"saved to {out}" if out else "not saved (add --out FILE)")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    """Run ``secureinfer train``; return the exit code (2 for usage and config errors)."""
    from .modelfile import save
    from .training import train

    problem = _usage_error(args)
    if problem:
        print(f"secureinfer train: error: {problem}", file=sys.stderr)
        return 2
    progress = not args.json or sys.stderr.isatty()
    try:
        result = train(args.dataset, args.arch, args.activation,
                       distill_from=args.distill_from, gradual=args.gradual,
                       epochs=args.epochs, seed=args.seed, hidden=args.hidden,
                       degree=args.degree, lr=args.lr, range_weight=args.range_weight,
                       norm=args.norm, quant_bits=args.bits, progress=progress)
        out = str(save(result.model, args.out, meta=result.meta)) if args.out else None
    except (ConfigError, ValueError) as exc:
        print(f"secureinfer train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"secureinfer train: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**result.meta, "out": out}, indent=2))
    else:
        print(_summary(result.meta, out))
    return 0


_PRUNE_DESCRIPTION = """\
Prune a model file in the units the scheme evaluates as a whole (fe-ip: rows of the first
layer; fe-quad: hidden units; ckks and bfv single packing: the plaintext diagonals (ckks
block layouts: input alignments) of their compiled layouts, in runs, with output units
permuted to fill them), fine-tuning by distillation from the unpruned model,
until --sparsity is reached or the test accuracy has dropped by --max-drop points. The
result is a model file that every scheme runs; the schemes skip the zero units (plan field
units_skipped)."""


def add_prune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` sub-command to ``subparsers``; its ``func`` is ``run_prune``."""
    p = subparsers.add_parser("prune", help="prune a model in the units a scheme evaluates",
                              description=_PRUNE_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (.npz) to prune")
    p.add_argument("--scheme", required=True, help="config string, e.g. ckks or fe-ip")
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="fraction of units to zero (default 0.5)")
    p.add_argument("--layer-sparsity", default="", metavar="NAME=F,...",
                   help="other sparsities for named layers, e.g. conv1=0.5,fc2=0.5")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="accuracy budget in points of test accuracy (default 1.0; 0: none)")
    p.add_argument("--dataset", default="digits", help="fine-tuning and test data "
                   "(default digits; npz:PATH works)")
    p.add_argument("--steps", type=int, default=4, help="schedule increments (default 4)")
    p.add_argument("--epochs", type=int, default=8,
                   help="distillation epochs per increment (default 8)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay while fine-tuning (default 0); smaller weights "
                        "let the ckks planner pick a smaller scale, maybe a smaller ring")
    p.add_argument("--out", required=True, help="where to write the pruned model file")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=run_prune)
    return p


def _layer_sparsity(text: str) -> dict[str, float]:
    """``"conv1=0.5,fc2=0.5"`` as a dict; a malformed item is a ``ConfigError``."""
    from ..errors import ConfigError

    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"--layer-sparsity item {item!r} is not NAME=FRACTION "
                              "(e.g. conv1=0.5)")
    return out


def run_prune(args: argparse.Namespace) -> int:
    """Run ``secureinfer prune``; return the exit code (2 for usage and config errors)."""
    from ..errors import SecureInferError
    from .modelfile import load, save
    from .pruning import prune

    try:
        model = load(args.model)
        result = prune(model, args.scheme, sparsity=args.sparsity, max_drop=args.max_drop,
                       data=args.dataset, layer_sparsity=_layer_sparsity(args.layer_sparsity),
                       steps=args.steps, epochs=args.epochs,
                       weight_decay=args.weight_decay,
                       progress=not args.json and sys.stderr.isatty())
        out = str(save(result.model, args.out))
    except (SecureInferError, ValueError) as exc:
        print(f"secureinfer prune: error: {exc}", file=sys.stderr)
        return 2
    meta = result.meta
    if args.json:
        print(json.dumps({**meta, "out": out}, indent=2))
    else:
        print(f"pruned {meta['pruned']} of {meta['units']} {meta['unit']} "
              f"({100 * meta['sparsity']:.0f}%): test accuracy "
              f"{100 * meta['accuracy_before']:.2f}% -> {100 * meta['accuracy_after']:.2f}%\n"
              f"saved to {out}")
    return 0
