"""CKKS on LeNet-class networks against Orion and HElayers (``bench_ckks.py --networks``).

Each network is a torch ``nn.Sequential`` with ``x^2`` activations and seeded random
weights (scaled so values stay near 1); its ``state_dict`` is saved to an ``.npz`` so every
system runs the same weights. Every system runs in its own child process so that its peak
RSS is its own: ours in this interpreter's environment, the anchors (never runtime
dependencies) in ``--anchors-python`` (a venv with ``orion-fhe`` and ``pyhelayers``).

Printed per network: evaluate median, compile + keygen, peak RSS against the plan's
estimate, rotations / keys / key bytes, and the op-count floor (every rotation, plaintext
product, ciphertext product and rescale of the plan times its unit cost measured at its
level with the plan's parameters).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    from secureinfer.nn.activations import Square
except ImportError:  # the anchors' venv need not hold secureinfer: the same x^2, same name

    class Square(nn.Module):  # type: ignore[no-redef]
        """``x * x``, as ``secureinfer.nn.activations.Square`` (the anchors match by name)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

__all__ = ["NETWORKS", "build", "run_child", "run_ours"]

NETWORKS = ("tenseal_cnn", "lenet5", "lenet", "alexnet64")
#: Peak memory the anchors were measured at (issue 11), with a margin: GB needed free.
ANCHOR_GB = {("orion", "lenet5"): 14.0, ("orion", "lenet"): 12.0, ("helayers", "lenet5"): 6.5,
             ("helayers", "lenet"): 5.5, ("orion", "alexnet64"): 20.0,
             ("helayers", "alexnet64"): 12.0}


def _seq(*mods: nn.Module) -> nn.Sequential:
    return nn.Sequential(*mods)


def build(name: str, seed: int = 0) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """The torch network ``name`` with seeded random weights, and its input shape."""
    torch.manual_seed(seed)
    if name == "tenseal_cnn":
        net = _seq(nn.Conv2d(1, 4, 7, stride=3), Square(), nn.Flatten(), nn.Linear(256, 64),
                   Square(), nn.Linear(64, 10))
        shape = (1, 28, 28)
    elif name == "lenet5":
        net = _seq(nn.Conv2d(1, 6, 5, padding=2), Square(), nn.AvgPool2d(2),
                   nn.Conv2d(6, 16, 5), Square(), nn.AvgPool2d(2), nn.Flatten(),
                   nn.Linear(400, 120), Square(), nn.Linear(120, 84), Square(),
                   nn.Linear(84, 10))
        shape = (1, 28, 28)
    elif name == "lenet":
        net = _seq(nn.Conv2d(1, 32, 5, stride=2, padding=2), Square(),
                   nn.Conv2d(32, 64, 5, stride=2, padding=2), Square(), nn.Flatten(),
                   nn.Linear(3136, 512), Square(), nn.Linear(512, 10))
        shape = (1, 28, 28)
    elif name == "alexnet64":
        net = _seq(nn.Conv2d(1, 6, 5, stride=2, padding=2), Square(), nn.AvgPool2d(2),
                   nn.Conv2d(6, 16, 3, padding=1), Square(), nn.AvgPool2d(2),
                   nn.Conv2d(16, 32, 3, padding=1), Square(),
                   nn.Conv2d(32, 32, 3, padding=1), Square(),
                   nn.Conv2d(32, 32, 3, padding=1), Square(), nn.AvgPool2d(2), nn.Flatten(),
                   nn.Linear(512, 128), Square(), nn.Linear(128, 10))
        shape = (1, 64, 64)
    else:
        raise ValueError(f"unknown network {name!r}; valid: {', '.join(NETWORKS)}")
    _normalise(net, shape)
    return net.eval(), shape


@torch.no_grad()
def _normalise(net: nn.Sequential, shape: tuple[int, ...]) -> None:
    """Rescale each conv/linear so its output on random inputs has RMS ~0.7 (squares then
    neither vanish nor explode), like a trained network's calibrated ranges."""
    x = torch.rand(32, *shape)
    for mod in net:
        x = mod(x)
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            rms = float(x.pow(2).mean().sqrt())
            mod.weight.mul_(0.7 / rms)
            mod.bias.mul_(0.7 / rms)
            x = x * (0.7 / rms)


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _children_memory_gb() -> tuple[float, float]:
    """Peak RSS (shared pages counted in full) and current proportional set size (shared
    pages split between the processes sharing them) of this process's children: the
    ``workers`` helpers, forked from the server."""
    pids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            pids += Path(f"/proc/self/task/{tid}/children").read_text().split()
        except OSError:
            continue
    hwm = pss = 0.0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            hwm += int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:"))
                       .split()[1]) / 1e6
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss += int(next(ln for ln in rollup.splitlines() if ln.startswith("Pss:"))
                       .split()[1]) / 1e6
        except (OSError, StopIteration):
            continue
    return hwm, pss


