"""The ``lenet5`` and ``alexnet`` architectures and MedMNIST-style archives at 28 and 64."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="secureinfer.nn needs torch")

import secureinfer  # noqa: E402
from secureinfer import data  # noqa: E402
from secureinfer.compiler import lower  # noqa: E402
from secureinfer.layers import AvgPool2d, Conv2d, Linear, Poly  # noqa: E402
from secureinfer.nn.activations import PolyAct, relu_fit  # noqa: E402
from secureinfer.nn.arch import ARCHS, build, conv_activations, default_hidden  # noqa: E402
from secureinfer.nn.training import train  # noqa: E402


def _medmnist(path, side: int, n: int = 40, classes: int = 3, seed: int = 0) -> None:
    """A MedMNIST-style archive: uint8 (n, side, side) images, (n, 1) labels, val split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", n), ("val", n // 4), ("test", n // 2)):
        labels = rng.integers(0, classes, (count, 1))
        images = rng.integers(0, 40, (count, side, side)).astype(np.uint8)
        for i, c in enumerate(labels[:, 0]):  # a learnable bright band per class
            images[i, c * side // classes:(c + 1) * side // classes] += 200
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)


@pytest.mark.parametrize("side", [28, 64])
def test_medmnist_archive_at_28_and_64(tmp_path, side: int) -> None:
    _medmnist(tmp_path / "m.npz", side)
    ds = data.load(f"npz:{tmp_path / 'm.npz'}")
    assert ds.input_shape == (1, side, side)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() <= ds.x_train.max() <= 1.0
    assert len(ds.x_train) == 40 and len(ds.x_test) == 20
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 3


def test_lenet5_is_lenet5() -> None:
    assert "lenet5" in ARCHS and default_hidden("lenet5") == (120, 84)
    model = build("lenet5", (1, 28, 28), 10, "square")
    layers = lower(model, (1, 28, 28))
    convs = [s for s in layers if isinstance(s, Conv2d)]
    assert [c.weight.shape for c in convs] == [(6, 1, 5, 5), (16, 6, 5, 5)]
    assert convs[0].padding == (2, 2) and convs[1].padding == (0, 0)
    assert sum(isinstance(s, AvgPool2d) for s in layers) == 2
    assert [s.weight.shape for s in layers if isinstance(s, Linear)] == [
        (120, 400), (84, 120), (10, 84)]
    assert sum(isinstance(s, Poly) for s in layers) == 4 == conv_activations("lenet5") + 2


def test_alexnet_for_64x64() -> None:
    model = build("alexnet", (1, 64, 64), 7, "poly")
    layers = lower(model, (1, 64, 64))
    assert sum(isinstance(s, Conv2d) for s in layers) == 5
    assert sum(isinstance(s, AvgPool2d) for s in layers) == 3
    dense = [s for s in layers if isinstance(s, Linear)]
    assert 2 <= len(dense) <= 3 and dense[0].weight.shape == (128, 512)
    assert dense[-1].weight.shape[0] == 7
    with pytest.raises(ValueError, match="32x32"):
        build("alexnet", (1, 28, 28), 10)


def test_lenet5_trains_with_poly_and_distillation(tmp_path) -> None:
    _medmnist(tmp_path / "m.npz", 28, n=64)
    result = train(f"npz:{tmp_path / 'm.npz'}", "lenet5", "poly", distill_from="relu",
                   epochs=2)
    assert result.meta["arch"] == "lenet5"
    layers = lower(result.model, (1, 28, 28))
    polys = [s for s in layers if isinstance(s, Poly)]
    assert len(polys) == 4 and all(p.degree == 2 for p in polys)
    x = torch.tensor(data.load(f"npz:{tmp_path / 'm.npz'}").x_test)
    assert torch.isfinite(result.model(x)).all()


def test_lenet5_distilled_on_digits28_is_a_trained_polynomial_network() -> None:
    # The full-size figures (30 epochs, 3 seeds, gap to the teacher) are
    # benchmarks/nn_accuracy.py --distill; this is the recipe on a subset, 3 epochs.
    full = data.load("digits28")
    sub = data.Dataset("digits28-600", full.x_train[:600], full.y_train[:600],
                       full.x_test[:200], full.y_test[:200])
    result = train(sub, "lenet5", "poly", distill_from="relu", epochs=3, quant_bits=(8,))
    teacher_acc, student_acc = result.meta["teacher_accuracy"], result.meta["test_accuracy"]
    assert teacher_acc > 0.85 and student_acc > 0.85  # chance is 0.1
    assert student_acc >= teacher_acc - 0.05
    x = torch.as_tensor(sub.x_test)
    with torch.no_grad():
        student_logits = result.model(x)
        agree = (student_logits.argmax(1) == result.teacher(x).argmax(1)).float().mean()
    assert agree >= 0.9  # the student follows its teacher
    assert not any(isinstance(m, torch.nn.ReLU) for m in result.model.modules())
    polys = [m for m in result.model.modules() if isinstance(m, PolyAct)]
    assert len(polys) == 4 and all(m.blend == 1.0 and m.degree == 2 for m in polys)
    # trainable activations: each moved away from its initial ReLU fit on its range
    for m in polys:
        start = torch.tensor(relu_fit(2, m.input_range))
        assert (m.coeffs.detach().double() - start).abs().max() > 1e-3, m
    sm = secureinfer.compile(result.model, "clear")
    assert sum(isinstance(s, Poly) for s in sm.secure_layers) == 4
    client, server, _ = sm.setup()
    out = client.decrypt(server.evaluate(client.encrypt(sub.x_test[:16])))
    np.testing.assert_allclose(out, student_logits[:16].double().numpy(), atol=1e-4)
