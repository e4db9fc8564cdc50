"""secureinfer.nn model files, calibration, run-time range checks and quantization."""

from __future__ import annotations

import copy
import io
import json
import warnings
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="secureinfer.nn needs torch")
import secureinfer
from secureinfer.compiler import lower
from secureinfer.errors import ConfigError, RangeError
from secureinfer.nn import (
    RangeWarning,
    calibrate,
    check_ranges,
    load,
    make_he_friendly,
    quantization_report,
    save,
    train,
)
from torch import nn


@pytest.fixture(scope="module")
def trained(digits):
    return train(digits, "cnn", "poly", epochs=4, seed=1, quant_bits=(6, 8))


def _outputs(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


def test_round_trip_keeps_weights_ranges_and_quantization(trained, digits, tmp_path):
    path = save(trained.model, tmp_path / "m.npz")
    model = load(path)
    x = digits.x_test[:32]
    assert np.array_equal(_outputs(model, x), _outputs(trained.model, x))
    assert model.secureinfer_input_shape == (1, 8, 8)
    cal, orig = model.secureinfer_calibration, trained.model.secureinfer_calibration
    assert cal.input_range == orig.input_range == (0.0, 1.0)
    assert cal.layer_ranges == orig.layer_ranges
    assert len(cal.layer_ranges) == len(lower(model, (1, 8, 8)))
    assert model.secureinfer_meta == json.loads(json.dumps(trained.meta))
    quant = model.secureinfer_meta["quantization"]
    assert quant["reference_bits"] == 8 and quant["params"]["input_scale"] == 1 / 255
    assert [r["bits"] for r in quant["report"]] == [6, 8]
    assert model.act1.input_range == trained.model.act1.input_range
    # compile needs nothing else, and the clear scheme agrees with torch.
    sm = secureinfer.compile(model, "clear")
    assert sm.calibration is cal
    assert np.allclose(sm.reference(x), _outputs(model, x), atol=1e-4)


def test_eight_bit_quantization_is_within_half_a_point(digits):
    # The default model (trained on first use, cached for the session).
    from secureinfer.nn.zoo import default_model

    model = default_model("digits", "mlp", progress=False)
    rows = quantization_report(model, digits, bits=(4, 8, 12))
    by_bits = {r["bits"]: r for r in rows}
    assert by_bits[8]["accuracy"] >= by_bits[8]["float_accuracy"] - 0.005
    assert by_bits[4]["max_bound_bits"] < by_bits[8]["max_bound_bits"] < by_bits[12]["max_bound_bits"]
    # The report is what `clear?bits=8` (the exact schemes' reference) computes.
    sm = secureinfer.compile(model, "clear?bits=8")
    acc = float(np.mean(sm.reference(digits.x_test).argmax(1) == digits.y_test))
    assert acc == by_bits[8]["accuracy"]


def test_relu_and_blended_models_save_without_calibration(digits, tmp_path):
    relu = train(digits, "mlp", "relu", epochs=1).model
    model = load(save(relu, tmp_path / "relu.npz"))
    assert isinstance(model.act1, nn.ReLU) and model.secureinfer_calibration is None
    student = make_he_friendly(model, blend=0.25)
    student.secureinfer_input_shape = (1, 8, 8)
    again = load(save(student, tmp_path / "blend.npz"))
    assert again.act1.blend == 0.25


def test_unsupported_models_are_refused_at_save(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ConfigError, match="Custom"):
        save(nn.Sequential(nn.Linear(2, 2), Custom()), tmp_path / "x.npz", input_shape=(2,))
    with pytest.raises(ConfigError, match="input shape"):
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.npz")
    with pytest.raises(ConfigError, match="padding_mode"):
        save(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")),
             tmp_path / "x.npz", input_shape=(1, 4, 4))


def _rewrite(src, dst, *, doc=None, arrays=None, drop=()):
    with np.load(src, allow_pickle=False) as f:
        content = {k: f[k] for k in f.files if k not in drop}
    if doc is not None:
        content["secureinfer.json"] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
    content.update(arrays or {})
    with open(dst, "wb") as out:
        np.savez(out, **content)
    return dst


def _doc(path):
    with np.load(path, allow_pickle=False) as f:
        return json.loads(f["secureinfer.json"].tobytes())


@pytest.fixture
def good_file(trained, tmp_path):
    return save(trained.model, tmp_path / "good.npz")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["architecture"]["children"][0][1].update(type="Evil"), "unknown type"),
    (lambda d: d["architecture"]["children"][0][1].update(out_channels=5), "tensor"),
    (lambda d: d["architecture"]["children"][0][1].update(stride="3"), "pair"),
    (lambda d: d["architecture"]["children"][1][1].update(blend=2.0), r"\[0, 1\]"),
    (lambda d: d["architecture"]["children"][1][1].update(extra=1), "fields"),
    (lambda d: d["calibration"]["layer_ranges"].pop(), "layer ranges"),
    (lambda d: d["calibration"].update(input_range=[1.0, 0.0]), "lo > hi"),
    (lambda d: d.update(input_shape="1x8x8"), "input_shape"),
    (lambda d: d.update(meta=[]), "meta"),
])
def test_malformed_documents_raise_config_error(good_file, tmp_path, mutate, message):
    doc = _doc(good_file)
    mutate(doc)
    bad = _rewrite(good_file, tmp_path / "bad.npz", doc=doc)
    with pytest.raises(ConfigError, match=message):
        load(bad)


