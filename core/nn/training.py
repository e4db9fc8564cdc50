"""Training: plain, distilled from a ReLU teacher, and with the gradual ReLU -> polynomial
schedule; range control on every polynomial activation.

``fit`` is the loop; ``train`` is the recipe behind ``secureinfer train`` and the default
models: build (or convert a ReLU teacher), fit, calibrate, report quantized accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..data import load as load_dataset
from ..errors import ConfigError, SecureInferError
from .activations import PolyAct
from .arch import ACTIVATIONS, build, default_hidden
from .convert import make_he_friendly
from .ranges import RangeRegularizer, calibrate

__all__ = ["DEFAULTS", "TrainResult", "TrainingDiverged", "accuracy", "fit", "train"]

DEFAULTS: dict[str, Any] = {
    "epochs": 30, "lr": 0.01, "batch_size": 64, "temperature": 4.0, "soft_weight": 0.7,
    "range_weight": 1.0, "gradual_fraction": 0.6, "weight_decay": 0.0,
}
"""The training recipe's hyper-parameters (see ``fit``)."""

INPUT_RANGE = (0.0, 1.0)
"""Declared input domain of every ``secureinfer.data`` dataset (images scaled to [0, 1])."""


class TrainingDiverged(SecureInferError, RuntimeError):
    """The loss became NaN or infinite; the message names the activation with the largest
    input and what to change."""


