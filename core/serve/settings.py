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
        staged_uploads: the service sits behind the ``serve --ray`` front, which streams
            key uploads into the key store directory and names the file in the
            ``X-Secureinfer-Staged`` header (``secureinfer.serve.upload``). Set by
            ``cluster.deploy`` for its replicas only: never on a service that clients
            reach directly.
    """

    artifact: Path
    token: str | None = None
    keys_dir: Path | None = None
    max_request_bytes: int = 256 << 20
    cache_mb: float = 1024.0
    staged_uploads: bool = False

    @property
    def key_store(self) -> Path:
        """The key store directory."""
        return self.keys_dir if self.keys_dir is not None else Path(self.artifact) / "keys"
