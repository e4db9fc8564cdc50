"""secureinfer.nn training: reproducibility, distillation, the gradual schedule, range control."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="secureinfer.nn needs torch")
import secureinfer
from secureinfer.nn import (
    PolyAct,
    RangeRegularizer,
    TrainingDiverged,
    accuracy,
    build,
    fit,
    make_he_friendly,
    train,
)
from torch import nn


def _state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_training_is_reproducible_for_a_fixed_seed(digits):
    a = train(digits, "mlp", "poly", epochs=2, seed=3, quant_bits=(8,))
    b = train(digits, "mlp", "poly", epochs=2, seed=3, quant_bits=(8,))
    c = train(digits, "mlp", "poly", epochs=2, seed=4, quant_bits=(8,))
    sa, sb, sc = _state(a.model), _state(b.model), _state(c.model)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert a.meta["test_accuracy"] == b.meta["test_accuracy"]
    assert a.model.secureinfer_calibration.layer_ranges == b.model.secureinfer_calibration.layer_ranges
    assert not all(np.array_equal(sa[k], sc[k]) for k in sa)


def test_distilled_poly_mlp_is_within_one_point_of_its_relu_teacher(digits):
    # The 3-seed version of this check (mlp and cnn) is benchmarks/nn_accuracy.py.
    result = train(digits, "mlp", "poly", distill_from="relu", seed=0, quant_bits=(8,))
    teacher_acc = result.meta["teacher_accuracy"]
    assert teacher_acc > 0.95
    assert result.meta["test_accuracy"] >= teacher_acc - 0.01
    assert accuracy(result.teacher, digits.x_test, digits.y_test) == teacher_acc
    assert not any(isinstance(m, nn.ReLU) for m in result.model.modules())
    # 8-bit integers (the BFV / FE reference) lose at most half a point.
    q8 = result.meta["quantization"]["report"][0]
    assert q8["bits"] == 8 and q8["accuracy"] >= result.meta["test_accuracy"] - 0.005


def test_gradual_schedule_ends_purely_polynomial(digits):
    torch.manual_seed(0)
    teacher = build("mlp", digits.input_shape, 10, "relu")
    fit(teacher, digits.x_train, digits.y_train, epochs=3)
    student = make_he_friendly(teacher, "poly", data=torch.as_tensor(digits.x_train), blend=0.0)
    x = torch.as_tensor(digits.x_test[:64])
    assert torch.allclose(student(x), teacher(x), atol=1e-5)  # starts as the teacher
    seen: list[float] = []
    act = student.act1
    act.register_forward_pre_hook(lambda m, a: seen.append(m.blend) if m.training else None)
    fit(student, digits.x_train, digits.y_train, epochs=3, teacher=teacher, gradual=True,
        gradual_fraction=0.5)
    assert seen[0] == 0.0 and 0.0 < seen[len(seen) // 4] < 1.0
    assert seen[-1] == 1.0 and act.blend == 1.0  # only the polynomial is left
    secureinfer.compile(student, "clear", input_shape=digits.input_shape)


def test_gradual_needs_a_teacher(digits):
    with pytest.raises(ValueError, match="distill_from"):
        train(digits, "mlp", "poly", gradual=True)
    with pytest.raises(ValueError, match="polynomial student"):
        train(digits, "mlp", "relu", distill_from="relu")


def _deep(norm: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("mlp", (1, 8, 8), 10, "poly", hidden=(64,) * 6, norm=norm)


def test_deep_polynomial_network_diverges_without_range_control(digits):
    # Six PolyAct layers (degree 2**6 = 64 overall) at a brisk learning rate.
    model = _deep(norm=False)
    try:
        history = fit(model, digits.x_train, digits.y_train, epochs=5, lr=0.05,
                      range_weight=0.0)
    except TrainingDiverged as exc:  # NaN or infinite loss: what the error must say
        assert "range" in str(exc) and "act" in str(exc)
        return
    peak = max(h["peak"] for h in history)
    assert peak > 1e4  # activation inputs 2500x past the declared range of +-4
    assert accuracy(model, digits.x_test, digits.y_test) < 0.3


def test_deep_polynomial_network_trains_with_range_control(digits):
    model = _deep(norm=True)
    history = fit(model, digits.x_train, digits.y_train, epochs=5, lr=0.05, range_weight=1.0)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < 0.5
    assert max(h["peak"] for h in history) < 16  # within 4x the declared range
    assert accuracy(model, digits.x_test, digits.y_test) > 0.85
    secureinfer.compile(model, "clear", input_shape=(1, 8, 8))  # BatchNorm folds away


def test_range_regularizer_pulls_activation_inputs_into_range():
    torch.manual_seed(0)
    x = torch.rand(512, 6)
    y = (x.sum(1) > 3).long()

    def outside_after_training(weight: float) -> float:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), PolyAct(2, input_range=(-1, 1)),
                              nn.Linear(16, 2))
        with torch.no_grad():
            model[0].weight.mul_(8)  # 65% of the inputs start outside [-1, 1]
        fit(model, x, y, epochs=20, lr=0.05, range_weight=weight)
        with torch.no_grad():
            return float((model[0](x).abs() > 1).float().mean())

    assert outside_after_training(10.0) < 0.25
    assert outside_after_training(0.0) > 0.5


def test_range_regularizer_penalty_is_zero_inside_the_range():
    act = PolyAct(2, input_range=(-2, 3))
    model = nn.Sequential(act)
    with RangeRegularizer(model, weight=2.0) as reg:
        model(torch.tensor([[-2.0, 0.0, 3.0]]))
        assert float(reg.penalty()) == 0.0
        model(torch.tensor([[5.5, 0.0]]))  # 2.5 past hi; half-width 2.5 -> (1)^2 / 2 elements
        assert float(reg.penalty()) == pytest.approx(2.0 * 0.5)
        model.eval()
        model(torch.tensor([[100.0]]))  # not training: not penalised
        assert float(reg.penalty()) == 0.0
    assert not act._forward_pre_hooks  # hooks removed
