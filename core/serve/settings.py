"""What ``secureinfer serve`` is configured with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """One service's configuration (``create_app(settings)``).

    Attributes:
        artifact: the compiled artifact directory (``secureinfer compile --out``).
        token: the bearer token every ``/v1`` request must carry; ``None``: none needed.
        keys_dir: where uploaded keys are stored (default: ``artifact/keys``).
        max_request_bytes: the largest request body; larger ones get 413 before they are
            read.
        cache_mb: memory budget of the opened keys (servers) kept in memory.
    """

    artifact: Path
    token: str | None = None
    keys_dir: Path | None = None
    max_request_bytes: int = 256 << 20
    cache_mb: float = 1024.0

    @property
    def key_store(self) -> Path:
        """The key store directory."""
        return self.keys_dir if self.keys_dir is not None else Path(self.artifact) / "keys"
