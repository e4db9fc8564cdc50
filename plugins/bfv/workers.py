"""Run the CRT contexts in parallel: one worker process per group of plaintext primes.

The contexts of the CRT never exchange data between the input and the output, so each can
run the whole network on its own core. A worker builds its contexts from the plan, loads
their public and evaluation keys (never a secret key), and keeps its share of the value
between layers: the server process sends a ciphertext message's blobs once, then one
command per layer, and gathers the output blobs at the end.

Workers are fresh interpreters (``python -m secureinfer.plugins.bfv._worker``), so a user's
script needs no ``if __name__ == "__main__"`` guard. The two pipes between the server and a
worker carry pickled Python objects; both ends are this process and its own child, never a
peer. Client bytes are parsed by SEAL inside the worker exactly as in process
(``PrimeContext.load``).

A worker that raises reports the error and stays alive; a worker that dies (killed, out of
memory) is detected by the server, which raises instead of waiting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from multiprocessing.connection import Connection
from typing import Any, Sequence

from secureinfer.errors import EnvelopeError

__all__ = ["WorkerPool"]

_POLL_S = 0.5
_ENTRY = __name__.rsplit(".", 1)[0] + "._worker"


def _assign(n_primes: int, workers: int) -> list[list[int]]:
    """Prime indices per worker, round robin (``workers <= n_primes``)."""
    return [list(range(w, n_primes, workers)) for w in range(workers)]


def _worker_main(inbox: Connection, conn: Connection) -> None:  # pragma: no cover - child
    """A worker's loop: build contexts and layers, then serve commands until ``close``."""
    from .backend import RAW, load_ciphertexts, new_contexts
    from .layers import BfvLayer, run_item

    try:
        setup = inbox.recv()
        plan, keys, indices = setup["plan"], setup["keys"], setup["indices"]
        moduli = [plan.plain_moduli[i] for i in indices]
        primes = new_contexts(plan.poly_degree, moduli, plan.coeff_bits)
        for p, i in zip(primes, indices):
            p.load_keys(keys, i)  # EnvelopeError: reported below, raised by the server
        ops = [[BfvLayer.build_op(step, p, level) for p in primes]
               for step, level in zip(plan.steps, setup["levels"])]
        drops = [step.last_drop for step in plan.steps]
        conn.send(("ready", primes[0].ciphertext_size()))
    except Exception as exc:  # noqa: BLE001 - reported to the server, which raises
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    items: list[list[Any]] = []
    while True:
        try:
            cmd, arg = inbox.recv()
        except EOFError:
            return
        try:
            if cmd == "close":
                return
            if cmd == "load":
                blobs, width, size = arg
                items = []
                for item in blobs:  # [item][local prime] -> list of blobs
                    flat = [b for per_prime in item for b in per_prime]
                    loaded = load_ciphertexts(primes, flat, width, size)
                    items.append([cts[0] if plan.packing == "single" else cts
                                  for cts in loaded])
                conn.send(("ok", None))
            elif cmd == "layer":
                items = [run_item(ops[arg], primes, item, drops[arg]) for item in items]
                conn.send(("ok", None))
            elif cmd == "dump":
                conn.send(("ok", [[[ct.to_bytes(RAW) for ct in (v if isinstance(v, list)
                                                                   else [v])]
                                   for v in item] for item in items]))
            else:
                conn.send(("error", ("ValueError", f"unknown command {cmd!r}")))
        except Exception as exc:  # noqa: BLE001 - reported to the server, which raises
            conn.send(("error", (type(exc).__name__, str(exc))))


