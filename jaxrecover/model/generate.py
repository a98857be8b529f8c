"""Batched autoregressive generation with a per-layer KV cache, interventions staying on.

Contract:
- Core functions are written for ONE example and batched with ``jax.vmap``: ``prefill(model, tokens,
  valid, max_len, hooks)`` runs the (left-padded) prompt and fills a ``KVCache`` of ``max_len`` slots;
  ``decode_step(model, cache, token, hooks)`` appends one token at slot ``cache.length``.
- Slots are raw indices into the padded buffer ``prompt slots ++ generated slots``, exactly the slots a
  teacher-forced ``transformer.forward`` over that buffer would see. Hooks ``{Site: fn(resid, slots)}``
  are called at every block point with the prompt slots during prefill and with ``[slot]`` at each
  decode step. So a ``Clamp`` stays on for every generated token, and an ``AddDelta`` row whose slot is
  a generated slot acts at exactly the step that produces that slot's residual (rows at prompt slots
  act during prefill only: their effect reaches later tokens through the cached keys/values).
- Positions count real tokens (``cumsum(valid) - 1``); a generated token's position is the number of
  real tokens before it. Generated slots are always valid, including after EOS.
- ``generate`` is one ``jit`` per shape bucket (batch, prompt length, ``max_new_tokens``) and static
  options; decode steps run inside ``lax.scan``. Hooks are traced arguments, so new delta or clamp
  values reuse the compiled program; a new hook *structure* (sites, types) recompiles.
- With several devices (or processes: ``jax.devices()`` is global after ``distributed.initialize``)
  the batch is padded to a multiple of the device count (repeating the last row), split over the
  devices with per-row hook arrays split alike and shared hooks and the model replicated, and the
  result is gathered back to a full host copy in every process (rows are independent, so no device
  talks to another until that gather).
- ``generate_uncached`` recomputes the full buffer each step with ``transformer.forward``: slow and
  obviously correct, the reference in tests.

Not here: tokenization (``tokenizer``), stopping on strings, beam search.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.core.pytree import pytree_dataclass
from jaxrecover.runtime.sharding import map_batched, pad_batch, replicate, shard_batch, to_host
from jaxrecover.core.sites import Site
from jaxrecover.model.transformer import (KV, Hook, SeqInfo, Transformer, check_sites, embed, forward, run_layers, seq_info,
                                          split_blocks, split_pays, unembed)
from jaxrecover.core.types import Tokens, Valid

# hooks keyed by Site or by "blocks.{L}.hook_{point}" string (Site.parse accepts both)
AnyHooks = Mapping[Site | str, Hook]
# prompts may come from the tokenizer as host NumPy arrays
_Tokens = Int[Array | np.ndarray, "batch seq"]
_Valid = Bool[Array | np.ndarray, "batch seq"]

_MSG_BATCH = "generate: tokens and valid must be [batch, seq] with the same shape, got {t} and {v}."
_MSG_NEW = "generate: max_new_tokens must be >= 1, got {n}."


@pytree_dataclass
class KVCache:
    """Keys/values of every layer for ``max_len`` slots of one sequence (``*batch`` under vmap).

    ``valid[s]`` is True for real prompt tokens and generated tokens written so far; ``positions[s]``
    is the RoPE position of slot ``s``; ``length`` is the next free slot.
    """

    k: Float[Array, "*batch layer max_len n_kv_heads d_head"]
    v: Float[Array, "*batch layer max_len n_kv_heads d_head"]
    valid: Bool[Array, "*batch max_len"]
    positions: Int[Array, "*batch max_len"]
    length: Int[Array, "*batch"]


@pytree_dataclass
class GenerationResult:
    """Output of ``generate``.

    ``tokens``: the new tokens (after a row's EOS: ``pad_id``). ``finished``: the row emitted EOS.
    ``sequences``/``valid``: prompt ++ new tokens and its validity mask (prompt padding False).
    ``logits``: the logits each new token was chosen from (only with ``return_logits=True``).
    """

    tokens: Int[Array, "batch new"]
    finished: Bool[Array, " batch"]
    sequences: Int[Array, "batch total"]
    valid: Bool[Array, "batch total"]
    logits: Float[Array, "batch new d_vocab"] | None = None


def bucket_length(n: int, multiple: int = 16) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n`` (at least ``multiple``): pad prompts to it so
    a sweep over prompts of different lengths compiles a handful of times.

    >>> bucket_length(17), bucket_length(32), bucket_length(0)
    (32, 32, 16)
    """
    return max(multiple, -(-n // multiple) * multiple)


# ----------------------------------------------------------------------------- per-example core


def _embed_at(model: Transformer, tokens: Int[Array, " q"], positions: Int[Array, " q"]) -> Float[Array, "q d_model"]:
    """``transformer.embed`` for tokens at explicit positions (a decode step has no prompt mask)."""
    x = embed(dataclasses.replace(model, W_pos=None), tokens)
    if model.W_pos is not None:
        x = x + model.W_pos[positions].astype(x.dtype)
    return x


def prefill(
    model: Transformer,
    tokens: Tokens,
    valid: Valid,
    max_len: int,
    hooks: AnyHooks | None = None,
) -> tuple[Float[Array, " d_vocab"], KVCache]:
    """Run the prompt with ``hooks`` and return the logits at its last slot and a cache of ``max_len``
    slots (the prompt's ``seq`` slots filled, ``length = seq``).

    The prompt attends over its own keys only, so the logits equal ``transformer.forward``'s.
    """
    cfg = model.cfg
    seq = tokens.shape[0]
    if max_len < seq:
        raise ValueError(f"prefill: max_len={max_len} is shorter than the prompt ({seq} slots).")
    info = seq_info(valid)
    x = embed(model, tokens, valid)
    out = run_layers(model, x, 0, cfg.n_layers, hooks, info=info)
    # the cache holds keys/values in the compute dtype (that of the embedded residual)
    k, v = out.k.astype(x.dtype), out.v.astype(x.dtype)
    logits = unembed(model, out.x[-1:])[0]
    extra = max_len - seq
    cache = KVCache(
        k=jnp.pad(k, ((0, 0), (0, extra), (0, 0), (0, 0))),
        v=jnp.pad(v, ((0, 0), (0, extra), (0, 0), (0, 0))),
        valid=jnp.pad(valid, (0, extra)),
        positions=jnp.pad(info.positions, (0, extra)),
        length=jnp.asarray(seq, jnp.int32),
    )
    return logits, cache


def decode_step(
    model: Transformer, cache: KVCache, token: Int[Array, ""], hooks: AnyHooks | None = None,
    layers: tuple | None = None,
) -> tuple[Float[Array, " d_vocab"], KVCache]:
    """Append ``token`` at slot ``cache.length`` and return the next-token logits and the new cache.

    Hooks are called with ``slots=[cache.length]`` at every block point. Writing past ``max_len`` is
    not checked (the token would be dropped from the cache); ``generate`` sizes the cache.
    ``layers``: every block, already ``split_blocks`` out of the stack by a caller that loops.
    """
    slot = cache.length
    pos = jnp.sum(cache.valid.astype(jnp.int32))  # real tokens before this one
    here = jnp.arange(cache.valid.shape[0], dtype=jnp.int32) == slot
    valid = cache.valid | here
    positions = jnp.where(here, pos, cache.positions)
    info = SeqInfo(slots=slot[None], positions=pos[None], valid=jnp.ones((1,), bool))
    out = run_layers(
        model, _embed_at(model, token[None], pos[None]), 0, model.cfg.n_layers, hooks, info=info,
        kv=KV(k=cache.k, v=cache.v, positions=positions, valid=valid), layers=layers,
    )
    x, k, v = out.x, out.k, out.v
    at_slot = here[None, :, None, None]  # [layer, max_len, n_kv_heads, d_head]
    new = KVCache(
        k=jnp.where(at_slot, k, cache.k),
        v=jnp.where(at_slot, v, cache.v),
        valid=valid,
        positions=positions,
        length=slot + 1,
    )
    return unembed(model, x)[0], new


# ----------------------------------------------------------------------------- uncached reference


@pytree_dataclass
class _Buffer:
    """State of the uncached reference: the whole padded buffer and the next free slot."""

    tokens: Int[Array, "*batch max_len"]
    valid: Bool[Array, "*batch max_len"]
    length: Int[Array, "*batch"]


def _prefill_uncached(
    model: Transformer, tokens: Array, valid: Array, max_len: int, hooks: AnyHooks | None
) -> tuple[Array, _Buffer]:
    seq = tokens.shape[0]
    buf = _Buffer(
        tokens=jnp.pad(tokens, (0, max_len - seq)),
        valid=jnp.pad(valid, (0, max_len - seq)),
        length=jnp.asarray(seq, jnp.int32),
    )
    return forward(model, buf.tokens, hooks, valid=buf.valid)[seq - 1], buf


def _step_uncached(model: Transformer, buf: _Buffer, token: Array, hooks: AnyHooks | None,
                   layers: tuple | None = None) -> tuple[Array, _Buffer]:
    slot = buf.length
    buf = _Buffer(tokens=buf.tokens.at[slot].set(token), valid=buf.valid.at[slot].set(True), length=slot + 1)
    return forward(model, buf.tokens, hooks, valid=buf.valid)[slot], buf


# ----------------------------------------------------------------------------- batched sampler


def _choose(
    logits: Float[Array, "batch d_vocab"],
    keys: Array,
    step: Array,
    temperature: Array,
    *,
    greedy: bool,
    top_k: int | None,
) -> Int[Array, " batch"]:
    """Greedy argmax, or a temperature / top-k sample with per-example keys folded with the step."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature.astype(logits.dtype)
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)

    def one(key: Array, row: Array) -> Array:
        return jax.random.categorical(jax.random.fold_in(key, step), row).astype(jnp.int32)

    return jax.vmap(one)(keys, scaled)


def _generate_impl(
    model: Transformer,
    tokens: Array,
    valid: Array,
    hooks: AnyHooks | None,
    temperature: Array,
    key: Array,
    *,
    prefill_fn: Callable,
    step_fn: Callable,
    max_new_tokens: int,
    greedy: bool,
    top_k: int | None,
    eos_id: int | None,
    pad_id: int,
    hooks_axes: tuple[tuple[Any, ...], Any],
    return_logits: bool,
    presplit: bool,
) -> GenerationResult:
    batch, seq = tokens.shape
    max_len = seq + max_new_tokens
    axes = jax.tree.unflatten(hooks_axes[1], hooks_axes[0])
    # sliced once, outside the decode scan (``transformer.split_pays``): on CPU slicing the stack inside
    # the scan copies every weight at every step
    layers = split_blocks(model, 0, model.cfg.n_layers) if presplit else None
    start = jax.vmap(lambda t, m, h: prefill_fn(model, t, m, max_len, h), in_axes=(0, 0, axes))
    advance = jax.vmap(lambda s, t, h: step_fn(model, s, t, h, layers), in_axes=(0, 0, axes))
    keys = jax.random.split(key, batch)
    choose = functools.partial(_choose, keys=keys, temperature=temperature, greedy=greedy, top_k=top_k)

    def emit(logits: Array, finished: Array, step: Array) -> tuple[Array, Array]:
        tok = jnp.where(finished, jnp.int32(pad_id), choose(logits, step=step))
        done = finished if eos_id is None else finished | (tok == eos_id)
        return tok, done

    def body(carry, step):
        state, logits, finished = carry
        tok, finished = emit(logits, finished, step)
        next_logits, state = advance(state, tok, hooks)
        return (state, next_logits, finished), (tok, logits if return_logits else None)

    logits, state = start(tokens, valid, hooks)
    finished = jnp.zeros((batch,), bool)
    steps = jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
    (state, logits, finished), (toks, seen) = jax.lax.scan(body, (state, logits, finished), steps)
    last, finished = emit(logits, finished, jnp.int32(max_new_tokens - 1))
    new = jnp.concatenate([toks.T, last[:, None]], axis=1)  # scan stacks steps first: [step, batch]
    all_logits = None
    if return_logits:
        all_logits = jnp.concatenate([jnp.swapaxes(seen, 0, 1), logits[:, None]], axis=1)
    return GenerationResult(
        tokens=new,
        finished=finished,
        sequences=jnp.concatenate([tokens, new], axis=1),
        valid=jnp.concatenate([valid, jnp.ones((batch, max_new_tokens), bool)], axis=1),
        logits=all_logits,
    )


_STATIC = ("max_new_tokens", "greedy", "top_k", "eos_id", "pad_id", "hooks_axes", "return_logits", "presplit")
_generate_cached_jit = jax.jit(
    functools.partial(_generate_impl, prefill_fn=prefill, step_fn=decode_step), static_argnames=_STATIC
)
_generate_uncached_jit = jax.jit(
    functools.partial(_generate_impl, prefill_fn=_prefill_uncached, step_fn=_step_uncached), static_argnames=_STATIC
)


def _normalize_hooks(hooks: Mapping[Any, Any] | None) -> dict[Site, Any]:
    """String or Site keys -> Site keys (hooks, or an in_axes prefix of them)."""
    return {Site.parse(s): f for s, f in (hooks or {}).items()}


def _call(
    fn: Callable,
    model: Transformer,
    tokens: _Tokens,
    valid: _Valid | None,
    *,
    max_new_tokens: int,
    hooks: AnyHooks | None = None,
    hooks_in_axes: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Array | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    tokens = jnp.asarray(tokens, jnp.int32)
    valid = jnp.ones(tokens.shape, bool) if valid is None else jnp.asarray(valid, bool)
    if tokens.ndim != 2 or valid.shape != tokens.shape:
        raise ValueError(_MSG_BATCH.format(t=tokens.shape, v=valid.shape))
    if max_new_tokens < 1:
        raise ValueError(_MSG_NEW.format(n=max_new_tokens))
    hooks = _normalize_hooks(hooks)
    check_sites(model.cfg, hooks, "Hook")  # fail here, not inside the trace
    if isinstance(hooks_in_axes, Mapping):
        hooks_in_axes = _normalize_hooks(hooks_in_axes)
    # the in_axes prefix becomes a static argument: flatten it into hashable leaves + treedef
    leaves, treedef = jax.tree.flatten(hooks_in_axes, is_leaf=lambda a: a is None)
    greedy = float(temperature) == 0.0
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    batch, n_dev = tokens.shape[0], len(jax.devices())
    if n_dev > 1:  # data parallel over the rows (see the module docstring)
        size = -(-batch // n_dev) * n_dev
        place = lambda t: shard_batch(pad_batch(t, size)[0])  # noqa: E731
        tokens, valid = place(tokens), place(valid)
        hooks = map_batched(hooks, hooks_in_axes, place, replicate)
        model = replicate(model)
    out = fn(
        model,
        tokens,
        valid,
        hooks,
        jnp.asarray(1.0 if greedy else temperature, jnp.float32),
        jax.random.key(0) if key is None else key,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        top_k=top_k,
        eos_id=eos_id,
        pad_id=int(pad_id),
        hooks_axes=(tuple(leaves), treedef),
        return_logits=return_logits,
        presplit=fn is _generate_cached_jit and split_pays(model, 0, model.cfg.n_layers),
    )
    if n_dev > 1:  # a full copy in every process, padding rows dropped
        out = jax.tree.map(lambda a: jnp.asarray(a[:batch]), to_host(out))
    return out


def generate(
    model: Transformer,
    tokens: _Tokens,
    valid: _Valid | None = None,
    *,
    max_new_tokens: int,
    hooks: AnyHooks | None = None,
    hooks_in_axes: Any = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Array | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_logits: bool = False,
) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens for a left-padded batch of prompts, with a KV cache.

    Args:
        model: the transformer.
        tokens: ``[batch, seq]`` prompt ids, padded on the left (pad to ``bucket_length`` to limit
            recompiles).
        valid: ``[batch, seq]`` True at real tokens; ``None`` means all real.
        max_new_tokens: number of tokens to generate (static; one compile per value).
        hooks: ``{Site: fn(resid, slots) -> resid}`` applied at prefill and at every decode step.
            Slots count from the first (padded) prompt slot; generated token ``i`` sits at slot
            ``seq + i``. Traced: new array values do not recompile.
        hooks_in_axes: how hook arrays map over the batch, as ``jax.vmap``'s ``in_axes`` for the hooks
            argument. ``None`` (default): every hook is shared by all rows. ``0``: every array leaf
            of every hook has a leading batch axis. A prefix pytree mixes them, e.g.
            ``{clamp_site: None, delta_site: 0}`` shares the clamp and gives each row its own
            ``AddDelta`` (``delta [batch, rows, d_model]``, ``slots [batch, rows]``); a prefix may
            also go inside a hook (``compose(Clamp(None, None, None), AddDelta(0, 0))``) where the
            hook's field annotations accept it.
        temperature: ``0.0`` is greedy (argmax); otherwise logits are divided by it and sampled. The
            greedy/sampling choice is static, the temperature value is traced.
        top_k: sample only among the ``top_k`` largest logits (static; ``None`` for all).
        key: PRNG key for sampling; split into one key per row, folded with the step index, so a
            row's sample does not depend on the batch it is in beyond its row index.
        eos_id: once a row emits it, the row is ``finished`` and emits ``pad_id`` from then on.
        pad_id: what finished rows emit; defaults to ``eos_id`` (or 0).
        return_logits: also return the ``[batch, max_new_tokens, d_vocab]`` logits of each choice.

    Returns:
        A ``GenerationResult``.

    >>> out = generate(model, tokens, valid, max_new_tokens=8, hooks={Site(6): clamp})
    >>> out.tokens.shape
    (batch, 8)
    """
    return _call(
        _generate_cached_jit,
        model,
        tokens,
        valid,
        max_new_tokens=max_new_tokens,
        hooks=hooks,
        hooks_in_axes=hooks_in_axes,
        temperature=temperature,
        top_k=top_k,
        key=key,
        eos_id=eos_id,
        pad_id=pad_id,
        return_logits=return_logits,
    )


def generate_uncached(model: Transformer, tokens: _Tokens, valid: _Valid | None = None, **options: Any) -> GenerationResult:
    """``generate`` without a cache: every step reruns ``transformer.forward`` over the whole
    ``seq + max_new_tokens`` buffer (future slots marked invalid). Same arguments (``options`` are
    ``generate``'s keywords) and result; cost is quadratic in the number of steps. Use it as a
    reference."""
    return _call(_generate_uncached_jit, model, tokens, valid, **options)
