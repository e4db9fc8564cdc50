"""Core-owned measurement: every phase timed and every message sized the same way."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["Meter", "peak_rss_mb"]

PHASES = ("keygen", "encrypt", "evaluate", "decrypt")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Meter:
    """Times of each phase (seconds, per call, with the samples it covered) and sizes."""

    times: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))

    @contextmanager
    def phase(self, name: str, samples: int = 1) -> Iterator[None]:
        """Time the body as one call of ``name`` covering ``samples`` inputs."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[name].append((time.perf_counter() - start, samples))

    def size(self, name: str, nbytes: int, samples: int = 1) -> None:
        """Record a message of ``nbytes`` that carries ``samples`` inputs."""
        self.sizes[name].append((int(nbytes), samples))

    def per_sample_latency(self, name: str) -> float | None:
        """Median over calls of (call time / samples); ``keygen`` is its single time."""
        calls = self.times.get(name)
        if not calls:
            return None
        return statistics.median(t / max(n, 1) for t, n in calls)

    def call_latency(self, name: str) -> float | None:
        """Median time of one call."""
        calls = self.times.get(name)
        return statistics.median(t for t, _ in calls) if calls else None

    def total(self, name: str) -> float:
        """Total seconds spent in ``name``."""
        return sum(t for t, _ in self.times.get(name, []))

    def samples(self, name: str) -> int:
        """Inputs covered by the calls of ``name``."""
        return sum(n for _, n in self.times.get(name, []))

    def per_sample_bytes(self, name: str) -> int | None:
        """Median message size per input carried."""
        msgs = self.sizes.get(name)
        if not msgs:
            return None
        return int(statistics.median(b / max(n, 1) for b, n in msgs))

    def reset(self) -> None:
        """Forget every measurement."""
        self.times.clear()
        self.sizes.clear()
