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

What a ``Clamp`` refuses (``ValueError`` naming the SAE): at construction, when ``features`` and
``values`` are concrete arrays (under ``jit``/``vmap`` they are tracers and the checks are skipped),
feature ids outside ``[0, d_sae)`` (JAX would silently clamp the gather to the last feature),
``features``/``values`` shape mismatch, NaN values, infinite values (except ``-inf`` as a floor and
``+inf`` as a ceiling, which are "no bound"), and a feature id listed twice with different values.
A feature listed twice with the same value is applied once (``__call__`` masks later duplicates, so
traced duplicates are honoured too). At trace time ``__call__`` refuses an SAE whose ``d_in`` is not
the residual width. ``check_clamps`` checks a whole ``{Site: clamp}`` mapping against a model once,
before any expensive stage: sites inside the model, SAE width, and SAE ``hook_name`` vs site.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.core.pytree import pytree_dataclass, static
from jaxrecover.sae.autoencoder import SAE, encode_features
from jaxrecover.core.sites import Site
from jaxrecover.core.types import Resid, Slots, Valid

CLAMP_MODES = ("set", "zero", "scale", "negative_on_positive", "floor", "ceiling")

_MSG_FEATURE_RANGE = (
    "Clamp on SAE {sae}: feature id(s) {bad} outside [0, {d_sae}) (the SAE has d_sae={d_sae}); "
    "JAX would silently clamp them to feature {last}."
)
_MSG_FEATURE_DUP = (
    "Clamp on SAE {sae}: feature id {feature} is listed more than once with different values "
    "{values}; list each feature once."
)
_MSG_SHAPES = (
    "Clamp on SAE {sae}: features has shape {f_shape} but values has shape {v_shape}; "
    "give one value per feature."
)
_MSG_VALUES = (
    "Clamp on SAE {sae} (mode {mode!r}): values hold {what} at position(s) {where}; a clamp to a "
    "non-finite value poisons every forward pass."
)
_MSG_WIDTH = (
    "Clamp on SAE {sae}: the SAE reads d_in={d_in} but the residual it is applied to is {width} "
    "wide; use an SAE trained on this model."
)
_MSG_SITE_RANGE = (
    "Intervention at site {site}: the model has {n_layers} layers (valid layers 0..{last}); a hook "
    "outside the model would never run."
)
_MSG_SITE_WIDTH = (
    "Clamp at site {site}: SAE {sae} reads d_in={d_in} but the model's residual is d_model={d_model} wide."
)
_MSG_SITE_MISMATCH = (
    "Clamp at site {site}: SAE {sae} was trained at {hook!r}, not at this site; its features mean "
    "something else here. Place it at its own site, or pass allow_site_mismatch=True to use it "
    "anyway."
)


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


def slot_gate(slot_mask: Bool[Array, " n"] | None, slots: Slots) -> Valid | None:
    """Where a clamp with ``slot_mask`` acts, per slot of ``slots`` (None: everywhere)."""
    if slot_mask is None:
        return None
    inside = slots < slot_mask.shape[0]
    # slots past the mask (generated tokens) are clamped: the defence stays on during generation
    return jnp.where(inside, slot_mask[jnp.clip(slots, 0, slot_mask.shape[0] - 1)], True)


def sae_name(sae: Any) -> str:
    """How messages name an SAE: its hook name, or its shape when it has none."""
    hook = getattr(sae, "hook_name", "")
    if hook:
        return repr(hook)
    shape = getattr(getattr(sae, "W_enc", None), "shape", None)
    return f"<no hook_name, W_enc shape {tuple(shape)}>" if shape is not None else "<no SAE>"


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as numpy when it is a concrete array; None for tracers, None/int prefixes."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, (np.ndarray, jax.Array)):
        return None
    return np.asarray(x)


def _d_sae(sae: Any) -> int | None:
    """The SAE's latent count, or None for a placeholder (``None`` or an ``in_axes`` prefix)."""
    shape = getattr(getattr(sae, "W_enc", None), "shape", None)
    return int(shape[-1]) if shape else None


