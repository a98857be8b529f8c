"""Stronger defences than a one-layer clamp, as hook values, and the attack-defend game.

Every defence here is a frozen pytree ``fn(resid, slots) -> resid``, passed exactly like a ``Clamp``:
as a value at a site, ``{Site: fn}``, to ``transformer.forward``, ``generate.generate`` and the solver
(``recovery`` / ``runner.solve_batch``). A defence placed at a *clamp site* of a ``RecoveryProblem``
exposes ``.sae`` and ``.features`` (the solver reads them to measure drift and, at the delta site, to
build the encoder-null projector); a bare ``compose(clamp, other)`` has neither, so the solver cannot
take it at a clamp site: use the values below.

==========================  ==================================================================
``ErrorFreeSplice``         ``h -> D(clamp_S(E(h)))``: the site's residual replaced by the SAE
                            reconstruction of the clamped latents (the SAE error ``h - D(E(h))``
                            dropped). Equals ``clamp(h) - (h - D(E(h)))``.
multi-layer clamp           ``{site_a: Clamp_a, site_b: Clamp_b, ...}`` (``multi_layer``): each
                            clamp acts at its own site, in forward order; the solver already takes
                            several clamp sites (``RecoveryProblem(delta_site, clamp_sites)``).
denser clamp                a ``Clamp`` with a larger ``K`` (no new value); ``next_token_fidelity``
                            measures what it costs the model.
``SpanAblation``            ``h -> h - (h @ Q) @ Q.T``, ``Q [d_model, r]`` orthonormal
                            (``span_basis``): refusal-direction-style ablation of a span.
``AblatedDefence``          ``h -> P(defence(h))``, ``P = I - Q Q^T``: a defence followed by the
                            ablation (``with_ablation``), measurable by the solver.
==========================  ==================================================================

**Order of clamp and ablation.** ``with_ablation(clamp, Q)`` is ``compose(clamp, SpanAblation(Q))``
(clamp first, then ablate): the clamp writes along ``W_dec[S]``, which generally has components in
span(Q); ablating last guarantees the site's output has none, which is the ablation's promise. (The
other order keeps the clamp's targets exact but lets the clamp re-write the ablated span.)

**The attacker under an ablation.** The solver adds ``delta`` after the site's hook (``h_rec =
hook(h) + delta``, the paper's convention, where the encoder-null constraint stops ``delta`` from
undoing the clamp). The analogue for an ablation is an attacker whose ``delta`` stays orthogonal to
span(Q): ``span_constraint(Q)``, an optax link chained after the optimiser. It is the SAME attack
as an ablation applied after ``delta`` (``P(clamp(h) + delta)``), because ``P`` is linear and
idempotent: every ``delta`` has the effect of ``P delta`` (no longer, same objective), and for
``delta ⟂ Q``, ``P(clamp(h)) + delta == P(clamp(h) + delta)``. ``attacker_optimizer`` builds that
attacker (gradient projected off the span, optimiser, ``delta`` projected back). With the
encoder-null constraint the post-step re-projection keeps ``delta ⟂ Q`` when span(Q) lies in the
encoder-null space, which holds when Q was built from encoder-null deltas (the game's encoder
attacker). The random-direction control should be confined alike (``confine``).

**The game** (``play_game``): round 0 attacks the base defence; after round ``r`` the defender adds
the span of round ``r``'s recovered deltas to Q (the spans of later rounds are orthogonal to the
earlier ones, since the attacker was confined to their complement, so the rank only grows), and
round ``r + 1`` re-attacks under ``with_ablation(defence, Q)``. It stops when recovery falls below
a threshold, stops falling, the span gains no direction, or the rounds run out.

What this module does not do: run a sweep or write results (the experiment driver does), or apply an
ablation at a site the solver does not treat as a clamp site (a cross-layer attack's delta site has no
clamp: put the ablation at a clamp site, or extend the solver).
"""

import dataclasses
import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.core.pytree import pytree_dataclass, static
from jaxrecover.core.sites import Site
from jaxrecover.core.types import Resid, Slots
from jaxrecover.model.transformer import forward
from jaxrecover.recover.projections import projected_params, projected_updates
from jaxrecover.sae.autoencoder import SAE, decode, encode
from jaxrecover.sae.clamp import Clamp, clamp_latents, own_site, sae_name, slot_gate, validate_clamp