class WorkerPool:
    """Worker processes, each holding some of the plan's CRT contexts.

    Args:
        plan: the ``BfvPlan`` (sent to every worker).
        keys: the public key fields (``public_key``, ``relin_key``, ``rotate_key`` lists).
        levels: coefficient primes dropped before each step.
        workers: how many processes (at most one per prime).
    """

    def __init__(self, plan: Any, keys: dict[str, Any], levels: Sequence[int],
                 workers: int) -> None:
        n = len(plan.plain_moduli)
        self.groups = _assign(n, max(1, min(workers, n)))
        self._procs: list[subprocess.Popen] = []
        self._outs: list[Connection] = []  # to each worker
        self._conns: list[Connection] = []  # from each worker
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._outs,
                                           self._conns)
        self._broken: str | None = None
        try:
            for _ in self.groups:
                self._spawn()
            self._send([{"plan": plan, "keys": keys, "indices": indices,
                         "levels": list(levels)} for indices in self.groups])
            sizes = self._gather("start")
        except BaseException:
            self.close()
            raise
        self.input_size = int(sizes[0])

    def _spawn(self) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", _ENTRY, str(down_r), str(up_w)],
                pass_fds=(down_r, up_w), stdin=subprocess.DEVNULL)
        except BaseException:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise
        os.close(down_r)
        os.close(up_w)
        self._procs.append(proc)
        self._outs.append(Connection(down_w, readable=False))
        self._conns.append(Connection(up_r, writable=False))

    @property
    def size(self) -> int:
        """Worker processes."""
        return len(self._procs)

    def _fail(self, reason: str) -> RuntimeError:
        """Mark the pool unusable (its pipes may hold unread replies) and say why."""
        self._broken = reason
        return RuntimeError(f"{reason}; its error, if any, is on stderr above. Build a new "
                            "server (workers=1 runs every prime in this process)")

    def _gather(self, what: str) -> list[Any]:
        """Every worker's reply, in order; raises on an error or a dead worker."""
        out = []
        errors = []
        for proc, conn, indices in zip(self._procs, self._conns, self.groups):
            while not conn.poll(_POLL_S):
                if proc.poll() is not None:
                    raise self._fail(f"bfv worker for primes {indices} exited (code "
                                     f"{proc.returncode}) during {what}")
            try:
                status, payload = conn.recv()
            except EOFError:
                raise self._fail(f"bfv worker for primes {indices} closed its pipe during "
                                 f"{what}") from None
            if status == "error":
                errors.append((indices, *payload))
            out.append(payload)
        if errors:
            indices, kind, message = errors[0]
            if kind == "EnvelopeError":
                raise EnvelopeError(message)
            raise RuntimeError(f"bfv worker for primes {indices} during {what}: "
                               f"{kind}: {message}")
        return out

    def _send(self, messages: Sequence[Any]) -> None:
        if self._broken:
            raise RuntimeError(f"this server's bfv workers failed earlier ({self._broken}); "
                               "build a new server")
        for proc, out, msg, indices in zip(self._procs, self._outs, messages, self.groups):
            try:
                out.send(msg)
            except OSError:  # BrokenPipeError: the worker is gone
                raise self._fail(f"bfv worker for primes {indices} is not running (exit "
                                 f"code {proc.poll()})") from None

    def load(self, blobs: Sequence[Sequence[Sequence[bytes]]], width: int,
             size: int | None) -> None:
        """``blobs[item][prime]``: each prime's ciphertexts of one item, to its worker."""
        self._send([("load", ([[item[i] for i in group] for item in blobs], width, size))
                    for group in self.groups])
        self._gather("load")

    def run_layer(self, index: int, name: str) -> None:
        """Run step ``index`` on every worker's share (in parallel)."""
        self._send([("layer", index)] * self.size)
        self._gather(f"layer {name}")

    def dump(self) -> list[list[list[bytes]]]:
        """``[item][prime]`` -> serialized ciphertexts, primes in plan order."""
        self._send([("dump", None)] * self.size)
        parts = self._gather("dump")
        n_items = len(parts[0]) if parts else 0
        n_primes = sum(len(g) for g in self.groups)
        out: list[list[list[bytes]]] = [[[] for _ in range(n_primes)] for _ in range(n_items)]
        for group, part in zip(self.groups, parts):
            for i, item in enumerate(part):
                for local, prime in enumerate(group):
                    out[i][prime] = item[local]
        return out

    def close(self) -> None:
        """Stop the workers (also done when the pool is garbage-collected)."""
        self._finalizer()


def _shutdown(procs: list[subprocess.Popen], outs: list[Connection],
              conns: list[Connection]) -> None:
    for out in outs:
        try:
            out.send(("close", None))
        except (OSError, ValueError):
            pass
    for proc in procs:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=2)
    for conn in [*outs, *conns]:
        conn.close()


def main(argv: Sequence[str]) -> None:  # pragma: no cover - the worker process
    """A worker's entry point (``_worker.py``): the two pipe descriptors."""
    _worker_main(Connection(int(argv[0]), writable=False),
                 Connection(int(argv[1]), readable=False))
