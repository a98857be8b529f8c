"""Thin orbax-checkpoint wrapper for recovery solver state, keyed by run id.

Layout: ``{root}/{run_id}/{step}/...`` (orbax ``CheckpointManager`` with ``StandardSave`` /
``StandardRestore``). The state is any pytree of arrays (``recovery.SolverState``: step, delta,
optimiser state, best-so-far, PRNG key as raw ``uint32[2]``). Restoring needs a ``like`` pytree of the
same structure (the freshly initialised state), whose shardings the restored arrays take.
Saves are waited on before returning, so a kill after ``save_state`` returns never loses that step.
"""

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def open_manager(root: str | os.PathLike, run_id: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for ``{root}/{run_id}`` (created if missing)."""
    directory = Path(root).absolute() / run_id
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
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
