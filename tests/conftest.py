"""Shared fixtures: an isolated cache directory and a small trained torch model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Default models and discrete-log tables go to a per-session cache, not the user's.
_CACHE = Path(os.environ.setdefault(
    "SECUREINFER_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache"
                                 / "secureinfer")))


@pytest.fixture(scope="session")
def digits():
    """The embedded digits dataset."""
    from secureinfer import data

    return data.load("digits")


@pytest.fixture(scope="session")
def toolkit_model(digits):
    """``toolkit_model(arch)``: the nn toolkit's ``arch`` (x^2 activations, 32 hidden) on
    digits, fitted 6 epochs and calibrated to [0, 1] inputs; one per arch per session."""
    pytest.importorskip("torch")
    from secureinfer import nn as snn

    built: dict[str, object] = {}

    def make(arch: str):
        if arch not in built:
            import torch

            torch.manual_seed(0)
            model = snn.build(arch, digits.input_shape, 10, "square", hidden=(32,))
            snn.fit(model, digits.x_train, digits.y_train, epochs=6)
            snn.calibrate(model, digits.x_train, digits.input_shape, input_range=(0.0, 1.0))
            built[arch] = model
        return built[arch]

    return make


@pytest.fixture(scope="session")
def square_mlp(digits):
    """Flatten -> Linear 64->32 -> x^2 -> Linear 32->10 trained for a few seconds."""
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)

    class Square(nn.Module):
        def forward(self, x):
            return x * x

        def secureinfer_poly(self):
            return (0.0, 0.0, 1.0)

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Square(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = torch.tensor(digits.x_train), torch.tensor(digits.y_train)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After each test module, collect cycles and give freed heap back to the system.

    The suite runs every scheme in one process; SEAL keys and plaintexts of a finished
    module are freed, but glibc keeps the pages, and the resident size of a 2-core, 24 GB
    CI machine would grow with every module.
    """
    if nextitem is not None and nextitem.module is item.module:
        return
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    log = os.environ.get("SECUREINFER_TEST_RSS_LOG")
    if log:  # where the one-process suite's memory goes: resident MB after each module
        _log_rss(Path(log), item.module.__name__ if item.module else item.nodeid)


def _log_rss(log: Path, module: str) -> None:
    import resource

    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with log.open("a") as f:
        f.write(f"{module}\t{rss / 2**20:.0f}\t{peak / 2**20:.0f}\n")