def _check_features(sae: Any, features: np.ndarray) -> None:
    d_sae = _d_sae(sae)
    if d_sae is None:
        return
    bad = features[(features < 0) | (features >= d_sae)]
    if bad.size:
        shown = sorted(set(bad.ravel().tolist()))[:8]
        raise ValueError(_MSG_FEATURE_RANGE.format(sae=sae_name(sae), bad=shown, d_sae=d_sae, last=d_sae - 1))


def _check_values(sae: Any, mode: str, values: np.ndarray) -> None:
    if mode == "zero":  # values are ignored
        return
    v = values.astype(np.float64)
    # -inf as a floor and +inf as a ceiling mean "no bound"; any other infinity is a broken value
    allowed_inf = {"floor": -np.inf, "ceiling": np.inf}.get(mode, np.nan)
    for what, hit in (("NaN", np.isnan(v)), ("an infinite value", np.isinf(v) & (v != allowed_inf))):
        if hit.any():
            where = np.argwhere(hit)[:8].tolist()
            raise ValueError(_MSG_VALUES.format(sae=sae_name(sae), mode=mode, what=what, where=where))


def _check_duplicates(sae: Any, mode: str, features: np.ndarray, values: np.ndarray | None) -> None:
    """Equal duplicates are harmless (``__call__`` applies them once); conflicting ones are refused."""
    if mode == "zero" or values is None or values.shape != features.shape:
        return
    order = np.argsort(features, axis=-1, kind="stable")
    f = np.take_along_axis(features, order, -1)
    v = np.take_along_axis(values, order, -1)
    conflict = (f[..., 1:] == f[..., :-1]) & (v[..., 1:] != v[..., :-1])
    if conflict.any():
        at = tuple(np.argwhere(conflict)[0])
        row, i = at[:-1], at[-1]
        feature = int(f[row + (i,)])
        shown = sorted(set(v[row][f[row] == feature].tolist()))
        raise ValueError(_MSG_FEATURE_DUP.format(sae=sae_name(sae), feature=feature, values=shown))


def validate_clamp(clamp: Any) -> None:
    """The construction-time checks of a clamp-like value (``Clamp``, ``defences.ErrorFreeSplice``:
    anything with ``sae``, ``features``, ``values``, ``mode``): the mode is one of ``CLAMP_MODES``,
    and whatever of the arrays is concrete passes the checks of the module docstring."""
    if clamp.mode not in CLAMP_MODES:
        raise ValueError(f"Unknown clamp mode {clamp.mode!r}; expected one of {CLAMP_MODES}.")
    features, values = _concrete(clamp.features), _concrete(clamp.values)
    if features is not None and values is not None and features.shape != values.shape:
        raise ValueError(_MSG_SHAPES.format(sae=sae_name(clamp.sae), f_shape=features.shape, v_shape=values.shape))
    if features is not None:
        _check_features(clamp.sae, features)
        _check_duplicates(clamp.sae, clamp.mode, features, values)
    if values is not None:
        _check_values(clamp.sae, clamp.mode, values)


def _later_duplicates(features: Int[Array, " k"]) -> Bool[Array, " k"]:
    """True at every repeat of an earlier id: those entries must not add their edit a second time."""
    order = jnp.argsort(features, stable=True)
    s = features[order]
    repeat = jnp.concatenate([jnp.zeros((1,), bool), s[1:] == s[:-1]])
    return jnp.zeros(features.shape, bool).at[order].set(repeat)


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
        # only user construction gets here (pytree unflattening bypasses __init__); tracers skip
        validate_clamp(self)

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        if self.sae.d_in != resid.shape[-1]:  # shapes are static: a trace-time error, not a dot_general one
            raise ValueError(_MSG_WIDTH.format(sae=sae_name(self.sae), d_in=self.sae.d_in, width=resid.shape[-1]))
        z_S = encode_features(self.sae, resid, self.features)
        dz = clamp_latents(self.mode, z_S, self.values) - z_S
        repeat = jnp.broadcast_to(_later_duplicates(self.features), dz.shape)
        dz = jnp.where(repeat, jnp.zeros_like(dz), dz)
        gate = slot_gate(self.slot_mask, slots)
        if gate is not None:
            dz = dz * gate[:, None].astype(dz.dtype)
        return resid + (dz @ self.sae.W_dec[self.features]).astype(resid.dtype)


