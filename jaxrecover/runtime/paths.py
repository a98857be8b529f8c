"""Where jaxrecover keeps what it caches (the converted default model, converted GGUFs, compiled programs)."""

import os
from pathlib import Path

CACHE_ENV = "JAXRECOVER_CACHE"
PathLike = str | os.PathLike[str]


def cache_root(cache_dir: PathLike | None = None) -> Path:
    """``cache_dir``, else ``$JAXRECOVER_CACHE``, else ``~/.cache/jaxrecover`` (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxrecover"
