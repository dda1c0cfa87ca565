"""Where VIMS finds the public data sets and keeps its cache.

- ``VIMS_DATASETS``: the folder of public data sets (default ``../shared/datasets`` next to the
  repository). They are never copied into the repository.
- ``VIMS_CACHE``: the cache for guest images, kernel profiles and fitted demo models
  (default ``~/.cache/vims``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def datasets_dir() -> Path:
    """The folder that holds the public data sets (it may not exist)."""
    env = os.environ.get("VIMS_DATASETS")
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT.parent / "shared" / "datasets").resolve()


def cache_dir(*parts: str) -> Path:
    """A folder under the VIMS cache, created on demand."""
    base = Path(os.environ.get("VIMS_CACHE") or Path.home() / ".cache" / "vims").expanduser()
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def home_dir(folder: Path | None, env: str, sub: str) -> Path:
    """A part's home folder: ``folder`` when given, else ``$env``, else ``sub`` under the VIMS cache."""
    if folder is not None:
        return Path(folder).expanduser()
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    return cache_dir(sub)
