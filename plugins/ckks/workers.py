"""Split one image's costly stages over several processes (``ckks?workers=k``).

SEAL's calls hold Python's GIL, so threads cannot share one evaluation. A stage whose giant
steps are split (``grid.split_stages``) runs each run of giants in its own process: every
process makes the stage's baby rotations and the products and Horner chain of its run,
and the server adds the helpers' partial sums to its own before the rescale. The helpers
are forked from the server once its kernels are built, at its first evaluation, so they
share its Galois keys and plaintexts copy-on-write (nothing is encoded twice, nothing is
sent but ciphertexts). The start method is ``fork`` for that reason (``spawn`` would
rebuild every plaintext); a helper touches only the objects it inherited.

Ciphertexts cross the pipe as SEAL's own serialization of their coefficient array, written
to a private scratch file (``sealapi`` serializes to paths only) and read back into a
ciphertext of the same level made by mod-switching one the process already holds. Both
ends are this server and its own children, never a peer.

A helper that fails or dies does not lose the request: the server computes that part
itself, warns once, and evaluates in one process from then on. One request at a time uses
the helpers; a concurrent request evaluates in its own thread as with ``workers=1``.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
import warnings
import weakref
from typing import Any

from .backend import _scratch_dir, sealapi

__all__ = ["StagePool"]


def _dump(ct: Any, level: int) -> tuple[str, int, float]:
    """Write ``ct``'s coefficients to a scratch file: ``(path, level, scale)``."""
    fd, path = tempfile.mkstemp(prefix="secureinfer-ckks-part-", dir=_scratch_dir(64 << 20))
    os.close(fd)
    ct.dyn_array().save(path)
    return path, level, float(ct.scale)


class _Loader:
    """Reads dumped ciphertexts into ciphertexts of this process (one template per level)."""

    def __init__(self, seal: Any, template: Any) -> None:
        self.seal = seal
        self.template = template

    def load(self, meta: tuple[str, int, float]) -> Any:
        path, level, scale = meta
        try:
            ct = sealapi().Ciphertext()
            self.seal.evaluator.mod_switch_to(self.template, self.seal.parms_ids[level], ct)
            expected = ct.dyn_array().size()
            ct.dyn_array().load(path)
            if ct.dyn_array().size() != expected:
                raise RuntimeError(f"ckks worker: a partial sum of {ct.dyn_array().size()} "
                                   f"coefficients at level {level}, expected {expected}")
            ct.scale = scale
            return ct
        finally:
            os.unlink(path)


def _level(seal: Any, ct: Any) -> int:
    return int(seal.context.get_context_data(ct.parms_id()).chain_index())


def _serve(conn: Any, kernels: dict[int, Any], loader: _Loader) -> None:
    """A helper's loop: ``(stage, part, inputs)`` in, its partial sum (or ``None``) out."""
    while True:
        try:
            index, part, metas = conn.recv()
        except (EOFError, OSError):
            return
        try:
            kernel = kernels[index]
            cts = [loader.load(m) for m in metas]
            item = tuple(cts) if kernel.plan.client_babies else cts[0]
            acc = kernel.partial(item, part)
            conn.send(("ok", None if acc is None else _dump(acc, _level(loader.seal, acc))))
        except Exception as exc:  # noqa: BLE001 - reported to the server, which recomputes
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _stop(conns: list[Any], procs: list[Any]) -> None:
    for conn in conns:
        conn.close()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


class StagePool:
    """The server's helper processes for split stages (``workers - 1`` of them).

    Args:
        seal: the server's ``backend.Seal``.
        workers: processes per split stage, the server's own included.
    """

    def __init__(self, seal: Any, workers: int) -> None:
        self.seal = seal
        self.workers = workers
        self.kernels: dict[int, Any] = {}
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._lock = threading.Lock()
        self._loader: _Loader | None = None
        self.broken: str | None = None

    def __repr__(self) -> str:
        state = self.broken or f"{len(self._procs)} helpers running"
        return f"<ckks StagePool workers={self.workers}: {state}>"

    def register(self, index: int, kernel: Any) -> None:
        """A split stage's kernel, reachable by the helpers forked after this."""
        self.kernels[index] = kernel

    def _start(self, template: Any) -> None:
        """Fork the helpers (they inherit the kernels, keys and ``template``)."""
        self._loader = _Loader(self.seal, template)
        fork = multiprocessing.get_context("fork")
        for _ in range(self.workers - 1):
            mine, theirs = fork.Pipe()
            proc = fork.Process(target=_serve, args=(theirs, self.kernels, self._loader),
                                daemon=True, name="secureinfer-ckks-worker")
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)
        weakref.finalize(self, _stop, self._conns, self._procs)

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            warnings.warn(f"ckks workers: {reason}; this server evaluates in one process from "
                          "now on (results are unaffected)", RuntimeWarning, stacklevel=4)

    def run(self, kernel: Any, index: int, item: Any) -> Any:
        """``kernel``'s sum over every part of its giants on ``item``: part 0 here, the
        others in the helpers; the parts a helper could not compute are computed here."""
        parts = len(kernel.plan.giant_parts())
        if self.broken is not None or not self._lock.acquire(blocking=False):
            return kernel.parts_sum(item, range(parts))
        try:
            cts = list(item) if kernel.plan.client_babies else [item]
            if self._loader is None:
                self._start(cts[0])
            sent: list[int] = []
            for part, conn in zip(range(1, parts), self._conns):
                metas = [_dump(ct, _level(self.seal, ct)) for ct in cts]
                try:
                    conn.send((index, part, metas))
                    sent.append(part)
                except (OSError, ValueError) as exc:
                    for path, _, _ in metas:
                        os.unlink(path)
                    self._fail(f"the helper for part {part} is unreachable ({exc})")
            missing = [p for p in range(1, parts) if p not in sent]
            results = [kernel.parts_sum(item, [0, *missing])]
            lost: list[int] = []
            for part in sent:
                results.append(self._receive(self._conns[part - 1], part, lost))
            if lost:
                results.append(kernel.parts_sum(item, lost))
            return _sum(kernel, results)
        finally:
            self._lock.release()

    def _receive(self, conn: Any, part: int, missing: list[int]) -> Any:
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as exc:
            self._fail(f"the helper for part {part} died ({type(exc).__name__})")
            missing.append(part)
            return None
        if status != "ok":
            self._fail(f"the helper for part {part} failed: {payload}")
            missing.append(part)
            return None
        assert self._loader is not None
        return None if payload is None else self._loader.load(payload)


def _sum(kernel: Any, parts: list[Any]) -> Any:
    """The sum of the non-empty partial sums (``None`` when all are empty)."""
    acc = None
    for ct in parts:
        if ct is None:
            continue
        if acc is None:
            acc = ct
        else:
            kernel.ev.add_inplace(acc, ct)
    return acc
