"""Invariants of the pure transformer on tiny random models of every family.

Computations run under ``jax.jit`` with hooks closed over (hooks are Python callables, not pytree
leaves): eager dispatch of a whole forward costs seconds on the shared 2-core test machine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.model.config import TransformerConfig
from jaxrecover.io.hf import build_transformer, param_shapes
from jaxrecover.core.sites import POINTS, Site
from jaxrecover.testing import random_transformer, tiny_config
from jaxrecover.model.transformer import embed, forward, run_blocks, run_from, run_to

SEQ = 10  # > sliding_window (4) of the tiny Gemma configs, so local layers are exercised
TOL = dict(atol=1e-5, rtol=1e-5)


def _tokens(cfg: TransformerConfig, seed: int = 0, n: int = SEQ) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (n,), 0, cfg.d_vocab)


def _fwd(model, toks, hooks=None, valid=None):
    return jax.jit(lambda m, t, v: forward(m, t, hooks, valid=v))(model, toks, valid)


def test_identity_hook_equals_no_hook(tiny_model):
    toks = _tokens(tiny_model.cfg)
    hooks = {Site(layer, point): (lambda x, slots: x) for layer in range(tiny_model.cfg.n_layers) for point in POINTS}
    # Hooked blocks run unrolled, the rest inside lax.scan: equal up to float reassociation.
    np.testing.assert_allclose(_fwd(tiny_model, toks, hooks), _fwd(tiny_model, toks), **TOL)


def test_run_from_run_to_equals_forward(tiny_model):
    toks = _tokens(tiny_model.cfg)
    n = tiny_model.cfg.n_layers

    @jax.jit
    def splits(m, t):
        return [run_from(m, run_to(m, t, layer), layer) for layer in range(n + 1)]

    ref = _fwd(tiny_model, toks)
    for layer, out in enumerate(splits(tiny_model, toks)):
        np.testing.assert_allclose(out, ref, **TOL, err_msg=f"split at layer {layer}")


def test_jit_equals_no_jit(llama_model):
    toks = _tokens(llama_model.cfg)
    # No hook: eager dispatch of an unrolled (hooked) block costs ~10 s on a loaded 2-core machine.
    np.testing.assert_allclose(_fwd(llama_model, toks), forward(llama_model, toks), **TOL)


def test_causality_by_gradient(tiny_model):
    """d logits[i] / d resid_0[j] is exactly zero for j > i, and not identically zero for j <= i."""
    toks = _tokens(tiny_model.cfg, n=6)

    @jax.jit
    def jac(m, t):
        return jax.jacrev(lambda r: run_from(m, r, 0).sum(-1))(embed(m, t))  # [i, j, d_model]

    influence = np.abs(np.asarray(jac(tiny_model, toks))).sum(-1)  # [i, j]
    i, j = np.indices(influence.shape)
    assert np.all(influence[j > i] == 0.0)
    assert np.all(influence[j <= i] > 0.0)


def test_left_padding_does_not_change_valid_logits(tiny_model):
    toks = _tokens(tiny_model.cfg)
    n_pad = 3
    padded = jnp.concatenate([jnp.zeros((n_pad,), toks.dtype), toks])
    valid = jnp.arange(padded.shape[0]) >= n_pad
    np.testing.assert_allclose(_fwd(tiny_model, padded, valid=valid)[n_pad:], _fwd(tiny_model, toks), **TOL)


def test_hooks_called_in_forward_order(llama_model):
    calls = []

    def recorder(site):
        def hook(x, slots):
            calls.append(site)  # runs once, at trace time
            return x

        return hook

    sites = [Site(1, "resid_post"), Site(0, "resid_mid"), Site(1, "resid_pre"), Site(0, "resid_pre"), Site(0, "resid_post")]
    jax.eval_shape(lambda m, t: forward(m, t, {s: recorder(s) for s in sites}), llama_model, _tokens(llama_model.cfg))
    assert calls == sorted(sites)


def test_hooks_compose_across_blocks(llama_model):
    """resid_post of block 0 and resid_pre of block 1 see the same stream; post runs first."""
    toks = _tokens(llama_model.cfg)
    hooks = {Site(1, "resid_pre"): lambda x, s: x * 2.0, Site(0, "resid_post"): lambda x, s: x + 1.0}
    manual = jax.jit(lambda m, t: run_from(m, (run_to(m, t, 1) + 1.0) * 2.0, 1))(llama_model, toks)
    np.testing.assert_allclose(_fwd(llama_model, toks, hooks), manual, **TOL)


def test_hooks_see_slots(llama_model):
    seen = {}

    def hook(x, slots):
        seen["slots"] = slots
        return x

    forward(llama_model, _tokens(llama_model.cfg), {Site(0, "resid_mid"): hook})
    np.testing.assert_array_equal(seen["slots"], np.arange(SEQ))


def test_capture_returns_pre_hook_values(llama_model):
    toks = _tokens(llama_model.cfg)
    hooks = {Site(1, "resid_pre"): lambda x, s: x * 0.0, Site(0, "resid_post"): lambda x, s: x + 3.0}
    capture = [Site(0, "resid_post"), Site(1, "resid_pre"), Site(1, "resid_mid")]

    @jax.jit
    def run(m, t):
        _, captured = run_blocks(m, embed(m, t), 0, m.cfg.n_layers, hooks, capture=capture)
        return captured, run_to(m, t, 1)

    captured, clean_1 = run(llama_model, toks)
    np.testing.assert_allclose(captured[Site(0, "resid_post")], clean_1, **TOL)  # before its +3
    np.testing.assert_allclose(captured[Site(1, "resid_pre")], clean_1 + 3.0, **TOL)  # before its *0
    # resid_mid of block 1 is computed from the zeroed stream, so it differs from what entered.
    assert not np.allclose(captured[Site(1, "resid_mid")], captured[Site(1, "resid_pre")])


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bfloat16_close_to_float32(arch):
    key = jax.random.key(0)
    m32 = random_transformer(key, tiny_config(arch))
    m16 = random_transformer(key, tiny_config(arch, dtype="bfloat16"))
    assert m16.W_E.dtype == jnp.bfloat16 and m16.blocks.attn.W_Q.dtype == jnp.bfloat16
    toks = _tokens(m32.cfg)
    l32, l16 = _fwd(m32, toks), _fwd(m16, toks)
    assert l16.dtype == jnp.float32  # logits always come back in float32
    assert float(jnp.abs(l32 - l16).max()) < 0.1 * float(jnp.abs(l32).max())
    assert float(jnp.mean(jnp.argmax(l32, -1) == jnp.argmax(l16, -1))) >= 0.8


def test_sliding_window_matters():
    """Guard for the parity tests: with seq > window, local attention changes the logits."""
    m = random_transformer(jax.random.key(0), tiny_config("gemma2"))
    wide = random_transformer(jax.random.key(0), tiny_config("gemma2", sliding_window=None))
    toks = _tokens(m.cfg)
    assert not np.allclose(_fwd(m, toks), _fwd(wide, toks), atol=1e-3)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("layer", [0, 7, 31])
def test_site_string_round_trip(layer, point):
    site = Site(layer, point)
    assert str(site) == f"blocks.{layer}.hook_{point}"
    assert Site.parse(str(site)) == site
    assert Site.parse(site) is site


@pytest.mark.parametrize("bad", ["blocks.3.hook_attn_out", "blocks.x.hook_resid_pre", "resid_pre", "blocks.-1.hook_resid_pre"])
def test_site_parse_rejects_unsupported(bad):
    with pytest.raises(ValueError):
        Site.parse(bad)


def test_real_size_shapes_without_compute():
    """SmolLM2-135M-shaped config traces with the right shapes (eval_shape: no FLOPs, no memory)."""
    cfg = tiny_config("llama", d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=49152)
    shapes = {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(cfg).items()}
    out = jax.eval_shape(lambda p, t: forward(build_transformer(cfg, p), t), shapes, jnp.zeros((16,), jnp.int32))
    assert out.shape == (16, 49152) and out.dtype == jnp.float32
