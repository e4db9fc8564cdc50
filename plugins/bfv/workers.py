"""Run the CRT contexts in parallel: one worker per group of plaintext primes.

The contexts of the CRT never exchange data between the input and the output, so each can
run the whole network on its own core. A worker (a ``Share``) builds its contexts from the
plan, loads their public and evaluation keys (never a secret key), and keeps its share of
the value between layers: the server sends a ciphertext message's blobs once, then one call
per layer, and gathers the output blobs at the end.

Two engines run the shares, chosen when the server is opened:

* **locally**, one ``concurrent.futures.ProcessPoolExecutor`` of one process per share; the
  process's initializer builds its ``Share``. The start method is ``fork``: ``spawn`` and
  ``forkserver`` re-run the user's ``__main__`` in every child, which breaks a script
  without an ``if __name__ == "__main__"`` guard. The trade-off: a child forked while
  another thread of the parent is inside a SEAL call could inherit a held lock; the child
  touches only its own new contexts, and a child that dies instead is an error, not a hang.
* **under Ray** (``ray.init`` was called, e.g. inside a Ray Serve replica), one Ray actor per
  share, placed by Ray on any node of the cluster.

Both ends are this library (the server and its own workers), never a peer; client bytes
are parsed by SEAL inside the worker exactly as in process (``PrimeContext.load``). A worker
that raises reports the error and stays usable; a worker that dies (killed, out of memory)
makes every call fail with the worker's primes named (``BrokenProcessPool`` or Ray's actor
error), and the pool stays refused afterwards.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from secureinfer.errors import EnvelopeError

__all__ = ["Share", "WorkerPool", "ray_running"]


def _assign(n_primes: int, workers: int) -> list[list[int]]:
    """Prime indices per worker, round robin (``workers <= n_primes``)."""
    return [list(range(w, n_primes, workers)) for w in range(workers)]


def ray_running() -> bool:
    """Whether this process is connected to a Ray cluster (Ray is never imported here)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


class Share:
    """One worker's primes: their contexts, layers and share of the current value.

    Args:
        plan: the ``BfvPlan``.
        keys: the public key fields (lists over all primes).
        indices: this worker's prime indices.
        levels: coefficient primes dropped before each step.

    Raises:
        EnvelopeError: a key of one of these primes is malformed.
    """

    def __init__(self, plan: Any, keys: dict[str, Any], indices: Sequence[int],
                 levels: Sequence[int]) -> None:
        from .backend import new_contexts
        from .layers import BfvLayer

        self.plan = plan
        moduli = [plan.plain_moduli[i] for i in indices]
        self.primes = new_contexts(plan.poly_degree, moduli, plan.coeff_bits)
        for p, i in zip(self.primes, indices):
            p.load_keys(keys, i)
        self.ops = [[BfvLayer.build_op(step, p, level) for p in self.primes]
                    for step, level in zip(plan.steps, levels)]
        self.drops = [step.last_drop for step in plan.steps]
        self.items: list[list[Any]] = []

    def input_size(self) -> int:
        """Bytes of one serialized input ciphertext."""
        return self.primes[0].ciphertext_size()

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def load(self, blobs: Sequence[Sequence[Sequence[bytes]]], width: int,
             size: int | None) -> None:
        """``blobs[item][local prime]``: this share's ciphertexts of each item."""
        from .backend import load_ciphertexts

        items = []
        for item in blobs:
            flat = [b for per_prime in item for b in per_prime]
            loaded = load_ciphertexts(self.primes, flat, width, size)
            items.append([cts[0] if self.plan.packing == "single" else cts
                          for cts in loaded])
        self.items = items

    def layer(self, index: int) -> None:
        """Run step ``index`` on every item of the share."""
        from .layers import run_item

        self.items = [run_item(self.ops[index], self.primes, item, self.drops[index])
                      for item in self.items]

    def dump(self) -> list[list[list[bytes]]]:
        """``[item][local prime]`` -> serialized ciphertexts."""
        from .backend import RAW

        return [[[ct.to_bytes(RAW) for ct in (v if isinstance(v, list) else [v])]
                 for v in item] for item in self.items]


# ----- the local engine: one process per share ------------------------------------------

_SHARE: Share | None = None  # in a worker process: its share
_SETUP: tuple[Any, ...] = ()  # in a worker process: what its share is built from


def _init_worker(*setup: Any) -> None:  # pragma: no cover - in the child
    global _SETUP
    _SETUP = setup


def _call(method: str, *args: Any) -> Any:  # pragma: no cover - in the child
    """Run ``method`` on this process's share, building it on the first call (so that a
    malformed key is raised to the server, not lost in a failed initializer)."""
    global _SHARE
    if _SHARE is None:
        _SHARE = Share(*_SETUP)
    return getattr(_SHARE, method)(*args)


