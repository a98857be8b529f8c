"""Data parallelism: a 4-way sharded batch gives the same logits as the unsharded one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.runtime.sharding import BATCH_AXIS, batch_mesh, batch_sharding, pad_batch, replicated, shard_batch
from jaxrecover.model.transformer import forward

N_DEV = 4


@pytest.fixture(autouse=True)
def _need_devices():
    if len(jax.devices()) < N_DEV:  # conftest sets XLA_FLAGS before jax starts; a prior import defeats it
        pytest.skip(f"needs {N_DEV} devices (XLA_FLAGS=--xla_force_host_platform_device_count={N_DEV})")


def test_sharded_forward_equals_unsharded(llama_model):
    cfg = llama_model.cfg
    tokens = jax.random.randint(jax.random.key(0), (8, 10), 0, cfg.d_vocab)
    valid = jnp.arange(10)[None, :] >= jnp.array([0, 1, 2, 3, 0, 5, 0, 9])[:, None]
    run = jax.jit(jax.vmap(lambda m, t, v: forward(m, t, valid=v), in_axes=(None, 0, 0)))
    ref = run(llama_model, tokens, valid)
    s_tokens, s_valid = shard_batch((tokens, valid))
    assert s_tokens.sharding == batch_sharding()
    assert len(s_tokens.addressable_shards) == N_DEV and s_tokens.addressable_shards[0].data.shape == (2, 10)
    out = run(jax.device_put(llama_model, replicated()), s_tokens, s_valid)
    assert out.sharding.spec[0] == BATCH_AXIS  # the result stays split over examples
    # logits are sums over d_model: a different partitioning may round differently, in proportion to their size
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * max(1.0, float(jnp.abs(ref).max())),
                               rtol=1e-5)


def test_indivisible_batch_raises_then_pad():
    x = jnp.arange(6 * 3).reshape(6, 3)
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        shard_batch({"tokens": x})
    padded, n = pad_batch({"tokens": x}, N_DEV)
    assert n == 6 and padded["tokens"].shape == (8, 3)
    np.testing.assert_array_equal(padded["tokens"][6:], jnp.stack([x[-1], x[-1]]))
    assert shard_batch(padded)["tokens"].sharding.spec == batch_sharding().spec


def test_explicit_mesh_subset():
    mesh = batch_mesh(jax.devices()[:2])
    y = shard_batch(jnp.zeros((6, 2)), mesh)
    assert len(y.sharding.device_set) == 2


def test_to_host_and_map_batched():
    from jaxrecover.runtime.sharding import map_batched, to_host

    x = shard_batch(jnp.arange(8.0).reshape(4, 2))
    host = to_host({"x": x, "none": None})
    assert isinstance(host["x"], np.ndarray) and host["none"] is None
    np.testing.assert_array_equal(host["x"], np.arange(8.0).reshape(4, 2))
    # an in_axes prefix: 0 maps the subtree through `batched`, None through `shared`
    tree = {"a": (jnp.ones(3), jnp.ones(3)), "b": jnp.ones(2)}
    out = map_batched(tree, {"a": 0, "b": None}, lambda t: jax.tree.map(lambda v: v * 2, t), lambda t: t)
    np.testing.assert_array_equal(out["a"][1], 2 * np.ones(3))
    np.testing.assert_array_equal(out["b"], np.ones(2))
    assert map_batched(tree, None, lambda t: 0, lambda t: "shared") == "shared"
