"""The ``secureinfer`` command line (also ``python -m secureinfer``).

Exit status: 0 on success, 2 on a usage or config error (message on stderr), 1 otherwise.
Set ``SECUREINFER_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, SecureInferError

__all__ = ["main"]


def _err(msg: str) -> None:
    print(f"secureinfer: error: {msg}", file=sys.stderr)


# ----- schemes and doctor -----------------------------------------------------------------

def scheme_rows() -> list[dict[str, Any]]:
    """One dict per registered scheme (what ``schemes --json`` prints)."""
    from .registry import get_registry

    reg = get_registry()
    rows = []
    for name, cls in sorted(reg.schemes.items()):
        caps = cls.capabilities
        reason = cls.availability()
        rows.append({
            "name": name,
            "aliases": sorted(a for a, n in reg.aliases.items() if n == name),
            "backend": cls.backend,
            "description": cls.description,
            "output": caps.output,
            "exact": caps.exact,
            "max_degree": caps.max_degree,
            "layers": sorted(caps.layers),
            "installed": reason is None,
            "why_not": reason,
            "extra": cls.extra,
            "options": [{"name": o.name, "type": o.type.__name__, "default": o.default,
                         "help": o.help} for o in cls.options],
        })
    return rows


def cmd_schemes(args: argparse.Namespace) -> int:
    rows = scheme_rows()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        state = "installed" if r["installed"] else f"NOT INSTALLED: {r['why_not']}"
        alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
        print(f"{r['name']}{alias}  [{r['backend']}]  {state}")
        print(f"    output {r['output']}, {'exact' if r['exact'] else 'approximate'}"
              + (f", max degree {r['max_degree']}" if r["max_degree"] else "")
              + f"; layers: {', '.join(r['layers'])}")
        if r["description"]:
            print(f"    {r['description']}")
        for o in r["options"]:
            print(f"    ?{o['name']}=<{o['type']}>  default {o['default']}  {o['help']}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from .registry import get_plugin_manager, get_registry

    checks: list[dict[str, Any]] = []
    for dist in ("numpy", "torch", "pluggy", "scikit-learn", "matplotlib"):
        try:
            checks.append({"name": dist, "ok": True, "version": md.version(dist), "hint": ""})
        except md.PackageNotFoundError:
            checks.append({"name": dist, "ok": False, "version": None,
                           "hint": "pip install secureinfer"})
    for name, cls in sorted(get_registry().schemes.items()):
        reason = cls.availability()
        checks.append({"name": f"scheme {name} ({cls.backend})", "ok": reason is None,
                       "version": cls.backend_version() if reason is None else None,
                       "hint": reason or ""})
    for extra in get_plugin_manager().hook.secureinfer_doctor():
        checks.extend(extra or [])
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        for c in checks:
            mark = "ok " if c["ok"] else "MISSING"
            print(f"[{mark}] {c['name']}" + (f" {c['version']}" if c["version"] else "")
                  + (f"  -> {c['hint']}" if c["hint"] else ""))
    return 0


# ----- run, bench, compare -----------------------------------------------------------------

def _config(args: argparse.Namespace) -> str:
    from .config import ENV_VAR, load_toml

    if args.scheme:
        return args.scheme
    if getattr(args, "config_file", None):
        return str(load_toml(args.config_file))
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    raise ConfigError(f"no scheme given: use --scheme CONFIG, --config FILE or {ENV_VAR}")


def _print_human(r: dict[str, Any]) -> None:
    lat = r["latency_s"]
    sec = "none (reference)" if r["security_bits"] is None else f"{r['security_bits']}-bit" + (
        "  ** INSECURE (allow_insecure) **" if r["insecure"] else "")
    print(f"scheme      {r['config']}  ({r['backend']} {r['backend_version'] or ''})")
    print(f"security    {sec}")
    print(f"plan        {json.dumps(r['plan'], default=str)[:2000]}")
    print(f"secure      {'; '.join(r['secure_layers'])}")
    if r["clear_layers"]:
        print(f"clear       {'; '.join(r['clear_layers'])}")
    print(f"output      {r['output']}; server learns: {r['reveals'] or 'nothing'}")
    print(f"dataset     {r['dataset']}, model {r['model']}, {r['samples']} samples")
    print(f"accuracy    {r['accuracy']:.4f} (float model {r['clear_accuracy']:.4f}), "
          f"agreement {r['agreement']:.4f}, max |error| {r['max_abs_error']:.3g}")
    print("latency     " + ", ".join(
        f"{p} {v * 1e3:.3f} ms" for p, v in lat.items() if v is not None)
        + "  (keygen once, others per image)")
    print(f"throughput  {r['throughput_per_s']:.4g} images/s")
    b = r["bytes"]
    print("bytes       " + ", ".join(f"{k} {v}" for k, v in b.items() if v))
    print(f"peak RSS    {r['peak_rss_mb']} MB")


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    config = _config(args)
    result = run(config, model=args.model, dataset=args.dataset, limit=args.limit,
                 allow_insecure=args.allow_insecure, progress=not args.no_progress,
                 arch=args.arch)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        _print_human(result)
    return 0


def _installed_default_schemes() -> list[str]:
    return [r["name"] for r in scheme_rows() if r["installed"]]


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .config import parse
    from .registry import get_registry
    from .report import markdown_table, write_reports

    schemes = [s.strip() for s in args.schemes.split(",")] if args.schemes \
        else _installed_default_schemes()
    for s in schemes:  # fail fast, before any work, on an unknown scheme or option
        cls = get_registry().get(parse(s).name)
        if cls.availability():
            raise ConfigError(f"scheme {s!r} is not installed: {cls.availability()}")
    if args.model is None:  # train the default model once, before the per-scheme processes
        from .data import load
        from .nn.zoo import default_model

        default_model(load(args.dataset), args.arch, progress=not args.no_progress)
    results = []
    for s in tqdm(schemes, desc="bench", unit="scheme", file=sys.stderr,
                  disable=args.no_progress):
        cmd = [sys.executable, "-m", "secureinfer", "run", "--scheme", s, "--json",
               "--dataset", args.dataset, "--arch", args.arch]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--allow-insecure"] if args.allow_insecure else []
        cmd += ["--no-progress"] if args.no_progress else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            _err(f"scheme {s} failed (exit {proc.returncode}); see the messages above")
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    paths = write_reports(results, args.out, args.name,
                          title=f"secureinfer on {results[0]['dataset']}" if results else "")
    print(markdown_table(results))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .report import load_results, markdown_table, write_reports

    files = sorted(Path(args.dir).glob("bench-*.json"))
    if not files:
        raise ConfigError(f"no bench-*.json files in {args.dir}: run `tox -e bench-clear` "
                          "(or another bench env) first")
    results = load_results(files)
    paths = write_reports(results, args.dir, "compare", title="secureinfer: every scheme")
    print(markdown_table(results))
    print("merged " + ", ".join(f.name for f in files) + " into " + ", ".join(map(str, paths)))
    return 0


# ----- parser -------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model file (secureinfer train --out); default: the "
                                   "dataset's default model, trained on first use")
    p.add_argument("--dataset", default="digits",
                   help="digits (default, embedded), digits28, or npz:PATH")
    p.add_argument("--arch", default="mlp", choices=("mlp", "cnn", "lenet5", "alexnet"),
                   help="architecture of the default model (with no --model)")
    p.add_argument("--limit", type=int, help="run only the first N test samples")
    p.add_argument("--allow-insecure", action="store_true",
                   help="accept parameters below 128-bit security (reported as such)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="secureinfer", description="Private neural-network inference under homomorphic "
                                        "and functional encryption.")
    parser.add_argument("--version", action="version", version=f"secureinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("schemes", help="list every registered scheme")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schemes)

    p = sub.add_parser("doctor", help="check which backends import and what to install")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("run", help="private inference on a dataset under one scheme")
    p.add_argument("--scheme", help='config string, e.g. "ckks" or "fe-ip?bits=8" '
                                    "(default: $SECUREINFER_SCHEME)")
    p.add_argument("--config", dest="config_file", help="TOML file with a [scheme] table")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="the same network under several schemes, side by side")
    p.add_argument("--schemes", help="comma-separated configs (default: every installed one)")
    _model_args(p)
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--name", default="bench", help="file name stem (default: bench)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="merge DIR/bench-*.json into DIR/compare.{md,png}")
    p.add_argument("dir", nargs="?", default="results")
    p.set_defaults(func=cmd_compare)

    try:
        from .nn.cli import add_train_parser
    except ImportError:  # the training toolkit needs torch, a core dependency
        pass
    else:
        add_train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI reports, it does not crash
        if os.environ.get("SECUREINFER_DEBUG"):
            raise
        known = isinstance(exc, (SecureInferError, OSError, ValueError))
        _err(str(exc) if known else f"{type(exc).__name__}: {exc} "
             "(set SECUREINFER_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
