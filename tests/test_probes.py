import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.recover.probes import train_linear_probes


def test_probes_separate_linearly_separable_classes():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4 + 10.0  # offset: the standardisation must be folded back
    y = np.repeat(np.arange(3), 40)
    X = centers[y] + rng.normal(size=(120, 8))
    W, b = train_linear_probes(jnp.asarray(X, jnp.float32), jnp.asarray(y), 3, steps=300, lr=0.05)
    logits = np.asarray(X, np.float32) @ np.asarray(W).T + np.asarray(b)
    assert W.shape == (3, 8) and b.shape == (3,)
    assert (logits.argmax(1) == y).mean() > 0.95
    # one-vs-rest: the own-class logit is positive, others negative, for most examples
    own = logits[np.arange(120), y]
    assert (own > 0).mean() > 0.9


def test_probe_training_is_deterministic():
    X = jax.random.normal(jax.random.PRNGKey(0), (30, 4))
    y = (X[:, 0] > 0).astype(jnp.int32)
    a = train_linear_probes(X, y, 2, steps=20)
    b = train_linear_probes(X, y, 2, steps=20)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
