"""Thin orbax-checkpoint wrapper for recovery solver state, keyed by run id.

Layout: ``{root}/{run_id}/{step}/...`` (orbax ``CheckpointManager`` with ``StandardSave`` /
``StandardRestore``). The state is any pytree of arrays (``recovery.SolverState``: step, delta,
optimiser state, best-so-far, PRNG key as raw ``uint32[2]``). Restoring needs a ``like`` pytree of the
same structure (the freshly initialised state), whose shardings the restored arrays take.
Saves are waited on before returning, so a kill after ``save_state`` returns never loses that step.

Temporary folders: orbax writes step ``N`` into ``N.orbax-checkpoint-tmp`` and, when that name
already exists, deletes it first, so two runs saving the same step into one folder (two runs into
one ``--out``) would delete each other's half-written checkpoint. ``UniqueTemporaryPath`` adds the
pid and 64 random bits (``N.orbax-checkpoint-tmp-<pid>-<hex>``; orbax recognises any name containing
its suffix as temporary), and ``open_manager`` removes such folders whose process is gone (a kill
mid-save) instead of leaving them forever.
"""

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrecover.core.proc import pid_alive

_Atomic = ocp.path.atomicity.AtomicRenameTemporaryPath
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's own marker (atomicity_types.TMP_DIR_SUFFIX)


class UniqueTemporaryPath(_Atomic):
    """orbax's atomic-rename temporary folder with a per-process, per-save unique name."""

    @classmethod
    def from_final(cls, final_path: Any, **kwargs: Any) -> "UniqueTemporaryPath":
        tmp = final_path.parent / f"{final_path.name}{TMP_SUFFIX}-{os.getpid()}-{secrets.token_hex(8)}"
        return cls(tmp, final_path, **kwargs)



def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``*.orbax-checkpoint-tmp-<pid>-<hex>`` folders whose process no longer runs."""
    removed = []
    for path in directory.glob(f"*{TMP_SUFFIX}-*-*") if directory.is_dir() else ():
        pid = path.name.rsplit("-", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def open_manager(root: str | os.PathLike, run_id: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``{root}/{run_id}`` (created if missing); leftovers of killed
    saves are removed first.

    Several processes (``jax.distributed``): orbax has every process compute the temporary folder's
    name and wait for process 0 to create it, so the name must agree; process 0 draws the suffix once
    per manager and shares it (``distributed.shared_token``), and only process 0 removes leftovers (a
    pid means nothing on another host)."""
    from jaxrecover.runtime import distributed as D

    directory = Path(root).absolute() / run_id
    temporary = UniqueTemporaryPath
    if D.is_multiprocess():
        tag = D.shared_token(f"ckpt/{run_id}")  # "<pid of process 0>-<hex>", the form remove_stale_temporaries reads

        class SharedTemporaryPath(UniqueTemporaryPath):
            @classmethod
            def from_final(cls, final_path: Any, **kwargs: Any) -> "SharedTemporaryPath":
                return cls(final_path.parent / f"{final_path.name}{TMP_SUFFIX}-{tag}", final_path, **kwargs)

        temporary = SharedTemporaryPath
    if D.is_writer():
        remove_stale_temporaries(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, temporary_path_class=temporary)
    return ocp.CheckpointManager(directory, options=options)


def save_state(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save ``state`` under ``step`` and wait until it is on disk."""
    mngr.save(int(step), args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    return mngr.latest_step()


def restore_state(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[int, Any] | None:
    """``(step, state)`` of ``step`` (default: the latest), or ``None`` when nothing is saved."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract))


# ----------------------------------------------------------------------------- finished results
# The one resume scheme of the experiments: a finished unit of work (a method's solve, its judged
# rows) is saved ONCE under ``{root}/{key}`` (step 0) as orbax arrays + orbax JSON, where ``key`` is
# a content hash of everything the result depends on. A rerun with the same inputs finds it; a
# changed input gives another key, so stale results are never read back.


def _plain(x: Any) -> Any:
    """numpy scalars and arrays as JSON values."""
    return np.asarray(x).tolist()


def save_result(root: str | os.PathLike, key: str, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save a dict of host arrays (nested dicts allowed, no ``None``; may be empty) and JSON metadata
    under ``key``."""
    mngr = open_manager(root, key, max_to_keep=1)
    items = {"meta": ocp.args.JsonSave(json.loads(json.dumps(meta, default=_plain)))}
    if arrays:
        items["arrays"] = ocp.args.StandardSave(jax.tree.map(np.asarray, arrays))
    mngr.save(0, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()
    mngr.close()


def load_result(root: str | os.PathLike, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(arrays, meta)`` saved under ``key`` (arrays as numpy), or ``None`` when there is none."""
    directory = Path(root).absolute() / key
    if not directory.is_dir():
        return None
    mngr = open_manager(root, key, max_to_keep=1)
    try:
        if mngr.latest_step() is None:
            return None
        items = {"meta": ocp.args.JsonRestore()}
        if (directory / "0" / "arrays").is_dir():
            items["arrays"] = ocp.args.StandardRestore()
        got = mngr.restore(0, args=ocp.args.Composite(**items))
        arrays = jax.tree.map(np.asarray, dict(got["arrays"])) if "arrays" in items else {}
        return arrays, dict(got["meta"])
    finally:
        mngr.close()
