"""The one delta decomposition (paper App. J) every setting replays."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.experiment import suite as S
from jaxrecover.sae.autoencoder import SAE, encode


def test_parts_add_up_and_isolate_the_clamped_features():
    d, m, n, rows = 12, 30, 3, 4
    k = jax.random.split(jax.random.key(0), 4)
    sae = SAE(W_enc=jax.random.normal(k[0], (d, m)) / d**0.5, b_enc=0.1 * jnp.ones(m),
              W_dec=jax.random.normal(k[1], (m, d)) / d**0.5, b_dec=jnp.zeros(d))
    h = jax.random.normal(k[2], (n, rows, d))
    delta = 0.5 * jax.random.normal(k[3], (n, rows, d))
    feats = jnp.array([1, 5, 7])
    p = S.replay_components(sae, feats, h, delta, topk=4)
    assert set(p) == {"full", "residual", "other_features", "topk_features", "clamped_features", "topk_knockout"}
    scale = float(np.abs(delta).max())
    np.testing.assert_allclose(p["clamped_features"] + p["other_features"] + p["residual"], delta, atol=1e-5 * scale)
    np.testing.assert_allclose(p["topk_knockout"] + p["topk_features"], delta, atol=1e-5 * scale)
    dz = jax.vmap(lambda a, b: encode(sae, a + b) - encode(sae, a))(h, delta)
    want = jnp.einsum("nrs,sd->nrd", dz[..., feats], sae.W_dec[feats])
    np.testing.assert_allclose(p["clamped_features"], want, atol=1e-5 * float(np.abs(want).max()))
