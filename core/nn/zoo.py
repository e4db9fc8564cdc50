"""Default models: trained on first use, then cached.

``default_model("digits", "mlp")`` is Flatten -> Linear 64->32 -> Square -> Linear 32->10:
one degree-2 activation between two Linear layers, so quadratic FE runs it whole.
``default_model("digits28", "cnn")`` is the TenSEAL MNIST network (Conv2d 1->4, k7, s3 ->
Square -> Linear 256->64 -> Square -> Linear 64->10). Any dataset name that
``secureinfer.data.load`` accepts works, ``npz:PATH`` included (keyed by the file's hash).

The cache lives in ``platformdirs.user_cache_dir("secureinfer")/models`` or
``$SECUREINFER_CACHE_DIR/models``; a file name holds the dataset, the arch and
``RECIPE_VERSION``, which changes whenever the recipe below does. Default models use
``Square`` activations: on these shallow networks they are as accurate as ``PolyAct`` (see
the README table), and ``x**2`` is exact in integers, while the coefficients of a general
quadratic are scaled by ``2**coeff_bits`` (``secureinfer.quant``), which multiplies the
worst-case integers of BFV and FE by as much.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..data import Dataset
from ..errors import ConfigError
from .arch import ARCHS
from .modelfile import load, save
from .training import train

__all__ = ["CACHE_ENV_VAR", "RECIPE", "RECIPE_VERSION", "cache_dir", "cache_path",
           "default_model"]

CACHE_ENV_VAR = "SECUREINFER_CACHE_DIR"
_BUILTIN = ("digits", "digits28")
RECIPE_VERSION = 1
RECIPE: dict[str, Any] = {"activation": "square", "epochs": 30, "seed": 0}
"""How default models are trained (``secureinfer.nn.train`` arguments; hidden widths are the
arch defaults)."""


def cache_dir() -> Path:
    """Where default models are stored."""
    root = os.environ.get(CACHE_ENV_VAR)
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("secureinfer")
    return Path(root).expanduser() / "models"


def _dataset_key(dataset: str | Dataset) -> str:
    if isinstance(dataset, Dataset):
        if dataset.name in _BUILTIN:
            return dataset.name
        digest = hashlib.sha256()
        for arr in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
            digest.update(str(arr.shape).encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", dataset.name.removeprefix("npz:"))[:40]
        return f"data-{stem}-{digest.hexdigest()[:16]}"
    name = dataset.strip()
    if name.lower().startswith("npz:") or name.endswith(".npz"):
        path = Path(name[4:] if name.lower().startswith("npz:") else name).expanduser()
        if not path.is_file():
            raise ConfigError(f"dataset file {path} does not exist")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)[:40]
        return f"npz-{stem}-{digest}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", name.lower())


def cache_path(dataset: str | Dataset = "digits", arch: str = "mlp") -> Path:
    """The cache file of a default model (it may not exist yet)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return cache_dir() / f"{_dataset_key(dataset)}-{arch}-r{RECIPE_VERSION}.npz"


def default_model(dataset: str | Dataset = "digits", arch: str = "mlp", *,
                  progress: bool = True) -> nn.Module:
    """The default HE-friendly ``arch`` model for ``dataset``, trained on first use.

    Args:
        dataset: a ``secureinfer.data.load`` name (``digits``, ``digits28``, ``npz:PATH``)
            or a loaded ``Dataset`` (cached by a hash of its arrays unless it is built in).
        arch: one of ``secureinfer.nn.arch.ARCHS`` (``mlp``, ``cnn``, ``lenet5``, ``alexnet``).
        progress: show a progress bar (stderr) while training.

    Returns:
        A loaded model file: ``secureinfer.compile(model, scheme)`` needs nothing else.

    Raises:
        ConfigError: unknown dataset or arch.
    """
    path = cache_path(dataset, arch)
    if path.is_file():
        try:
            return load(path)
        except ConfigError as exc:
            warnings.warn(f"retraining the default model: {exc}", stacklevel=2)
    if progress:
        label = dataset.name if isinstance(dataset, Dataset) else dataset
        print(f"secureinfer: training the default {arch} model for {label} (first use; "
              f"cached in {path})", file=sys.stderr)
    result = train(dataset, arch, progress=progress, **RECIPE)
    result.meta["recipe_version"] = RECIPE_VERSION
    save(result.model, path, meta=result.meta)
    return load(path)