class _LocalEngine:
    def __init__(self, groups: list[list[int]], plan: Any, keys: dict[str, Any],
                 levels: list[int]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.executors = [ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker,
                                              initargs=(plan, keys, indices, levels))
                          for indices in groups]

    def submit(self, w: int, method: str, *args: Any) -> Future:
        return self.executors[w].submit(_call, method, *args)

    def close(self) -> None:
        for ex in self.executors:
            procs = list(getattr(ex, "_processes", {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for proc in procs:  # a worker that does not stop promptly is terminated
                proc.join(timeout=2)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=2)


# ----- the Ray engine: one actor per share ----------------------------------------------


class _RayEngine:
    def __init__(self, groups: list[list[int]], plan: Any, keys: dict[str, Any],
                 levels: list[int]) -> None:
        import ray

        self.ray = ray
        actor = ray.remote(max_restarts=0, max_task_retries=0)(Share)
        keys_ref = ray.put(keys)
        self.actors = [actor.remote(plan, keys_ref, indices, levels) for indices in groups]

    def submit(self, w: int, method: str, *args: Any) -> Future:
        return getattr(self.actors[w], method).remote(*args).future()

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone or Ray shut down
                pass


class WorkerPool:
    """Workers, each holding some of the plan's CRT contexts.

    Args:
        plan: the ``BfvPlan`` (given to every worker).
        keys: the public key fields (``public_key``, ``relin_key``, ``rotate_key`` lists).
        levels: coefficient primes dropped before each step.
        workers: how many workers (at most one per prime).
        engine: ``"local"`` (processes), ``"ray"`` (actors) or ``None``: Ray when this
            process is connected to a Ray cluster, else local.
    """

    def __init__(self, plan: Any, keys: dict[str, Any], levels: Sequence[int],
                 workers: int, engine: str | None = None) -> None:
        n = len(plan.plain_moduli)
        self.groups = _assign(n, max(1, min(workers, n)))
        self.engine = engine or ("ray" if ray_running() else "local")
        make: Callable[..., Any] = _RayEngine if self.engine == "ray" else _LocalEngine
        self._broken: str | None = None
        self._engine = make(self.groups, plan, keys, list(levels))
        self._finalizer = weakref.finalize(self, self._engine.close)
        try:
            sizes = self._all("start", "input_size")
            self.pids = [int(p) for p in self._all("start", "pid")]
        except BaseException:
            self.close()
            raise
        self.input_size = int(sizes[0])

    @property
    def size(self) -> int:
        """Workers."""
        return len(self.groups)

    def _fail(self, reason: str) -> RuntimeError:
        """Mark the pool unusable (a worker's share is lost) and say why."""
        self._broken = reason
        return RuntimeError(f"{reason}. Build a new server (workers=1 runs every prime in "
                            "this process)")

    def _all(self, what: str, method: str, args: Sequence[tuple[Any, ...]] | None = None
             ) -> list[Any]:
        """Call ``method`` on every worker at once; their results in order.

        Raises:
            EnvelopeError: a worker refused client bytes.
            RuntimeError: a worker raised or died (naming its primes).
        """
        if self._broken:
            raise RuntimeError(f"this server's bfv workers failed earlier ({self._broken}); "
                               "build a new server")
        args = args if args is not None else [()] * self.size
        futures = [self._engine.submit(w, method, *a) for w, a in enumerate(args)]
        out, errors = [], []
        for indices, fut in zip(self.groups, futures):
            try:
                out.append(fut.result())
            except BrokenProcessPool:
                raise self._fail(f"bfv worker for primes {indices} died during {what}") \
                    from None
            except EnvelopeError as exc:
                errors.append(exc)
            except Exception as exc:  # noqa: BLE001 - named and raised below
                cause = _ray_cause(exc)
                if cause is None:
                    raise self._fail(f"bfv worker for primes {indices} died during {what} "
                                     f"({type(exc).__name__})") from None
                if isinstance(cause, EnvelopeError):
                    errors.append(cause)
                else:
                    errors.append(RuntimeError(f"bfv worker for primes {indices} during "
                                               f"{what}: {type(cause).__name__}: {cause}"))
        if errors:
            raise errors[0]
        return out

    def load(self, blobs: Sequence[Sequence[Sequence[bytes]]], width: int,
             size: int | None) -> None:
        """``blobs[item][prime]``: each prime's ciphertexts of one item, to its worker."""
        self._all("load", "load", [([[item[i] for i in group] for item in blobs], width, size)
                                   for group in self.groups])

    def run_layer(self, index: int, name: str) -> None:
        """Run step ``index`` on every worker's share (in parallel)."""
        self._all(f"layer {name}", "layer", [(index,)] * self.size)

    def dump(self) -> list[list[list[bytes]]]:
        """``[item][prime]`` -> serialized ciphertexts, primes in plan order."""
        parts = self._all("dump", "dump")
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


def _ray_cause(exc: BaseException) -> BaseException | None:
    """The worker's own exception inside a Ray task error; ``None`` when the worker died
    (or ``exc`` comes from the local engine)."""
    ray = sys.modules.get("ray")
    if ray is None:
        return exc
    if isinstance(exc, ray.exceptions.RayActorError):
        return None
    if isinstance(exc, ray.exceptions.RayTaskError):
        return getattr(exc, "cause", None) or exc
    return exc
