"""Results as files: JSONL per example, summary JSON, CSV, markdown tables and PNG plots.

Every writer (plots included) is atomic: temp file then rename, so an interrupted run never leaves a
half-written result next to a complete one. The temporary name is unique per process and call
(``.<name>.<pid>.<random>.tmp``), so concurrent runs writing into one folder never share one; the
file is created with mode 0o666 minus the umask, like any ``open(path, "w")`` (``mkstemp`` would
give 0600 whatever the umask).

In a multi-process run (``distributed``) only process 0 writes: every writer here returns without
touching the disk in the other processes, which hold the same results.
"""

import atexit
import csv
import io
import json
import math
import os
import re
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrecover.runtime.distributed import is_writer


def temp_name(path: Path) -> Path:
    """A sibling of ``path`` no other process or call will pick: pid plus 64 random bits."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


# what ``temp_name`` makes: readers never match it (a leading dot, a .tmp suffix), and the pid in it
# tells ``remove_stale_temps`` whether its writer can still finish it
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{16}\.tmp$")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """THE atomic writer of the package (results, records, run keys, plots): ``data`` goes to a
    unique temp sibling (``temp_name``), is flushed to disk, then renamed over ``path``. A kill at any
    point leaves either the old file or the new one, never a part (the temp file is left behind
    only by SIGKILL, and ``remove_stale_temps`` removes it at the next run). ``os.replace`` replaces a
    symlink at ``path`` itself, so a write never goes through a link. Only process 0 writes."""
    if is_writer():
        replace_file(path, data)


def replace_file(path: str | Path, data: bytes) -> None:
    """``atomic_write_bytes`` in every process (for files each process owns, e.g. SAE training work
    files): temp sibling, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    # 0o666 through os.open: the kernel applies the umask, as for any ordinary new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (power loss)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: Any) -> None:
    """``np.save`` through ``atomic_write_bytes`` (a killed ``np.save`` leaves a truncated .npy)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    atomic_write_bytes(path, buf.getvalue())


_atomic_write_bytes = atomic_write_bytes  # the names this module used before (kept for callers)
_atomic_write = atomic_write_text


def remove_stale_temps(folder: str | Path, *, skip: tuple[str, ...] = ("checkpoints",)) -> list[Path]:
    """Delete ``temp_name`` files under ``folder`` whose writing process is gone (SIGKILL mid-write),
    skipping the ``skip`` subfolders (orbax cleans its own). Returns what was removed."""
    from jaxrecover.core.proc import pid_alive

    removed = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        for name in files:
            m = _TEMP_RE.match(name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                p = Path(root) / name
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------- one run per folder

LOCK_NAME = ".jaxrecover.lock"
_HELD: set[Path] = set()
_MSG_LOCKED = (
    "--out {folder}: another jaxrecover run (pid {pid} on {host}) is writing there; wait for it, "
    "or pass another --out (if that process is gone, remove {lock})."
)


def _lock_owner(lock: Path) -> dict[str, Any] | None:
    try:
        got = json.loads(lock.read_text(encoding="utf-8"))
        return got if isinstance(got, dict) else None
    except (OSError, ValueError):
        return None


def _release_locks() -> None:
    for lock in list(_HELD):
        owner = _lock_owner(lock)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            lock.unlink(missing_ok=True)
        _HELD.discard(lock)


def lock_folder(folder: str | Path) -> Path:
    """Take ``folder/.jaxrecover.lock`` for this process, or raise one line naming the run holding it.

    The lock is created whole (a temp file hard-linked into place: it never exists half-written) and
    holds ``{"pid", "host"}``; a lock of a dead process on this host is stale and taken over (a kill
    leaves one); the same process may take it again (runs one after another in one Python session).
    Released when the process exits."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        tmp = temp_name(lock)
        tmp.write_text(json.dumps(me), encoding="utf-8")
        try:
            os.link(tmp, lock)  # atomic, and fails when the lock exists
            taken = True
        except FileExistsError:
            taken = False
        except OSError:  # no hard links on this file system: O_EXCL (a reader may see it empty)
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
                taken = True
            except FileExistsError:
                taken = False
        finally:
            tmp.unlink(missing_ok=True)
        if taken:
            break
        owner = _lock_owner(lock)
        if owner == me:
            break  # ours already
        from jaxrecover.core.proc import pid_alive

        pid = owner.get("pid") if owner else None
        if owner is None or not isinstance(pid, int):
            raise SystemExit(_MSG_LOCKED.format(folder=folder, pid="?", host="?", lock=lock))
        if owner.get("host") == me["host"] and not pid_alive(pid):
            lock.unlink(missing_ok=True)  # stale: its run was killed; try again
            continue
        raise SystemExit(_MSG_LOCKED.format(folder=folder, pid=pid, host=owner.get("host"), lock=lock))
    else:
        raise SystemExit(_MSG_LOCKED.format(folder=folder, pid="?", host="?", lock=lock))
    if not _HELD:
        atexit.register(_release_locks)
    _HELD.add(lock)
    return lock


def to_jsonable(x: Any) -> Any:
    """Arrays and numpy scalars to plain Python; NaN/inf to None (JSON has neither)."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return to_jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str | Path, obj: Any) -> None:
    _atomic_write(Path(path), json.dumps(to_jsonable(obj), indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    _atomic_write(Path(path), "".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: to_jsonable(v) for k, v in r.items()})
    _atomic_write(Path(path), buf.getvalue())


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "--"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``columns`` fixes order (default: first-seen key order)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))

    def cell(text: str) -> str:  # a bare "|" (e.g. in "||delta||") would split the column
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(fmt(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    parts = [f"# {title}\n"] + [f"\n## {h}\n\n{body}" for h, body in sections]
    _atomic_write(Path(path), "".join(parts))


def rate_cell(k: int, n: int, lo: float, hi: float) -> str:
    """'23/24 (95.8% [79.8, 99.3])' — the paper's way of printing a binary rate."""
    if n == 0:
        return "0/0"
    return f"{k}/{n} ({100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}])"


def line_plot(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    errors: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    logx: bool = False,
) -> None:
    """One PNG line plot; ``errors[name] = (lo, hi)`` draws a shaded interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
        if errors and name in errors:
            lo, hi = errors[name]
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)


def bar_plot(path: str | Path, labels: Sequence[str], values: Mapping[str, Sequence[float]], *, ylabel: str, title: str = "") -> None:
    """Grouped bars: one group per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(labels)), 3.6), dpi=120)
    width = 0.8 / max(1, len(values))
    xs = np.arange(len(labels))
    for i, (name, ys) in enumerate(values.items()):
        ax.bar(xs + i * width, ys, width, label=name)
    ax.set_xticks(xs + width * (len(values) - 1) / 2, labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, Path(path))
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    """Render into memory, then write atomically like every other result file."""
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    _atomic_write_bytes(path, buf.getvalue())
