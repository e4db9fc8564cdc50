"""Run one scheme on a dataset and measure it the same way for every scheme.

``run()`` is what ``secureinfer run`` and each scheme of ``secureinfer bench`` execute: it
compiles the model, sets up the roles, encrypts, evaluates and decrypts the test samples,
and returns the report dict (every field documented in ``REPORT_FIELDS``).
"""

from __future__ import annotations

import math
import platform
import sys
from typing import Any

import numpy as np

from . import __version__
from .data import Dataset, load
from .layers import LayerSpec
from .metrics import peak_rss_mb
from .model import SecureModel, compile_layers
from .scheme import Calibration

__all__ = ["REPORT_FIELDS", "load_network", "run"]

REPORT_FIELDS = {
    "scheme": "scheme name",
    "config": "the config string as given",
    "backend": "library the scheme runs on",
    "backend_version": "its version",
    "security_bits": "security level of the planned parameters (null: no encryption)",
    "insecure": "true when the parameters are below 128 bits (allow_insecure)",
    "security_source": "how security_bits was obtained: the standard's table row or the "
                       "estimate used (null: no encryption)",
    "output": "encrypted (HE), plaintext (FE) or clear (no encryption: the reference)",
    "dataset": "dataset name",
    "model": "model file, or the default model's name",
    "samples": "test samples run",
    "accuracy": "accuracy of the secure pipeline",
    "clear_accuracy": "accuracy of the float model on the same samples",
    "agreement": "fraction of samples whose argmax equals the float model's",
    "max_abs_error": "largest |logit - float logit|",
    "reference_max_abs_error": "largest |logit - scheme reference| (0 for exact schemes)",
    "secure_layers": "layers run under the scheme",
    "clear_layers": "layers run in the clear by the server",
    "reveals": "what the server learns in plaintext: null under HE (nothing), the prefix "
               "outputs under FE, everything for clear",
    "plan": "the scheme's chosen parameters (all of them; human output summarizes them)",
    "batch_size": "inputs per encrypted message",
    "latency_s": "keygen once; encrypt, evaluate, decrypt per sample (median)",
    "throughput_per_s": "samples per second through encrypt + evaluate + decrypt",
    "bytes": "input and output per sample; public and functional keys (raw byte counts)",
    "peak_rss_mb": "peak resident memory of the process",
}