STOP_REASONS = ("below_threshold", "stopped_falling", "no_new_directions", "span_full", "rounds")

_MSG_SITE = "Defence at site {site}: the model has {n_layers} layers (valid layers 0..{last}); a hook outside the model would never run."
_MSG_WIDTH = "Defence at site {site}: SAE {sae} reads d_in={d_in} but the model's residual is d_model={d_model} wide; use an SAE trained on this model."
_MSG_K = "Defence at site {site}: K={k} features asked for but SAE {sae} has only d_sae={d_sae}; choose K <= {d_sae}."
_MSG_HOOK = "Defence at site {site}: SAE {sae} was trained at {hook!r}, not at this site; place it at its own site (or pass allow_site_mismatch=True)."
_MSG_EMPTY_SPAN = "Span ablation{where}: the span is empty ({why}); there is no direction to project out."
_MSG_BASIS_WIDTH = "Span ablation{where}: basis has shape {shape} but the residual is d_model={d_model} wide; the basis must be [d_model, r]."
_MSG_BASIS_ORTHO = "Span ablation{where}: basis columns are not orthonormal (max |Q^T Q - I| = {err:.2e}); build it with span_basis."
_MSG_MULTI_EMPTY = "multi_layer: no sites given; a multi-layer clamp needs at least one {site: clamp}."
_MSG_MULTI_DUP = "multi_layer: site {site} is given twice ({a!r} and {b!r}); give one defence per site."
_MSG_MULTI_KIND = "multi_layer: the value at {site} is a {kind}, not a defence with an SAE (Clamp, ErrorFreeSplice, AblatedDefence)."


# ----------------------------------------------------------------------------- error-free splice


@pytree_dataclass
class ErrorFreeSplice:
    """Replace the residual by the SAE reconstruction of the clamped latents, dropping the error:

        h_def = D(clamp_S(E(h))) = h + (clamp_S(z) - z)_S @ W_dec[S] - (h - D(z)),   z = E(h)

    ``mode``, ``values``, ``slot_mask`` mean what they mean for ``Clamp`` (the clamp-mode logic is
    ``interventions.clamp_latents``); slots the mask skips keep ``h`` unchanged. Gradients flow
    through ``E`` (the ReLU / JumpReLU / TopK gates), as through a clamp. Construction refuses what
    ``Clamp`` refuses (feature ids out of range, NaN values, conflicting duplicates).
    """

    sae: SAE | None
    features: Int[Array, "*batch k"] | int | None
    values: Float[Array, "*batch k"] | int | None
    slot_mask: Bool[Array, "*batch n_slots"] | int | None = None
    mode: str = static("set")

    def __post_init__(self) -> None:
        validate_clamp(self)  # the clamp module's one check (mode, ids, values, duplicates), duck-typed

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        if self.sae.d_in != resid.shape[-1]:
            raise ValueError(f"ErrorFreeSplice on SAE {sae_name(self.sae)}: the SAE reads d_in={self.sae.d_in} but the "
                             f"residual is {resid.shape[-1]} wide; use an SAE trained on this model.")
        z = encode(self.sae, resid)
        z_S = z[..., self.features]
        # duplicate ids carry equal targets (validated), so the scatter writes the same value twice
        z = z.at[..., self.features].set(clamp_latents(self.mode, z_S, self.values))
        out = decode(self.sae, z).astype(resid.dtype)
        gate = slot_gate(self.slot_mask, slots)
        if gate is None:
            return out
        return jnp.where(jnp.broadcast_to(gate[:, None], out.shape), out, resid)


def error_free(clamp: Clamp) -> ErrorFreeSplice:
    """The error-free splice with ``clamp``'s SAE, features, values, mode and slot mask."""
    return ErrorFreeSplice(clamp.sae, clamp.features, clamp.values, clamp.slot_mask, mode=clamp.mode)


# ----------------------------------------------------------------------------- multi-layer


def _has_sae(fn: Any) -> bool:
    return hasattr(fn, "sae") and hasattr(fn, "features")