def reencoding_error(clamp: Clamp, resid: Resid, slots: Slots) -> Float[Array, ""]:
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
    gate = slot_gate(clamp.slot_mask, slots)
    if gate is not None:
        target = jnp.where(jnp.broadcast_to(gate[:, None], target.shape), target, z_S)
    read_back = encode_features(clamp.sae, clamp(resid, slots), clamp.features)
    return jnp.max(jnp.abs(read_back - target))


@pytree_dataclass
class AddDelta:
    """Add ``delta[r]`` to the residual at slot ``slots[r]`` (rows with slot -1 are inactive)."""

    delta: Float[Array, "*batch rows d"] | int | None  # batch / int / None: see the note in Clamp
    slots: Int[Array, "*batch rows"] | int | None

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        # one-hot scatter: works unchanged for a full pass and for a single decode slot
        hit = (slots[:, None] == self.slots[None, :]).astype(self.delta.dtype)
        return resid + (hit @ self.delta).astype(resid.dtype)


@pytree_dataclass
class Compose:
    """Apply ``fns`` left to right (the ``optax.chain`` of residual transforms)."""

    fns: tuple

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        for fn in self.fns:
            resid = fn(resid, slots)
        return resid


def compose(*fns: Callable) -> Compose:
    """``compose(f, g)(x) == g(f(x))``. ``compose(clamp, AddDelta(...))`` is the defended state plus
    a recovery perturbation."""
    return Compose(tuple(fns))


@pytree_dataclass
class Identity:
    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        return resid


def _clamps_in(fn: Any) -> list[Clamp]:
    """The clamps inside a hook value: itself, or the members of a ``Compose`` (recursively)."""
    if isinstance(fn, Clamp):
        return [fn]
    if isinstance(fn, Compose):
        return [c for f in fn.fns for c in _clamps_in(f)]
    return []


def check_clamps(cfg_or_model: Any, clamps: Mapping[Any, Any], *, allow_site_mismatch: bool = False) -> None:
    """Refuse a ``{Site: clamp}`` mapping the model cannot honour; call once before expensive work.

    Checks every site is inside the model (``0 <= layer < n_layers``), and for every ``Clamp`` (also
    inside a ``compose``): its SAE's ``d_in`` equals ``d_model``, its concrete features/values pass
    the construction checks, and its SAE's ``hook_name`` (when set) names this very site. An SAE
    trained elsewhere (another layer, or a non-residual hook such as ``hook_mlp_out``) is allowed
    only with ``allow_site_mismatch=True``.

    Args:
        cfg_or_model: a ``TransformerConfig`` or anything with a ``.cfg`` (a ``Transformer``).
        clamps: ``{Site or hook string: Clamp | Compose | other hook}``.
        allow_site_mismatch: accept SAEs placed at a site other than their own ``hook_name``.

    Raises:
        ValueError: naming the site and the SAE.
    """
    cfg = getattr(cfg_or_model, "cfg", cfg_or_model)
    for key, fn in clamps.items():
        site = Site.parse(key)
        if not site.layer < cfg.n_layers:
            raise ValueError(_MSG_SITE_RANGE.format(site=site, n_layers=cfg.n_layers, last=cfg.n_layers - 1))
        for clamp in _clamps_in(fn):
            if _d_sae(clamp.sae) is None:
                continue
            name = sae_name(clamp.sae)
            if clamp.sae.d_in != cfg.d_model:
                raise ValueError(_MSG_SITE_WIDTH.format(site=site, sae=name, d_in=clamp.sae.d_in, d_model=cfg.d_model))
            try:
                validate_clamp(clamp)
            except ValueError as err:  # the construction messages know the SAE, not the site
                raise ValueError(f"At site {site}: {err}") from None
            if clamp.sae.hook_name and not allow_site_mismatch and own_site(clamp.sae.hook_name) != site:
                raise ValueError(_MSG_SITE_MISMATCH.format(site=site, sae=name, hook=clamp.sae.hook_name))


def own_site(hook_name: str) -> Site | None:
    """The residual site an SAE was trained at; None for non-residual hooks (mlp_out, attn_out...)."""
    try:
        return Site.parse(hook_name)
    except ValueError:
        return None