# ----- ours ---------------------------------------------------------------------------------


def _unit_costs(scheme: Any, reps: int = 5) -> dict[int, dict[str, float]]:
    """Seconds per rotation, plaintext product, ciphertext product (with relinearization)
    and rescale at every level, with the plan's parameters; with the native part also per
    split and per rotation from a split, a product being one term of a fused sum (the
    ``threads`` of the config: a sum's products on one thread, ``dot``)."""
    from secureinfer.plugins.ckks.backend import ClientKeys, Seal, sealapi

    seal = Seal(scheme.params)
    keys = ClientKeys(seal, [1], True)
    ev = seal.evaluator
    ct = keys.encrypt(np.random.default_rng(0).random(seal.slots))
    out: dict[int, dict[str, float]] = {}
    from secureinfer.plugins.ckks import native

    threads = int(scheme.opts.get("threads") or 1)
    nat = native.Native(seal, keys.galois, [1], threads) if native.available() else None

    def med(fn: Any) -> float:
        ts = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return statistics.median(ts)

    for level in range(seal.top, 0, -1):
        c = sealapi().Ciphertext()
        ev.mod_switch_to(ct, seal.parms_ids[level], c)
        pt = seal.encode(np.full(seal.slots, 0.5), level, 2.0 ** scheme.params.scale_bits)
        tmp = sealapi().Ciphertext()

        def square() -> None:
            ev.multiply(c, c, tmp)
            ev.relinearize_inplace(tmp, keys.relin)

        def rescale() -> None:
            r = sealapi().Ciphertext()
            ev.multiply_plain(c, pt, r)
            ev.rescale_to_next_inplace(r)

        out[level] = {"rotation": med(lambda: ev.rotate_vector(c, 1, keys.galois, tmp)),
                      "pt_product": med(lambda: ev.multiply_plain(c, pt, tmp)),
                      "ct_product": med(square), "rescale": max(0.0, med(rescale) -
                                                                 med(lambda: ev.multiply_plain(c, pt, tmp)))}
        if nat is not None:  # what the server runs with the native part
            split = nat.split(c)
            prods = nat.products([pt] * 8, level + 1)
            out[level].update(split=med(lambda: nat.split(c)),
                              hoisted_rotation=med(lambda: nat.rotate(split, 1)),
                              pt_product=med(lambda: nat.dot([c] * 8, prods)) / 8)
            if threads > 1:  # every rotation runs on the threads (``Native.rotate_one``)
                out[level]["rotation"] = med(lambda: nat.rotate_one(c, 1))
    return out


def _floor(plan: dict[str, Any], units: dict[int, dict[str, float]]) -> dict[str, float]:
    """Op counts of the plan times their unit cost at their level."""
    totals = {"rotation": 0.0, "pt_product": 0.0, "ct_product": 0.0, "rescale": 0.0}
    counts = {k: 0 for k in totals}
    for st in plan.get("grid_stages", []):
        u = units[st["level"]]
        hoisted = st.get("hoisted_rotations", 0) if "split" in u else 0
        splits = st.get("splits", 0) if hoisted else 0
        totals["rotation"] += ((st["rotations"] - hoisted) * u["rotation"]
                               + (hoisted * u["hoisted_rotation"] + splits * u["split"]
                                  if hoisted else 0.0))
        totals["pt_product"] += st["plaintext_products"] * u["pt_product"]
        totals["rescale"] += u["rescale"]
        counts["rotation"] += st["rotations"]
        counts["pt_product"] += st["plaintext_products"]
        counts["rescale"] += 1
    level = len(plan["coeff_mod_bits"]) - 2
    for st in plan["stages"]:
        if st["stage"].startswith("poly"):
            totals["ct_product"] += units[level]["ct_product"]
            totals["rescale"] += units[level]["rescale"]
            counts["ct_product"] += 1
            counts["rescale"] += 1
        level -= st["depth"]
    return {"floor_s": sum(totals.values()), **{f"{k}_s": v for k, v in totals.items()},
            **{f"{k}s": v for k, v in counts.items()}}


