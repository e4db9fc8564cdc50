"""Split one image's costly stages over several processes (``ckks?workers=k``).

SEAL's calls hold Python's GIL, so threads cannot share one evaluation. A stage whose giant
steps are split (``grid.split_stages``) runs each run of giants in its own process: every
process makes the stage's baby rotations and the products and Horner chain of its run,
and the server adds the helpers' partial sums to its own before the rescale. The helpers
are forked from the server once its kernels are built, at its first evaluation, so they
share its Galois keys and plaintexts copy-on-write (nothing is encoded twice, nothing is
sent but ciphertexts). The start method is ``fork`` for that reason (``spawn`` would
rebuild every plaintext).

A forked helper is a copy of the whole process: it holds what the process held at its
first evaluation (in one process with the client, as in ``SecureModel.setup``, the
client's keys too; in a web server, its listening socket) and uses only the kernels it
inherited. It needs no secret key and is never sent one. Ciphertexts cross the pipe as
SEAL's own serialization of their coefficient array, written to a private scratch file
(``sealapi`` serializes to paths only) and read back into a ciphertext of the same level
made by mod-switching one the process already holds. Both ends are this server and its
own children, never a peer: the pipe carries only paths, levels and scales.

Every message carries a request number and an answer to another request is dropped, so a
request interrupted half-way can never hand its partial sum to the next one. A helper that
fails, dies or stays silent past ``HELPER_TIMEOUT_FACTOR`` times the server's own part
does not lose the request: the server computes that part itself, warns once, stops the
helpers and evaluates in one process from then on. One request at a time uses the
helpers; a concurrent request evaluates in its own thread as with ``workers=1``.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from .backend import _scratch_dir, sealapi

__all__ = ["HELPER_TIMEOUT_FACTOR", "StagePool"]

#: A helper silent for this many times the server's own part of the stage (and at least
#: ``MIN_WAIT_S``) is given up on: its part is computed by the server.
HELPER_TIMEOUT_FACTOR = 20.0
MIN_WAIT_S = 30.0

_POOLS: weakref.WeakSet[StagePool] = weakref.WeakSet()


def _dump(ct: Any, level: int) -> tuple[str, int, float]:
    """Write ``ct``'s coefficients to a scratch file: ``(path, level, scale)``."""
    fd, path = tempfile.mkstemp(prefix="secureinfer-ckks-part-", dir=_scratch_dir(64 << 20))
    os.close(fd)
    try:
        ct.dyn_array().save(path)
    except BaseException:
        _unlink([(path, level, 0.0)])
        raise
    return path, level, float(ct.scale)


def _unlink(metas: Sequence[tuple[str, int, float]]) -> None:
    for path, _, _ in metas:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class _Loader:
    """Reads dumped ciphertexts into ciphertexts of this process (mod-switched copies of
    one template it already holds)."""

    def __init__(self, seal: Any, template: Any) -> None:
        self.seal = seal
        self.template = template

    def load(self, meta: tuple[str, int, float]) -> Any:
        path, level, scale = meta
        ct = sealapi().Ciphertext()
        self.seal.evaluator.mod_switch_to(self.template, self.seal.parms_ids[level], ct)
        expected = ct.dyn_array().size()
        ct.dyn_array().load(path)
        if ct.dyn_array().size() != expected:
            raise RuntimeError(f"ckks worker: a ciphertext of {ct.dyn_array().size()} "
                               f"coefficients at level {level}, expected {expected}")
        ct.scale = scale
        return ct


def _level(seal: Any, ct: Any) -> int:
    return int(seal.context.get_context_data(ct.parms_id()).chain_index())


def _serve(conn: Any, kernels: dict[int, Any], loader: _Loader, inherited: list[Any]) -> None:
    """A helper's loop: ``(request, stage, part, inputs)`` in, ``(request, status, partial
    sum)`` out. ``inherited``: pipe ends of the server's other helpers, closed here so that
    each helper sees the end of its own pipe when the server drops it."""
    for other in inherited:
        other.close()
    while True:
        try:
            request, index, part, metas = conn.recv()
        except (EOFError, OSError):
            return
        try:
            kernel = kernels[index]
            cts = [loader.load(m) for m in metas]  # the server removes these files
            item = tuple(cts) if kernel.plan.client_babies else cts[0]
            acc = kernel.partial(item, part)
            answer = ("ok", None if acc is None else _dump(acc, _level(loader.seal, acc)))
        except Exception as exc:  # noqa: BLE001 - reported to the server, which recomputes
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send((request, *answer))
        except (OSError, ValueError):
            if answer[0] == "ok" and answer[1] is not None:
                _unlink([answer[1]])
            return


