"""Training shared by the benchmark scripts (imported as ``_models`` when a script runs
from ``benchmarks/``): plain Adam on cross-entropy, and the TenSEAL tutorial ConvNet."""

from __future__ import annotations

import torch
from secureinfer import data
from secureinfer.nn.activations import Square
from torch import nn


def fit(model: nn.Module, ds: data.Dataset, epochs: int, lr: float,
        seed: int | None = None) -> nn.Module:
    """Adam (weight decay 1e-4), batches of 64, reseeded first unless ``seed`` is None."""
    if seed is not None:
        torch.manual_seed(seed)
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def train_cnn(ds: data.Dataset, seed: int = 0) -> nn.Module:
    """TenSEAL's tutorial ConvNet on 28x28 digits: conv 1->4 k7 s3, x^2, 256->64, x^2, 64->10."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), Square(), nn.Flatten(),
                          nn.Linear(256, 64), Square(), nn.Linear(64, 10))
    return fit(model, ds, 20, 1e-3, seed)
