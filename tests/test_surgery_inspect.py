"""Functional surgery (equinox tree_at, penzai selectors) and treescope rendering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover import inspect, surgery, testing
from jaxrecover.interventions import AddDelta, Clamp, compose
from jaxrecover.sae import SAE
from jaxrecover.transformer import Norm, forward


@pytest.fixture(scope="module")
def model():
    return testing.random_transformer(jax.random.PRNGKey(0), testing.tiny_config("llama"))


def test_ablate_heads_changes_only_that_layer(model):
    m2 = surgery.ablate_heads(model, 1, [0, 2])
    W, W2 = model.blocks.attn.W_O, m2.blocks.attn.W_O
    assert float(jnp.abs(W2[1, 0]).max()) == 0.0 and float(jnp.abs(W2[1, 2]).max()) == 0.0
    np.testing.assert_array_equal(W2[0], W[0])
    np.testing.assert_array_equal(W2[1, 1], W[1, 1])
    toks = jnp.arange(6) % model.cfg.d_vocab
    assert not np.allclose(forward(model, toks), forward(m2, toks))
    with pytest.raises(ValueError, match="head indices"):
        surgery.ablate_heads(model, 0, [model.cfg.n_heads])


def test_set_param_checks_shape(model):
    with pytest.raises(ValueError, match="shape"):
        surgery.set_param(model, lambda m: m.W_E, jnp.zeros((2, 2)))
    m2 = surgery.set_param(model, lambda m: m.W_E, jnp.zeros_like(model.W_E))
    assert float(jnp.abs(m2.W_E).max()) == 0.0 and float(jnp.abs(model.W_E).max()) > 0


def test_penzai_selection_by_type(model):
    n = surgery.count_instances(model, Norm)
    assert n >= 3  # ln1, ln2 (stacked) and ln_final
    m2 = surgery.map_instances(model, Norm, lambda p: Norm(p.w * 0 + 1, p.b))
    assert all(float(jnp.abs(p.w - 1).max()) == 0 for p in jax.tree.leaves(m2, is_leaf=lambda x: isinstance(x, Norm)) if isinstance(p, Norm))


def test_scale_clamps_inside_composed_hooks():
    d, n = 4, 6
    sae = SAE(W_enc=jnp.eye(d, n), b_enc=jnp.zeros(n), W_dec=jnp.eye(n, d), b_dec=jnp.zeros(d))
    hook = compose(Clamp(sae, jnp.array([1]), jnp.array([2.0]), mode="scale"), AddDelta(jnp.zeros((1, d)), jnp.array([0])))
    out = surgery.scale_clamps({"site": hook}, 3.0)
    assert float(out["site"].fns[0].values[0]) == 6.0
    assert float(hook.fns[0].values[0]) == 2.0  # the original is untouched


def test_treescope_html(model, tmp_path):
    p = inspect.save_html(model, tmp_path / "m.html")
    text = p.read_text()
    assert "treescope" in text and len(text) > 1000  # the payload itself is compressed
    txt = inspect.to_text(model)
    assert "Transformer" in txt and "W_E" in txt
