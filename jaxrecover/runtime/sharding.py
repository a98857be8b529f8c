"""Data parallelism over the example axis: shard a batch across ``jax.devices()``.

Contract:
- One mesh axis, ``"batch"``, over all (or the given) devices. Batched arrays are split along their
  leading axis; the model is replicated. ``jit(vmap(forward))`` then runs each device's slice of
  the batch locally: no communication, because examples are independent.
- The leading axis must be divisible by the device count. ``shard_batch`` RAISES otherwise (it never
  pads silently, since padded rows would flow into means and losses); call ``pad_batch`` first and
  drop the extra rows from the results.
- On CPU, tests get several devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
- Several processes (after ``distributed.initialize``): ``jax.devices()`` lists every process's
  devices and the mesh spans them all. Every process holds the same full host batch;
  ``shard_batch`` / ``replicate`` build global arrays from it (each process fills its own devices'
  shards) and ``to_host`` gathers a global result back to a full NumPy copy in every process, so code
  after a sharded call is the same in every layout.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"

_MSG_INDIVISIBLE = (
    "shard_batch: leaf {path} has leading (batch) size {n}, not divisible by the {d} devices of the "
    "mesh. Pad the batch first with pad_batch(tree, {d}) and drop the extra rows afterwards."
)


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: ``jax.devices()``)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh | None = None) -> NamedSharding:
    """Sharding that splits an array's leading axis over the ``"batch"`` mesh axis."""
    return NamedSharding(batch_mesh() if mesh is None else mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh | None = None) -> NamedSharding:
    """Sharding that keeps a full copy on every device of the mesh (for model parameters)."""
    return NamedSharding(batch_mesh() if mesh is None else mesh, PartitionSpec())


def shard_batch(tree: Any, mesh: Mesh | None = None) -> Any:
    """Place every leaf of ``tree`` split along its leading axis across the mesh.

    Args:
        tree: a pytree of arrays that all share the leading example axis.
        mesh: a mesh with a ``"batch"`` axis; default: all devices.

    Returns:
        The same tree with ``jax.Array`` leaves sharded by ``batch_sharding(mesh)``.

    Raises:
        ValueError: a leaf is a scalar or its leading size is not divisible by the device count.

    >>> tokens = shard_batch(jnp.zeros((8, 16), jnp.int32))
    >>> logits = jax.jit(jax.vmap(forward, in_axes=(None, 0)))(model, tokens)
    """
    sharding = batch_sharding(mesh)
    d = sharding.mesh.shape[BATCH_AXIS]
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = np.shape(leaf)
        if not shape or shape[0] % d:
            n = shape[0] if shape else "none (scalar)"
            raise ValueError(_MSG_INDIVISIBLE.format(path=jax.tree_util.keystr(path) or "<root>", n=n, d=d))
    return jax.device_put(_host_if_multiprocess(tree), sharding)


def _host_if_multiprocess(tree: Any) -> Any:
    """Leaves as host NumPy when the mesh spans processes: ``device_put`` builds a global array from
    identical host data in every process; a local device array would have to be copied off first."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(lambda a: a if _is_global(a) else np.asarray(a), tree)


def _is_global(a: Any) -> bool:
    return isinstance(a, jax.Array) and not a.is_fully_addressable


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    """Place a full copy of every leaf on every device of the (global) mesh: model parameters and
    shared clamps of a multi-process run. One process: leaves are returned as they are (``jit`` moves
    uncommitted arrays itself)."""
    if jax.process_count() == 1:
        return tree
    return jax.device_put(_host_if_multiprocess(tree), replicated(mesh))


def to_host(tree: Any) -> Any:
    """Every leaf as a full host NumPy array in every process. Arrays split over other processes'
    devices are all-gathered first (one compiled identity with a replicated output for the whole
    tree); one process: ``jax.device_get``."""
    leaves, treedef = jax.tree.flatten(tree)
    spread = [i for i, a in enumerate(leaves) if _is_global(a)]
    if spread:
        mesh = getattr(leaves[spread[0]].sharding, "mesh", None)
        gathered = jax.jit(lambda xs: xs, out_shardings=replicated(mesh))([leaves[i] for i in spread])
        for i, a in zip(spread, gathered):
            leaves[i] = np.asarray(a.addressable_data(0))
    return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(a)) for a in leaves])


def map_batched(tree: Any, in_axes: Any, batched: Any, shared: Any) -> Any:
    """Apply ``batched`` to the subtrees whose ``in_axes`` prefix entry is 0 and ``shared`` to those
    whose entry is None (``in_axes`` as for ``jax.vmap``: None, 0 or a prefix pytree of them)."""
    return jax.tree.map(lambda ax, sub: shared(sub) if ax is None else batched(sub), in_axes, tree,
                        is_leaf=lambda x: x is None)


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf's leading axis up to a multiple of ``multiple`` by repeating the last example.

    Repeating a real example (rather than zeros) keeps padded rows well-formed: a row of padding
    tokens with no valid position would be an all-masked attention row. Returns the padded tree and
    the original size ``n``; keep ``result[:n]``.
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"pad_batch: leaves disagree on the leading size: {sorted(sizes)}.")
    (n,) = sizes
    extra = -n % multiple

    def pad(x: Any) -> Any:
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0) if extra else x

    return jax.tree.map(pad, tree), n