def test_malformed_archives_raise_config_error(good_file, tmp_path):
    nan = np.full((4, 1, 3, 3), np.nan, dtype=np.float32)
    cases = {
        "nan weights": (_rewrite(good_file, tmp_path / "a.npz",
                                 arrays={"p:conv1.weight": nan}), "NaN"),
        "missing tensor": (_rewrite(good_file, tmp_path / "b.npz", drop=("p:fc2.bias",)),
                           "missing"),
        "extra entry": (_rewrite(good_file, tmp_path / "c.npz",
                                 arrays={"junk": np.zeros(1)}), "unexpected"),
        "no document": (_rewrite(good_file, tmp_path / "d.npz", drop=("secureinfer.json",)),
                        "not a secureinfer model"),
        "pickled object": (_rewrite(good_file, tmp_path / "e.npz",
                                    arrays={"p:fc2.bias": np.array([object()] * 10)}),
                           "readable|dtype"),
    }
    truncated = tmp_path / "f.npz"
    truncated.write_bytes(good_file.read_bytes()[:300])
    cases["truncated"] = (truncated, "readable")
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"not a zip at all")
    cases["garbage"] = (garbage, "not a secureinfer model file.*secureinfer train")
    cases["missing file"] = (tmp_path / "nope.npz", "does not exist")
    for path, message in cases.values():
        with pytest.raises(ConfigError, match=message):
            load(path)


def test_calibration_records_every_lowered_layer(trained, digits):
    layers = lower(trained.model, digits.input_shape)
    cal = calibrate(trained.model, digits.x_train, margin=0.0)
    assert len(cal.layer_ranges) == len(layers)
    y = digits.x_train.astype(np.float64)
    for spec, (lo, hi) in zip(layers, cal.layer_ranges):
        y = spec.forward(y)
        assert (lo, hi) == pytest.approx((y.min(), y.max()))
    calibrate(trained.model, digits.x_train, input_range=(0.0, 1.0))  # restore the default


def test_check_ranges_names_the_layer(trained, digits):
    model = copy.deepcopy(trained.model)
    assert check_ranges(model, digits.x_test[:64]) == []
    with pytest.raises(RangeError, match="network input"):
        check_ranges(model, digits.x_test[:4] * 3)
    # Calibrated on faint images (input range still [0, 1]), real ones leave some layer's
    # range although every pixel is in range.
    narrow = calibrate(model, digits.x_train * 0.5, margin=0.0, input_range=(0.0, 1.0))
    x = digits.x_test[:8]
    layers, y, first = lower(model, digits.input_shape), x.astype(np.float64), None
    for i, (spec, (lo, hi)) in enumerate(zip(layers, narrow.layer_ranges)):
        y = spec.forward(y)
        if y.min() < lo or y.max() > hi:
            first = i
            break
    assert first is not None
    with pytest.raises(RangeError, match=f"output of layer {layers[first].name} ") as err:
        check_ranges(model, x)
    assert f"the input of layer {layers[first + 1].name}" in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = check_ranges(model, x, action="warn")
    assert problems and caught and issubclass(caught[0].category, RangeWarning)
    assert layers[first].name in problems[0]
    assert check_ranges(model, x, tolerance=1e6) == []
    assert check_ranges(layers, x, narrow, tolerance=1e6) == []  # LayerSpecs work too


def test_document_must_be_utf8_bytes(good_file, tmp_path):
    with np.load(good_file, allow_pickle=False) as f:
        content = {k: f[k] for k in f.files}
    content["secureinfer.json"] = np.array(["{}"])
    buf = io.BytesIO()
    np.savez(buf, **content)
    bad = tmp_path / "u.npz"
    bad.write_bytes(buf.getvalue())
    assert zipfile.is_zipfile(bad)
    with pytest.raises(ConfigError, match="byte string"):
        load(bad)
