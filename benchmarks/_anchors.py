"""The anchors of ``bench_ckks.py --networks``: Orion 1.0.2 (Lattigo) and HElayers 1.5.5
(SEAL), run in their own venv (``--anchors-python``), never a runtime dependency.

``python _anchors.py --child {orion,helayers} NETWORK WEIGHTS.npz RUNS`` prints one JSON
line: evaluate median, compile + keygen time, peak RSS, max error against torch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cnn  # noqa: E402


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _stub_torchvision() -> None:
    """Orion's ``orion.core.utils`` imports torchvision for dataset downloads only; the
    torchvision wheel does not match the CPU torch here, so give it an empty module."""
    tv = types.ModuleType("torchvision")
    for sub in ("datasets", "transforms"):
        mod = types.ModuleType(f"torchvision.{sub}")
        setattr(tv, sub, mod)
        sys.modules[f"torchvision.{sub}"] = mod
    sys.modules["torchvision"] = tv


def _torch_index_shim() -> None:
    """Orion indexes scipy sparse matrices with torch tensors, which scipy 1.17 refuses;
    hand scipy numpy arrays instead (benchmark-side compatibility only)."""
    from scipy.sparse import _index, _lil

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return tuple(conv(k) for k in v)
        return v.numpy() if isinstance(v, torch.Tensor) else v

    for cls in (_index.IndexMixin, _lil._lil_base):
        get, put = cls.__getitem__, cls.__setitem__
        cls.__getitem__ = (lambda g: lambda self, key: g(self, conv(key)))(get)
        cls.__setitem__ = (lambda p: lambda self, key, value: p(self, conv(key),
                                                                conv(value)))(put)


def _depth(net: nn.Sequential) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear, nn.AvgPool2d)) or
               type(m).__name__ == "Square" for m in net)


def run_orion(name: str, net: nn.Sequential, shape: tuple[int, ...], x: np.ndarray,
              calib: np.ndarray, runs: int) -> dict[str, Any]:
    _stub_torchvision()
    _torch_index_shim()
    import orion
    import orion.nn as on
    from torch.utils.data import DataLoader, TensorDataset

    class Net(on.Module):
        def __init__(self) -> None:
            super().__init__()
            mods = []
            for m in net:
                if isinstance(m, nn.Conv2d):
                    o = on.Conv2d(m.in_channels, m.out_channels, m.kernel_size[0],
                                  stride=m.stride[0], padding=m.padding[0])
                    o.weight.data.copy_(m.weight.data)
                    o.bias.data.copy_(m.bias.data)
                elif isinstance(m, nn.Linear):
                    o = on.Linear(m.in_features, m.out_features)
                    o.weight.data.copy_(m.weight.data)
                    o.bias.data.copy_(m.bias.data)
                elif isinstance(m, nn.AvgPool2d):
                    o = on.AvgPool2d(m.kernel_size, m.stride)
                elif isinstance(m, nn.Flatten):
                    o = on.Flatten()
                else:
                    o = on.Quad()
                mods.append(o)
            self.layers = nn.ModuleList(mods)

        def forward(self, v: Any) -> Any:
            for m in self.layers:
                v = m(v)
            return v

    levels = _depth(net)  # the figures: LogN 13, [29, 26x5] for the small networks
    logn = 13 if levels <= 5 else 14 if levels <= 13 else 15
    config = {"ckks_params": {"LogN": logn, "LogQ": [29] + [26] * levels, "LogP": [29, 29],
                              "LogScale": 26, "H": 192, "RingType": "ConjugateInvariant"},
              "orion": {"margin": 2, "embedding_method": "hybrid", "backend": "lattigo",
                        "fuse_modules": True, "debug": False}}
    orion.init_scheme(config)
    model = Net()
    model.eval()
    start = time.perf_counter()
    loader = DataLoader(TensorDataset(torch.tensor(calib, dtype=torch.float32)), batch_size=1)
    orion.fit(model, loader)
    level = orion.compile(model)
    compile_s = time.perf_counter() - start
    inp = torch.tensor(x, dtype=torch.float32)
    ctxt = orion.encrypt(orion.encode(inp, level))
    model.he()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = model(ctxt)
        times.append(time.perf_counter() - start)
    y = out.decrypt().decode().detach().numpy().reshape(1, -1)
    return {"compile_s": compile_s, "times": times, "y": y,
            "params": f"LogN {logn}, LogQ [29, 26x{levels}], LogP [29, 29], ConjugateInvariant"}


def run_helayers(name: str, net: nn.Sequential, shape: tuple[int, ...], x: np.ndarray,
                 calib: np.ndarray, runs: int) -> dict[str, Any]:
    import pyhelayers

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.onnx")
        torch.onnx.export(net, torch.tensor(x, dtype=torch.float32), path,
                          input_names=["input"], output_names=["output"], dynamo=False)
        start = time.perf_counter()
        plain = pyhelayers.NeuralNetPlain()
        hyper = pyhelayers.PlainModelHyperParams()
        plain.init_from_files(hyper, [path])
        reqs = pyhelayers.HeRunRequirements()
        reqs.set_he_context_options([pyhelayers.SealCkksContext()])
        reqs.optimize_for_batch_size(1)
        reqs.set_model_encrypted(False)
        reqs.set_security_level(128)
        profile = pyhelayers.HeModel.compile(plain, reqs)
        ctx = pyhelayers.HeModel.create_context(profile)
        model = pyhelayers.NeuralNet(ctx)
        model.encode(plain, profile)
        compile_s = time.perf_counter() - start
    io = pyhelayers.ModelIoEncoder(model)
    enc = pyhelayers.EncryptedData(ctx)
    io.encode_encrypt(enc, [x.astype(np.float32)])
    times = []
    for _ in range(runs):
        out = pyhelayers.EncryptedData(ctx)
        start = time.perf_counter()
        model.predict(out, enc)
        times.append(time.perf_counter() - start)
    y = np.asarray(io.decrypt_decode_output(out)).reshape(1, -1)
    return {"compile_s": compile_s, "times": times, "y": y, "params": "HElayers optimizer"}


def main(argv: list[str]) -> None:
    assert argv[0] == "--child"
    system, name, weights, runs = argv[1], argv[2], argv[3], int(argv[4])
    torch.set_num_threads(1)
    net, shape = _cnn.build(name)
    net.load_state_dict({k: torch.tensor(v) for k, v in np.load(weights).items()})
    rng = np.random.default_rng(1)
    calib = rng.random((32, *shape))
    x = rng.random((1, *shape))
    fn = {"orion": run_orion, "helayers": run_helayers}[system]
    r = fn(name, net, shape, x, calib, runs)
    ref = net(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    print(json.dumps({"system": system, "network": name,
                      "evaluate_s": statistics.median(r["times"]),
                      "compile_s": r["compile_s"], "peak_rss_gb": _rss_gb(),
                      "max_abs_error": float(np.abs(r["y"] - ref).max()),
                      "params": r["params"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
