"""The ``ckks`` scheme: the whole network on CKKS ciphertexts (SEAL via ``tenseal.sealapi``).

Encrypted output: the client encrypts with its secret key (symmetric CKKS); the server
receives the public context (SEAL's encryption parameters, checked against its own plan),
the relinearization key and the Galois keys of exactly the rotations the compiled model
uses, never a public or secret key; the client decrypts. Every message is bytes: SEAL
objects serialized with SEAL's own compression, inside ``pack_fields`` payloads.

Config keys (``ckks?packing=batch&scale_bits=30``):

* ``packing``: ``single`` (one input per ciphertext, lowest latency: convolution-aware
  channel-interleaved layouts for networks with convolutions, module ``grid``; hybrid
  diagonal matrix products with baby-step giant-step otherwise, module ``search``),
  ``batch`` (CryptoNets-style, input ``j`` of a group in slot ``j`` of one ciphertext per
  feature; no rotations, highest throughput) or ``auto`` (``single`` when every value fits one ciphertext, else ``batch``).
* ``input_shifts`` (default 32): most ciphertexts per input in ``single`` packing. When
  the first layer reads the input itself (a convolution on the grid or the client's
  im2col), the client also encrypts its input rotated by each of that layer's baby steps
  (public shifts of its own data, nothing about the weights) and the server skips those
  rotations, the costliest of the network (top level). ``1``: one ciphertext per input.
* ``block_layouts`` (default true): ``single`` packing may evaluate a dense layer in a
  block layout when it costs fewer rotations; ``false`` keeps the hybrid diagonals, whose
  diagonals ``secureinfer.nn.prune`` zeroes one by one (a block layout has a few coarse
  units: ``units.py``). Prune under ``false``, then compile the pruned model either way.
* ``hoist`` (default true): with grid layouts, each stage's baby-step tree groups the
  babies by parent over the Galois keys the plan has anyway, so that the server splits each
  parent once and derives its babies from the split (hoisted rotations,
  ``secureinfer.plugins.ckks.native``, about 0.6 of a rotation each), and the planner
  prices babies so. ``false``: babies chained, every rotation priced in full (the better
  plan for a server without the native part).
* ``threads`` (default 1): threads of the native part per evaluation; hoisted rotations,
  digit splits and sums of products run side by side (its C functions release the GIL;
  SEAL's own calls hold it and stay on one).
* ``poly_modulus_degree``, ``scale_bits``, ``coeff_mod_bits`` (``"q0,q1,...,special"``):
  override the planner (see ``secureinfer.plugins.ckks.params``).
* ``lazy_rescale`` (``auto``/``off``): a square leaves its rescale to the affine stage after
  it, which divides by one prime of twice the scale; ``auto`` when that keeps the ring
  degree (``Program.with_lazy_squares``).
* ``workers`` (default 1): processes per image; costly stages split their giant steps over
  forked helpers (``secureinfer.plugins.ckks.workers``).
* ``flood_bits``: the server masks and noise-floods every output so that a decryption is
  within statistical distance ``2^-flood_bits`` of one that shows the result only, measured
  against the planner's estimated error bound (``secureinfer.plugins.ckks.flood``); the
  server then also receives the public key. Unset (auto, ``secureinfer.privacy``): 16 when
  the model is compiled for deployment (``deploy=True``, ``secureinfer compile --out``,
  ``load_server``), 0 in one process, where the client holds the model. ``flood_bits=0``
  explicitly: no flooding, even in an artifact.
"""

from __future__ import annotations

from typing import Any

from secureinfer.hookspecs import hookimpl

from .scheme import CKKSScheme

__all__ = ["CKKSScheme"]


@hookimpl
def secureinfer_register_schemes(register: Any) -> None:
    """Register ``ckks``."""
    register(CKKSScheme)


@hookimpl
def secureinfer_doctor() -> list[dict[str, Any]]:
    """Whether the native part (hoisted rotations, fused products) works here."""
    if CKKSScheme.availability() is not None:
        return []
    from . import native

    ok = native.available()
    return [{"name": "ckks native rotations (plugins/ckks/_native.c)", "ok": ok,
             "version": "self-test passed" if ok else None,
             "hint": "" if ok else f"{native.why_unavailable()}; the server falls back to "
                                   "SEAL's rotations (slower). Reinstall with a C compiler: "
                                   "pip install -e ."}]
