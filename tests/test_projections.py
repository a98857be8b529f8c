"""Encoder-null projector (pinv / ridge), Jacobian projection (finite differences), clip, optax glue."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrecover.recover import projections as P
from jaxrecover.sae.autoencoder import SAE, encode_features, encode_pre
from jaxrecover.testing import random_transformer, tiny_config
from jaxrecover.model.transformer import run_blocks, run_to

D, D_SAE = 16, 24


def random_sae(key, dup: bool = False) -> SAE:
    k = jax.random.split(key, 3)
    W_enc = jax.random.normal(k[0], (D, D_SAE)) / D**0.5
    if dup:  # rank-deficient selection: column 1 == 2 * column 0
        W_enc = W_enc.at[:, 1].set(2.0 * W_enc[:, 0])
    return SAE(W_enc=W_enc, b_enc=0.5 + 0.1 * jax.random.normal(k[1], (D_SAE,)),
               W_dec=jax.random.normal(k[2], (D_SAE, D)) / D**0.5, b_dec=jnp.zeros(D))


FEATS = jnp.array([0, 1, 5, 7], jnp.int32)


def test_pinv_is_the_exact_orthogonal_projector():
    for dup in (False, True):
        sae = random_sae(jax.random.key(0), dup)
        p = P.encoder_null_projector(sae, FEATS)
        A = np.asarray(sae.W_enc[:, FEATS], np.float64)
        exact = np.eye(D) - A @ np.linalg.pinv(A.T @ A) @ A.T
        v = jax.random.normal(jax.random.key(1), (5, D))
        # fp32 matmuls against a float64 reference: the error scales with |v|, so the atol does too
        atol = 1e-5 * max(1.0, float(jnp.abs(v).max()))
        np.testing.assert_allclose(P.apply(p, v), np.asarray(v) @ exact, atol=atol)
        np.testing.assert_allclose(P.apply(p, P.apply(p, v)), P.apply(p, v), atol=atol)  # idempotent


def test_ridge_matches_authors_formula():
    sae = random_sae(jax.random.key(0))
    p = P.encoder_null_projector(sae, FEATS, method="ridge", ridge=1e-4)
    A = np.asarray(sae.W_enc[:, FEATS], np.float64)
    v = np.asarray(jax.random.normal(jax.random.key(1), (5, D)), np.float64)
    want = v - (A @ np.linalg.solve(A.T @ A + 1e-4 * np.eye(A.shape[1]), A.T @ v.T)).T
    # fp32 against float64: rounding scales with |v| (see test_pinv_is_the_exact_orthogonal_projector)
    np.testing.assert_allclose(P.apply(p, jnp.asarray(v, jnp.float32)), want, atol=1e-5 * max(1.0, np.abs(v).max()))


def test_projected_step_leaves_defended_preactivations_unchanged():
    sae = random_sae(jax.random.key(0))
    p = P.encoder_null_projector(sae, FEATS)
    h = jax.random.normal(jax.random.key(2), (3, D))
    g = 10.0 * jax.random.normal(jax.random.key(3), (3, D))
    before = encode_pre(sae, h)[:, FEATS]
    after = encode_pre(sae, h + P.apply(p, g))[:, FEATS]
    # Exact in real arithmetic; in fp32 each pre-activation is a D-term dot product of h + P g (entries
    # ~10) with A, so its rounding error scales with sum_i |x_i| |A_ij|, not with 1. D * eps times that
    # magnitude is the textbook dot-product bound (measured: 2-5 eps on x86 CPUs); a fixed atol=1e-5
    # failed on one AMD EPYC by 1.45e-5.
    A = sae.W_enc[:, FEATS]
    bound = D * float(jnp.finfo(jnp.float32).eps) * ((jnp.abs(h) + jnp.abs(g)) @ jnp.abs(A) + jnp.abs(sae.b_enc[FEATS])[None, :])
    np.testing.assert_array_less(jnp.abs(after - before), bound)
    assert float(jnp.abs(encode_pre(sae, h + g)[:, FEATS] - before).max()) > 1.0


def test_clip_l2():
    d = jnp.array([[3.0, 4.0], [0.0, 12.0]])  # row norms 5, 12; Frobenius 13
    np.testing.assert_allclose(jnp.linalg.norm(P.clip_l2(d, 6.5)), 6.5, rtol=1e-6)
    np.testing.assert_allclose(P.clip_l2(d, 20.0), d)
    np.testing.assert_allclose(jnp.linalg.norm(P.clip_l2(d, 6.0, per="position"), axis=1), [5.0, 6.0], rtol=1e-6)
    assert float(jnp.abs(P.clip_l2(d, 0.0)).max()) == 0.0


def test_optax_transforms():
    sae = random_sae(jax.random.key(0))
    p = P.encoder_null_projector(sae, FEATS)
    A = sae.W_enc[:, FEATS]
    g = jax.random.normal(jax.random.key(4), (2, D))
    tx = optax.chain(P.projected_updates(lambda u: P.apply(p, u)), optax.sgd(1.0))
    u, _ = tx.update(g, tx.init(g), g)
    # u @ A is zero in exact arithmetic; fp32 leaves rounding of the size of the terms |g| @ |A|
    tol = 1e-5 * max(1.0, float((jnp.abs(g) @ jnp.abs(A)).max()))
    assert float(jnp.abs(u @ A).max()) < tol
    tx2 = optax.chain(optax.sgd(1.0), P.projected_params(lambda x: P.clip_l2(P.apply(p, x), 0.5)))
    x = jnp.zeros((2, D))
    for _ in range(3):
        u, _ = tx2.update(g, tx2.init(x), x)
        x = optax.apply_updates(x, u)
        assert float(jnp.linalg.norm(x)) <= 0.5 * (1 + 1e-6)
        assert float(jnp.abs(x @ A).max()) < tol  # ||x|| <= 0.5 < ||g||: the same bound covers it


def _cross_layer_phi():
    """Phi(delta) = clamped latents at blocks.1.hook_resid_pre, delta added at blocks.0.hook_resid_mid."""
    from jaxrecover.sae.clamp import AddDelta
    from jaxrecover.core.sites import Site

    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    sae = random_sae(jax.random.key(5))
    tokens = jax.random.randint(jax.random.key(6), (5,), 0, cfg.d_vocab)
    x = run_to(model, tokens, 0)
    slots = jnp.array([3, 4], jnp.int32)

    def phi(delta):
        _, cap = run_blocks(model, x, 0, 2, {Site(0, "resid_mid"): AddDelta(delta, slots)}, capture=(Site(1),))
        return encode_features(sae, cap[Site(1)], FEATS)

    return phi


def test_jacobian_exact_projection_is_first_order_invariant():
    phi = _cross_layer_phi()
    delta = 0.3 * jax.random.normal(jax.random.key(7), (2, D))
    g = jax.random.normal(jax.random.key(8), (2, D))

    def project(dl, v):  # what the solver does each step: the row space of J at dl, then g off it
        value, vjp = jax.vjp(phi, dl)
        return P.project_off(P.jacobian_basis(lambda c: vjp(c)[0], value, method="exact"), v)

    pg = jax.jit(project)(delta, g)  # eager: seconds
    eps = 1e-2
    moved_free = jnp.linalg.norm(phi(delta + eps * g) - phi(delta))
    moved_proj = jnp.linalg.norm(phi(delta + eps * pg) - phi(delta))
    assert float(moved_free) > 1e-3
    assert float(moved_proj) < 0.05 * float(moved_free)  # only O(eps^2) is left
    _, vjp = jax.vjp(phi, delta)
    J = jax.vmap(lambda c: vjp(c)[0])(jnp.eye(5 * 4).reshape(20, 5, 4))  # every row of J
    # each J_m . pg is a sum of 2 * D products: zero up to rounding relative to sum |J_m| |pg|
    scale = float(jnp.einsum("mrd,rd->m", jnp.abs(J), jnp.abs(pg)).max())
    np.testing.assert_allclose(jnp.einsum("mrd,rd->m", J, pg), 0.0, atol=1e-4 * max(1.0, scale))


def test_jacobian_sketch_basis_is_orthonormal_and_removes_probes():
    phi = _cross_layer_phi()
    delta = 0.3 * jax.random.normal(jax.random.key(7), (2, D))
    z, vjp = jax.vjp(phi, delta)
    basis = P.jacobian_basis(lambda c: vjp(c)[0], z, method="sketch", key=jax.random.key(0), probes=4,
                             phi_ref=jnp.zeros_like(z))
    assert basis.shape == (5, 2 * D)
    gram = basis @ basis.T
    nz = jnp.linalg.norm(basis, axis=1) > 0
    np.testing.assert_allclose(gram, jnp.diag(nz.astype(jnp.float32)), atol=1e-4)
    drift_dir = vjp(z / jnp.linalg.norm(z))[0]  # the drift probe's VJP is removed from any gradient
    g = jax.random.normal(jax.random.key(9), (2, D))
    # a dot product that is zero in exact arithmetic: rounding is relative to |g| |drift_dir|
    tol = 1e-4 * max(1.0, float(jnp.linalg.norm(g) * jnp.linalg.norm(drift_dir)))
    assert abs(float(jnp.vdot(P.project_off(basis, g), drift_dir))) < tol


def test_an_empty_encoder_null_space_is_refused_before_solving():
    import pytest

    from jaxrecover.recover import objectives as O
    from jaxrecover.recover import solver as R
    from jaxrecover.sae.clamp import Clamp
    from jaxrecover.core.sites import Site

    P.check_encoder_null_space(8, 7)  # a 1-dimensional null space is still a space
    d, seq = 16, 4
    model = random_transformer(jax.random.key(0), tiny_config("llama", d_model=d, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32))
    sae = SAE(W_enc=jax.random.normal(jax.random.key(1), (d, 24)), b_enc=jnp.zeros(24),
              W_dec=jax.random.normal(jax.random.key(2), (24, d)), b_dec=jnp.zeros(d))
    clamp = Clamp(sae, jnp.arange(17, dtype=jnp.int32), jnp.zeros(17))  # 17 encoder columns span R^16
    ex = R.Example(tokens=jnp.ones((1, seq), jnp.int32), valid=jnp.ones((1, seq), bool),
                   delta_slots=jnp.array([seq - 1], jnp.int32), measure_mask=jnp.ones((seq,), bool),
                   target=O.Continuation(ids=jnp.ones((1, seq), jnp.int32), weights=jnp.ones((1, seq), jnp.float32)))
    site = Site(1, "resid_pre")
    solver = R.make_solver(R.RecoveryProblem(site, (site,)), R.RecoveryConfig(constraint="encoder"),
                           O.continuation_logprob, O.continuation_success)
    with pytest.raises(ValueError, match="17 clamped features on a 16-dimensional residual leave an empty null space"):
        jax.eval_shape(lambda: R.init(solver, model, ex, {site: clamp}))
