"""HE-aware pruning against magnitude pruning, measured under encryption (issue 14).

For each case (model, scheme) the variants of the same trained default model run: ``base``
(unpruned), ``he-aware`` (``secureinfer.nn.prune`` in the scheme's units, the case's target
sparsity and fine-tuning weight decay, budget ``--max-drop`` points), ``he-aware, no decay``
when the case has a weight decay (the same schedule without it: what the pruning gives
alone), ``decay only`` beside it (prune's distillation schedule and decay, nothing pruned:
what the decay gives alone) and ``magnitude`` (each layer's weights of least magnitude
zeroed, at the case's fraction of that layer's units (he-aware's target), no fine-tuning).
Each variant is first compiled and run in its own process (so peak memory is its own):
setup, then ``--images`` test images through encrypt, evaluate and decrypt, to check that
the encrypted decisions agree with the clear model. Evaluate latency is then measured in one
process per case (every variant set up): they evaluate the same test images alternately,
image after image, for ``--rounds`` rounds, and each latency is the median of its ``rounds x
images`` calls, so a busy spell on the shared machine hits all alike; the changes against
``base`` (and against ``decay only``) are taken within that process. Printed per variant:
test accuracy of the float model (the whole test split), the median evaluate latency (for FE
this is the server's functional decryption), the change against ``base``, the process's peak
RSS, Galois key bytes and functional key count from the plan, the units the plan skipped,
and the agreement with the clear model.

Targets (issue 14): digits cnn (and LeNet-5) under ckks single packing, >= 40 % lower
evaluate latency and >= 30 % fewer key bytes at <= 1 point loss; digits mlp under fe-ip,
>= 40 % fewer functional keys and lower decrypt time at <= 1 point loss. The bfv rows
(digits mlp and cnn, single packing) have no target of their own.

Run: ``python benchmarks/bench_prune.py [--images 10] [--rounds 3] [--sparsity S]
[--max-drop 1.0] [--lenet] [--only 0,2] [--out r.json]``. ``--lenet`` adds LeNet-5 on
28x28 digits as case 4 (minutes; ~2.5 GB per process, three models in the timing one).
The sparsity (fraction of each layer's units) and the schedule are per case (``CASES``):
ckks needs enough of a dense layer's diagonals gone for the all-hybrid chain of layouts to
beat the block layouts, which is where the rotations go.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: (dataset, arch, scheme, sparsity, per-layer sparsities, schedule steps, distillation
#: epochs per step, fine-tuning weight decay). ckks runs unflooded (``flood_bits=0``): the
#: default flood raises the scale enough to double the ring (N=32768), which makes LeNet-5
#: take ~7 GB; pruning changes the layouts, not the flood. The classifiers (16 diagonals in
#: the cnn) are pruned by half, the other layers by 3/4 unless named (the ckks cnn's
#: ``conv1`` not at all, the bfv cnn's by half). The digits cnn fine-tunes with weight
#: decay 0.01 under ckks: smaller weights amplify the noise less, so the planner may choose
#: a smaller scale and ring (the ``no decay`` and ``decay only`` rows separate the two
#: effects). bfv runs in one process, so its
#: outputs are not re-randomized (the default there); single packing evaluates two images
#: per ciphertext, one here.
Case = tuple[str, str, str, float, dict[str, float], int, int, float]
CASES: list[Case] = [
    ("digits", "cnn", "ckks?packing=single&flood_bits=0", 0.75, {"conv1": 0.0, "fc2": 0.5}, 4, 16,
     0.01),
    ("digits", "mlp", "fe-ip", 0.5, {}, 4, 8, 0.0),
    ("digits", "mlp", "bfv?packing=single", 0.75, {"fc2": 0.5}, 4, 8, 0.0),
    ("digits", "cnn", "bfv?packing=single", 0.75, {"conv1": 0.5, "fc2": 0.5}, 4, 16, 0.0)]
#: LeNet-5 prunes its costliest stage harder: pool1+conv2 runs at level 7, near the top of
#: the chain, with the largest share of the rotations (46 of base's 101) and ~57 % of the
#: time, so ``conv2`` goes to 0.88; ``fc2`` is left whole,
#: because base's block layout (7 rotations, 2 products) beats its pruned hybrid one (10
#: rotations, 32 products at 3/4).
LENET: Case = ("digits28", "lenet5", "ckks?packing=single&flood_bits=0", 0.75,
               {"conv2": 0.88, "fc2": 0.0, "fc3": 0.5}, 4, 16, 0.0)
#: Extra config for the pruning run only (every variant is then compiled and run under the
#: case's scheme): ckks prunes the hybrid diagonals of dense layers (``block_layouts=false``),
#: whose units are single diagonals; a block layout has two or so coarse units, each half
#: of its layer's weights. Once enough of them are zero the planner picks the hybrid layout
#: under the default config too.
PRUNE_OPTIONS = {"ckks": "block_layouts=false"}


def child(model_path: str, scheme: str, dataset: str, images: int) -> dict[str, Any]:
    """Compile, set up and run one variant; the figures as a dict."""
    import secureinfer
    from secureinfer import data
    from secureinfer import nn as snn

    ds = data.load(dataset)
    model = snn.load(model_path)
    sm = secureinfer.compile(model, scheme, calibration=ds.x_train[:256])
    plan = sm.plan
    client, server, _ = sm.setup()
    x = ds.x_test[:images]
    evals, agree = [], 0
    for i in range(len(x)):
        ct = client.encrypt(x[i:i + 1])
        start = time.perf_counter()
        out = server.evaluate(ct)
        evals.append(time.perf_counter() - start)
        y = client.decrypt(out)
        agree += int(np.argmax(y) == np.argmax(sm.predict_clear(x[i:i + 1])))
    return {"alone_evaluate_ms": 1e3 * statistics.median(evals),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "galois_key_bytes": int(plan.get("galois_key_bytes") or 0),
            "galois_keys": int(plan.get("galois_keys") or 0),
            "fixed_keys": (len(plan["fixed_rotation_steps"])
                           if "fixed_rotation_steps" in plan else None),
            "functional_keys": plan.get("functional_keys"),
            "units_skipped": int(plan.get("units_skipped") or 0),
            "rotations": plan.get("rotations_per_input"),
            "products": plan.get("plaintext_products"),
            "agree": f"{agree}/{len(x)}"}


def _variants(dataset: str, arch: str, scheme: str, sparsity: float,
              layer_sparsity: dict[str, float], max_drop: float,
              schedule: tuple[int, int, float],
              folder: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """``base``, ``he-aware`` (the case's schedule, with its weight decay), when the case
    has a decay ``he-aware, no decay`` (the same schedule without it: the pruning alone)
    and ``decay only`` (the decay alone), and ``magnitude``, each saved under
    ``folder``."""
    from secureinfer import data
    from secureinfer import nn as snn
    from secureinfer.nn.ranges import calibrate
    from secureinfer.nn.training import INPUT_RANGE, fit

    ds = data.load(dataset)
    base = snn.default_model(dataset, arch)
    extra = PRUNE_OPTIONS.get(scheme.split("?")[0])
    prune_with = f"{scheme}{'&' if '?' in scheme else '?'}{extra}" if extra else scheme
    models: list[tuple[str, Any, dict[str, Any]]] = [
        ("base", base, {"accuracy": snn.accuracy(base, ds.x_test, ds.y_test)})]
    decays = [("he-aware", schedule[2])]
    if schedule[2]:
        decays.append(("he-aware, no decay", 0.0))
    for name, decay in decays:
        start = time.perf_counter()
        aware = snn.prune(base, prune_with, sparsity=sparsity, max_drop=max_drop, data=ds,
                          layer_sparsity=layer_sparsity, steps=schedule[0],
                          epochs=schedule[1], weight_decay=decay,
                          progress=sys.stderr.isatty())
        models.append((name, aware.model,
                       {"accuracy": aware.meta["accuracy_after"],
                        "units": f"{aware.meta['pruned']}/{aware.meta['units']} "
                                 f"{aware.meta['unit']}",
                        "prune_s": time.perf_counter() - start, "weight_decay": decay}))
    if schedule[2]:
        # The control for the decay: prune's schedule (``steps`` fits of ``epochs``, each
        # with a fresh optimizer, seeds 1..steps) and decay, distilled from base, nothing
        # pruned; calibrated as prune calibrates its result.
        start = time.perf_counter()
        tuned, teacher = copy.deepcopy(base), copy.deepcopy(base).eval()
        for k in range(1, schedule[0] + 1):
            fit(tuned, ds.x_train, ds.y_train, epochs=schedule[1], teacher=teacher,
                weight_decay=schedule[2], seed=k, progress=sys.stderr.isatty(),
                desc=f"decay only {k}/{schedule[0]}")
        tuned.eval()
        calibrate(tuned, ds.x_train, ds.input_shape, input_range=INPUT_RANGE)
        models.append(("decay only", tuned,
                       {"accuracy": snn.accuracy(tuned, ds.x_test, ds.y_test),
                        "units": "none", "prune_s": time.perf_counter() - start,
                        "weight_decay": schedule[2]}))
    magnitude = snn.magnitude_prune(base, sparsity, data=ds, layer_sparsity=layer_sparsity)
    models.append(("magnitude", magnitude.model,
                   {"accuracy": magnitude.meta["accuracy_after"],
                    "units": f"{100 * _zero_fraction(magnitude.model):.0f}% weights"}))
    out = []
    for name, model, meta in models:
        path = folder / f"{dataset}-{arch}-{name.replace(', ', '-').replace(' ', '-')}.npz"
        snn.save(model, path)
        out.append((name, path, meta))
    return out


def _zero_fraction(model: Any) -> float:
    """The fraction of the Linear and Conv2d weights of ``model`` that are zero."""
    import torch

    ws = [m.weight.detach() for m in model.modules()
          if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def timing(paths: list[str], scheme: str, dataset: str, images: int,
           rounds: int) -> list[float]:
    """Median evaluate ms of each model of ``paths``, all set up in this process, each
    warmed up by one discarded evaluation, then run alternately (image by image, the
    order rotating at each image) for ``rounds`` rounds of ``images`` test images."""
    import secureinfer
    from secureinfer import data
    from secureinfer import nn as snn

    ds = data.load(dataset)
    parties = []
    for path in paths:
        sm = secureinfer.compile(snn.load(path), scheme, calibration=ds.x_train[:256])
        client, server, _ = sm.setup()
        parties.append((client, server))
    x = ds.x_test[:images]
    for client, server in parties:  # one discarded evaluation each (first-call costs)
        server.evaluate(client.encrypt(x[:1]))
    times: list[list[float]] = [[] for _ in paths]
    calls = 0
    for _ in range(rounds):
        for i in range(len(x)):
            # the order rotates call by call, so no model always follows the same one
            for j in range(len(parties)):
                k = (j + calls) % len(parties)
                client, server = parties[k]
                ct = client.encrypt(x[i:i + 1])
                start = time.perf_counter()
                server.evaluate(ct)
                times[k].append(time.perf_counter() - start)
            calls += 1
    return [1e3 * statistics.median(t) for t in times]


def _run(args: list[str], what: str) -> Any:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"{what}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_child(path: Path, scheme: str, dataset: str, images: int) -> dict[str, Any]:
    return _run(["--child", str(path), scheme, dataset, str(images)],
                f"{path.name} under {scheme}")


def _run_timing(paths: list[Path], scheme: str, dataset: str, images: int,
                rounds: int) -> list[float]:
    return _run(["--timing", scheme, dataset, str(images), str(rounds),
                 *map(str, paths)], f"timing {', '.join(p.name for p in paths)}")


def run_case(case: Case, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """The variants of one case: each alone in its process (figures, agreement, peak
    memory), then all of them timed alternately in one process; a discarded warm-up run first (it builds the on-disk tables and caches the first run
    would otherwise pay alone)."""
    dataset, arch, scheme, sparsity, per_layer, steps, epochs, decay = case
    if args.sparsity is not None:
        sparsity, per_layer = args.sparsity, {}
    variants = _variants(dataset, arch, scheme, sparsity, per_layer, args.max_drop,
                         (steps, epochs, decay), folder)
    _run_child(variants[0][1], scheme, dataset, 1)
    alone = {name: _run_child(path, scheme, dataset, args.images)
             for name, path, _ in variants}
    medians = _run_timing([path for _, path, _ in variants], scheme, dataset, args.images,
                          args.rounds)
    timed = {name: ms for (name, _, _), ms in zip(variants, medians)}
    rows = []
    for name, _, meta in variants:
        row = {"model": f"{dataset} {arch}", "scheme": scheme, "variant": name,
               "sparsity": sparsity, **meta, **alone[name], "evaluate_ms": timed[name],
               "vs_base": "-" if name == "base" else
               f"{100 * (timed[name] - timed['base']) / timed['base']:+.0f}%"}
        rows.append(row)
    return rows


def _change(rows: list[dict[str, Any]], key: str) -> dict[str, str]:
    base = rows[0].get(key) or 0
    out = {}
    for r in rows[1:]:
        v = r.get(key) or 0
        out[r["variant"]] = f"{100 * (v - base) / base:+.0f}%" if base else "n/a"
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | scheme | variant | units pruned | accuracy | evaluate ms | vs base "
            "| peak MB "
            "| rotations | products | Galois keys | Galois key MB | functional keys "
            "| units skipped | agree |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        fk, rot, prod = (r.get(k) if r.get(k) is not None else "-"
                         for k in ("functional_keys", "rotations", "products"))
        lines.append(f"| {r['model']} | {r['scheme']} | {r['variant']} | {r.get('units', '-')} "
                     f"| {100 * r['accuracy']:.2f}% | {r['evaluate_ms']:.1f} | {r['vs_base']} "
                     f"| {r['peak_rss_mb']:.0f} | {rot} | {prod} | {r['galois_keys']} "
                     f"| {r['galois_key_bytes'] / 2**20:.1f} | {fk} "
                     f"| {r['units_skipped']} | {r['agree']} |")
    return "\n".join(lines)


def _groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows of each case, each group starting with its ``base``."""
    groups: list[list[dict[str, Any]]] = []
    for r in rows:
        if r["variant"] == "base":
            groups.append([])
        groups[-1].append(r)
    return groups


def summary(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for group in _groups(rows):
        keys = _change(group, "galois_key_bytes")
        fk = _change(group, "functional_keys")
        for r in group[1:]:
            drop = 100 * (group[0]["accuracy"] - r["accuracy"])
            out.append(f"{r['model']} / {r['scheme']} / {r['variant']}: evaluate "
                       f"{r['vs_base']} (timed with base in one process), Galois key bytes "
                       f"{keys[r['variant']]}, functional keys "
                       f"{fk[r['variant']]}, accuracy {-drop:+.2f} points")
        control = [r for r in group if r["variant"] == "decay only"]
        aware = [r for r in group if r["variant"] == "he-aware"]
        if control and aware and control[0]["evaluate_ms"] and control[0]["galois_key_bytes"]:
            c, r = control[0], aware[0]
            out.append(f"{r['model']} / {r['scheme']} / he-aware against decay only (the "
                       "pruning's own share, same decay): evaluate "
                       f"{100 * (r['evaluate_ms'] - c['evaluate_ms']) / c['evaluate_ms']:+.0f}%,"
                       " Galois key bytes "
                       f"{100 * (r['galois_key_bytes'] - c['galois_key_bytes']) / c['galois_key_bytes']:+.0f}%,"
                       f" accuracy {100 * (r['accuracy'] - c['accuracy']):+.2f} points")
        base = group[0]
        if base.get("fixed_keys") is not None and base["galois_keys"]:
            fixed, total = base["fixed_keys"], base["galois_keys"]
            out.append(f"{base['model']} / {base['scheme']}: {fixed} of base's {total} Galois "
                       "keys are pool passes and rotate-and-sums, keyed whatever the "
                       "weights at base's layouts: at those layouts pruning removes at "
                       f"most {total - fixed} key{'' if total - fixed == 1 else 's'} "
                       f"({-100 * (total - fixed) / total:.0f} % "
                       "at the same chain; other layouts may drop more)")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--timing":
        print(json.dumps(timing(sys.argv[6:], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                int(sys.argv[5]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=None,
                        help="one sparsity for every case and layer (default: per case)")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of --images evaluations per variant, all variants of a "
                             "case alternating in one process; the median of all is kept")
    parser.add_argument("--lenet", action="store_true", help="add LeNet-5 on 28x28 digits")
    parser.add_argument("--only", help="comma-separated case indices (0-based) to run")
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    cases = CASES + ([LENET] if args.lenet else [])
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            case_rows = run_case(case, args, Path(tmp))
            rows += case_rows
            print(table(case_rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print()
    print(table(rows))
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
