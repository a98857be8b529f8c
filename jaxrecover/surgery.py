"""Functional model surgery: new models from old ones, never in place.

Two tools, each for what it does best:
- ``equinox.tree_at`` replaces one named leaf (``lambda m: m.blocks.mlp.W_out``) and is how we
  edit a single layer of the stacked blocks.
- ``penzai.pz.select`` selects by type anywhere in the tree (every ``Norm``, every ``Clamp`` in a
  composed hook) and applies a function to all of them.

Because models are immutable pytrees, an edited model is just another argument to ``forward`` /
``run_from``: ``jit`` recompiles only if shapes change.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from penzai import pz

from jaxrecover.interventions import Clamp
from jaxrecover.transformer import Transformer


def set_param(model: Any, where: Callable[[Any], Any], value: Any) -> Any:
    """A copy of ``model`` with the leaf chosen by ``where`` replaced (shape and dtype checked)."""
    old = where(model)
    if hasattr(old, "shape") and (old.shape != value.shape or old.dtype != value.dtype):
        raise ValueError(f"set_param: replacement has shape {value.shape} {value.dtype}, the parameter has {old.shape} {old.dtype}.")
    return eqx.tree_at(where, model, value)


def edit_layer(model: Transformer, where: Callable[[Any], Any], layer: int, fn: Callable[[Any], Any]) -> Transformer:
    """Apply ``fn`` to layer ``layer`` of a stacked block parameter, e.g.
    ``edit_layer(model, lambda m: m.blocks.mlp.W_out, 3, jnp.zeros_like)``."""
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"edit_layer: layer {layer} outside 0..{model.cfg.n_layers - 1}.")
    stacked = where(model)
    return eqx.tree_at(where, model, stacked.at[layer].set(fn(stacked[layer])))


def ablate_heads(model: Transformer, layer: int, heads: Sequence[int]) -> Transformer:
    """Zero the output projection of attention heads ``heads`` in block ``layer``."""
    bad = [h for h in heads if not 0 <= h < model.cfg.n_heads]
    if bad:
        raise ValueError(f"ablate_heads: head indices {bad} outside 0..{model.cfg.n_heads - 1}.")
    idx = jnp.asarray(list(heads), jnp.int32)
    return edit_layer(model, lambda m: m.blocks.attn.W_O, layer, lambda W: W.at[idx].set(0.0))


def map_instances(tree: Any, cls: type, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every instance of ``cls`` anywhere in ``tree`` (penzai selector)."""
    return pz.select(tree).at_instances_of(cls).apply(fn)


def count_instances(tree: Any, cls: type) -> int:
    return pz.select(tree).at_instances_of(cls).count()


def scale_clamps(hooks: Any, factor: float) -> Any:
    """Every ``Clamp`` in a hook mapping (composed or not) with its values multiplied by ``factor``:
    a stronger or weaker defence without rebuilding the hooks."""
    return map_instances(hooks, Clamp, lambda c: eqx.tree_at(lambda x: x.values, c, c.values * factor))
