"""secureinfer.nn default models (zoo) and the ``secureinfer train`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="secureinfer.nn needs torch")

import secureinfer
from secureinfer import cli
from secureinfer.compiler import lower
from secureinfer.data import load as load_dataset
from secureinfer.nn import load, zoo


def _kinds(model, shape):
    return [(s.kind, getattr(s, "weight", np.zeros((0,))).shape, getattr(s, "degree", None))
            for s in lower(model, shape)]


def test_default_digits_mlp(digits, monkeypatch):
    model = zoo.default_model("digits", "mlp", progress=False)
    assert _kinds(model, (1, 8, 8)) == [
        ("flatten", (0,), 1), ("linear", (32, 64), 1), ("poly", (0,), 2),
        ("linear", (10, 32), 1)]
    assert model.secureinfer_meta["test_accuracy"] >= 0.95
    sm = secureinfer.compile(model, "clear")  # nothing else needed
    assert np.mean(sm.predict_clear(digits.x_test).argmax(1) == digits.y_test) >= 0.95
    path = zoo.cache_path("digits", "mlp")
    assert path.is_file() and f"r{zoo.RECIPE_VERSION}" in path.name
    assert path.parent == zoo.cache_dir()

    def no_training(*a, **k):
        raise AssertionError("a cached default model must not be retrained")

    monkeypatch.setattr(zoo, "train", no_training)
    again = zoo.default_model("digits", "mlp", progress=False)
    assert again.secureinfer_calibration.layer_ranges == model.secureinfer_calibration.layer_ranges


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(zoo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.RECIPE, "epochs", 1)  # architecture checks need no accuracy
    return tmp_path / "cache" / "models"


def test_default_digits28_cnn_is_the_tenseal_network(private_cache):
    model = zoo.default_model("digits28", "cnn", progress=False)
    assert _kinds(model, (1, 28, 28)) == [
        ("conv2d", (4, 1, 7, 7), 1), ("poly", (0,), 2), ("flatten", (0,), 1),
        ("linear", (64, 256), 1), ("poly", (0,), 2), ("linear", (10, 64), 1)]
    assert zoo.cache_path("digits28", "cnn").parent == private_cache


def test_corrupt_cache_is_retrained(private_cache):
    path = zoo.cache_path("digits", "mlp")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"junk")
    with pytest.warns(UserWarning, match="retraining"):
        model = zoo.default_model("digits", "mlp", progress=False)
    assert load(path).secureinfer_meta == model.secureinfer_meta


def test_npz_datasets_train_on_the_fly(private_cache, digits, tmp_path):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=(digits.x_train[:300, 0] * 255).astype(np.uint8),
             y_train=digits.y_train[:300], x_test=(digits.x_test[:50, 0] * 255).astype(np.uint8),
             y_test=digits.y_test[:50])
    model = zoo.default_model(f"npz:{npz}", "mlp", progress=False)
    assert model.secureinfer_input_shape == (1, 8, 8)
    assert model.secureinfer_meta["dataset"] == "npz:tiny.npz"
    by_name, by_data = zoo.cache_path(f"npz:{npz}"), zoo.cache_path(load_dataset(f"npz:{npz}"))
    assert by_name.is_file() and by_data.name.startswith("data-tiny")
    # Another file with other content is another model.
    np.savez(npz, x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.arange(10),
             x_test=np.zeros((2, 8, 8), np.uint8), y_test=np.arange(2))
    assert zoo.cache_path(f"npz:{npz}") != by_name


def test_train_command_json(tmp_path, capsys):
    out = tmp_path / "model.npz"
    code = cli.main(["train", "--dataset", "digits", "--arch", "mlp", "--activation", "poly",
                     "--distill-from", "relu", "--gradual", "--epochs", "2", "--seed", "5",
                     "--out", str(out), "--json", "--bits", "8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    for key in ("test_accuracy", "activation", "arch", "epochs", "seed"):
        assert key in report
    assert (report["activation"], report["arch"], report["epochs"], report["seed"]) == (
        "poly", "mlp", 2, 5)
    assert report["gradual"] is True and report["teacher_accuracy"] is not None
    assert report["out"] == str(out)
    model = load(out)
    assert model.secureinfer_meta["test_accuracy"] == report["test_accuracy"]
    assert model.act1.blend == 1.0


def test_train_command_human_output(capsys):
    assert cli.main(["train", "--epochs", "1", "--activation", "square", "--bits", "8"]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text and "8-bit integers" in text and "not saved" in text


@pytest.mark.parametrize("args, message", [
    (["--gradual"], "--distill-from"),
    (["--activation", "relu", "--distill-from", "relu"], "polynomial student"),
    (["--epochs", "0"], "--epochs"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--distill-from", "/nonexistent/teacher.npz"], "does not exist"),
])
def test_train_command_usage_errors(args, message, capsys):
    assert cli.main(["train", *args]) == 2
    assert message in capsys.readouterr().err


def test_train_command_distils_from_a_teacher_file(tmp_path, capsys):
    teacher = tmp_path / "relu.npz"
    assert cli.main(["train", "--activation", "relu", "--arch", "cnn", "--epochs", "2",
                     "--out", str(teacher), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["activation"] == "relu"
    student = tmp_path / "poly.npz"
    assert cli.main(["train", "--activation", "poly", "--distill-from", str(teacher),
                     "--epochs", "2", "--out", str(student), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "cnn"  # the teacher file's architecture, not --arch's default
    assert report["distill_from"] == str(teacher)
    model = load(student)
    assert [s.kind for s in lower(model, (1, 8, 8))][:2] == ["conv2d", "poly"]
    assert model.secureinfer_calibration is not None