def multi_layer(clamps_by_site: Mapping[Any, Any]) -> dict[Site, Any]:
    """The multi-layer defence: ``{Site: defence}`` in forward order (a plain hooks mapping).

    Each defence acts at its own site in the order the forward pass visits them, so in a forward
    pass the mapping IS the composition of the single-site defences in layer order (tested). Pass it
    as ``clamps`` with ``RecoveryProblem(delta_site, clamp_sites=tuple(mapping))``: clamps below the
    delta site act in the cached prefix, the rest are measured (``JacobianNull`` constrains all of
    them; ``EncoderNull`` only the one at the delta site).

    Raises:
        ValueError: an empty mapping, a site given twice (e.g. as a string and a ``Site``), or a
            value without an SAE (the solver could not measure it).
    """
    if not clamps_by_site:
        raise ValueError(_MSG_MULTI_EMPTY)
    out: dict[Site, Any] = {}
    names: dict[Site, Any] = {}
    for key, fn in clamps_by_site.items():
        site = Site.parse(key)
        if site in out:
            raise ValueError(_MSG_MULTI_DUP.format(site=site, a=str(names[site]), b=str(key)))
        if not _has_sae(fn):
            raise ValueError(_MSG_MULTI_KIND.format(site=site, kind=type(fn).__name__))
        out[site], names[site] = fn, key
    return dict(sorted(out.items()))


def multi_layer_clamps(saes_by_site: Mapping[Any, SAE], select: Callable[[Site, SAE], Any], values: Any, *,
                       mode: str = "set") -> dict[Site, Clamp]:
    """``{site: Clamp(sae, select(site, sae), values, mode)}`` over the given SAEs, in forward order:
    the same behaviour's features chosen at each layer by one rule (e.g. ``lambda s, sae:
    features.top_by_cosine(sae, direction_at[s], k)``). ``values`` is one array for every site, or
    a ``{site: values}`` mapping."""
    out = {}
    for key, sae in saes_by_site.items():
        site = Site.parse(key)
        feats = jnp.asarray(select(site, sae), jnp.int32)
        v = values.get(key, values.get(site)) if isinstance(values, Mapping) else values
        v = jnp.broadcast_to(jnp.asarray(v, jnp.float32), feats.shape)
        out[site] = Clamp(sae, feats, v, mode=mode)
    return multi_layer(out)


# ----------------------------------------------------------------------------- span ablation


def _check_basis(basis: Any, d_model: int | None, where: str = "") -> None:
    """Refuse an empty, misshaped or non-orthonormal basis (concrete arrays only; tracers pass)."""
    if isinstance(basis, jax.core.Tracer) or not isinstance(basis, (np.ndarray, jax.Array)):
        return
    Q = np.asarray(basis, np.float64)
    if Q.ndim != 2 or (d_model is not None and Q.shape[0] != d_model):
        raise ValueError(_MSG_BASIS_WIDTH.format(where=where, shape=tuple(Q.shape), d_model=d_model if d_model else "?"))
    if Q.shape[1] == 0:
        raise ValueError(_MSG_EMPTY_SPAN.format(where=where, why="the basis has 0 columns"))
    err = float(np.max(np.abs(Q.T @ Q - np.eye(Q.shape[1]))))
    if err > 1e-4:
        raise ValueError(_MSG_BASIS_ORTHO.format(where=where, err=err))


def ablate(basis: Float[Array, "d r"], x: Float[Array, "*rows d"]) -> Float[Array, "*rows d"]:
    """``x - (x @ Q) @ Q.T``: every row of ``x`` with its component in span(Q) removed."""
    Q = basis.astype(x.dtype)
    return x - (x @ Q) @ Q.T


@pytree_dataclass
class SpanAblation:
    """Project a span out of the residual at every slot (like refusal-direction ablation):

        h_def = h - (h @ Q) @ Q^T = (I - Q Q^T) h,    Q [d_model, r] with orthonormal columns

    Build ``Q`` with ``span_basis``. Construction refuses an empty (``r = 0``), non-2-D or
    non-orthonormal concrete basis. The map is linear and idempotent.
    """

    basis: Float[Array, "*batch d r"] | int | None

    def __post_init__(self) -> None:
        _check_basis(self.basis, None)

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        return ablate(self.basis, resid)


@pytree_dataclass
class AblatedDefence:
    """``compose(defence, SpanAblation(Q))`` that the solver can take at a clamp site:

        h_def = (I - Q Q^T) defence(h)

    ``sae`` / ``features`` (and ``values``, ``mode``) are the wrapped defence's, so the solver measures
    the same features and builds the same encoder-null projector. Clamp first, then ablate: see the
    module docstring for why, and for how an attacker is confined to match (``span_constraint``).
    """

    defence: Any
    ablation: SpanAblation

    @property
    def sae(self) -> SAE:
        return self.defence.sae

    @property
    def features(self) -> Any:
        return self.defence.features

    @property
    def values(self) -> Any:
        return self.defence.values

    @property
    def mode(self) -> str:
        return self.defence.mode

    @property
    def basis(self) -> Any:
        return self.ablation.basis

    def __call__(self, resid: Resid, slots: Slots) -> Resid:
        return self.ablation(self.defence(resid, slots), slots)