#: Our config in the table: without the output flood, which only a deployment whose
#: client must not learn more than the outputs needs (``flood_bits`` > 0 raises the scale
#: and often the ring degree).
OURS_CONFIG = "ckks?flood_bits=0"


def run_ours(name: str, weights: str, runs: int, config: str = OURS_CONFIG) -> dict[str, Any]:
    """Compile, set up and time ``name`` with the ``ckks`` plugin (in this process)."""
    import secureinfer

    net, shape = build(name)
    net.load_state_dict({k: torch.tensor(v) for k, v in np.load(weights).items()})
    rng = np.random.default_rng(1)
    calib = rng.random((32, *shape))
    baseline = _rss_gb()
    start = time.perf_counter()
    sm = secureinfer.compile(net, config, input_shape=shape, calibration=calib)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    client, server, _ = sm.setup()
    setup_s = time.perf_counter() - start
    x = rng.random((1, *shape))
    start = time.perf_counter()
    msg = client.encrypt(x)
    encrypt_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = server.evaluate(msg)
        times.append(time.perf_counter() - start)
    y = client.decrypt(out)
    ref = net(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    plan = sm.plan
    rss = _rss_gb()
    helpers_hwm, helpers_pss = _children_memory_gb()
    units = _unit_costs(sm.scheme)
    est = plan.get("estimated_memory", {}).get("peak_one_process")
    return {"system": "ours", "network": name, "config": config,
            "evaluate_s": statistics.median(times), "encrypt_s": encrypt_s,
            "input_ciphertexts": plan["input_ciphertexts_per_message"],
            "input_mb": len(msg) / 1e6,
            "compile_s": compile_s, "setup_s": setup_s, "peak_rss_gb": rss,
            "evaluate_runs_s": times, "workers": plan.get("workers", 1),
            "helpers_peak_rss_gb": helpers_hwm, "helpers_pss_gb": helpers_pss,
            "estimated_peak_gb": baseline + est / 1e9 if est else None,
            "max_abs_error": float(np.abs(y - ref).max()),
            "agree": bool((y.argmax(1) == ref.argmax(1)).all()),
            "N": plan["poly_modulus_degree"], "layout": plan["layout"],
            "rotations": plan["rotations_per_input"], "galois_keys": plan["galois_keys"],
            "key_gb": plan["galois_key_bytes"] / 1e9, **_floor(plan, units)}


# ----- children -----------------------------------------------------------------------------


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1e6
    return float("inf")


def run_child(python: str, system: str, name: str, weights: str, runs: int,
              timeout: float, need_gb: float = 0.0, config: str = OURS_CONFIG) -> dict[str, Any]:
    """Run one system on one network in a fresh interpreter; its JSON line back.

    Skipped (with the reason) when the machine has less than ``need_gb`` available: it is
    shared, and an anchor that swaps or is killed measures nothing.
    """
    if _available_gb() < need_gb:
        return {"system": system, "network": name,
                "skipped": f"needs ~{need_gb:.0f} GB, {_available_gb():.1f} GB available"}
    here = Path(__file__).resolve().parent
    script = here / ("_anchors.py" if system != "ours" else "bench_ckks.py")
    cmd = [python, str(script), "--child", system, name, weights, str(runs)]
    if system == "ours":
        cmd += ["--config", config]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "network": name, "skipped": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"system"'):
            return json.loads(line)
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
             if ln.strip() and "Warning" not in ln]
    tail = " | ".join(ln.strip() for ln in lines[-3:]) or "no output"
    return {"system": system, "network": name,
            "skipped": f"failed (exit {proc.returncode}): {tail[:300]}"}


def save_weights(name: str, path: str) -> None:
    net, _ = build(name)
    np.savez(path, **{k: v.detach().numpy() for k, v in net.state_dict().items()})


def child_main(argv: list[str], config: str = OURS_CONFIG) -> None:
    system, name, weights, runs = argv[0], argv[1], argv[2], int(argv[3])
    assert system == "ours"
    print(json.dumps(run_ours(name, weights, runs, config)))
    sys.stdout.flush()