def _stop(conns: list[Any], procs: list[Any]) -> None:
    for conn in conns:
        conn.close()
    for proc in procs:
        proc.join(timeout=2)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2)


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
        self._requests = itertools.count(1)
        self._finalizer: Any = None
        self.broken: str | None = None
        _POOLS.add(self)

    def __repr__(self) -> str:
        state = self.broken or f"{len(self._procs)} helpers running"
        return f"<ckks StagePool workers={self.workers}: {state}>"

    def register(self, index: int, kernel: Any) -> None:
        """A split stage's kernel, reachable by the helpers forked after this."""
        self.kernels[index] = kernel

    def close(self) -> None:
        """Stop the helpers (also done when the pool is garbage-collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def _start(self, template: Any) -> None:
        """Fork the helpers (they inherit the kernels, keys and ``template``)."""
        self._loader = _Loader(self.seal, template)
        fork = multiprocessing.get_context("fork")
        for _ in range(self.workers - 1):
            mine, theirs = fork.Pipe()
            # the child's copies of every server-side pipe end, its own included
            inherited = [c for pool in list(_POOLS) for c in pool._conns] + [mine]
            proc = fork.Process(target=_serve,
                                args=(theirs, self.kernels, self._loader, inherited),
                                daemon=True, name="secureinfer-ckks-worker")
            proc.start()
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs)

    def _fail(self, reason: str) -> None:
        """Give up on the helpers: warn once, stop them, evaluate in one process."""
        if self.broken is None:
            self.broken = reason
            warnings.warn(f"ckks workers: {reason}; this server evaluates in one process from "
                          "now on (results are unaffected)", RuntimeWarning, stacklevel=4)
            self.close()

    def run(self, kernel: Any, index: int, item: Any) -> Any:
        """``kernel``'s sum over every part of its giants on ``item``: part 0 here, the
        others in the helpers; the parts a helper could not compute are computed here."""
        parts = len(kernel.plan.giant_parts())
        if self.broken is not None or not self._lock.acquire(blocking=False):
            return kernel.parts_sum(item, range(parts))
        try:
            return self._run(kernel, index, item, parts)
        finally:
            self._lock.release()

    def _run(self, kernel: Any, index: int, item: Any, parts: int) -> Any:
        cts = list(item) if kernel.plan.client_babies else [item]
        if self._loader is None:
            self._start(cts[0])
        request = next(self._requests)
        sent: list[int] = []
        # the stage input, written once for every helper; removed when all have answered
        metas = [_dump(ct, _level(self.seal, ct)) for ct in cts]
        try:
            for part, conn in zip(range(1, parts), self._conns):
                try:
                    conn.send((request, index, part, metas))
                    sent.append(part)
                except (OSError, ValueError) as exc:
                    self._fail(f"the helper for part {part} is unreachable ({exc})")
                    break
            missing = [p for p in range(1, parts) if p not in sent]
            start = time.monotonic()
            results = [kernel.parts_sum(item, [0, *missing])]
            wait = max(MIN_WAIT_S, HELPER_TIMEOUT_FACTOR * (time.monotonic() - start))
            lost = []
            for part in sent:
                got = self._receive(part, request, start + wait)
                if got is False:
                    lost.append(part)
                else:
                    results.append(got)
            if lost:
                results.append(kernel.parts_sum(item, lost))
            return kernel.add_all(results)
        except BaseException:
            # interrupted with answers outstanding: never let them reach another request
            self._fail("a request was interrupted while the helpers worked")
            raise
        finally:
            _unlink(metas)

    def _receive(self, part: int, request: int, deadline: float) -> Any:
        """Helper ``part``'s partial sum for ``request`` (``None``: empty), or ``False``
        when it failed, died or missed ``deadline`` (the pool is then given up on)."""
        conn = self._conns[part - 1]
        while True:
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    self._fail(f"the helper for part {part} gave no answer in time")
                    return False
                got, status, payload = conn.recv()
            except (EOFError, OSError) as exc:
                self._fail(f"the helper for part {part} died ({type(exc).__name__})")
                return False
            if got == request:
                break
            if status == "ok" and payload is not None:  # a stale answer: drop it
                _unlink([payload])
        if status != "ok":
            self._fail(f"the helper for part {part} failed: {payload}")
            return False
        if payload is None:
            return None
        assert self._loader is not None
        try:
            return self._loader.load(payload)
        except Exception as exc:  # noqa: BLE001 - recomputed in process
            self._fail(f"the helper for part {part} sent an unreadable sum ({exc})")
            return False
        finally:
            _unlink([payload])
