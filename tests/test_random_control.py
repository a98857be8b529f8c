"""Random-direction control: same norm, same constraint subspace, replayed under the clamp."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.sae.clamp import Clamp
from jaxrecover.experiment import suite as S
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_transformer, tiny_config

SEQ, D = 6, 16
SITE = Site(1, "resid_pre")


def _problem(constraint: str, delta_site: Site = SITE):
    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    k = jax.random.split(jax.random.key(1), 4)
    sae = SAE(W_enc=jax.random.normal(k[0], (D, 24)) / D**0.5, b_enc=0.3 * jnp.ones(24),
              W_dec=jax.random.normal(k[1], (24, D)), b_dec=jnp.zeros(D))
    clamp = Clamp(sae, jnp.array([0, 3, 7], jnp.int32), jnp.zeros(3))
    n = 4
    ex = R.Example(tokens=jax.random.randint(k[2], (n, 1, SEQ), 0, cfg.d_vocab), valid=jnp.ones((n, 1, SEQ), bool),
                   delta_slots=jnp.tile(jnp.array([SEQ - 2, SEQ - 1], jnp.int32), (n, 1)),
                   measure_mask=jnp.ones((n, SEQ), bool),
                   target=O.Continuation(ids=jax.random.randint(k[3], (n, 1, SEQ), 0, cfg.d_vocab),
                                         weights=jnp.ones((n, 1, SEQ), jnp.float32)))
    rc = R.RecoveryConfig(steps=4, lr=0.1, budget=3.0, constraint=constraint)
    solver = R.make_solver(R.RecoveryProblem(delta_site, (SITE,)), rc, O.continuation_logprob, O.continuation_success)
    return solver, model, ex, {SITE: clamp}, sae


def test_random_direction_keeps_norm_rows_and_encoder_null():
    solver, model, ex, clamps, sae = _problem("encoder")
    one = jax.tree.map(lambda a: a[0], ex)
    delta = jnp.zeros((2, D)).at[0, 0].set(2.5)
    rd = jax.jit(R.random_direction, static_argnums=0)(solver, model, one, clamps, delta, jax.random.key(3))
    np.testing.assert_allclose(float(jnp.linalg.norm(rd)), 2.5, rtol=1e-5)
    assert float(jnp.abs(rd[1]).max()) > 0  # both rows carry the random direction
    # orthogonal to the clamped features' encoder rows: their pre-activations do not move
    W = sae.W_enc[:, clamps[SITE].features]
    assert float(jnp.abs(rd @ W).max()) <= 1e-5 * float(jnp.abs(rd).max() * jnp.abs(W).sum(0).max())
    other = jax.jit(R.random_direction, static_argnums=0)(solver, model, one, clamps, delta, jax.random.key(4))
    assert not np.allclose(rd, other)  # a different seed, a different direction


def test_random_control_counts_recovered_examples_only():
    solver, model, ex, clamps, _ = _problem("none")
    res = S.run_solver(solver, model, ex, clamps, progress=False).result
    forced = dataclasses.replace(res, success=np.array([True, False, True, False]),
                                 non_finite=np.array([False, False, True, False]))
    rc = S.random_control(solver, model, ex, clamps, forced, seeds=2)
    assert rc["n_recovered"] == 1 and rc["random"]["n"] == 2  # a non-finite delta is never recovered
    assert set(rc["per_example"]) == {0}


def test_evaluate_delta_sets_equals_one_call_per_set():
    # the attribution replays every part in one call (one init per example): each set must measure
    # exactly as its own evaluate_deltas call would, whatever the other sets hold
    solver, model, ex, clamps, _ = _problem("none")
    k = jax.random.split(jax.random.key(5), 3)
    sets = [jax.random.normal(kk, (4, 2, D)) * s for kk, s in zip(k, (0.0, 1.0, 10.0))]
    joint = S.evaluate_delta_sets(solver, model, ex, clamps, sets)
    assert len(joint) == 3
    for d, got in zip(sets, joint):
        alone = S.evaluate_deltas(solver, model, ex, clamps, d)
        np.testing.assert_array_equal(np.asarray(got.result.success), np.asarray(alone.result.success))
        for a, b in ((got.result.objective, alone.result.objective),
                     (got.result.metrics["drift_rel"], alone.result.metrics["drift_rel"])):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    assert not np.allclose(np.asarray(joint[0].result.objective), np.asarray(joint[2].result.objective))


def test_random_direction_on_the_solve_window_equals_the_full_pass():
    # the control's Jacobian-null projection runs on the solve's window (slots before the first delta
    # row have zero Jacobian rows): same direction as the full-sequence pass, up to rounding
    solver, model, ex, clamps, _ = _problem("jacobian", delta_site=Site(0, "resid_pre"))
    w = ex.target.weights.at[..., : SEQ - 2].set(0.0)  # the objective reads the last slots only
    ex = dataclasses.replace(ex, target=dataclasses.replace(ex.target, weights=w))
    one = jax.tree.map(lambda a: a[0], ex)
    window = R.plan_window(solver, ex)
    assert window.cut == SEQ - 2
    delta = jnp.ones((2, D))
    full = jax.jit(R.random_direction, static_argnums=0)(solver, model, one, clamps, delta, jax.random.key(3))
    win = jax.jit(lambda *a: R.random_direction(solver, *a, window=window))(model, one, clamps, delta, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(win), np.asarray(full), rtol=1e-4, atol=1e-5 * float(jnp.abs(full).max()))
    assert float(jnp.abs(full).max()) > 0
