"""Exact cross-layer Jacobian projection in bounded memory (``projections.exact_jacobian_basis``):
against a dense ``jax.jacrev`` in float64 (rank-deficient J, zero rows, chunk sizes that do not
divide the row count), the chunk bound on XLA's scratch memory, and the solver's projected step on
a tiny random model (delta one block below the clamp)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import objectives as O
from jaxrecover.recover import projections as P
from jaxrecover.recover import solver as R
from jaxrecover.sae.clamp import Clamp
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_sae, random_transformer, tiny_config

ROWS, D, SEQ, K = 3, 8, 5, 4  # delta [ROWS, D]; Phi [SEQ, K]


def _phi_fn(dtype, seed: int = 0):
    """A causal nonlinear ``delta [ROWS, D] -> Phi [SEQ, K]`` (attention-like mixing + ReLU latents):
    Phi at slot t sees delta rows at slots <= t; latents that are 0 have zero rows."""
    rng = np.random.default_rng(seed)
    slots = jnp.array([1, 2, 4])
    x0 = jnp.asarray(rng.standard_normal((SEQ, D)), dtype)
    W1 = jnp.asarray(rng.standard_normal((D, D)) / D**0.5, dtype)
    W_enc = jnp.asarray(rng.standard_normal((D, K)) / D**0.5, dtype)
    W_enc = W_enc.at[:, 1].set(2.0 * W_enc[:, 0])  # duplicate latent direction: J is rank-deficient
    b = jnp.asarray([0.3, 0.6, -5.0, 0.2], dtype)  # latent 2 is dead (always 0)
    causal = jnp.tril(jnp.ones((SEQ, SEQ), dtype))

    def phi(delta):
        x = x0.at[slots].add(delta)
        a = jnp.where(causal > 0, jnp.tanh(x @ W1 @ x.T / D), -jnp.inf)
        h = x + jax.nn.softmax(a, axis=-1) @ jnp.tanh(x @ W1)
        return jax.nn.relu(h @ W_enc + b[None, :])

    return phi


def _basis(phi, chunk, skip_zeros):
    """jit: the exact basis at ``delta`` (eager dispatch of the chunk loop costs seconds)."""

    def fn(delta):
        z, vjp = jax.vjp(phi, delta)
        return P.exact_jacobian_basis(lambda c: vjp(c)[0], z, active=(z != 0) if skip_zeros else None, chunk=chunk)

    return jax.jit(fn)


def _check_exact(phi, delta, g, basis, tol):
    nz = jnp.linalg.norm(basis, axis=1) > 0.5
    np.testing.assert_allclose(basis @ basis.T, jnp.diag(nz.astype(basis.dtype)), atol=tol)  # orthonormal
    pg = P.project_off(basis, g)
    J = jax.jit(jax.jacrev(phi))(delta).reshape(SEQ * K, ROWS * D)  # dense reference
    # J pg vanishes relative to |J| |g|, and pg is the orthogonal projection of g onto null(J)
    assert float(jnp.max(jnp.abs(J @ pg.reshape(-1)))) <= tol * float(jnp.linalg.norm(J, 2) * jnp.linalg.norm(g))
    Jn = np.asarray(J, np.float64)
    ref = g.reshape(-1) - Jn.T @ (np.linalg.pinv(Jn.T, rcond=1e-10) @ np.asarray(g, np.float64).reshape(-1))
    np.testing.assert_allclose(np.asarray(pg).reshape(-1), ref, atol=tol * float(jnp.linalg.norm(g)))
    assert int(nz.sum()) == np.linalg.matrix_rank(Jn)


def test_exact_basis_equals_dense_pinv_projection_float64():
    with jax.enable_x64(True):
        phi = _phi_fn(jnp.float64)
        delta = 0.3 * jax.random.normal(jax.random.key(1), (ROWS, D), jnp.float64)
        g = jax.random.normal(jax.random.key(2), (ROWS, D), jnp.float64)
        assert int(jnp.sum(phi(delta) == 0)) >= SEQ  # the dead latent (and any at the kink) gives zero rows
        # 20 rows: one per chunk, 6 chunks + a remainder, all in one chunk; zero rows skipped or not
        for chunk, skip in ((1, True), (3, True), (3, False), (64, False)):
            _check_exact(phi, delta, g, _basis(phi, chunk, skip)(delta), 1e-10)


def test_exact_basis_float32_is_exact_to_rounding_and_jacobian_rows_is_j():
    phi = _phi_fn(jnp.float32)
    delta = 0.3 * jax.random.normal(jax.random.key(1), (ROWS, D))
    g = jax.random.normal(jax.random.key(2), (ROWS, D))
    _check_exact(phi, delta, g, _basis(phi, 4, True)(delta), 2e-5)
    z = phi(delta)
    rows = jax.jit(lambda dl: P.jacobian_rows(lambda c: jax.vjp(phi, dl)[1](c)[0], z, chunk=7))  # 20 = 2 x 7 + 6
    np.testing.assert_allclose(rows(delta), jax.jit(jax.jacrev(phi))(delta).reshape(SEQ * K, ROWS * D), atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        P.jacobian_rows(lambda c: c, z, chunk=0)


def _temp_bytes(m_rows: int, chunk: int) -> int:
    """XLA scratch of the exact basis for a wide MLP Phi with ``m_rows`` outputs."""
    d, width = 8, 4096

    def basis(delta, W1, W2):
        z, vjp = jax.vjp(lambda dl: jnp.tanh(jnp.tanh(dl @ W1) @ W2), delta)
        return P.exact_jacobian_basis(lambda c: vjp(c)[0], z, chunk=chunk)

    args = (jax.ShapeDtypeStruct((1, d), jnp.float32), jax.ShapeDtypeStruct((d, width), jnp.float32),
            jax.ShapeDtypeStruct((width, m_rows), jnp.float32))
    mem = jax.jit(basis).lower(*args).compile().memory_analysis()
    if mem is None:
        pytest.skip("no XLA memory analysis on this backend")
    return int(mem.temp_size_in_bytes)


def test_scratch_memory_is_bounded_by_the_chunk():
    # every VJP holds a [1, 4096] hidden cotangent; all 256 rows at once is >= 4 MiB of scratch
    small, big = _temp_bytes(256, 4), _temp_bytes(256, 256)
    assert small < big / 4
    assert _temp_bytes(1024, 4) < big / 2  # 4x the rows, same chunk: still far below unchunked


def _solver_setup(method: str, chunk: int = 3):
    cfg = tiny_config("llama")
    model = random_transformer(jax.random.key(3), cfg)
    site, clamp_site = Site(0, "resid_post"), Site(1, "resid_post")
    clamps = {clamp_site: Clamp(random_sae(cfg.d_model, 48, seed=1, hook_name=str(clamp_site)), jnp.arange(6),
                                jnp.full(6, 0.5))}
    seq, rows = 10, 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, cfg.d_vocab, (1, seq)).astype(np.int32)
    w = np.zeros((1, seq), np.float32)
    w[:, 6:9] = 1.0
    ex = R.Example(tokens=jnp.asarray(tokens), valid=jnp.ones((1, seq), bool),
                   delta_slots=jnp.array([6, 7, 8], jnp.int32), measure_mask=jnp.ones((seq,), bool),
                   target=O.Continuation(ids=jnp.asarray(np.roll(tokens, -1, -1)), weights=jnp.asarray(w)))
    rc = R.RecoveryConfig(steps=1, optimizer="sgd", lr=1.0, budget=1e6, constraint=R.JacobianNull(method, chunk=chunk))
    solver = R.make_solver(R.RecoveryProblem(site, (clamp_site,)), rc, O.LOGPROB.objective, O.LOGPROB.success)
    return solver, model, clamps, ex, rows


def test_solver_exact_step_is_in_the_dense_jacobian_null_space():
    solver, model, clamps, ex, rows = _solver_setup("exact")
    window = R.plan_window(solver, jax.tree.map(lambda a: a[None], ex))
    assert window.cut == 6  # the step runs slots 6.. against cached keys/values
    ctx, st0 = jax.jit(lambda m, c: R.init(solver, m, ex, c, window))(model, clamps)
    st1, _ = jax.jit(lambda m, c, x, s: R.advance(solver, m, ex, c, x, s, 1, window))(model, clamps, ctx, st0)
    step = st1.delta - st0.delta  # SGD, no clip: -lr * projected gradient

    def jac(m, c, x, dl):  # dense reference: jacrev of the measured latents over the window
        return jax.jacrev(lambda d: R._forward(solver, m, ex, c, x, d, window, readout=False)[1])(dl)

    J = jnp.concatenate([j.reshape(-1, rows * model.cfg.d_model) for j in jax.jit(jac)(model, clamps, ctx, st0.delta)])
    assert float(jnp.linalg.norm(J)) > 0 and float(jnp.linalg.norm(step)) > 0
    assert float(jnp.max(jnp.abs(J @ step.reshape(-1)))) <= 1e-5 * float(jnp.linalg.norm(J, 2) * jnp.linalg.norm(step))
    # the config knob reaches the strategy (chunk invariance: the float64 test above)
    assert solver.cfg.constraint.chunk == 3
    assert R.RecoveryConfig(constraint="jacobian").constraint.chunk == P.JACOBIAN_CHUNK
    with pytest.raises(ValueError, match="JacobianNull.chunk=0"):
        R.JacobianNull(chunk=0)
