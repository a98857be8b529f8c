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

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrecover._proc import pid_alive

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
    saves are removed first."""
    directory = Path(root).absolute() / run_id
    remove_stale_temporaries(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           temporary_path_class=UniqueTemporaryPath)
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