def with_ablation(defence: Any, basis: Any) -> Any:
    """``defence`` followed by the ablation of span(``basis``); ``basis=None`` returns ``defence``."""
    if basis is None:
        return defence
    return AblatedDefence(defence, SpanAblation(jnp.asarray(basis, jnp.float32)))


def span_basis(deltas: Any, rtol: float = 1e-3, *, prev: Any = None, max_new: int | None = None) -> np.ndarray:
    """An orthonormal basis ``Q [d_model, r]`` of the span of delta rows (and of ``prev``).

    Every row of ``deltas`` (any shape ``[..., d_model]``; all-zero rows, e.g. unused delta rows,
    add nothing) is projected off span(``prev``) first; the new directions are the right singular
    vectors of what is left whose singular value exceeds ``rtol`` times the largest singular value
    of the rows before that projection (so a direction already in ``prev`` is not added back from
    rounding noise). ``max_new`` keeps only the strongest new directions (refusal-direction ablation
    is rank 1). Host numpy, float64.

    Args:
        deltas: recovered deltas, ``[..., d_model]``.
        rtol: relative singular-value cutoff.
        prev: a basis from an earlier round, ``[d_model, r0]`` (kept as its first columns), or None.
        max_new: at most this many new directions (None: all above the cutoff).

    Returns:
        ``[d_model, r0 + r_new]``, orthonormal columns.

    Raises:
        ValueError: the span is empty (no rows, all-zero rows, or non-finite rows) and ``prev`` is None.
    """
    rows = np.asarray(deltas, np.float64)
    if rows.ndim < 1 or rows.shape[-1] == 0:
        raise ValueError(_MSG_EMPTY_SPAN.format(where="", why=f"deltas of shape {rows.shape}"))
    d = rows.shape[-1]
    rows = rows.reshape(-1, d)
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"span_basis: deltas hold non-finite values (rows {np.argwhere(~np.isfinite(rows).all(1))[:8, 0].tolist()}); a non-finite delta is never a recovery.")
    rows = rows[np.any(rows != 0, axis=1)]
    P = None if prev is None else np.asarray(prev, np.float64)
    if P is not None:
        _check_basis(P, d, " (prev)")
    if rows.shape[0] == 0:
        if P is None:
            raise ValueError(_MSG_EMPTY_SPAN.format(where="", why="every delta row is zero"))
        return P
    s_ref = np.linalg.svd(rows, compute_uv=False)[0]
    if P is not None:
        rows = rows - (rows @ P) @ P.T
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    keep = int(np.sum(s > rtol * s_ref))
    if max_new is not None:
        keep = min(keep, max_new)
    new = vt[:keep].T
    if P is None:
        if keep == 0:
            raise ValueError(_MSG_EMPTY_SPAN.format(where="", why=f"no singular value above rtol={rtol}"))
        return new
    # re-orthonormalise the new columns against prev (they are orthogonal up to rounding already)
    new = new - P @ (P.T @ new)
    new, _ = np.linalg.qr(new) if keep else (new, None)
    return np.concatenate([P, new], axis=1)


def span_constraint(basis: Any) -> optax.GradientTransformation:
    """An optax link that keeps ``delta`` orthogonal to span(``basis``): rows ``delta - (delta @ Q) Q^T``
    after the update. Chain it after the optimiser (``attacker_optimizer`` does, with the gradient
    projected before it too); the solver's own re-projection and budget clip follow."""
    Q = jnp.asarray(basis, jnp.float32)
    return projected_params(lambda delta: ablate(Q, delta))


