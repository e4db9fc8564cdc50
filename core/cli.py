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
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import BackendNotInstalledError, ConfigError, SecureInferError

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
            "output": caps.output if caps.encrypts else "clear",
            "encrypts": caps.encrypts,
            "exact": caps.exact,
            "max_degree": caps.max_degree,
            "layers": sorted(caps.layers),
            "installed": reason is None,
            "why_not": reason,
            "extra": cls.extra,
            "security_basis": cls.security_basis or None,
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
        if r["security_basis"]:
            print(f"    security: {r['security_basis']}")
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


def cmd_compile(args: argparse.Namespace) -> int:
    from .data import load
    from .model import compile_layers
    from .registry import resolve
    from .runner import load_network

    scheme = resolve(_config(args), allow_insecure=args.allow_insecure)  # errors before work
    ds = load(args.dataset)
    layers, calib, name = load_network(args.model, ds, arch=args.arch,
                                       progress=not args.no_progress)
    sm = compile_layers(layers, scheme, calibration=calib, deploy=True)  # for data owners
    out = sm.save(args.out)
    print(f"compiled {name} for {sm.scheme.name}: {out}/server (the evaluator's), "
          f"{out}/client (the data owners'); digest {sm.digest.hex()}")
    if sm.plan.get("output_privacy"):
        print(f"outputs: {sm.plan['output_privacy']}")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        return Path(args.token_file).read_text().strip()
    return os.environ.get("SECUREINFER_TOKEN") or None


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import Settings, serve

    settings = Settings(artifact=Path(args.dir), token=_token(args),
                        keys_dir=Path(args.keys_dir) if args.keys_dir else None,
                        max_request_bytes=int(args.max_request_mb * (1 << 20)),
                        cache_mb=args.cache_mb)
    if args.ray is None:
        serve(settings, host=args.host, port=args.port)
        return 0
    return _serve_ray(args, settings)


def _serve_ray(args: argparse.Namespace, settings: Any) -> int:
    from .serve.cluster import deploy

    try:
        url = deploy(settings, address=args.ray or None, host=args.host, port=args.port,
                     replicas=args.replicas, min_replicas=args.min_replicas,
                     max_replicas=args.max_replicas)
    except BackendNotInstalledError as exc:
        _err(str(exc))
        return 2
    from ray import serve as ray_serve

    print(f"secureinfer: serving {settings.artifact} through Ray Serve on {url}; keys in "
          f"{settings.key_store} (shared by every replica)", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        ray_serve.shutdown()


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    if args.server:
        from .remote import run_remote

        result = run_remote(args.server, token=_token(args), dataset=args.dataset,
                            limit=args.limit, progress=not args.no_progress,
                            allow_insecure=args.allow_insecure)
        if args.json:
            print(json.dumps(result, default=str))
        else:
            _print_remote(result)
        return 0
    config = _config(args)
    result = run(config, model=args.model, dataset=args.dataset, limit=args.limit,
                 allow_insecure=args.allow_insecure, progress=not args.no_progress,
                 arch=args.arch)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        from .report import human_report

        print(human_report(result))
    return 0


def _print_remote(r: dict[str, Any]) -> None:
    print(f"server      {r['server']}  scheme {r['scheme']}, digest {r['digest']}")
    print(f"dataset     {r['dataset']}, {r['samples']} samples; accuracy {r['accuracy']:.4f}")
    print("latency     " + ", ".join(f"{p} {v * 1e3:.3f} ms" for p, v in r["latency_s"].items()
                                     if v is not None) + "  (keygen once, others per image)")
    print(f"round trip  {r['round_trip_s'] * 1e3:.3f} ms per request (evaluate on the server "
          "included)")
    from .report import human_bytes

    print("network     " + ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}"
                                     for k, v in r["network_bytes"].items()))


def _installed_default_schemes() -> list[str]:
    return [r["name"] for r in scheme_rows() if r["installed"]]


def _bench_local(args: argparse.Namespace, schemes: list[str]) -> list[dict[str, Any]] | None:
    """One ``secureinfer run`` process per scheme; ``None`` when one failed."""
    from tqdm.auto import tqdm

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
            return None
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append({**result, "engine": "local", "workers": 1})
    return results


