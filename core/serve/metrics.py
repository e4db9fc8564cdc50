"""Prometheus text exposition of the service's counters (format 0.0.4), kept in memory."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["BUCKETS", "Metrics"]

#: Latency histogram buckets, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(**labels: str) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


class Metrics:
    """Requests by endpoint and status, errors by kind, request latency, keys cached."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = defaultdict(int)
        self._errors: dict[str, int] = defaultdict(int)
        self._hist: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self._count: dict[str, int] = defaultdict(int)
        self._sum: dict[str, float] = defaultdict(float)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        with self._lock:
            self._requests[(endpoint, status)] += 1
            counts = self._hist[endpoint]
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    counts[i] += 1
            self._count[endpoint] += 1
            self._sum[endpoint] += seconds

    def error(self, kind: str) -> None:
        """Count one error answer of ``kind`` (the exception class name)."""
        with self._lock:
            self._errors[kind] += 1

    def errors(self) -> dict[str, int]:
        """Errors so far by kind."""
        with self._lock:
            return dict(self._errors)

    def render(self, keys_cached: int, keys_cached_bytes: int, keys_stored: int) -> str:
        """The exposition text."""
        out = ["# HELP secureinfer_requests_total Requests answered, by endpoint and status.",
               "# TYPE secureinfer_requests_total counter"]
        with self._lock:
            for (endpoint, status), n in sorted(self._requests.items()):
                out.append(f"secureinfer_requests_total"
                           f"{_labels(endpoint=endpoint, status=str(status))} {n}")
            out += ["# HELP secureinfer_errors_total Error answers, by kind.",
                    "# TYPE secureinfer_errors_total counter"]
            for kind, n in sorted(self._errors.items()):
                out.append(f"secureinfer_errors_total{_labels(kind=kind)} {n}")
            out += ["# HELP secureinfer_request_seconds Request latency.",
                    "# TYPE secureinfer_request_seconds histogram"]
            for endpoint, counts in sorted(self._hist.items()):
                for edge, n in zip(BUCKETS, counts):
                    out.append(f"secureinfer_request_seconds_bucket"
                               f"{_labels(endpoint=endpoint, le=repr(edge))} {n}")
                out.append(f"secureinfer_request_seconds_bucket"
                           f"{_labels(endpoint=endpoint, le='+Inf')} {self._count[endpoint]}")
                out.append(f"secureinfer_request_seconds_sum{_labels(endpoint=endpoint)} "
                           f"{self._sum[endpoint]:.6f}")
                out.append(f"secureinfer_request_seconds_count{_labels(endpoint=endpoint)} "
                           f"{self._count[endpoint]}")
        out += ["# HELP secureinfer_keys_cached Key owners whose keys are open in memory.",
                "# TYPE secureinfer_keys_cached gauge", f"secureinfer_keys_cached {keys_cached}",
                "# HELP secureinfer_keys_cached_bytes Estimated memory of the open keys.",
                "# TYPE secureinfer_keys_cached_bytes gauge",
                f"secureinfer_keys_cached_bytes {keys_cached_bytes}",
                "# HELP secureinfer_keys_stored Key owners in the key store on disk.",
                "# TYPE secureinfer_keys_stored gauge", f"secureinfer_keys_stored {keys_stored}"]
        return "\n".join(out) + "\n"