class ConfinedOptimizer(optax.GradientTransformation):
    """An optax ``GradientTransformation`` whose ``repr`` is a stable description (optimiser, lr, basis
    digest and rank; kept on its ``update`` function), not two function addresses: run keys built from
    ``repr(RecoveryConfig)`` (``runner.run_recovery``) then match across reruns and processes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return getattr(self.update, "description", "ConfinedOptimizer")


def attacker_optimizer(optimizer: Any, lr: float, basis: Any) -> Any:
    """The attacker's optimiser under an ablation of span(``basis``): the gradient projected off the
    span, then ``optimizer`` (an optax transform, or ``"adam"`` / ``"sgd"`` with ``lr``), then
    ``span_constraint``. With ``basis=None`` it is ``optimizer`` itself (a name stays a name, so
    ``RecoveryConfig(optimizer=..., lr=lr)`` is the plain config).

    Why both projections: Adam rescales each coordinate, so its step from a projected gradient has
    span components again (removed by ``span_constraint``); and projecting only Adam's step of the
    raw gradient can point downhill for the confined problem when the gradient lies mostly in the
    span (seen on the tiny test model: the objective fell below its delta = 0 value).
    """
    if basis is None:
        return optimizer
    name = f"{optimizer}(lr={lr})" if isinstance(optimizer, str) else repr(optimizer)
    if isinstance(optimizer, str):
        optimizer = {"adam": optax.adam, "sgd": optax.sgd}[optimizer](lr)
    Q = jnp.asarray(basis, jnp.float32)
    tx = optax.chain(projected_updates(lambda g: ablate(Q, g)), optimizer, span_constraint(Q))
    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(Q)).tobytes()).hexdigest()[:12]
    update = tx.update  # a fresh closure of this chain: safe to label
    update.description = f"attacker_optimizer({name}, basis rank {Q.shape[1]} sha {digest})"
    return ConfinedOptimizer(tx.init, update)


def confine(direction: Any, basis: Any) -> Array:
    """``direction`` with its span(``basis``) component removed and rescaled to its own L2 norm: the
    random-direction control for an attacker confined by ``attacker_optimizer`` (a control with span
    components would spend part of its norm where the ablation erases it)."""
    g = jnp.asarray(direction, jnp.float32)
    if basis is None:
        return g
    p = ablate(jnp.asarray(basis, jnp.float32), g)
    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x)))
    return p * (norm(g) / jnp.maximum(norm(p), 1e-30))


# ----------------------------------------------------------------------------- guard


def check_defence(cfg: Any, site: Any, sae: SAE | None = None, features: Any = None, *, n_features: int | None = None,
                  basis: Any = None, require_basis: bool = False, allow_site_mismatch: bool = False) -> None:
    """Refuse, in one line, a defence that cannot apply; pure (a config, not a model), so call it
    before anything loads.

    Checks: ``site`` inside the model; the SAE reads ``d_model``; the SAE was trained at ``site``
    (unless ``allow_site_mismatch``); ``K`` (``n_features``, or ``len(features)``) at most the
    dictionary size ``d_sae``, and every feature id inside it; a span basis (when given, or when
    ``require_basis``) non-empty, ``[d_model, r]`` and orthonormal.

    Args:
        cfg: a ``TransformerConfig`` (or anything with ``.cfg``, e.g. a model).
        site: a ``Site`` or hook string.
        sae: the defence's SAE (None for an ablation alone).
        features: the feature ids (concrete), or None.
        n_features: K asked for (a sweep value), when the ids are not chosen yet.
        basis: a span-ablation basis, or None.
        require_basis: refuse a missing basis (a span ablation was asked for).
        allow_site_mismatch: accept an SAE placed away from its own ``hook_name``.

    Raises:
        ValueError: one line naming the site and what is wrong.
    """
    cfg = getattr(cfg, "cfg", cfg)
    site = Site.parse(site)
    if not site.layer < cfg.n_layers:
        raise ValueError(_MSG_SITE.format(site=site, n_layers=cfg.n_layers, last=cfg.n_layers - 1))
    if sae is not None:
        name = sae_name(sae)
        if sae.d_in != cfg.d_model:
            raise ValueError(_MSG_WIDTH.format(site=site, sae=name, d_in=sae.d_in, d_model=cfg.d_model))
        if sae.hook_name and not allow_site_mismatch and own_site(sae.hook_name) != site:
            raise ValueError(_MSG_HOOK.format(site=site, sae=name, hook=sae.hook_name))
        ks = [k for k in (n_features, None if features is None else int(np.asarray(features).shape[-1])) if k is not None]
        for k in ks:
            if k > sae.d_sae:
                raise ValueError(_MSG_K.format(site=site, k=k, sae=name, d_sae=sae.d_sae))
        if features is not None:
            f = np.asarray(features)
            bad = f[(f < 0) | (f >= sae.d_sae)]
            if bad.size:
                raise ValueError(f"Defence at site {site}: feature id(s) {sorted(set(bad.tolist()))[:8]} outside [0, {sae.d_sae}) of SAE {name}.")
    if basis is None:
        if require_basis:
            raise ValueError(_MSG_EMPTY_SPAN.format(where=f" at site {site}", why="no basis was given"))
        return
    _check_basis(np.asarray(basis), cfg.d_model, f" at site {site}")


# ----------------------------------------------------------------------------- side effects


@jax.jit
def _fidelity(model: Any, tokens: Any, valid: Any, mask: Any, hooks: Any, base_hooks: Any) -> tuple[Array, Array, Array]:
    def one(t, v):
        return forward(model, t, base_hooks, valid=v), forward(model, t, hooks, valid=v)

    base, dfd = jax.vmap(one)(tokens, valid)
    lp, lq = jax.nn.log_softmax(base.astype(jnp.float32), -1), jax.nn.log_softmax(dfd.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    agree = (jnp.argmax(lp, -1) == jnp.argmax(lq, -1)).astype(jnp.float32)
    w = mask.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    return (kl * w).sum() / n, (agree * w).sum() / n, w.sum()


def next_token_fidelity(model: Any, tokens: Any, valid: Any, hooks: Mapping[Any, Any], *,
                        base_hooks: Mapping[Any, Any] | None = None, mask: Any = None) -> dict[str, float]:
    """What a defence costs on given text: next-token distributions of the base model (no hooks, or
    ``base_hooks``) vs the defended one (``hooks``), at every masked slot.

    Returns ``kl_mean`` (mean ``KL(p_base || p_defended)``, nats), ``top1_agree`` (fraction of slots
    whose argmax token is the same) and ``n_slots``. ``tokens``/``valid`` are ``[batch, seq]``;
    ``mask`` defaults to ``valid``.

    >>> next_token_fidelity(model, toks, valid, {site: ErrorFreeSplice(sae, S, v)})["top1_agree"]
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    mask = valid if mask is None else jnp.asarray(mask, bool) & valid
    norm = lambda h: {Site.parse(s): f for s, f in (h or {}).items()}
    kl, agree, n = _fidelity(model, tokens, valid, mask, norm(hooks), norm(base_hooks))
    return {"kl_mean": float(kl), "top1_agree": float(agree), "n_slots": int(n)}


