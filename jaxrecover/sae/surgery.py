"""Functional model surgery: new models from old ones, never in place.

What a researcher does with it: knock out attention heads (``knockout_heads``) or SAE features
(``knockout_features``), rescale every weight of one kind (``scale_weights``), or make a clamp
stronger or weaker (``scale_clamps``), then rerun ``forward`` / a recovery on the edited pytree and
compare. Two tools, each for what it does best:

- ``equinox.tree_at`` replaces one named leaf (``lambda m: m.blocks.attn.W_O``) and is how we edit a
  single layer of the stacked blocks (``edit_layer``).
- ``penzai.pz.select`` selects by type anywhere in a tree (every ``Norm``, every ``MLP``, every
  ``Clamp`` in a composed hook) and applies a function to all of them (``map_instances``).

Because models are immutable pytrees, an edited model is just another argument to ``forward`` /
``run_from``: ``jit`` recompiles only if shapes change. Note that block parameters are STACKED over
layers (one ``MLP`` instance holds every layer's MLP), so a type selection acts on every layer at
once; use ``edit_layer`` for one layer.

>>> m2 = knockout_heads(model, layer=3, heads=[0, 5])       # zero two heads' output  # doctest: +SKIP
>>> sae2 = knockout_features(sae, [12, 345])                # latents that never fire  # doctest: +SKIP
>>> m3 = scale_weights(model, MLP, 0.5, fields=("W_out",))  # every MLP output halved  # doctest: +SKIP
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from penzai import pz

from jaxrecover.sae.clamp import Clamp
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.model.transformer import Transformer


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


def _check_ids(what: str, ids: Sequence[int], n: int) -> jax.Array:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} indices {bad} outside 0..{n - 1}.")
    return jnp.asarray(ids, jnp.int32)


def knockout_heads(model: Transformer, layer: int, heads: Sequence[int]) -> Transformer:
    """Zero the output projection ``W_O[layer, h]`` of attention heads ``heads`` in block ``layer``.

    Exactly equivalent to zeroing those heads' attention outputs before ``W_O`` (the output bias
    ``b_O``, shared by all heads, stays). Their queries/keys/values are untouched, so under
    grouped-query attention the other heads of the same key/value group are unaffected.
    """
    idx = _check_ids("knockout_heads: head", heads, model.cfg.n_heads)
    return edit_layer(model, lambda m: m.blocks.attn.W_O, layer, lambda W: W.at[idx].set(0.0))


ablate_heads = knockout_heads  # the earlier name


def knockout_features(sae: SAE, features: Sequence[int]) -> SAE:
    """An SAE whose latents ``features`` are dead: their encoder columns, encoder biases and decoder
    rows are zero, so they never fire (ReLU / JumpReLU) and would contribute nothing if they did.

    For ReLU / JumpReLU SAEs, splicing the knocked-out SAE's reconstruction in place of the original's
    (keeping the original's error term) is exactly a ``Clamp(sae, features, 0)``; for top-k SAEs the
    dead latents also stop competing for the k slots, which a clamp does not do.
    """
    idx = _check_ids("knockout_features: feature", features, sae.d_sae)
    return eqx.tree_at(
        lambda s: (s.W_enc, s.b_enc, s.W_dec),
        sae,
        (sae.W_enc.at[:, idx].set(0.0), sae.b_enc.at[idx].set(0.0), sae.W_dec.at[idx].set(0.0)),
    )


def map_instances(tree: Any, cls: type | tuple[type, ...], fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every instance of ``cls`` anywhere in ``tree`` (penzai selector)."""
    return pz.select(tree).at_instances_of(cls).apply(fn)


def count_instances(tree: Any, cls: type | tuple[type, ...]) -> int:
    return pz.select(tree).at_instances_of(cls).count()


def _scale_node(node: Any, factor: float, fields: Sequence[str] | None) -> Any:
    """``node`` with its floating-point array leaves (or only ``fields``) multiplied by ``factor``,
    each keeping its dtype (a bf16 model stays bf16)."""

    def scale(x: Any) -> Any:
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
            return x * jnp.asarray(factor, x.dtype)
        return x

    if fields is None:
        return jax.tree.map(scale, node)
    missing = [f for f in fields if not hasattr(node, f)]
    if missing:
        raise ValueError(f"scale_weights: {type(node).__name__} has no field(s) {missing}.")
    present = [f for f in fields if getattr(node, f) is not None]  # optional biases may be None
    return eqx.tree_at(lambda n: tuple(getattr(n, f) for f in present), node,
                       tuple(jax.tree.map(scale, getattr(node, f)) for f in present))


def scale_weights(tree: Any, selector: type | tuple[type, ...], factor: float, *,
                  fields: Sequence[str] | None = None) -> Any:
    """Multiply the weights of every ``selector`` instance in ``tree`` by ``factor``.

    Args:
        tree: a model, an SAE, a hook mapping: any pytree.
        selector: a type (or tuple of types) chosen with ``pz.select(...).at_instances_of``, e.g.
            ``MLP``, ``Attention``, ``Norm``, ``SAE``.
        factor: the multiplier (0 knocks the selection out).
        fields: only these fields of each instance (e.g. ``("W_out",)``); default every float leaf.

    Raises ``ValueError`` when nothing in ``tree`` is a ``selector`` (a typo would otherwise be a
    silent no-op).
    """
    if count_instances(tree, selector) == 0:
        raise ValueError(f"scale_weights: no instance of {selector} in the tree.")
    return map_instances(tree, selector, lambda node: _scale_node(node, factor, fields))


def scale_clamps(hooks: Any, factor: float) -> Any:
    """Every ``Clamp`` in a hook mapping (composed or not) with its values multiplied by ``factor``:
    a stronger or weaker defence without rebuilding the hooks."""
    return map_instances(hooks, Clamp, lambda c: eqx.tree_at(lambda x: x.values, c, c.values * factor))
