"""Datasets: ``digits`` (embedded, the default), ``digits28`` and ``npz:PATH``.

Every loader returns a ``Dataset`` of float32 images ``(n, channels, height, width)``
scaled to ``[0, 1]`` and int64 labels. Nothing is downloaded.

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images), split 75/25 with a fixed
  seed.
* ``digits28``: the same images resized to 28x28 (bilinear), to run MNIST-shaped networks
  on embedded data.
* ``npz:PATH``: a NumPy archive with MedMNIST keys ``train_images, train_labels,
  test_images, test_labels`` or Keras-MNIST keys ``x_train, y_train, x_test, y_test``.
  Images are ``(n, h, w)``, ``(n, h, w, c)`` or ``(n, c, h, w)``; integer pixels are divided
  by 255.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

__all__ = ["Dataset", "load", "DATASETS"]

DATASETS = ("digits", "digits28", "npz:PATH")
_KEYSETS = (("train_images", "train_labels", "test_images", "test_labels"),
            ("x_train", "y_train", "x_test", "y_test"))


@dataclass
class Dataset:
    """Train and test splits of one dataset."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's shape, ``(channels, height, width)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _digits(size: int | None) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    if size is not None:
        x = _resize(x, size)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target.astype(np.int64), test_size=0.25,
                                              random_state=0, stratify=d.target)
    return Dataset("digits" if size is None else f"digits{size}", x_tr, y_tr, x_te, y_te)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(n, c, h, w)`` images to ``size`` x ``size``."""
    n, c, h, w = x.shape

    def axis(src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size) + 0.5) * src / size - 0.5
        pos = np.clip(pos, 0, src - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    r0, r1, rw = axis(h)
    c0, c1, cw = axis(w)
    rows = x[:, :, r0] * (1 - rw)[:, None] + x[:, :, r1] * rw[:, None]
    out = rows[:, :, :, c0] * (1 - cw) + rows[:, :, :, c1] * cw
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _images(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif arr.ndim != 4:
        raise ConfigError(f"{path}: {key} has shape {arr.shape}; expected (n, h, w), "
                          "(n, h, w, c) or (n, c, h, w)")
    if arr.dtype.kind in "ui":
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise ConfigError(f"{path}: float images in {key} must be scaled to [0, 1] "
                              f"(found [{arr.min():.3g}, {arr.max():.3g}])")
    else:
        raise ConfigError(f"{path}: {key} has dtype {arr.dtype}; expected integers or floats")
    return arr


def _labels(arr: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    arr = np.asarray(arr).reshape(len(arr), -1) if np.ndim(arr) > 1 else np.asarray(arr)
    if arr.ndim == 2:
        if arr.shape[1] != 1:
            raise ConfigError(f"{path}: {key} has shape {arr.shape}; expected one label each")
        arr = arr[:, 0]
    if arr.dtype.kind not in "ui" or len(arr) != n:
        raise ConfigError(f"{path}: {key} must hold {n} integer labels "
                          f"(got {len(arr)} of dtype {arr.dtype})")
    if arr.size and arr.min() < 0:
        raise ConfigError(f"{path}: {key} has negative labels")
    return arr.astype(np.int64)


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise ConfigError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            for names in _KEYSETS:
                if set(names) <= keys:
                    arrays = [f[k] for k in names]
                    break
            else:
                raise ConfigError(
                    f"{path}: found keys {sorted(keys)}; expected MedMNIST keys "
                    f"{', '.join(_KEYSETS[0])} or Keras-MNIST keys {', '.join(_KEYSETS[1])}")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"{path} is not a readable .npz archive ({exc})") from None
    xtr = _images(arrays[0], path, names[0])
    xte = _images(arrays[2], path, names[2])
    if xtr.shape[1:] != xte.shape[1:]:
        raise ConfigError(f"{path}: train images {xtr.shape[1:]} and test images "
                          f"{xte.shape[1:]} differ in shape")
    return Dataset(f"npz:{path.name}", xtr, _labels(arrays[1], len(xtr), path, names[1]),
                   xte, _labels(arrays[3], len(xte), path, names[3]))


def load(name: str = "digits") -> Dataset:
    """Load a dataset by name: ``digits``, ``digits28`` or ``npz:PATH``.

    Raises:
        ConfigError: an unknown name, or a file that is missing or malformed (the message
            says which key or shape is wrong).
    """
    key = name.strip()
    if key.lower() == "digits":
        return _digits(None)
    if key.lower() == "digits28":
        return _digits(28)
    if key.lower().startswith("npz:"):
        return _npz(Path(key[4:]).expanduser())
    if key.endswith(".npz"):
        return _npz(Path(key).expanduser())
    raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