# ----------------------------------------------------------------------------- the game


@dataclasses.dataclass(frozen=True)
class GameRound:
    """One round of ``play_game``: the defence it faced and how the attacker did.

    ``basis_rank`` is the rank of the span ablated in this round's defence (0 in round 0);
    ``delta_norm_median`` is over the recovered examples (None when none); ``budget`` is what the
    caller said the solve used; ``n_defended``: counted examples this round's defence alone still
    blocks (``clamped_success`` False; None when the result has no such field); an ablation can
    undo part of the clamp, which this shows; ``stop`` says why the game ended after this round (None: it went on).
    """

    round: int
    n: int
    n_recovered: int
    n_defended: int | None
    recovery_rate: float
    basis_rank: int
    delta_norm_median: float | None
    delta_norm_max: float | None
    budget: float | None
    side_effects: dict
    stop: str | None

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Game:
    """``rounds`` in order; ``bases[r]``: the basis ablated in round r (None in round 0); ``stop``."""

    rounds: tuple[GameRound, ...]
    bases: tuple[Any, ...]
    stop: str

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.rounds]


def ablation_defence(hooks: Mapping[Any, Any], site: Any) -> Callable[[Any], dict[Site, Any]]:
    """``defend_fn`` for ``play_game``: ``hooks`` with the defence at ``site`` followed by the
    ablation of span(basis) (``with_ablation``); the other sites unchanged."""
    site = Site.parse(site)
    base = {Site.parse(s): f for s, f in hooks.items()}
    if site not in base:
        raise ValueError(f"ablation_defence: no defence at site {site} (sites: {sorted(map(str, base))}); the ablation composes with the defence at the attack site.")

    def defend(basis: Any) -> dict[Site, Any]:
        return {**base, site: with_ablation(base[site], basis)}

    return defend


