"""Residual-stream interventions: callable pytrees ``fn(resid, slots) -> resid``, and ``compose``.

An intervention is passed to the model as a value at a site, ``{Site: fn}``; there is no global hook
state. ``slots`` are raw indices into the padded sequence (see ``transformer``), so the same
intervention acts identically in a teacher-forced pass, a cached prompt pass and each decode step.

The clamp keeps the SAE error term exactly, in closed form::

    h_def = D(clamp_S(z)) + (h - D(z)) = h + (clamp_S(z) - z)_S @ W_dec[S]

Because ``z_S`` is computed from ``h`` inside the function, gradients with respect to ``h`` flow
through both the clamp and the error term (SAELens detaches its error term; that would give the
wrong gradient for recovery, where ``h`` carries the perturbation).

Clamp modes (``values`` has one entry per feature, or one per (slot, feature) is not supported):

========================  ==========================================================
``"set"``                 ``z_S <- values`` everywhere (``values = 0`` is zero-ablation)
``"zero"``                ``z_S <- 0`` (``values`` ignored)
``"scale"``               ``z_S <- z_S * values`` (refusal steering uses x3)
``"negative_on_positive"`` where ``z_i > 0``: ``z_i <- values`` (SAEBench unlearning, values = -m)
``"floor"``               ``z_S <- max(z_S, values)``
``"ceiling"``             ``z_S <- min(z_S, values)``
========================  ==========================================================
"""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxrecover._pytree import pytree_dataclass, static
from jaxrecover.sae import SAE, encode_features

CLAMP_MODES = ("set", "zero", "scale", "negative_on_positive", "floor", "ceiling")


def clamp_latents(mode: str, z_S: Float[Array, "*seq k"], values: Float[Array, " k"]) -> Float[Array, "*seq k"]:
    """The defended values of the selected latents, given their current values."""
    # explicit broadcast: tests run with jax_numpy_rank_promotion="raise"
    values = jnp.broadcast_to(values.astype(z_S.dtype), z_S.shape)
    if mode == "set":
        return values
    if mode == "zero":
        return jnp.zeros_like(z_S)
    if mode == "scale":
        return z_S * values
    if mode == "negative_on_positive":
        return jnp.where(z_S > 0, values, z_S)
    if mode == "floor":
        return jnp.maximum(z_S, values)
    if mode == "ceiling":
        return jnp.minimum(z_S, values)
    raise ValueError(f"Unknown clamp mode {mode!r}; expected one of {CLAMP_MODES}.")


def _slot_gate(slot_mask: Bool[Array, " n"] | None, slots: Int[Array, " seq"]) -> Bool[Array, " seq"] | None:
    if slot_mask is None:
        return None
    inside = slots < slot_mask.shape[0]
    # slots past the mask (generated tokens) are clamped: the defence stays on during generation
    return jnp.where(inside, slot_mask[jnp.clip(slots, 0, slot_mask.shape[0] - 1)], True)


@pytree_dataclass
class Clamp:
    """Clamp SAE features ``features`` to ``values`` (see module docstring for ``mode``).

    ``slot_mask[slot]`` (optional) says where the clamp acts, e.g. False at the BOS slot; slots beyond
    the mask are clamped.
    """

    # The field annotations admit what JAX itself builds: a stack of clamps (leading ``*batch`` axes,
    # e.g. the output of ``jax.vmap``) and an ``in_axes`` prefix such as ``Clamp(None, 0, 0)``.
    # register_dataclass unflattens through ``__init__``, which jaxtyping checks; ``__call__`` still
    # checks the per-example shapes.
    sae: SAE | None
    features: Int[Array, "*batch k"] | int | None
    values: Float[Array, "*batch k"] | int | None
    slot_mask: Bool[Array, "*batch n_slots"] | int | None = None
    mode: str = static("set")

    def __post_init__(self) -> None:
        if self.mode not in CLAMP_MODES:
            raise ValueError(f"Unknown clamp mode {self.mode!r}; expected one of {CLAMP_MODES}.")

    def __call__(self, resid: Float[Array, "seq d"], slots: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        z_S = encode_features(self.sae, resid, self.features)
        dz = clamp_latents(self.mode, z_S, self.values) - z_S
        gate = _slot_gate(self.slot_mask, slots)
        if gate is not None:
            dz = dz * gate[:, None].astype(dz.dtype)
        return resid + (dz @ self.sae.W_dec[self.features]).astype(resid.dtype)


def reencoding_error(clamp: Clamp, resid: Float[Array, "seq d"], slots: Int[Array, " seq"]) -> Float[Array, ""]:
    """How far the clamped features read back from their targets: ``max |z_S(clamp(h)) - target|``.

    The clamp writes ``target - z_S`` along the decoder rows ``W_dec[S]``; re-encoding the result gives
    ``target`` back only when ``W_dec[S] @ W_enc[:, S]`` is the identity and no feature crosses its
    (jump)ReLU / top-k boundary, so a real SAE reads back approximately. This reports the gap, over the
    clamped slots and features (slots the ``slot_mask`` skips count against their unclamped value).

    Args:
        clamp: the clamp.
        resid: the residual before the clamp.
        slots: raw slot indices of ``resid``'s rows.

    Returns:
        A scalar, in the SAE's latent units.
    """
    z_S = encode_features(clamp.sae, resid, clamp.features)
    target = clamp_latents(clamp.mode, z_S, clamp.values)
    gate = _slot_gate(clamp.slot_mask, slots)
    if gate is not None:
        target = jnp.where(jnp.broadcast_to(gate[:, None], target.shape), target, z_S)
    read_back = encode_features(clamp.sae, clamp(resid, slots), clamp.features)
    return jnp.max(jnp.abs(read_back - target))


@pytree_dataclass
class AddDelta:
    """Add ``delta[r]`` to the residual at slot ``slots[r]`` (rows with slot -1 are inactive)."""

    delta: Float[Array, "*batch rows d"] | int | None  # batch / int / None: see the note in Clamp
    slots: Int[Array, "*batch rows"] | int | None

    def __call__(self, resid: Float[Array, "seq d"], slots: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        # one-hot scatter: works unchanged for a full pass and for a single decode slot
        hit = (slots[:, None] == self.slots[None, :]).astype(self.delta.dtype)
        return resid + (hit @ self.delta).astype(resid.dtype)


@pytree_dataclass
class Compose:
    """Apply ``fns`` left to right (the ``optax.chain`` of residual transforms)."""

    fns: tuple

    def __call__(self, resid: Float[Array, "seq d"], slots: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        for fn in self.fns:
            resid = fn(resid, slots)
        return resid


def compose(*fns: Callable) -> Compose:
    """``compose(f, g)(x) == g(f(x))``. ``compose(clamp, AddDelta(...))`` is the defended state plus
    a recovery perturbation."""
    return Compose(tuple(fns))


@pytree_dataclass
class Identity:
    def __call__(self, resid: Float[Array, "seq d"], slots: Int[Array, " seq"]) -> Float[Array, "seq d"]:
        return resid
