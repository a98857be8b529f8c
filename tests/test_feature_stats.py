"""features.activation_stats on a constructed case: known activity, and a x3 scale of a feature that
never fires changes nothing."""

import jax.numpy as jnp
import numpy as np

from jaxrecover.sae.features import activation_stats
from jaxrecover.sae.clamp import Clamp
from jaxrecover.sae.autoencoder import SAE


def _sae() -> SAE:
    # 4 latents reading / writing the first 4 basis directions of an 8-dim residual, threshold 0.5
    W = np.eye(4, 8, dtype=np.float32)
    return SAE(W_enc=jnp.asarray(W.T.copy()), b_enc=jnp.zeros(4, jnp.float32), W_dec=jnp.asarray(W),
               b_dec=jnp.zeros(8, jnp.float32), threshold=jnp.full((4,), 0.5, jnp.float32), activation="jumprelu")


def _rows() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    h = np.zeros((4, 8), np.float32)
    h[:, 5] = 3.0  # off-dictionary part: ||h|| counts it, no latent reads it
    h[0, 0] = h[1, 0] = 2.0  # feature 0 fires (2 > 0.5) on rows 0 and 1
    h[2, 0] = 0.25  # below the JumpReLU threshold: inactive
    h[3, 0] = h[3, 1] = 100.0  # masked-out row: must not count
    # feature 1 never fires on the masked rows
    return jnp.asarray(h), jnp.arange(4, dtype=jnp.int32), jnp.asarray([True, True, True, False])


def test_activity_and_scale_change_known_values():
    h, slots, mask = _rows()
    s = activation_stats(Clamp(_sae(), jnp.asarray([0, 1]), jnp.asarray([3.0, 3.0]), mode="scale"), h, slots, mask)
    np.testing.assert_allclose(s["frac_active"], [2 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(s["mean_active"], [2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(s["mean_all"], [4 / 3, 0.0], rtol=1e-6)
    assert float(s["n_rows"]) == 3
    # x3 of z = 2 adds 2 * 2 = 4 along W_dec[0] on the two active rows, nothing on the third
    np.testing.assert_allclose(s["clamp_change"], 8 / 3, rtol=1e-6)
    norms = [np.hypot(2, 3), np.hypot(2, 3), np.hypot(0.25, 3)]
    np.testing.assert_allclose(s["resid_norm"], np.mean(norms), rtol=1e-6)
    np.testing.assert_allclose(s["clamp_change_rel"], (8 / 3) / np.mean(norms), rtol=1e-6)
    np.testing.assert_allclose(s["frac_changed"], 2 / 3, rtol=1e-6)


def test_scaling_a_feature_that_never_fires_changes_nothing():
    h, slots, mask = _rows()
    s = activation_stats(Clamp(_sae(), jnp.asarray([1]), jnp.asarray([3.0]), mode="scale"), h, slots, mask)
    assert float(s["frac_active"][0]) == 0.0 and float(s["mean_active"][0]) == 0.0
    assert float(s["clamp_change"]) == 0.0 and float(s["frac_changed"]) == 0.0
    # a floor on the same feature does write into the residual, on every row
    f = activation_stats(Clamp(_sae(), jnp.asarray([1]), jnp.asarray([1.5]), mode="floor"), h, slots, mask)
    np.testing.assert_allclose(f["clamp_change"], 1.5, rtol=1e-6)
    assert float(f["frac_changed"]) == 1.0
