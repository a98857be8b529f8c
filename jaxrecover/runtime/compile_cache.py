"""JAX's persistent compilation cache for jaxrecover runs and tests.

Every ``jaxrecover run`` (and every test process) compiles the same XLA programs again; with the
persistent cache a second run loads them from disk instead. ``enable()`` points
``jax_compilation_cache_dir`` at ``<cache>/xla/<cpu tag>`` (``<cache>`` is the folder
``jaxrecover.io.embedded`` uses: ``$JAXRECOVER_CACHE`` or ``~/.cache/jaxrecover``) and lowers JAX's
thresholds so that CPU programs, which mostly compile in well under JAX's default one second, are
written too.

``$JAXRECOVER_COMPILATION_CACHE`` moves it (a folder) or turns it off (``0``, ``off``, ``none``,
``false``, ``no``); ``1``/``on``/empty mean the default folder. A folder that cannot be created or
written is one warning line on stderr and the run goes on without the cache.

The default folder has a per-CPU subfolder (a hash of the architecture and CPU model/flags): XLA:CPU
compiles for the host's instruction set and the cache key does not record it, so a cache in a home
directory shared between machines must not hand one CPU's code to another.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import tempfile
from pathlib import Path

ENV = "JAXRECOVER_COMPILATION_CACHE"
_OFF = frozenset({"0", "off", "none", "false", "no"})
_DEFAULT = frozenset({"", "1", "on", "true", "yes", "default"})

# CPU programs compile in tens of milliseconds to a few seconds; below this a disk read is not
# cheaper than compiling again (measured: a tiny eager op compiles in ~10 ms, its entry loads in ~3 ms,
# but thousands of such files make a slow cache folder), so only programs above it are written.
MIN_COMPILE_TIME_S = 0.05
# Eviction (LRU, by total size) makes JAX take a file lock around every read and write, which is what
# makes several processes on one folder safe (pytest-xdist workers): without it a reader can see a
# half-written entry (JAX then warns and recompiles).
MAX_SIZE_BYTES = 4 << 30

_MSG_UNUSABLE = "jaxrecover: warning: compilation cache off: {path} is not a writable folder ({why}); set {env}=off to silence"


def cpu_tag() -> str:
    """``cpu-<8 hex>``: a short hash of the machine architecture and the CPU model and feature flags."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read()
        # the first processor's model and flags; the other cores repeat them
        text += "".join(ln for ln in info.split("\n\n")[0].splitlines() if ln.startswith(("model name", "flags")))
    except OSError:
        pass
    return "cpu-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def default_dir(name: str = "xla") -> Path:
    """``<jaxrecover cache>/<name>/<cpu tag>`` (not created here)."""
    from jaxrecover.runtime.paths import cache_root  # noqa: PLC0415

    return cache_root() / name / cpu_tag()


def resolve(value: str | os.PathLike | None, default: Path) -> Path | None:
    """The cache folder a setting names: ``None``/``on``/``1``/empty -> ``default``; ``off``/``0``/
    ``none`` -> ``None`` (no cache); anything else is a folder path."""
    if value is None:
        return default
    text = os.fspath(value).strip()
    if text.lower() in _OFF:
        return None
    if text.lower() in _DEFAULT:
        return default
    return Path(text).expanduser()


def check_writable(path: Path) -> str | None:
    """``None`` if ``path`` is (or can be made) a folder this process can write, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def enable(path: str | os.PathLike | None = None, *, name: str = "xla") -> Path | None:
    """Turn on JAX's persistent compilation cache; returns the folder in use, or ``None`` if off.

    ``path`` wins over ``$JAXRECOVER_COMPILATION_CACHE``, which wins over the default
    ``<cache>/<name>/<cpu tag>``; both accept ``off``. Call it before the first compile (JAX reads the
    folder once per process). A folder that cannot be written is one warning line on stderr and
    ``None``; never an exception.
    """
    import jax  # noqa: PLC0415

    folder = resolve(os.environ.get(ENV) if path is None else path, default_dir(name))
    if folder is None:
        return None
    why = check_writable(folder)
    if why is not None:
        print(_MSG_UNUSABLE.format(path=folder, why=why, env=ENV), file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor
    try:
        import filelock  # noqa: F401, PLC0415  (JAX needs it for the locked, size-bounded cache)
    except ImportError:
        pass  # unbounded, unlocked: concurrent processes may race on an entry, JAX then recompiles
    else:
        jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    return folder
