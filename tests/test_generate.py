"""KV-cached generation against the uncached reference, on tiny random models.

Properties: prefill == forward at the last slot; cached == uncached (tokens and logits) with no hook,
a Clamp, and an AddDelta whose rows sit at a prompt slot and at a generated slot; a left-padded batch
== each prompt alone; per-example hooks under vmap == one row at a time; sampling is a function of
the key; EOS rows emit padding; one compile per shape bucket.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# names, not the module: jaxrecover/__init__ re-exports the function ``generate``, which shadows the
# submodule attribute ``jaxrecover.model.generate``
from jaxrecover.model.generate import _generate_cached_jit, bucket_length, generate, generate_uncached, prefill
from jaxrecover.sae.clamp import AddDelta, Clamp, compose
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_transformer, tiny_config
from jaxrecover.model.transformer import forward

NEW = 4  # new tokens per test: enough to cover prefill, decode steps and a generated-slot delta
ATOL = 1e-4


def _model(arch: str):
    # untied unembedding: with a tied random W_E, greedy decoding just repeats the last token
    return random_transformer(jax.random.key(0), tiny_config(arch, tied_embeddings=False))


def _prompts(cfg, batch: int = 2, seq: int = 6):
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.d_vocab, dtype=jnp.int32)
    valid = jnp.ones((batch, seq), bool).at[1, :2].set(False)  # row 1 is left-padded by two slots
    return tokens, valid


def _sae(cfg, d_sae: int = 16) -> SAE:
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    return SAE(
        W_enc=jax.random.normal(k1, (cfg.d_model, d_sae)) * cfg.d_model**-0.5,
        b_enc=jnp.zeros((d_sae,)),
        W_dec=jax.random.normal(k2, (d_sae, cfg.d_model)) * d_sae**-0.5,
        b_dec=0.1 * jax.random.normal(k3, (cfg.d_model,)),
    )


def _clamp(cfg) -> Clamp:
    return Clamp(_sae(cfg), features=jnp.array([1, 5], jnp.int32), values=jnp.array([4.0, -3.0]))


def _hooks(kind: str, cfg, seq: int):
    if kind == "none":
        return None
    clamp = _clamp(cfg)
    if kind == "clamp":
        return {Site(1, "resid_pre"): clamp}
    # one delta row at prompt slot 3, one at the second generated slot (seq + 1)
    delta = 2.0 * jax.random.normal(jax.random.key(3), (2, cfg.d_model))
    add = AddDelta(delta, jnp.array([3, seq + 1], jnp.int32))
    return {Site(0, "resid_mid"): add, "blocks.1.hook_resid_post": compose(clamp, add)}


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 33)] == [16, 16, 16, 32, 48]
    assert bucket_length(5, multiple=4) == 8


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefill_logits_equal_forward(arch):
    model = _model(arch)
    tokens, valid = _prompts(model.cfg)
    hooks = _hooks("delta", model.cfg, tokens.shape[1])
    for row in range(tokens.shape[0]):
        logits, cache = prefill(model, tokens[row], valid[row], tokens.shape[1] + NEW, hooks)
        want = forward(model, tokens[row], hooks, valid=valid[row])[-1]
        np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
        assert cache.k.shape == (model.cfg.n_layers, tokens.shape[1] + NEW, model.cfg.n_kv_heads, model.cfg.d_head)
        assert int(cache.length) == tokens.shape[1]


@pytest.mark.parametrize(
    ("arch", "kind"),
    [("llama", "none"), ("llama", "clamp"), ("llama", "delta"), ("gemma2", "delta"), ("gpt2", "clamp")],
)
def test_cached_equals_uncached(arch, kind):
    model = _model(arch)
    tokens, valid = _prompts(model.cfg)
    hooks = _hooks(kind, model.cfg, tokens.shape[1])
    got = generate(model, tokens, valid, max_new_tokens=NEW, hooks=hooks, return_logits=True)
    want = generate_uncached(model, tokens, valid, max_new_tokens=NEW, hooks=hooks, return_logits=True)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(got.sequences, jnp.concatenate([tokens, got.tokens], axis=1))
    if kind != "none":  # the hooks must matter at every step, or the comparison proves little
        plain = generate(model, tokens, valid, max_new_tokens=NEW, return_logits=True)
        assert np.all(np.abs(got.logits - plain.logits).max(axis=-1) > 1e-3)


def test_generated_slot_delta_acts_at_its_step_only():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    seq = tokens.shape[1]
    delta = AddDelta(5.0 * jnp.ones((1, model.cfg.d_model)), jnp.array([seq + 1], jnp.int32))
    got = generate(model, tokens, valid, max_new_tokens=NEW, hooks={Site(1): delta}, return_logits=True)
    plain = generate(model, tokens, valid, max_new_tokens=NEW, return_logits=True)
    # logits[:, i] are read at slot seq - 1 + i: untouched before slot seq + 1, changed from then on
    np.testing.assert_allclose(got.logits[:, :2], plain.logits[:, :2], atol=1e-5)
    assert np.all(np.abs(got.logits[:, 2] - plain.logits[:, 2]).max(axis=-1) > 1e-3)


def test_left_padded_batch_equals_each_prompt_alone():
    model = _model("gemma2")
    tokens, valid = _prompts(model.cfg)
    hooks = {Site(0, "resid_post"): _clamp(model.cfg)}  # slot-independent, so padding cannot shift it
    batch = generate(model, tokens, valid, max_new_tokens=NEW, hooks=hooks, return_logits=True)
    for row in range(tokens.shape[0]):
        alone = np.asarray(tokens[row])[np.asarray(valid[row])][None]  # host NumPy, as the tokenizer gives
        one = generate(model, alone, max_new_tokens=NEW, hooks=hooks, return_logits=True)
        np.testing.assert_array_equal(batch.tokens[row], one.tokens[0])
        np.testing.assert_allclose(batch.logits[row], one.logits[0], atol=ATOL, rtol=ATOL)


def test_per_example_hooks_equal_one_row_at_a_time():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    seq, batch = tokens.shape[1], tokens.shape[0]
    deltas = 3.0 * jax.random.normal(jax.random.key(4), (batch, 2, model.cfg.d_model))  # [batch, rows, d_model]
    slots = jnp.array([[4, seq + 2], [seq, 5]], jnp.int32)  # [batch, rows]
    clamp_site, delta_site = Site(0, "resid_post"), Site(1, "resid_mid")
    hooks = {clamp_site: _clamp(model.cfg), delta_site: AddDelta(deltas, slots)}
    axes = {clamp_site: None, delta_site: 0}  # one clamp for all rows, a delta per row
    out = generate(model, tokens, valid, max_new_tokens=NEW, hooks=hooks, hooks_in_axes=axes, return_logits=True)
    for row in range(batch):
        one_hooks = {clamp_site: _clamp(model.cfg), delta_site: AddDelta(deltas[row], slots[row])}
        one = generate(model, tokens[row : row + 1], valid[row : row + 1], max_new_tokens=NEW, hooks=one_hooks,
                           return_logits=True)
        np.testing.assert_array_equal(out.tokens[row], one.tokens[0])
        np.testing.assert_allclose(out.logits[row], one.logits[0], atol=ATOL, rtol=ATOL)


def test_sampling_is_a_function_of_the_key():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    kw = dict(max_new_tokens=6, temperature=1.5, top_k=20)
    a = generate(model, tokens, valid, key=jax.random.key(7), **kw)
    b = generate(model, tokens, valid, key=jax.random.key(7), **kw)
    c = generate(model, tokens, valid, key=jax.random.key(8), **kw)
    ref = generate_uncached(model, tokens, valid, key=jax.random.key(7), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, ref.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_eos_rows_emit_padding():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    free = generate(model, tokens, valid, max_new_tokens=NEW)
    eos = int(free.tokens[0, 1])  # row 0 emits it at step 1 (it may appear earlier too)
    first = int(np.argmax(np.asarray(free.tokens[0]) == eos))
    out = generate(model, tokens, valid, max_new_tokens=NEW, eos_id=eos, pad_id=-1)
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])
    assert np.all(np.asarray(out.tokens[0, first + 1 :]) == -1)
    assert bool(out.finished[0])


def test_one_compile_per_shape_bucket():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    add = lambda scale: {Site(0): AddDelta(scale * jnp.ones((1, model.cfg.d_model)), jnp.array([2], jnp.int32))}
    before = _generate_cached_jit._cache_size()
    generate(model, tokens, valid, max_new_tokens=3, hooks=add(1.0))
    generate(model, tokens[::-1], valid, max_new_tokens=3, hooks=add(2.0))  # new values: no recompile
    assert _generate_cached_jit._cache_size() == before + 1
    generate(model, tokens, valid, max_new_tokens=2, hooks=add(1.0))  # new max_new_tokens: one more
    assert _generate_cached_jit._cache_size() == before + 2


def test_hook_past_last_layer_raises():
    model = _model("llama")
    tokens, valid = _prompts(model.cfg)
    with pytest.raises(ValueError, match="outside the model"):
        generate(model, tokens, valid, max_new_tokens=2, hooks={Site(model.cfg.n_layers): _clamp(model.cfg)})
