"""Where fetched models and corpora live (a folder git ignores)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: Path | str | None = None) -> Path:
    """``override``, else ``$NEUQI_CACHE``, else ``~/.cache/neuqi``; created if missing."""
    path = Path(override or os.environ.get("NEUQI_CACHE") or Path.home() / ".cache" / "neuqi")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
