"""Linear probes on residual features (TPP): one-vs-rest logistic regression, trained with a Flax
``TrainState`` (parameters + Optax state + step in one pytree) inside one ``lax.scan``.

The probe head is a ``flax.linen.Dense``; its kernel ``[d, n_classes]`` and bias are returned as
plain arrays (``W [n_classes, d]``, ``b [n_classes]``) because the recovery objective
(``objectives.probe_logit``) only needs ``w . pooled + b``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState
from jaxtyping import Array, Float, Int


class _Head(nn.Module):
    n_classes: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(self.n_classes, kernel_init=nn.initializers.zeros)(x)


def train_linear_probes(
    X: Float[Array, "n d"],
    y: Int[Array, " n"],
    n_classes: int,
    *,
    steps: int = 400,
    lr: float = 0.01,
    l2: float = 1e-3,
    seed: int = 0,
) -> tuple[Float[Array, "n_classes d"], Float[Array, " n_classes"]]:
    """One-vs-rest logistic probes with class-balanced BCE and an L2 penalty (full batch).

    Features are standardised for the optimisation and the scaling is folded back into the
    returned weights, so ``X @ W.T + b`` are the probe logits on raw residuals.
    """
    X = X.astype(jnp.float32)
    # keepdims everywhere: the test suite runs with rank promotion "raise"
    mu, sd = X.mean(0, keepdims=True), X.std(0, keepdims=True) + 1e-6
    Z = (X - mu) / sd
    Y = jax.nn.one_hot(y, n_classes)
    pos = Y.mean(0, keepdims=True)
    weight = 0.5 * Y / jnp.maximum(pos, 1e-6) + 0.5 * (1 - Y) / jnp.maximum(1 - pos, 1e-6)  # balanced classes
    head = _Head(n_classes)
    # flax's Dense broadcasts its bias and optax's Adam mixes Python floats with int32 counts: allow
    # both here even when the caller (e.g. the test suite) runs with strict promotion flags
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        params = head.init(jax.random.PRNGKey(seed), Z[:1])
        state = TrainState.create(apply_fn=head.apply, params=params, tx=optax.adam(lr))

    def loss(params):
        logits = state.apply_fn(params, Z)
        bce = optax.sigmoid_binary_cross_entropy(logits, Y)
        return jnp.mean(bce * weight) + l2 * jnp.sum(jnp.square(params["params"]["Dense_0"]["kernel"]))

    def step(s: TrainState, _):
        return s.apply_gradients(grads=jax.grad(loss)(s.params)), None

    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        state, _ = jax.lax.scan(step, state, None, length=steps)
    k = state.params["params"]["Dense_0"]["kernel"]  # [d, n_classes] on standardised inputs
    b = state.params["params"]["Dense_0"]["bias"]
    W = (k / sd.T).T
    return W, b - W @ mu[0]
