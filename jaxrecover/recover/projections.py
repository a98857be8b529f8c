"""Constraint maps for recovery perturbations: encoder-null projection (C1), Jacobian row-space
projection (cross-layer C2/C3 to first order) and the Frobenius budget (C4).

Contract:
- A perturbation ``delta`` is ``[rows, d_model]``: one row per perturbed slot (see ``recovery``).
- ``EncoderNullProjector.basis`` is a ``[d_model, k]`` matrix ``B`` with ``apply(P, v) = v - (v B) B^T``,
  applied to every row independently (C1 holds per optimised position).

  ================  ==================================================================================
  ``"pinv"``        ``B`` = orthonormal basis of span(A), ``A = W_enc[:, S]`` (SVD, rank cutoff; zero
                    columns past the rank). This is the paper's exact ``I - A (A^T A)^+ A^T``.
  ``"ridge"``       ``B = A L^{-T}`` with ``L L^T = A^T A + ridge I`` (Cholesky, precomputed), so that
                    ``v - B B^T v = v - A (A^T A + ridge I)^{-1} A^T v``: the authors' code (ridge 1e-4).
                    Not exactly idempotent: it leaves a ``O(ridge / sigma_min^2)`` component along A.
  ================  ==================================================================================

- Because SAE pre-activations are affine in the residual, any ``delta`` whose rows lie in the
  encoder-null space leaves the ``S`` pre-activations (hence relu/jumprelu latents) exactly unchanged.
  This does NOT hold for top-k SAEs (the ranking depends on every latent).
- ``jacobian_basis`` builds an orthonormal basis of (a sketch of) the row space of
  ``J = dPhi/d delta``; ``project_off`` removes it from a gradient.

  ================  ==================================================================================
  ``"exact"``       every row of J, ``chunk`` VJPs at a time, orthonormalised block by block as
                    they come (``exact_jacobian_basis``: block Gram-Schmidt through small Gram
                    matrices, deflated twice per block); rows known to be zero (masked entries,
                    latents at 0) are skipped. The paper's ``I - J^T (J J^T)^+ J`` up to rounding.
                    Memory: ``chunk`` VJP working sets plus the basis (``(m + chunk) x p`` floats,
                    ``m`` = entries of Phi, ``p`` = entries of delta); compute: one VJP per active
                    row, so give it a ``vjp_fn`` of Phi ALONE (the blocks up to the last measured
                    site), not of the whole objective. ``jacobian_rows`` gives J itself.
  ``"sketch"``      the authors' code: ``probes`` random unit vectors in Phi-space (plus the unit drift
                    direction when nonzero), their VJPs, Gram-Schmidt with drop tolerance 1e-7.
  ================  ==================================================================================

- ``clip_l2`` is the code's rescale ``delta * eps / (||delta|| + 1e-8)`` when ``||delta|| > eps``
  (Frobenius over all rows, the paper; or per row).
- ``projected_updates(fn)`` is an optax transform applying ``fn`` to the incoming gradient (put it
  *before* Adam, as paper and code do); ``projected_params(fn)`` rewrites the update so that the new
  parameters equal ``fn(params + update)`` (put it *last*: post-step re-projection and clipping).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

from jaxrecover.core.pytree import pytree_dataclass
from jaxrecover.sae.autoencoder import SAE

PROJECTOR_METHODS = ("pinv", "ridge")
JACOBIAN_METHODS = ("exact", "sketch")
JACOBIAN_CHUNK = 16  # VJPs per iteration of the exact Jacobian (memory ~ chunk, not ~ rows); 16 measured
# fastest on the main job (32: 131 s, 16: 110 s, 8: 130 s for 15 steps; benchmarks/README.md)
BUDGET_PER = ("example", "position")
GS_DROP_TOL = 1e-7  # authors' Gram-Schmidt drop tolerance
CLIP_EPS = 1e-8  # authors' clipping denominator guard


@pytree_dataclass
class EncoderNullProjector:
    """``apply(P, v) = v - (v @ basis) @ basis.T`` row by row (see module docstring)."""

    basis: Float[Array, "d k"]


def check_encoder_null_space(d_in: int, n_features: int) -> None:
    """Refuse a clamped set whose encoder columns (generically) span the whole residual: with
    ``n_features >= d_in`` the encoder-null space is {0}, so an encoder-projected delta cannot move
    and "not recovered" would be a statement about the projector, not about the defence."""
    if n_features >= d_in:
        raise ValueError(
            f"encoder-null projection: {n_features} clamped features on a {d_in}-dimensional residual leave an "
            f"empty null space (their encoder columns span every direction), so the only encoder-null delta is 0. "
            f"Clamp fewer than {d_in} features per site, or use the unconstrained or Jacobian constraint.")


def encoder_null_projector(
    sae: SAE, features: Int[Array, " k"], *, method: str = "pinv", ridge: float = 1e-4, rcond: float | None = None
) -> EncoderNullProjector:
    """Projector onto the null space of ``A^T``, ``A = W_enc[:, features]``.

    Args:
        sae: the SAE at the perturbed site.
        features: the clamped feature indices ``S``.
        method: ``"pinv"`` (paper, exact orthogonal projector) or ``"ridge"`` (authors' code).
        ridge: the ridge of ``"ridge"`` (code: 1e-4).
        rcond: relative singular-value cutoff for ``"pinv"`` (default ``max(d, k) * eps``, as numpy).

    >>> P = encoder_null_projector(sae, jnp.array([3, 7]))
    >>> v_null = apply(P, v)   # encode_pre(sae, x + v_null)[..., S] == encode_pre(sae, x)[..., S]
    """
    A = sae.W_enc[:, features].astype(jnp.float32)  # [d, k]
    if method == "pinv":
        U, s, _ = jnp.linalg.svd(A, full_matrices=False)  # U [d, min(d, k)]
        cutoff = (max(A.shape) * jnp.finfo(A.dtype).eps if rcond is None else rcond) * jnp.max(s)
        keep = (s > cutoff).astype(U.dtype)
        return EncoderNullProjector(basis=U * keep[None, :])
    if method == "ridge":
        G = A.T @ A + ridge * jnp.eye(A.shape[1], dtype=A.dtype)
        L = jnp.linalg.cholesky(G)
        # B = A L^{-T}  <=>  B^T = L^{-1} A^T, so B B^T = A (L L^T)^{-1} A^T
        Bt = jax.scipy.linalg.solve_triangular(L, A.T, lower=True)
        return EncoderNullProjector(basis=Bt.T)
    raise ValueError(f"Unknown projector method {method!r}; expected one of {PROJECTOR_METHODS}.")


def apply(proj: EncoderNullProjector, v: Float[Array, "rows d"]) -> Float[Array, "rows d"]:
    """Project every row of ``v`` off span(A) (see ``EncoderNullProjector``)."""
    B = proj.basis.astype(v.dtype)
    return v - (v @ B) @ B.T


# ----------------------------------------------------------------------------- Jacobian (cross-layer)


def _flat(tree: Any) -> Array:
    return ravel_pytree(tree)[0]


def _gram_schmidt(vectors: Float[Array, "n p"], tol: float) -> Float[Array, "n p"]:
    """Orthonormalise rows in order (modified GS, two passes); rows whose residual norm <= tol become 0."""
    basis = jnp.zeros_like(vectors)
    for i in range(vectors.shape[0]):  # n is small and static (probes + 1)
        v = vectors[i]
        for _ in range(2):  # re-orthogonalisation: float32 GS loses orthogonality otherwise
            v = v - basis.T @ (basis @ v)
        n = jnp.linalg.norm(v)
        keep = n > tol
        basis = basis.at[i].set(jnp.where(keep, v / jnp.where(keep, n, 1.0), jnp.zeros_like(v)))
    return basis


def jacobian_rows(vjp_fn: Callable[[Any], Any], phi: Any, *, chunk: int = JACOBIAN_CHUNK) -> Array:
    """Every row of ``J = dPhi/d delta``: row ``i`` is ``vjp_fn(e_i)`` (``e_i`` the one-hot cotangent
    of the ``i``-th entry of ``ravel_pytree(phi)``), ``chunk`` VJPs at a time.

    ``lax.map(..., batch_size=chunk)`` vmaps the VJP over ``chunk`` cotangents per iteration and
    scans over the chunks (the remainder runs as one smaller batch), so the working set is ``chunk``
    backward passes whatever the number of rows; only the output ``[m, p]`` grows with ``m``. The
    one-hot cotangents are built inside the map (no ``[m, m]`` identity).

    Args:
        vjp_fn: ``cotangent_phi -> d(<cotangent, Phi>)/d delta`` (pytree of ``phi`` in, any pytree out).
        phi: ``Phi`` (any pytree of arrays; only its structure, shapes and dtype are used).
        chunk: VJPs per iteration (``>= 1``; capped at the number of rows).

    Returns:
        ``J`` as ``[m, p]``: ``m`` = entries of ``phi``, ``p`` = entries of ``vjp_fn``'s output.
    """
    if chunk < 1:
        raise ValueError(f"jacobian_rows: chunk={chunk!r} must be >= 1.")
    flat_phi, unravel = ravel_pytree(phi)
    m = flat_phi.shape[0]

    def row(i: Array) -> Array:
        return _flat(vjp_fn(unravel(jax.nn.one_hot(i, m, dtype=flat_phi.dtype))))

    return jax.lax.map(row, jnp.arange(m, dtype=jnp.int32), batch_size=min(chunk, m))


ORTH_TAU = 1e-6  # per deflation round: Gram eigenvalues below this x the largest wait for the next round
ORTH_ROUNDS = 2  # rounds per chunk: resolves singular values down to ~ORTH_TAU ** (ROUNDS / 2) of the chunk's


def _deflate(C: Array, Q: Array) -> Array:
    """``C`` minus its components along the (orthonormal or zero) rows of ``Q``."""
    return C - (C @ Q.T) @ Q


def _gram_rows(C: Array, tau: float, floor2: Array | float) -> Array:
    """Orthogonal rows spanning the part of ``C``'s row space whose Gram eigenvalues exceed
    ``max(tau * lambda_max, floor2)``, scaled to unit norm (``diag(lambda)^-1/2 V^T C``); zero rows
    for the rest. In float32 the rows are orthonormal only to ``eps / tau``: callers normalise twice."""
    lam, V = jnp.linalg.eigh(C @ C.T)  # ascending; C is [chunk, p], chunk small
    keep = lam > jnp.maximum(tau * lam[-1], floor2)
    inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return (V * inv[None, :]).T @ C


def exact_jacobian_basis(
    vjp_fn: Callable[[Any], Any],
    phi: Any,
    *,
    active: Any = None,
    chunk: int = JACOBIAN_CHUNK,
    rcond: float = 1e-6,
) -> Array:
    """Orthonormal rows spanning the row space of ``J = dPhi/d delta`` (every row, exact up to
    rounding), built ``chunk`` rows at a time without forming ``J``.

    Rows are visited active-first: ``active`` (pytree of bools like ``phi``; default all) marks
    the entries whose row may be nonzero, and a ``lax.while_loop`` stops after the last chunk that
    holds one, so the cost is ``ceil(n_active / chunk)`` batches of ``chunk`` VJPs (under ``vmap``:
    the largest ``n_active`` of the batch). Inactive rows are TREATED AS ZERO: pass only entries
    whose row is exactly zero (a masked entry; a ReLU / JumpReLU / TopK latent that is 0, whose
    derivative JAX defines as 0).

    Each chunk of rows is orthogonalised against the basis so far and orthonormalised through its
    small ``[chunk, chunk]`` Gram matrix (block Gram-Schmidt; only matmuls and a small ``eigh``:
    XLA's CPU QR/SVD of a ``p x m`` matrix is 10-50x slower than the matmuls). A Gram matrix squares
    the condition number, so each chunk is deflated ``ORTH_ROUNDS`` times (directions whose Gram
    eigenvalue is below ``ORTH_TAU`` x the largest are picked up by the next round) and every new
    block is re-orthogonalised and re-normalised once. Directions with singular value
    ``<= rcond * (largest row norm so far)`` are dropped: ``|J_i . project_off(basis, g)|`` is then
    ``<~ rcond * |J| |g|`` plus rounding.

    Memory: ``chunk`` VJP working sets plus the basis, ``[m + chunk, p]`` floats (``m`` = entries of
    ``phi``, ``p`` = entries of ``delta``).

    Returns:
        ``[m + chunk, p]``: orthonormal rows, then zero rows.
    """
    if chunk < 1:
        raise ValueError(f"exact_jacobian_basis: chunk={chunk!r} must be >= 1.")
    flat_phi, unravel = ravel_pytree(phi)
    m, dtype = flat_phi.shape[0], flat_phi.dtype
    c = min(chunk, m)
    n_chunks = -(-m // c)
    act = jnp.ones((m,), bool) if active is None else _flat(active).astype(bool)
    order = jnp.argsort(jnp.logical_not(act), stable=True).astype(jnp.int32)  # active rows first
    order = jnp.concatenate([order, jnp.full((n_chunks * c - m,), m, jnp.int32)])  # index m = no row
    weight = jnp.concatenate([act.astype(dtype), jnp.zeros((1,), dtype)])
    n_active = jnp.sum(act, dtype=jnp.int32)
    out = jax.eval_shape(lambda e: _flat(vjp_fn(unravel(e))), flat_phi)
    p, qdtype = out.shape[0], out.dtype  # the basis lives in delta's dtype (Phi may be narrower)
    n_q = m + c  # rank <= m; the slack keeps every dynamic_update_slice in bounds

    def row(i: Array) -> Array:
        return _flat(vjp_fn(unravel(jax.nn.one_hot(i, m, dtype=dtype) * weight[i])))

    def body(carry):
        k, r, Q, scale2 = carry
        C = jax.vmap(row)(jax.lax.dynamic_slice(order, (k * c,), (c,)))  # [c, p]
        scale2 = jnp.maximum(scale2, jnp.max(jnp.sum(jnp.square(C), axis=1)))
        for _ in range(ORTH_ROUNDS):
            C = _deflate(C, Q)
            B = _gram_rows(C, ORTH_TAU, jnp.square(rcond) * scale2)
            B = _gram_rows(_deflate(B, Q), 0.0, 0.25)  # rows are ~unit or ~0 here: re-orthonormalise
            new = jnp.sum(B * B, axis=1) > 0.5
            B = B[jnp.argsort(jnp.logical_not(new), stable=True)]  # kept rows first, zeros after
            Q = jax.lax.dynamic_update_slice(Q, B, (r, jnp.zeros((), jnp.int32)))
            r = jnp.minimum(r + jnp.sum(new, dtype=jnp.int32), n_q - c)
        return k + 1, r, Q, scale2

    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((n_q, p), qdtype), jnp.zeros((), qdtype))
    return jax.lax.while_loop(lambda cr: cr[0] * c < n_active, body, init)[2]


def jacobian_basis(
    vjp_fn: Callable[[Any], Any],
    phi: Any,
    *,
    method: str = "exact",
    key: Array | None = None,
    probes: int = 8,
    phi_ref: Any = None,
    drift_probe: bool = True,
    tol: float = GS_DROP_TOL,
    rcond: float = 1e-6,
    chunk: int = JACOBIAN_CHUNK,
    active: Any = None,
) -> Array:
    """Orthonormal rows spanning (a sketch of) the row space of ``J = dPhi/d delta``.

    Args:
        vjp_fn: ``cotangent_phi -> d(<cotangent, Phi>)/d delta`` (e.g. from ``jax.vjp``), where the
            cotangent has the pytree structure of ``phi``. Extra outputs may be zeroed by the caller.
        phi: ``Phi`` at the current ``delta`` (any pytree of arrays).
        method: ``"exact"`` (every row of J: ``exact_jacobian_basis``) or ``"sketch"``.
        key: PRNG key for the sketch's Gaussian probes (seed it per step).
        probes: number of random unit probes (code: 8).
        phi_ref: reference ``Phi`` (delta = 0) for the drift probe ``(Phi - Phi_ref)/||.||``.
        drift_probe: add the drift probe when ``||Phi - Phi_ref|| > 1e-8``.
        tol: Gram-Schmidt drop tolerance (code: 1e-7).
        rcond: ``"exact"``: directions with singular value ``<= rcond * max row norm`` are dropped.
        chunk: ``"exact"``: rows (VJPs) per iteration; the span does not depend on it.
        active: ``"exact"``: entries whose row can be nonzero (see ``exact_jacobian_basis``).

    Returns:
        ``[n_basis, delta.size]``: orthonormal rows (flattened like ``delta.reshape(-1)``); unused
        rows are zero.
    """
    flat_phi, unravel = ravel_pytree(phi)
    m = flat_phi.shape[0]
    if method == "exact":
        rows = exact_jacobian_basis(vjp_fn, phi, active=active, chunk=chunk, rcond=rcond)
    elif method == "sketch":
        if key is None:
            raise ValueError("jacobian_basis(method='sketch') needs a PRNG key.")
        R = jax.random.normal(key, (probes, m), flat_phi.dtype)
        R = R / jnp.linalg.norm(R, axis=1, keepdims=True)
        if drift_probe and phi_ref is not None:
            d = flat_phi - _flat(phi_ref)
            n = jnp.linalg.norm(d)
            use = n > 1e-8
            d = jnp.where(use, d / jnp.where(use, n, 1.0), jnp.zeros_like(d))
            R = jnp.concatenate([R, d[None, :]], axis=0)
        V = jax.vmap(lambda r: _flat(vjp_fn(unravel(r))))(R)  # [n_probe, p]
        rows = _gram_schmidt(V, tol)
    else:
        raise ValueError(f"Unknown jacobian method {method!r}; expected one of {JACOBIAN_METHODS}.")
    return rows


def project_off(basis: Array, g: Array) -> Array:
    """``g - sum_b <g, b> b`` for orthonormal (or zero) rows ``b`` of ``basis`` ``[n, g.size]``."""
    flat = g.reshape(-1)
    return (flat - basis.T @ (basis @ flat)).reshape(g.shape)


# ----------------------------------------------------------------------------- budget (C4)


def clip_l2(delta: Float[Array, "rows d"], budget: float | Array, *, per: str = "example") -> Float[Array, "rows d"]:
    """Rescale so ``||delta||_F <= budget`` (``per="example"``, paper) or each row ``<= budget``
    (``per="position"``), with the code's ``budget / (norm + 1e-8)`` factor. ``budget = 0`` gives 0."""
    if per == "example":
        n = jnp.sqrt(jnp.sum(jnp.square(delta)))
    elif per == "position":
        n = jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1, keepdims=True))
    else:
        raise ValueError(f"Unknown budget_per {per!r}; expected one of {BUDGET_PER}.")
    scale = jnp.where(n > budget, budget / (n + CLIP_EPS), jnp.ones_like(n))
    return delta * scale.astype(delta.dtype)


# ----------------------------------------------------------------------------- optax glue


def projected_updates(fn: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Apply ``fn`` to the incoming updates (gradients). Chain it BEFORE the optimiser:
    ``optax.chain(projected_updates(lambda g: apply(P, g)), optax.adam(lr))``."""

    def update(updates, state, params=None):
        del params
        return fn(updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def projected_params(fn: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Last link of a chain: rewrites ``u`` so that ``params + u == fn(params + u)`` (post-step
    re-projection / clipping of ``delta`` itself)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("projected_params needs params: call tx.update(grads, state, params).")
        new = fn(optax.apply_updates(params, updates))
        return jax.tree.map(jnp.subtract, new, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
