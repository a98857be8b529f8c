"""Functional surgery (equinox tree_at, penzai selectors) against hand-built references, and the
treescope page / ``jaxrecover inspect`` command."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover import testing
from jaxrecover.cli import inspect as inspect
from jaxrecover.sae import surgery as surgery
from jaxrecover.sae.clamp import AddDelta, Clamp, compose
from jaxrecover.sae.autoencoder import SAE, encode, reconstruct
from jaxrecover.model.transformer import (
    MLP,
    Norm,
    attend,
    attention_mask,
    attn_out,
    forward,
    layer_is_local,
    mlp,
    mlp_residual,
    norm,
    qkv,
    run_from,
    run_to,
    seq_info,
)


@pytest.fixture(scope="module")
def model():
    return testing.random_transformer(jax.random.PRNGKey(0), testing.tiny_config("llama"))


def _logits_with_heads_zeroed(model, tokens, layer, heads):
    """Reference: the model run block by block with the outputs of ``heads`` in ``layer`` zeroed right
    after attention (before ``W_O``), written out from the transformer's own pieces."""
    cfg = model.cfg
    x = run_to(model, tokens, layer)
    p = jax.tree.map(lambda a: a[layer], model.blocks)
    info = seq_info(jnp.ones(tokens.shape, bool))
    is_local = layer_is_local(cfg)[layer]
    q, k, v = qkv(cfg, p.attn, norm(p.ln1, x, cfg.norm_eps), info.positions, is_local)
    mask = attention_mask(cfg, info.slots, info.slots, info.positions, info.positions, info.valid, is_local)
    o = attend(cfg, q, k, v, mask).at[:, jnp.asarray(heads)].set(0.0)
    a = attn_out(p.attn, o)
    if p.ln1_post is not None:
        a = norm(p.ln1_post, a, cfg.norm_eps)
    return run_from(model, mlp_residual(cfg, p, x + a), layer + 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])  # GQA; output bias b_O; post-attention norm
def test_knockout_heads_equals_zeroing_their_attention_outputs(arch):
    m = testing.random_transformer(jax.random.key(3), testing.tiny_config(arch))
    tokens = jax.random.randint(jax.random.key(4), (7,), 0, m.cfg.d_vocab)
    layer, heads = 0, [1, 2]
    got = forward(surgery.knockout_heads(m, layer, heads), tokens)
    want = _logits_with_heads_zeroed(m, tokens, layer, heads)
    # logits are sums over d_model through the remaining blocks: atol relative to their size
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(jnp.abs(want).max())))
    # the knockout matters, and zeroing different heads gives a different model
    assert float(jnp.abs(got - forward(m, tokens)).max()) > 1e-2
    assert float(jnp.abs(got - _logits_with_heads_zeroed(m, tokens, layer, [0])).max()) > 1e-2


def test_knockout_heads_changes_only_those_rows(model):
    m2 = surgery.knockout_heads(model, 1, [0, 2])
    W, W2 = model.blocks.attn.W_O, m2.blocks.attn.W_O
    assert float(jnp.abs(W2[1, 0]).max()) == 0.0 and float(jnp.abs(W2[1, 2]).max()) == 0.0
    np.testing.assert_array_equal(W2[0], W[0])
    np.testing.assert_array_equal(W2[1, 1], W[1, 1])
    assert float(jnp.abs(W[1, 0]).max()) > 0  # pure: the input model is untouched
    assert surgery.ablate_heads is surgery.knockout_heads  # the earlier name still works
    with pytest.raises(ValueError, match="head indices"):
        surgery.knockout_heads(model, 0, [model.cfg.n_heads])
    with pytest.raises(ValueError, match="layer"):
        surgery.knockout_heads(model, model.cfg.n_layers, [0])


