"""Datasets: the embedded digits and user .npz files (MedMNIST and Keras-MNIST keys)."""

from __future__ import annotations

import numpy as np
import pytest

from secureinfer import data
from secureinfer.errors import ConfigError


def test_digits_default_shapes_and_range(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.num_classes == 10


def test_digits28_is_resized_digits():
    d = data.load("digits28")
    assert d.x_test.shape[1:] == (1, 28, 28) and d.x_test.max() <= 1.0


def _write(path, keys, n=6, shape=(5, 5), dtype=np.uint8):
    rng = np.random.default_rng(0)
    arrays = {keys[0]: rng.integers(0, 256, (n, *shape)).astype(dtype),
              keys[1]: rng.integers(0, 3, (n, 1)), keys[2]: rng.integers(0, 256, (4, *shape))
              .astype(dtype), keys[3]: rng.integers(0, 3, 4)}
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("keys", [("train_images", "train_labels", "test_images", "test_labels"),
                                  ("x_train", "y_train", "x_test", "y_test")])
def test_npz_both_key_conventions(tmp_path, keys):
    arrays = _write(tmp_path / "d.npz", keys)
    d = data.load(f"npz:{tmp_path / 'd.npz'}")
    assert d.x_train.shape == (6, 1, 5, 5) and d.x_test.shape == (4, 1, 5, 5)
    np.testing.assert_allclose(d.x_train[:, 0], arrays[keys[0]] / 255.0, rtol=1e-6)
    assert d.y_train.tolist() == arrays[keys[1]][:, 0].tolist()


def test_npz_channels_last_rgb(tmp_path):
    _write(tmp_path / "rgb.npz", ("x_train", "y_train", "x_test", "y_test"), shape=(5, 5, 3))
    assert data.load(f"npz:{tmp_path / 'rgb.npz'}").input_shape == (3, 5, 5)


@pytest.mark.parametrize("content, match", [
    ({"a": np.zeros(3)}, "expected MedMNIST keys"),
    ({"x_train": np.zeros((2, 3, 3)), "y_train": np.zeros(3, dtype=int),
      "x_test": np.zeros((1, 3, 3)), "y_test": np.zeros(1, dtype=int)}, "2 integer labels"),
    ({"x_train": np.full((2, 3, 3), 7.0), "y_train": np.zeros(2, dtype=int),
      "x_test": np.zeros((1, 3, 3)), "y_test": np.zeros(1, dtype=int)}, r"\[0, 1\]"),
    ({"x_train": np.zeros((2, 3)), "y_train": np.zeros(2, dtype=int),
      "x_test": np.zeros((1, 3)), "y_test": np.zeros(1, dtype=int)}, "shape"),
])
def test_npz_malformed_is_clear_error(tmp_path, content, match):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(ConfigError, match=match):
        data.load(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_not_a_zip_and_missing(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(ConfigError, match="does not exist"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")


def test_npz_with_pickled_objects_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x_train=np.array([{"a": 1}], dtype=object),
             y_train=np.zeros(1, dtype=int), x_test=np.zeros((1, 2, 2)),
             y_test=np.zeros(1, dtype=int))
    with pytest.raises(ConfigError):
        data.load(f"npz:{tmp_path / 'p.npz'}")


def test_unknown_dataset_lists_valid():
    with pytest.raises(ConfigError, match="digits"):
        data.load("mnist")
