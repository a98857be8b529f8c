"""Clamp / AddDelta / compose invariants on a tiny random SAE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.sae.clamp import (
    AddDelta,
    Clamp,
    Identity,
    clamp_latents,
    compose,
    reencoding_error,
)
from jaxrecover.sae.autoencoder import SAE, decode, encode, encode_features

D, D_SAE, SEQ = 8, 12, 5


def _sae(activation: str = "jumprelu", seed: int = 0) -> SAE:
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    return SAE(
        W_enc=f(D, D_SAE) * 0.5,
        b_enc=f(D_SAE) * 0.1,
        W_dec=f(D_SAE, D) * 0.5,
        b_dec=f(D) * 0.1,
        threshold=jnp.abs(f(D_SAE)) * 0.1 if activation == "jumprelu" else None,
        activation=activation,
        k=4 if activation == "topk" else 0,
        apply_b_dec_to_input=True,
    )


def _resid(seed: int = 1, seq: int = SEQ) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(seq, D)).astype(np.float32))


SLOTS = jnp.arange(SEQ)
FEATURES = jnp.array([2, 5, 9])


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize(
    ("mode", "value"), [("scale", 1.0), ("floor", -jnp.inf), ("ceiling", jnp.inf)]
)
def test_clamp_to_current_is_exact_noop(activation, mode, value):
    sae, h = _sae(activation), _resid()
    clamp = Clamp(sae, FEATURES, jnp.full((3,), value, jnp.float32), mode=mode)
    np.testing.assert_array_equal(clamp(h, SLOTS), h)


def test_set_to_current_values_is_exact_noop_single_slot():
    sae, h = _sae(), _resid(seq=1)
    current = encode_features(sae, h, FEATURES)[0]
    np.testing.assert_array_equal(Clamp(sae, FEATURES, current)(h, jnp.array([0])), h)


def test_closed_form_equals_two_decode_formula():
    sae, h = _sae(), _resid()
    values = jnp.array([3.0, 0.0, -1.5])
    z = encode(sae, h)
    z_clamped = z.at[..., FEATURES].set(jnp.broadcast_to(values, (SEQ, 3)))
    expected = decode(sae, z_clamped) + (h - decode(sae, z))
    # expected is a difference of two decodes (sums over d_sae): its fp32 error scales with the size of
    # those terms, not of the (smaller) result
    terms = max(1.0, float(jnp.abs(decode(sae, z)).max()), float(jnp.abs(decode(sae, z_clamped)).max()))
    np.testing.assert_allclose(Clamp(sae, FEATURES, values)(h, SLOTS), expected, rtol=1e-5, atol=1e-5 * terms)


@pytest.mark.parametrize("mode", ["set", "scale", "floor"])
def test_gradient_keeps_the_error_term(mode):
    """d clamp(h) / dh equals jax.grad of the explicit formula with the error term NOT detached."""
    sae, h = _sae(), _resid()
    values = jnp.array([2.0, 0.5, 1.0])
    clamp = Clamp(sae, FEATURES, values, mode=mode)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(SEQ, D)).astype(np.float32))

    def explicit(x):
        z = encode(sae, x)
        z_S = z[..., FEATURES]
        z_new = z.at[..., FEATURES].set(clamp_latents(mode, z_S, values))
        return jnp.sum(w * (decode(sae, z_new) + (x - decode(sae, z))))

    def detached(x):  # SAELens' error term: no gradient through x - decode(z)
        z = encode(sae, x)
        z_new = z.at[..., FEATURES].set(clamp_latents(mode, z[..., FEATURES], values))
        return jnp.sum(w * (decode(sae, z_new) + jax.lax.stop_gradient(x - decode(sae, z))))

    got = jax.jit(jax.grad(lambda x: jnp.sum(w * clamp(x, SLOTS))))(h)
    want = jax.jit(jax.grad(explicit))(h)
    # gradients accumulate over d_sae latents: the atol scales with the gradient's size
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(want).max())))
    assert not np.allclose(got, jax.jit(jax.grad(detached))(h), atol=1e-3)


def test_clamped_features_read_back_with_orthonormal_decoder():
    """With orthonormal decoder rows and W_enc = pinv(W_dec) the re-encoding error is ~0 (for features
    that stay on the linear side of the ReLU)."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    d_sae = 6
    W_dec = jnp.asarray(q[:d_sae].astype(np.float32))  # orthonormal rows
    sae = SAE(
        W_enc=jnp.asarray(np.linalg.pinv(np.asarray(W_dec)).astype(np.float32)),
        b_enc=jnp.full((d_sae,), 10.0, jnp.float32),  # every feature active: pre > 0 everywhere
        W_dec=W_dec,
        b_dec=jnp.zeros(D, jnp.float32),
    )
    h = _resid()
    clamp = Clamp(sae, jnp.array([1, 4]), jnp.array([3.0, 12.5]))
    err = reencoding_error(clamp, h, SLOTS)
    # exact in real arithmetic; the re-encoded latents are D-term sums whose terms (b_enc = 10, targets up
    # to 12.5) set the fp32 rounding, so the tolerance is relative to the largest latent compared
    tol = 1e-5 * max(1.0, float(jnp.abs(clamp.values).max()), float(jnp.abs(sae.b_enc).max()))
    assert err.shape == () and float(err) < tol
    np.testing.assert_allclose(encode_features(sae, clamp(h, SLOTS), clamp.features), jnp.tile(clamp.values, (SEQ, 1)),
                               atol=tol)
    # a random SAE reads back only approximately; the function reports how far
    assert float(reencoding_error(Clamp(_sae(), FEATURES, jnp.array([3.0, 3.0, 3.0])), h, SLOTS)) > 1e-3