def load_network(model: Any, dataset: Dataset, *, arch: str = "mlp",
                 progress: bool = True) -> tuple[list[LayerSpec], Calibration, str]:
    """Layers, calibration and a display name for ``model``.

    ``model`` is ``None`` (the default model of the dataset, trained on first use), a path
    to a secureinfer model file, a torch module, or a list of LayerSpecs.
    """
    from .compiler import lower

    if isinstance(model, list):
        layers, name = model, "layers"
        module = None
    else:
        if model is None:
            from .nn.zoo import default_model

            module = default_model(dataset, arch, progress=progress)
            name = f"default-{arch}"
        elif isinstance(model, str):
            from .nn import load as load_model

            module, name = load_model(model), model
        else:
            module, name = model, type(model).__name__
        shape = getattr(module, "secureinfer_input_shape", None) or dataset.input_shape
        if tuple(shape) != dataset.input_shape:
            from .errors import ConfigError

            raise ConfigError(f"model {name} takes inputs of shape {tuple(shape)} but dataset "
                              f"{dataset.name} has {dataset.input_shape}")
        layers = lower(module, dataset.input_shape)
    calib = getattr(module, "secureinfer_calibration", None) if module is not None else None
    if calib is None:
        calib = Calibration.from_data(layers, dataset.x_train)
    elif calib.samples is None:
        calib.samples = np.asarray(dataset.x_train[:256], dtype=np.float64)
    return layers, calib, name


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def run(config: str, *, model: Any = None, dataset: str | Dataset = "digits",
        limit: int | None = None, allow_insecure: bool = False, progress: bool = True,
        arch: str = "mlp") -> dict[str, Any]:
    """Private inference of ``dataset``'s test samples under ``config``; the report dict.

    Args:
        config: scheme config string.
        model: see ``load_network``.
        dataset: a dataset name (``digits``, ``digits28``, ``npz:PATH``) or a ``Dataset``.
        limit: run only the first ``limit`` test samples (at least 1; ``None``: all).
        allow_insecure: accept parameters below 128-bit security.
        progress: show progress bars on stderr.
        arch: architecture of the default model when ``model`` is None.
    """
    from tqdm.auto import tqdm

    from .errors import ConfigError
    from .registry import resolve

    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} is not a sample count: give at least 1, or None "
                          "for every test sample")
    scheme = resolve(config, allow_insecure=allow_insecure)  # config errors before any work
    reason = scheme.availability()
    if reason:
        from .errors import BackendNotInstalledError

        raise BackendNotInstalledError(f"scheme {scheme.name}: {reason}")
    ds = load(dataset) if isinstance(dataset, str) else dataset
    layers, calib, model_name = load_network(model, ds, arch=arch, progress=progress)
    sm = compile_layers(layers, scheme, calibration=calib)
    x = np.asarray(ds.x_test[:limit], dtype=np.float64)
    y = ds.y_test[: len(x)]
    client, server, _ = sm.setup()
    outs = []
    batch = max(1, int(sm.scheme.batch_size()))
    with tqdm(total=len(x), desc=f"{sm.scheme.name}", unit="img", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for sl in _batches(len(x), batch):
            outs.append(client.decrypt(server.evaluate(client.encrypt(x[sl]))))
            bar.update(sl.stop - sl.start)
    logits = np.concatenate(outs)
    return report(sm, config, ds.name, model_name, x, y, logits)


def report(sm: SecureModel, config: str, dataset: str, model_name: str, x: np.ndarray,
           y: np.ndarray, logits: np.ndarray) -> dict[str, Any]:
    """The report dict of a finished run (see ``REPORT_FIELDS``)."""
    clear = sm.predict_clear(x)
    ref = sm.reference(x)
    meter = sm.meter
    scheme = sm.scheme
    busy = sum(meter.total(p) for p in ("encrypt", "evaluate", "decrypt"))

    def lat(phase: str) -> float | None:
        v = meter.per_sample_latency(phase)
        return None if v is None else round(v, 6)

    return {
        "scheme": scheme.name,
        "config": config,
        "backend": scheme.backend,
        "backend_version": scheme.backend_version(),
        "security_bits": scheme.security_bits,
        "insecure": scheme.security_bits is not None and scheme.security_bits < 128,
        "security_source": scheme.security_source,
        "output": sm.output,
        "dataset": dataset,
        "model": model_name,
        "samples": int(len(x)),
        "accuracy": float((logits.argmax(1) == y).mean()),
        "clear_accuracy": float((clear.argmax(1) == y).mean()),
        "agreement": float((logits.argmax(1) == clear.argmax(1)).mean()),
        "max_abs_error": float(np.abs(logits - clear).max()),
        "reference_max_abs_error": float(np.abs(logits - ref).max()),
        "secure_layers": [l.describe() for l in sm.secure_layers],
        "clear_layers": [l.describe() for l in sm.clear_layers],
        "reveals": sm.reveals,
        "plan": sm.plan,
        "batch_size": int(scheme.batch_size()),
        "latency_s": {"keygen": lat("keygen"), "encrypt": lat("encrypt"),
                      "evaluate": lat("evaluate"), "decrypt": lat("decrypt")},
        "throughput_per_s": round(len(x) / busy, 3) if busy > 0 else math.inf,
        "bytes": {"input": meter.per_sample_bytes("input"),
                  "output": meter.per_sample_bytes("output"),
                  "public_keys": meter.per_sample_bytes("public_keys"),
                  "functional_keys": meter.per_sample_bytes("functional_keys")},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "secureinfer_version": __version__,
        "python": platform.python_version(),
    }