def cmd_bench(args: argparse.Namespace) -> int:
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
    if args.ray is not None:
        from .raybench import bench_on_ray

        try:
            results = bench_on_ray(schemes, model=args.model, dataset=args.dataset,
                                   arch=args.arch, limit=args.limit,
                                   allow_insecure=args.allow_insecure, shards=args.shards,
                                   address=args.ray or None)
        except BackendNotInstalledError as exc:
            _err(str(exc))
            return 2
    else:
        results = _bench_local(args, schemes)
        if results is None:
            return 1
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

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a sample count: give N >= 1, or "
                                         "leave --limit out to run every test sample")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model file (secureinfer train --out) or an ONNX file "
                                   "(.onnx); default: the dataset's default model, trained "
                                   "on first use")
    p.add_argument("--dataset", default="digits",
                   help="digits (default, embedded), digits28, or npz:PATH")
    p.add_argument("--arch", default="mlp", choices=("mlp", "cnn", "lenet5", "alexnet"),
                   help="architecture of the default model (with no --model)")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="run only the first N test samples (N >= 1; default: all)")
    p.add_argument("--allow-insecure", action="store_true",
                   help="accept parameters below 128-bit security (reported as such)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


#: Subcommands that never need torch: their parser leaves out the training toolkit's
#: subcommands, whose import loads torch (seconds of a service's start-up).
_NO_TORCH = frozenset({"serve"})


def build_parser(training: bool = True) -> argparse.ArgumentParser:
    """The argument parser of every subcommand (``training=False``: without the training
    toolkit's)."""
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
    p.add_argument("--server", help="run against a `secureinfer serve` URL (the scheme and "
                                    "model are the server's)")
    p.add_argument("--token-file", help="file holding the service token "
                                        "(default: $SECUREINFER_TOKEN)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile a model for a scheme into an artifact directory")
    p.add_argument("--scheme", help="config string (default: $SECUREINFER_SCHEME)")
    p.add_argument("--config", dest="config_file", help="TOML file with a [scheme] table")
    p.add_argument("--model", help="model file (secureinfer train --out); default: the "
                                   "dataset's default model")
    p.add_argument("--dataset", default="digits", help="dataset the model takes (calibration "
                                                        "when the model file has none)")
    p.add_argument("--arch", default="mlp", choices=("mlp", "cnn"),
                   help="architecture of the default model (with no --model)")
    p.add_argument("--out", required=True, help="artifact directory (server/ and client/)")
    p.add_argument("--allow-insecure", action="store_true",
                   help="accept parameters below 128-bit security")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("serve", help="serve a compiled artifact over HTTP (FastAPI, uvicorn)")
    p.add_argument("dir", help="artifact directory (secureinfer compile --out)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="require this bearer token (default: "
                                        "$SECUREINFER_TOKEN; neither: no token)")
    p.add_argument("--keys-dir", help="key store directory (default: DIR/keys)")
    p.add_argument("--max-request-mb", type=float, default=256.0,
                   help="largest request body in MiB (default: 256; flooded CKKS keys "
                        "with Galois keys at N=16384 reach about 120)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="serve through Ray Serve on the Ray cluster at ADDRESS (default: the "
                        "running one or a new local one); needs the ray extra")
    p.add_argument("--replicas", type=int, help="with --ray: this many replicas (default 1)")
    p.add_argument("--min-replicas", type=int, help="with --ray: autoscaling lower bound")
    p.add_argument("--max-replicas", type=int, help="with --ray: autoscaling upper bound")
    p.add_argument("--cache-mb", type=float, default=1024.0,
                   help="memory budget of the opened-keys cache in MiB (default: 1024)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="the same network under several schemes, side by side")
    p.add_argument("--schemes", help="comma-separated configs (default: every installed one)")
    _model_args(p)
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--name", default="bench", help="file name stem (default: bench)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the matrix as Ray tasks on the cluster at ADDRESS (default: the "
                        "running one or a new local one); needs the ray extra")
    p.add_argument("--shards", type=int, help="with --ray: pieces of the test set per "
                                              "scheme (default: the cluster's CPUs)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("compare", help="merge DIR/bench-*.json into DIR/compare.{md,png}")
    p.add_argument("dir", nargs="?", default="results")
    p.set_defaults(func=cmd_compare)

    if not training:
        return parser
    try:
        from .nn.cli import add_prune_parser, add_train_parser
    except ImportError:  # the training toolkit needs torch, a core dependency
        pass
    else:
        add_train_parser(sub)
        add_prune_parser(sub)
        from .nn.from_onnx import add_convert_parser

        add_convert_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(training=not (argv and argv[0] in _NO_TORCH))
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