def test_slot_mask_skips_slots_and_clamps_beyond_mask():
    sae, h = _sae(), _resid()
    mask = jnp.array([False, True, False])  # covers slots 0..2; slots 3, 4 are past the mask
    clamp = Clamp(sae, FEATURES, jnp.array([4.0, 4.0, 4.0]), slot_mask=mask)
    out, full = clamp(h, SLOTS), Clamp(sae, FEATURES, jnp.array([4.0, 4.0, 4.0]))(h, SLOTS)
    np.testing.assert_array_equal(out[jnp.array([0, 2])], h[jnp.array([0, 2])])
    np.testing.assert_allclose(out[jnp.array([1, 3, 4])], full[jnp.array([1, 3, 4])], rtol=1e-6)
    # reencoding_error with a mask, against a reference built from the unmasked clamp: skipped slots keep
    # their own latents (error 0 there), so the error is the unmasked per-slot error maximised over the
    # clamped slots only. Slot 4 reads back worst for this SAE at 0.5, so skipping it must change the value.
    v = jnp.array([0.5, 0.5, 0.5])
    per_slot = jnp.abs(encode_features(sae, Clamp(sae, FEATURES, v)(h, SLOTS), FEATURES) - 0.5).max(axis=1)
    skip_last = Clamp(sae, FEATURES, v, slot_mask=jnp.array([True, True, True, True, False]))
    assert float(reencoding_error(skip_last, h, SLOTS)) == pytest.approx(float(per_slot[:4].max()), rel=1e-6)
    assert float(per_slot[:4].max()) < float(per_slot[4])


def test_add_delta_hits_the_right_slots():
    h = _resid()
    delta = jnp.array([[1.0] * D, [2.0] * D, [5.0] * D])
    out = AddDelta(delta, jnp.array([3, 0, -1]))(h, SLOTS)
    expected = h.at[3].add(1.0).at[0].add(2.0)  # slot -1 is inactive
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # a single decode step at slot 3 gets only row 0
    np.testing.assert_allclose(AddDelta(delta, jnp.array([3, 0, -1]))(h[:1], jnp.array([3])), h[:1] + 1.0)


def test_compose_is_left_to_right_and_identity_is_noop():
    h = _resid()
    add = AddDelta(jnp.full((1, D), 2.0), jnp.array([0]))

    class Double:
        def __call__(self, resid, slots):
            return resid * 2.0

    np.testing.assert_allclose(compose(add, Double())(h, SLOTS), (h.at[0].add(2.0)) * 2.0)
    np.testing.assert_allclose(compose(Double(), add)(h, SLOTS), (h * 2.0).at[0].add(2.0))
    np.testing.assert_array_equal(compose(Identity(), Identity())(h, SLOTS), h)


def test_vmap_over_clamps_with_different_features():
    sae, h = _sae(), _resid()
    features = jnp.array([[0, 1], [5, 9], [3, 3]])
    values = jnp.array([[1.0, 2.0], [0.0, 0.0], [4.0, 4.0]])
    singles = jnp.stack([Clamp(sae, features[i], values[i])(h, SLOTS) for i in range(3)])
    # a stack of clamps passed with an in_axes prefix (the feature-sweep pattern)
    batched = Clamp(sae, features, values)
    out = jax.vmap(lambda c: c(h, SLOTS), in_axes=(Clamp(None, 0, 0),))(batched)
    # batched and single matmuls may sum in a different order: atol relative to the outputs' size
    atol = 1e-6 * max(1.0, float(jnp.abs(singles).max()))
    np.testing.assert_allclose(out, singles, rtol=1e-6, atol=atol)
    # clamps built inside vmap, and returned from it
    np.testing.assert_allclose(jax.vmap(lambda f, v: Clamp(sae, f, v)(h, SLOTS))(features, values), singles,
                               rtol=1e-6, atol=atol)


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="clamp mode"):
        Clamp(_sae(), FEATURES, jnp.zeros(3), mode="clip")
