"""SAE math against hand-written numpy, for every activation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.sae.autoencoder import SAE, astype, decode, encode, encode_features, encode_pre, reconstruct

D_IN, D_SAE, SEQ = 6, 10, 4


def _sae(activation: str, *, apply_b_dec: bool = True, seed: int = 0) -> SAE:
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    return SAE(
        W_enc=f(D_IN, D_SAE),
        b_enc=f(D_SAE) * 0.3,
        W_dec=f(D_SAE, D_IN),
        b_dec=f(D_IN),
        threshold=jnp.abs(f(D_SAE)) * 0.5 if activation == "jumprelu" else None,
        activation=activation,
        k=3 if activation == "topk" else 0,
        apply_b_dec_to_input=apply_b_dec,
        hook_name="blocks.1.hook_resid_pre",
    )


def _np_encode(sae: SAE, x: np.ndarray) -> np.ndarray:
    W_enc, b_enc, b_dec = (np.asarray(a, np.float64) for a in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x - b_dec * sae.apply_b_dec_to_input) @ W_enc + b_enc
    if sae.activation == "relu":
        return np.maximum(pre, 0)
    if sae.activation == "jumprelu":
        return np.where(pre > np.asarray(sae.threshold, np.float64), np.maximum(pre, 0), 0.0)
    out = np.zeros_like(pre)
    for r in range(pre.shape[0]):  # top-k: the k largest pre-activations, then relu
        top = np.argsort(pre[r])[-sae.k :]
        out[r, top] = np.maximum(pre[r, top], 0)
    return out


def _atol(base: float, *terms) -> float:
    """``base`` scaled by the largest magnitude among ``terms``: fp32 matmul rounding grows with the size
    of the summed terms, so an absolute tolerance that is right for O(1) values is too tight for larger
    ones (and across CPUs, whose kernels sum in different orders)."""
    return base * max(1.0, *(float(np.abs(np.asarray(t, np.float64)).max()) for t in terms))


def _x(seed: int = 1) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(SEQ, D_IN)).astype(np.float32))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_match_numpy(activation, apply_b_dec):
    sae, x = _sae(activation, apply_b_dec=apply_b_dec), _x()
    z = encode(sae, x)
    # the size of the summed terms |x - b_dec| @ |W_enc| (pre-activations) and |z| @ |W_dec| (decode)
    x64, W_enc, W_dec = (np.asarray(a, np.float64) for a in (x, sae.W_enc, sae.W_dec))
    enc_terms = np.abs(x64 - np.asarray(sae.b_dec) * sae.apply_b_dec_to_input) @ np.abs(W_enc)
    dec_terms = np.abs(np.asarray(z, np.float64)) @ np.abs(W_dec)
    np.testing.assert_allclose(z, _np_encode(sae, x64), rtol=1e-5, atol=_atol(1e-5, enc_terms, sae.b_enc))
    np.testing.assert_allclose(
        decode(sae, z), np.asarray(z, np.float64) @ W_dec + np.asarray(sae.b_dec), rtol=1e-5,
        atol=_atol(1e-5, dec_terms, sae.b_dec),
    )
    np.testing.assert_allclose(reconstruct(sae, x), decode(sae, z), rtol=1e-6, atol=_atol(1e-6, dec_terms))


def test_topk_keeps_at_most_k_and_jumprelu_respects_threshold():
    x = _x()
    assert int(jnp.max(jnp.sum(encode(_sae("topk"), x) > 0, axis=-1))) <= 3
    sae = _sae("jumprelu")
    pre, z = encode_pre(sae, x), encode(sae, x)
    thr = jnp.broadcast_to(sae.threshold, pre.shape)
    assert bool(jnp.all((z > 0) == (pre > thr) & (pre > 0)))


def test_b_dec_is_subtracted_only_when_asked():
    on, off = _sae("relu", apply_b_dec=True), _sae("relu", apply_b_dec=False)
    x = _x()
    shifted = x - jnp.broadcast_to(on.b_dec, x.shape)
    np.testing.assert_allclose(encode_pre(on, x), encode_pre(off, shifted), rtol=1e-6,
                               atol=_atol(1e-6, np.abs(shifted) @ np.abs(on.W_enc)))


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encode_features_equals_encode_subset(activation):
    sae, x = _sae(activation), _x()
    features = jnp.array([7, 0, 3])
    # a k-column matmul against the full one: the summation order may differ, rounding scales with the terms
    atol = _atol(1e-6, np.abs(x - sae.b_dec[None, :]) @ np.abs(sae.W_enc), sae.b_enc)
    np.testing.assert_allclose(encode_features(sae, x, features), encode(sae, x)[..., features], rtol=1e-6, atol=atol)


def test_single_vector_and_jit():
    sae, x = _sae("jumprelu"), _x()[0]
    atol = _atol(1e-6, np.abs(x - sae.b_dec) @ np.abs(sae.W_enc), sae.b_enc)  # jit may fuse and reorder sums
    np.testing.assert_allclose(jax.jit(encode)(sae, x), encode(sae, x[None])[0], rtol=1e-6, atol=atol)


def test_astype_casts_every_array_and_keeps_static_fields():
    sae = astype(_sae("jumprelu"), jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(sae)} == {jnp.dtype(jnp.bfloat16)}
    assert sae.activation == "jumprelu" and sae.hook_name == "blocks.1.hook_resid_pre"


def test_bad_configurations_raise():
    with pytest.raises(ValueError, match="threshold"):
        SAE(jnp.zeros((2, 3)), jnp.zeros(3), jnp.zeros((3, 2)), jnp.zeros(2), activation="jumprelu")
    with pytest.raises(ValueError, match="k > 0"):
        SAE(jnp.zeros((2, 3)), jnp.zeros(3), jnp.zeros((3, 2)), jnp.zeros(2), activation="topk")
    with pytest.raises(ValueError, match="activation"):
        SAE(jnp.zeros((2, 3)), jnp.zeros(3), jnp.zeros((3, 2)), jnp.zeros(2), activation="gelu")