def _sae(activation: str) -> SAE:
    sae = testing.random_sae(16, 40, seed=1)
    # biases and a threshold so that the knockout must zero b_enc too, and JumpReLU gates matter
    rng = np.random.default_rng(2)
    b_enc = jnp.asarray(0.2 * rng.standard_normal(40), jnp.float32)
    thr = jnp.asarray(0.1 * np.abs(rng.standard_normal(40)), jnp.float32) if activation == "jumprelu" else None
    return dataclasses.replace(sae, b_enc=b_enc, threshold=thr, activation=activation)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_knockout_features_is_a_zero_clamp(activation):
    """Splicing the knocked-out SAE's reconstruction in place of the original's, keeping the original's
    error term, is exactly the closed-form clamp of those features to 0."""
    sae = _sae(activation)
    h = jax.random.normal(jax.random.key(5), (6, 16))
    z = encode(sae, h)
    feats = [int(i) for i in np.argsort(-np.asarray(z).max(axis=0))[:3]]  # features active on h
    assert float(z[:, jnp.asarray(feats)].max()) > 0.1
    knocked = surgery.knockout_features(sae, feats)
    spliced = reconstruct(knocked, h) + (h - reconstruct(sae, h))
    clamped = Clamp(sae, jnp.asarray(feats), jnp.zeros(3))(h, jnp.arange(6))
    # a difference of two reconstructions (sums over d_sae): atol relative to the size of those terms
    scale = max(1.0, float(jnp.abs(reconstruct(sae, h)).max()), float(jnp.abs(h).max()))
    np.testing.assert_allclose(spliced, clamped, rtol=1e-5, atol=1e-5 * scale)
    assert float(jnp.abs(clamped - h).max()) > 1e-2  # the clamp does something here
    zk = encode(knocked, h)
    assert float(jnp.abs(zk[:, jnp.asarray(feats)]).max()) == 0.0  # dead latents
    keep = jnp.asarray([i for i in range(40) if i not in feats])
    np.testing.assert_array_equal(zk[:, keep], z[:, keep])  # the other latents are untouched
    assert float(jnp.abs(sae.W_dec[jnp.asarray(feats)]).max()) > 0  # pure
    with pytest.raises(ValueError, match="feature indices"):
        surgery.knockout_features(sae, [40])


def test_scale_weights_selects_by_type(model):
    cfg = model.cfg
    half = surgery.scale_weights(model, MLP, 0.5, fields=("W_out",))
    x = jax.random.normal(jax.random.key(6), (5, cfg.d_model))
    for layer in range(cfg.n_layers):  # the stacked MLP is one instance: every layer is scaled
        p, p2 = (jax.tree.map(lambda a, i=layer: a[i], m.blocks.mlp) for m in (model, half))
        # llama has no MLP output bias, so the MLP output halves (x0.5 is exact in binary floating point)
        np.testing.assert_allclose(mlp(cfg, p2, x), 0.5 * mlp(cfg, p, x), rtol=1e-6)
    np.testing.assert_array_equal(half.blocks.mlp.W_in, model.blocks.mlp.W_in)
    np.testing.assert_array_equal(half.blocks.attn.W_O, model.blocks.attn.W_O)
    # every float leaf of every Norm when no fields are named
    doubled = surgery.scale_weights(model, Norm, 2.0)
    np.testing.assert_array_equal(doubled.ln_final.w, 2.0 * model.ln_final.w)
    np.testing.assert_array_equal(doubled.blocks.ln1.w, 2.0 * model.blocks.ln1.w)
    with pytest.raises(ValueError, match="no instance"):
        surgery.scale_weights(model, Clamp, 2.0)
    with pytest.raises(ValueError, match="no field"):
        surgery.scale_weights(model, MLP, 2.0, fields=("W_typo",))


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


def test_save_html_sections(model, tmp_path):
    sae = testing.random_sae(model.cfg.d_model, 48, hook_name="blocks.1.hook_resid_post")
    clamp = Clamp(sae, jnp.array([3, 7]), jnp.zeros(2))
    p = inspect.save_html(tmp_path / "m.html", model=model, clamps={"blocks.1.hook_resid_post": clamp},
                          result={"delta": jnp.ones((2, 4))})
    text = p.read_text()
    assert "treescope" in text and len(text) > 1000  # the interactive payload itself is compressed
    for name in ("model", "clamps", "result"):
        assert f'<section id="{name}">' in text
    assert "Clamp at blocks.1.hook_resid_post: mode &#x27;set&#x27;, features [3, 7], values [0.0, 0.0]" in text
    assert "W_E" in text  # the plain-text rendering is in the page too
    with pytest.raises(ValueError, match="nothing to render"):
        inspect.save_html(tmp_path / "empty.html")
    txt = inspect.to_text(model)
    assert "Transformer" in txt and "W_E" in txt


def test_inspect_command_writes_html(tmp_path):
    pytest.importorskip("transformers")
    from jaxrecover.sae.files import save_sae

    model_dir = testing.write_tiny_hf_checkpoint(tmp_path / "model", "llama", seed=0)
    hook = "blocks.1.hook_resid_post"
    sae_dir = save_sae(testing.random_sae(32, 48, hook_name=hook), tmp_path / "sae")
    np.savez(tmp_path / "result.npz", delta=np.ones((2, 32), np.float32), success=np.array([True, False]))
    out = tmp_path / "page" / "look.html"
    rc = inspect.main(["--model-dir", str(model_dir), "--sae", str(sae_dir), "--features", "1,2,3",
                       "--result", str(tmp_path / "result.npz"), "--out", str(out)])
    assert rc == 0 and out.stat().st_size > 1000
    text = out.read_text()
    assert f"Clamp at {hook}" in text and "features [1, 2, 3]" in text
    assert hook in text and "success" in text and "W_E" in text
    with pytest.raises(SystemExit):
        inspect.main(["--model-dir", str(model_dir), "--sae", str(sae_dir), "--features", "1,x"])
