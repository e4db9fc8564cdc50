"""``secureinfer.nn.prune`` and ``secureinfer prune``: structured pruning in the units the
scheme evaluates, within an accuracy budget; the pruned model runs under every scheme."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import secureinfer  # noqa: E402
from secureinfer import nn as snn  # noqa: E402
from secureinfer.errors import ConfigError  # noqa: E402
from secureinfer.nn.pruning import unit_masks  # noqa: E402


@pytest.fixture(scope="module")
def mlp(digits):
    torch.manual_seed(0)
    model = snn.build("mlp", digits.input_shape, 10, "square")
    snn.fit(model, digits.x_train, digits.y_train, epochs=10)
    snn.calibrate(model, digits.x_train, digits.input_shape, input_range=(0.0, 1.0))
    return model


@pytest.fixture(scope="module")
def rows_pruned(mlp, digits):
    return snn.prune(mlp, "fe-ip", sparsity=0.5, max_drop=2.0, data=digits, epochs=3)


def _pruned_units(model, unit: str) -> int:
    return sum(all(not p.detach()[m].any() for p, m in parts)
               for parts in unit_masks(model, unit))


def test_budget_zero_changes_nothing(mlp, digits):
    result = snn.prune(mlp, "fe-ip", sparsity=0.5, max_drop=0.0, data=digits, epochs=1)
    for (k, a), b in zip(mlp.state_dict().items(), result.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert result.meta["pruned"] == 0 and result.meta["history"] == []


def test_rows_pruned_within_budget_and_skipped_by_fe_ip(rows_pruned, mlp, digits):
    meta = rows_pruned.meta
    assert meta["unit"] == "rows" and meta["units"] == 32
    assert meta["pruned"] == _pruned_units(rows_pruned.model, "rows") >= 8
    assert 100 * (meta["accuracy_before"] - meta["accuracy_after"]) <= 2.0
    assert snn.accuracy(rows_pruned.model, digits.x_test, digits.y_test) == meta["accuracy_after"]
    assert _pruned_units(mlp, "rows") == 0  # the input model is left alone
    pytest.importorskip("pymcl", reason="fe-ip needs pymcl: pip install secureinfer[fe]")
    sm = secureinfer.compile(rows_pruned.model, "fe-ip", calibration=digits.x_train[:256])
    assert sm.plan["units_skipped"] == meta["pruned"]
    assert sm.plan["functional_keys"] == 32 - meta["pruned"]
    client, server, _ = sm.setup()
    x = digits.x_test[:4]
    np.testing.assert_array_equal(server.infer(client.encrypt(x)), sm.reference(x))


def test_model_pruned_for_one_scheme_runs_under_others(rows_pruned, digits):
    x = digits.x_test[:3]
    clear = secureinfer.compile(rows_pruned.model, "clear")
    want = clear.predict_clear(x)
    with torch.no_grad():
        np.testing.assert_allclose(want, rows_pruned.model(torch.tensor(x)).double().numpy(),
                                   atol=1e-4)
    pytest.importorskip("tenseal", reason="ckks needs tenseal: pip install secureinfer[ckks]")
    sm = secureinfer.compile(rows_pruned.model, "ckks?packing=single")
    client, server, _ = sm.setup()
    np.testing.assert_allclose(client.decrypt(server.evaluate(client.encrypt(x))), want,
                               atol=sm.scheme.capabilities.tolerance)


def test_hidden_units_for_fe_quad(mlp, digits):
    result = snn.prune(mlp, unit="hidden", sparsity=0.25, max_drop=3.0, data=digits,
                       steps=1, epochs=2)
    n = result.meta["pruned"]
    assert n == _pruned_units(result.model, "hidden") == 8
    pytest.importorskip("pymcl", reason="fe-quad needs pymcl: pip install secureinfer[fe]")
    sm = secureinfer.compile(result.model, "fe-quad?bits=4", calibration=digits.x_train[:256])
    assert sm.plan["hidden"] == 32 - n and sm.plan["units_skipped"] == n


@pytest.fixture(scope="module")
def small_cnn(digits):
    torch.manual_seed(0)
    model = snn.build("cnn", digits.input_shape, 10, "square", hidden=(16,))
    snn.fit(model, digits.x_train, digits.y_train, epochs=4)
    return model


def test_diagonals_of_a_cnn_are_skipped_by_ckks(small_cnn, digits):
    pytest.importorskip("tenseal", reason="ckks needs tenseal: pip install secureinfer[ckks]")
    result = snn.prune(small_cnn, "ckks", sparsity=0.4, max_drop=100.0, data=digits,
                       steps=1, epochs=2)  # the budget is tested elsewhere
    assert result.meta["unit"] == "diagonals" and result.meta["units_from"] == "plan"
    assert result.meta["pruned"] > 0
    sm = secureinfer.compile(result.model, "ckks?packing=single")
    assert sm.plan["units_skipped"] > 0


def test_shape_diagonals_without_a_scheme(small_cnn, digits):
    result = snn.prune(small_cnn, unit="diagonals", sparsity=0.4, max_drop=5.0, data=digits,
                       steps=1, epochs=2)
    conv = result.model.conv1.weight.detach()
    zero_taps = int((conv.abs().sum(dim=(0, 1)) == 0).sum())
    assert result.meta["units_from"] == "weights" and result.meta["pruned"] > 0
    assert zero_taps >= 1  # whole kernel offsets, across every channel pair


def test_magnitude_prune_zeroes_each_layers_fraction(mlp, digits):
    result = snn.magnitude_prune(mlp, 0.75, data=digits, layer_sparsity={"fc2": 0.5})
    fc1, fc2 = result.model.fc1.weight.detach(), result.model.fc2.weight.detach()
    assert abs(float((fc1 == 0).float().mean()) - 0.75) < 0.01
    assert abs(float((fc2 == 0).float().mean()) - 0.5) < 0.01
    kept = mlp.fc1.weight.detach()[fc1 != 0].abs()
    assert float(kept.min()) >= float(mlp.fc1.weight.detach()[fc1 == 0].abs().max())
    assert float(mlp.fc1.weight.detach().abs().sum()) > 0 and (mlp.fc1.weight != 0).all()
    with pytest.raises(ConfigError, match="layer_sparsity names conv9.*valid: fc1, fc2"):
        snn.magnitude_prune(mlp, 0.5, data=digits, layer_sparsity={"conv9": 0.5})


def test_bad_arguments_say_what_is_valid(mlp, digits):
    with pytest.raises(ConfigError, match=r"sparsity=1.5 must be in \[0, 1\)"):
        snn.prune(mlp, "fe-ip", sparsity=1.5, data=digits)
    with pytest.raises(ConfigError, match="max_drop"):
        snn.prune(mlp, "fe-ip", max_drop=-1, data=digits)
    with pytest.raises(ConfigError, match="declares no pruning unit"):
        snn.prune(mlp, "clear", data=digits)
    with pytest.raises(ConfigError, match="unknown pruning unit 'tiles'"):
        snn.prune(mlp, unit="tiles", data=digits)
    with pytest.raises(ConfigError, match="layer_sparsity names conv9.*valid: fc1, fc2"):
        snn.prune(mlp, "fe-ip", layer_sparsity={"conv9": 0.5}, data=digits)
    with pytest.raises(ConfigError, match=r"layer_sparsity\['fc1'\]=1.0 must be in"):
        snn.prune(mlp, "fe-ip", layer_sparsity={"fc1": 1.0}, data=digits)


def test_cli_prune(mlp, digits, tmp_path, capsys):
    from secureinfer.cli import main

    src, out = tmp_path / "m.npz", tmp_path / "p.npz"
    snn.save(mlp, src)
    assert main(["prune", "--model", str(src), "--scheme", "fe-ip", "--sparsity", "0.25",
                 "--max-drop", "0", "--out", str(out)]) == 0
    assert "pruned 0 of 32 rows" in capsys.readouterr().out
    again = snn.load(out)
    for a, b in zip(mlp.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert main(["prune", "--model", str(src), "--scheme", "fe-ip", "--sparsity", "2",
                 "--out", str(out)]) == 2
    assert "sparsity=2.0" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--scheme", "fe-ip", "--layer-sparsity",
                 "fc1", "--out", str(out)]) == 2
    assert "'fc1' is not NAME=FRACTION" in capsys.readouterr().err