def play_game(solve_fn: Callable[[Mapping[Site, Any], Any], Any], defend_fn: Callable[[Any], Mapping[Site, Any]], *,
              rounds: int, threshold: float, valid: Any = None, rtol: float = 1e-3, max_new: int | None = None,
              min_drop: float = 0.0, budget: float | None = None,
              side_effect_fn: Callable[[Mapping[Site, Any]], Mapping[str, float]] | None = None) -> Game:
    """The attack-defend game (module docstring): at most ``rounds`` rounds.

    Round ``r``: ``hooks = defend_fn(Q_r)`` (``Q_0 = None``: the base defence), ``res =
    solve_fn(hooks, Q_r)`` (the attacker re-optimises from scratch; it gets ``Q_r`` to confine itself,
    e.g. ``RecoveryConfig(optimizer=attacker_optimizer(..., Q_r))``). ``res`` has ``success [n]`` and
    ``delta [n, rows, d_model]`` (a ``RecoveryResult``). Then, in this order, the game stops when the
    recovery rate is below ``threshold`` (``"below_threshold"``), when ``r > 0`` and it did not fall
    by more than ``min_drop`` from round ``r - 1`` (``"stopped_falling"``), when ``r`` is the last
    round (``"rounds"``); otherwise ``Q_{r+1} = span_basis(recovered deltas, rtol, prev=Q_r,
    max_new=max_new)``, and it stops if that adds no direction (``"no_new_directions"``) or fills the
    residual (``"span_full"``: the ablation would erase it).

    Args:
        solve_fn: ``(hooks, basis) -> result``.
        defend_fn: ``basis -> hooks`` (e.g. ``ablation_defence(clamps, site)``).
        rounds: at most this many rounds (>= 1).
        threshold: stop once the recovery rate is below it.
        valid: ``[n]`` bool, the examples that count (e.g. round 0's valid flips); None: all.
        rtol, max_new: passed to ``span_basis``.
        min_drop: the fall in recovery rate a round must reach to continue (0: any fall).
        budget: recorded as is (the solve's L2 budget).
        side_effect_fn: ``hooks -> {name: value}`` recorded per round (e.g. ``next_token_fidelity``).

    Returns:
        A ``Game``.
    """
    if rounds < 1:
        raise ValueError(f"play_game: rounds={rounds}; play at least one round.")
    out: list[GameRound] = []
    bases: list[Any] = []
    basis, prev_rate, stop = None, None, "rounds"
    for r in range(rounds):
        hooks = defend_fn(basis)
        res = solve_fn(hooks, basis)
        success = np.asarray(res.success, bool).reshape(-1)
        delta = np.asarray(res.delta, np.float64)
        keep = np.ones_like(success) if valid is None else np.asarray(valid, bool).reshape(-1)
        won = success & keep
        n, k = int(keep.sum()), int(won.sum())
        rate = k / n if n else 0.0
        norms = np.sqrt(np.sum(np.square(delta.reshape(delta.shape[0], -1)), axis=1))[won]
        rank = 0 if basis is None else int(np.asarray(basis).shape[1])
        blocked = getattr(res, "clamped_success", None)
        n_def = None if blocked is None else int((~np.asarray(blocked, bool).reshape(-1) & keep).sum())
        stop_now, new = None, None
        if rate < threshold:
            stop_now = "below_threshold"
        elif prev_rate is not None and rate > prev_rate - min_drop:
            stop_now = "stopped_falling"
        elif r == rounds - 1:
            stop_now = "rounds"
        else:
            new = span_basis(delta[won], rtol, prev=basis, max_new=max_new) if (k or basis is not None) else None
            if new is None or new.shape[1] == rank:
                stop_now = "no_new_directions"
            elif new.shape[1] >= delta.shape[-1]:
                stop_now = "span_full"
        effects = dict(side_effect_fn(hooks)) if side_effect_fn is not None else {}
        out.append(GameRound(
            round=r, n=n, n_recovered=k, n_defended=n_def, recovery_rate=rate, basis_rank=rank,
            delta_norm_median=float(np.median(norms)) if k else None, delta_norm_max=float(norms.max()) if k else None,
            budget=None if budget is None else float(budget), side_effects=effects, stop=stop_now,
        ))
        bases.append(basis)
        if stop_now is not None:
            stop = stop_now
            break
        basis, prev_rate = new, rate
    return Game(rounds=tuple(out), bases=tuple(bases), stop=stop)