def _tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def accuracy(model: nn.Module, x: Any, y: Any, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in eval mode, without gradients."""
    x, y = _tensor(x), _tensor(y, torch.int64)
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size])
            correct += int((logits.argmax(1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def _distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor,
                  temperature: float, soft_weight: float) -> torch.Tensor:
    """Hinton et al.: ``w * T^2 * KL(teacher_T || student_T) + (1 - w) * CE(labels)``."""
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(logits, y)
    return soft_weight * temperature**2 * soft + (1.0 - soft_weight) * hard


def _task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher: nn.Module | None,
               temperature: float, soft_weight: float) -> torch.Tensor:
    logits = model(x)
    if teacher is None:
        return F.cross_entropy(logits, y)
    with torch.no_grad():
        t_logits = teacher(x)
    return _distill_loss(logits, t_logits, y, temperature, soft_weight)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _set_blend(polys: list[PolyAct], value: float) -> None:
    for m in polys:
        m.blend = value


def _diverged(epoch: int, loss: float, reg: RangeRegularizer) -> TrainingDiverged:
    peak = max(reg.peaks.items(), key=lambda kv: kv[1], default=None)
    where = (f"; the largest activation input was {peak[1]:.3g} at layer {peak[0]}"
             if peak else "")
    return TrainingDiverged(
        f"training diverged at epoch {epoch}: loss {loss}{where}. Polynomial activations "
        "explode outside their range: keep range control on (range_weight > 0), lower the "
        "learning rate, or use fewer activation layers")


def fit(model: nn.Module, x: Any, y: Any, *, epochs: int = DEFAULTS["epochs"],
        lr: float = DEFAULTS["lr"], batch_size: int = DEFAULTS["batch_size"], seed: int = 0,
        teacher: nn.Module | None = None, temperature: float = DEFAULTS["temperature"],
        soft_weight: float = DEFAULTS["soft_weight"], gradual: bool = False,
        gradual_fraction: float = DEFAULTS["gradual_fraction"],
        range_weight: float = DEFAULTS["range_weight"],
        weight_decay: float = DEFAULTS["weight_decay"], threads: int | None = 1,
        progress: bool = False, desc: str = "train") -> list[dict[str, float]]:
    """Train ``model`` in place with Adam and a cosine learning-rate decay.

    Args:
        model: the network to train.
        x, y: training inputs ``(n, ...)`` and integer labels.
        epochs, lr, batch_size: the usual; batches are shuffled by a generator seeded with
            ``seed``, so a run is reproducible.
        teacher: when given, knowledge distillation: the loss is ``soft_weight`` times the
            KL divergence to the teacher's soft targets at ``temperature`` (times T^2) plus
            ``1 - soft_weight`` times cross-entropy on the labels.
        gradual: blend every ``PolyAct`` from ReLU (``blend=0``) to its polynomial
            (``blend=1``) linearly over the first ``gradual_fraction`` of the steps; only the
            polynomial is left for the rest, and at the end.
        range_weight: weight of the ``RangeRegularizer`` penalty (0 turns range control off).
        weight_decay: Adam's L2 weight decay.
        threads: torch threads while training (restored after). Networks this small train
            several times faster on one thread than on several busy cores; ``None`` keeps
            torch's setting.
        progress: show a tqdm bar (stderr).
        desc: the bar's label.

    Returns:
        Per epoch: ``loss`` (task loss), ``penalty`` (range penalty) and ``peak`` (largest
        activation input).

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
    """
    from tqdm.auto import tqdm

    x, y = _tensor(x), _tensor(y, torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    polys = [m for m in model.modules() if isinstance(m, PolyAct)]
    ramp = max(1, int(total * gradual_fraction))
    if teacher is not None:
        teacher.eval()
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    with _torch_threads(threads), RangeRegularizer(model, range_weight) as reg, \
            tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(x), generator=gen)
            sums = np.zeros(3)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                if gradual:
                    _set_blend(polys, min(1.0, step / ramp))
                task = _task_loss(model, x[idx], y[idx], teacher, temperature, soft_weight)
                penalty = reg.penalty()
                loss = task + penalty if range_weight > 0 else task
                if not torch.isfinite(loss):
                    raise _diverged(epoch, loss.item(), reg)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                sums += (task.item(), penalty.item(), max(reg.peaks.values(), default=0.0))
            history.append({k: float(v) for k, v in
                            zip(("loss", "penalty", "peak"), sums / steps_per_epoch)})
            bar.set_postfix(epoch=epoch, loss=f"{history[-1]['loss']:.4f}", refresh=False)
    if gradual:
        _set_blend(polys, 1.0)
    model.eval()
    return history


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained network (``secureinfer_meta``, ``secureinfer_calibration`` and
            ``secureinfer_input_shape`` set when it has polynomial activations).
        meta: the JSON-able record saved with the model (also ``model.secureinfer_meta``).
        teacher: the ReLU teacher, when distilled.
    """

    model: nn.Module
    meta: dict[str, Any]
    teacher: nn.Module | None = field(default=None, repr=False)


def _teacher(spec: str | nn.Module, data: Dataset, arch: str, hidden: tuple[int, ...],
             norm: bool, seed: int, epochs: int, lr: float, progress: bool) -> nn.Module:
    """The ReLU teacher: trained here (``"relu"``), read from a model file, or given."""
    if isinstance(spec, nn.Module):
        return spec.eval()
    if spec == "relu":
        torch.manual_seed(seed)
        teacher = build(arch, data.input_shape, data.num_classes, "relu", hidden=hidden,
                        norm=norm)
        fit(teacher, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed,
            progress=progress, desc="teacher relu")
        return teacher
    from .modelfile import load

    teacher = load(spec)
    if tuple(teacher.secureinfer_input_shape) != data.input_shape:
        raise ConfigError(f"teacher {spec} takes inputs of shape "
                          f"{tuple(teacher.secureinfer_input_shape)}, dataset {data.name} has "
                          f"{data.input_shape}")
    return teacher


def _check_combination(activation: str, distill_from: object, gradual: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if distill_from is not None and activation == "relu":
        raise ConfigError("distillation trains a polynomial student: use activation poly or "
                         "square with distill_from")
    if gradual and (distill_from is None or activation != "poly"):
        raise ConfigError("the gradual schedule blends a ReLU teacher's activations into "
                         "PolyAct: it needs activation poly and distill_from")


def train(dataset: str | Dataset = "digits", arch: str = "mlp", activation: str = "poly", *,
          distill_from: str | nn.Module | None = None, gradual: bool = False,
          epochs: int | None = None, seed: int = 0, hidden: Sequence[int] | None = None,
          degree: int = 2, lr: float = DEFAULTS["lr"],
          range_weight: float = DEFAULTS["range_weight"], norm: bool | None = None,
          quant_bits: Sequence[int] = (4, 6, 8, 10, 12), progress: bool = False) -> TrainResult:
    """Train an HE-friendly network on ``dataset``: the whole recipe.

    Without ``distill_from`` the network is trained from scratch. With it, the ReLU teacher
    is converted by ``make_he_friendly`` (each polynomial fitted where its input lies on the
    training set) and fine-tuned by distillation at half the learning rate, gradually if
    ``gradual``. Polynomial models are then calibrated on the training set (input range
    ``[0, 1]``) and their quantized accuracy is reported in ``meta["quantization"]``.

    Args:
        dataset: a ``secureinfer.data`` name or a loaded ``Dataset``.
        arch: ``mlp`` or ``cnn`` (see ``secureinfer.nn.arch``).
        activation: ``relu``, ``square`` or ``poly``.
        distill_from: ``"relu"`` (a ReLU teacher of the same arch, trained here with the
            same seed and epochs), a model file path, or a teacher module.
        gradual: blend each ReLU into its polynomial over training (``fit``).
        epochs: training epochs (of the teacher too); ``DEFAULTS["epochs"]`` if ``None``.
        seed: seeds the initialisation and the batch order; a run is reproducible.
        hidden: hidden Linear widths (``secureinfer.nn.arch.default_hidden``).
        degree: ``poly`` degree.
        lr: Adam learning rate.
        range_weight: weight of the range regulariser (0 turns it off).
        norm: a BatchNorm before every activation, the other half of range control
            (folded into the layer before it at compile time, so free under encryption);
            ``None`` turns it on for more than two activation layers, which without it
            tend to diverge.
        quant_bits: bit widths of the quantization report.
        progress: tqdm progress bars on stderr.

    Raises:
        ValueError: an invalid combination (e.g. ``gradual`` without a teacher).
        ConfigError: an unknown dataset, or an unreadable or mismatched teacher file.
        TrainingDiverged: the loss became NaN or infinite.
    """
    from .quantization import quantization_meta

    _check_combination(activation, distill_from, gradual)
    data = load_dataset(dataset) if isinstance(dataset, str) else dataset
    hidden = tuple(hidden) if hidden is not None else default_hidden(arch)
    norm = len(hidden) + (arch == "cnn") > 2 if norm is None else norm
    epochs = DEFAULTS["epochs"] if epochs is None else int(epochs)
    degree = 2 if activation == "square" else degree
    started = time.perf_counter()
    teacher = None
    if distill_from is None:
        torch.manual_seed(seed)
        model = build(arch, data.input_shape, data.num_classes, activation, hidden=hidden,
                      degree=degree, norm=norm)
        fit(model, data.x_train, data.y_train, epochs=epochs, lr=lr, seed=seed,
            range_weight=range_weight, progress=progress, desc=f"{arch} {activation}")
    else:
        teacher = _teacher(distill_from, data, arch, hidden, norm, seed, epochs, lr, progress)
        model = make_he_friendly(teacher, activation, degree=degree,
                                 data=_tensor(data.x_train), blend=0.0 if gradual else 1.0)
        fit(model, data.x_train, data.y_train, epochs=epochs, lr=lr / 2, seed=seed,
            teacher=teacher, gradual=gradual, range_weight=range_weight, progress=progress,
            desc=f"{arch} {activation} distill")
    recorded = getattr(teacher, "secureinfer_meta", None) or {}
    meta: dict[str, Any] = {
        "dataset": data.name, "arch": recorded.get("arch", arch), "activation": activation,
        "degree": degree, "hidden": recorded.get("hidden", list(hidden)),
        "norm": recorded.get("norm", norm), "epochs": epochs, "seed": seed, "lr": lr,
        "range_weight": range_weight,
        "distill_from": None if distill_from is None else (
            distill_from if isinstance(distill_from, str) else type(distill_from).__name__),
        "gradual": gradual,
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "teacher_accuracy": (accuracy(teacher, data.x_test, data.y_test)
                             if teacher is not None else None),
    }
    model.secureinfer_input_shape = data.input_shape
    if activation != "relu":
        calibrate(model, data.x_train, data.input_shape, input_range=INPUT_RANGE)
        meta["quantization"] = quantization_meta(model, data, quant_bits)
    meta["train_seconds"] = round(time.perf_counter() - started, 3)
    model.secureinfer_meta = meta
    return TrainResult(model, meta, teacher)
