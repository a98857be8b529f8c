"""Pure-function decoder-only transformer over stacked block parameters.

Contract:
- Parameters are pytrees (`Transformer`, `Block`, ...); behaviour is module-level functions.
- Everything is written for ONE example: ``tokens: Int[seq]``; batch with ``jax.vmap``.
- ``valid`` marks real tokens (left padding is False); RoPE/learned positions count real tokens only
  and attention never looks at padding. ``slots`` are raw indices into the padded sequence; they are
  what interventions see, so a perturbation indexed by slot lines up between teacher forcing and
  cached generation.
- Interventions (hooks) are explicit values: a mapping ``{Site: fn}`` with
  ``fn(resid: [seq, d_model], slots: [seq]) -> resid``. No global hook state.
- ``run_to(model, tokens, L)`` returns the residual entering block L (``blocks.L.hook_resid_pre``
  before any hook at that site); ``run_from(model, resid, L, hooks)`` continues from there, so the
  prefix below a perturbed layer is computed once and reused.
- Blocks are stacked on a leading ``layer`` axis and run with ``lax.scan``; a block that carries a
  hook or a capture is run unrolled between scanned segments.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.core.pytree import pytree_dataclass, static
from jaxrecover.model.config import TransformerConfig
from jaxrecover.core.sites import Site
from jaxrecover.core.types import Logits, Resid, Slots, Tokens, Valid

Hook = Callable[[Resid, Slots], Resid]
Hooks = Mapping[Site, Hook]


@pytree_dataclass
class Norm:
    """RMSNorm (``b is None``) or LayerNorm. Gemma's ``(1 + w)`` is folded into ``w`` at load time."""

    w: Float[Array, "*layer d"]
    b: Float[Array, "*layer d"] | None = None


@pytree_dataclass
class Attention:
    W_Q: Float[Array, "*layer d_model n_heads d_head"]
    W_K: Float[Array, "*layer d_model n_kv_heads d_head"]
    W_V: Float[Array, "*layer d_model n_kv_heads d_head"]
    W_O: Float[Array, "*layer n_heads d_head d_model"]
    b_Q: Float[Array, "*layer n_heads d_head"] | None = None
    b_K: Float[Array, "*layer n_kv_heads d_head"] | None = None
    b_V: Float[Array, "*layer n_kv_heads d_head"] | None = None
    b_O: Float[Array, "*layer d_model"] | None = None
    q_norm: Norm | None = None  # Gemma-3
    k_norm: Norm | None = None


@pytree_dataclass
class MLP:
    W_in: Float[Array, "*layer d_model d_mlp"]
    W_out: Float[Array, "*layer d_mlp d_model"]
    W_gate: Float[Array, "*layer d_model d_mlp"] | None = None  # gated MLPs (SwiGLU / GeGLU)
    b_in: Float[Array, "*layer d_mlp"] | None = None
    b_out: Float[Array, "*layer d_model"] | None = None


@pytree_dataclass
class Block:
    ln1: Norm
    attn: Attention
    ln2: Norm
    mlp: MLP
    ln1_post: Norm | None = None  # Gemma post-attention norm
    ln2_post: Norm | None = None  # Gemma post-MLP norm


@pytree_dataclass
class Transformer:
    """A whole model. ``blocks`` leaves carry a leading ``layer`` axis."""

    cfg: TransformerConfig = static()
    W_E: Float[Array, "d_vocab d_model"]
    blocks: Block
    ln_final: Norm
    W_pos: Float[Array, "n_ctx d_model"] | None = None
    W_U: Float[Array, "d_model d_vocab"] | None = None  # None: tied to W_E


# ----------------------------------------------------------------------------- small pieces


def _like(v: Array, x: Array) -> Array:
    """``v`` with leading unit axes up to ``x``'s rank: broadcasting stays explicit, so the code runs
    under ``jax_numpy_rank_promotion="raise"`` (the test setting)."""
    return jnp.expand_dims(v, tuple(range(x.ndim - v.ndim)))


def norm(p: Norm, x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """RMSNorm or LayerNorm, computed in float32 and cast back (bf16 statistics are too coarse)."""
    x32 = x.astype(jnp.float32)
    w = _like(p.w.astype(jnp.float32), x32)
    if p.b is None:
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * w
    else:
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + eps) * w + _like(p.b.astype(jnp.float32), x32)
    return y.astype(x.dtype)


def _act(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu_new", "gelu_tanh"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"Unknown activation {name!r}.")


def rope(x: Float[Array, "seq heads d_head"], positions: Slots, theta: Array | float) -> Array:
    """Rotary embedding, half-split layout (Hugging Face ``rotate_half``)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [seq, d/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, axis=-1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, axis=-1)[:, None, :]
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., d // 2 :], x32[..., : d // 2]], axis=-1)
    return (x32 * cos + rot * sin).astype(x.dtype)


def attention_mask(
    cfg: TransformerConfig,
    q_slots: Int[Array, " q"],
    k_slots: Int[Array, " k"],
    q_pos: Int[Array, " q"],
    k_pos: Int[Array, " k"],
    k_valid: Bool[Array, " k"],
    is_local: Bool[Array, ""],
) -> Bool[Array, "q k"]:
    """Causal over slots, never attend to padding, sliding window on local layers."""
    mask = (k_slots[None, :] <= q_slots[:, None]) & k_valid[None, :]
    if cfg.sliding_window is not None:
        in_window = (q_pos[:, None] - k_pos[None, :]) < cfg.sliding_window
        mask = mask & (in_window | ~is_local)
    return mask


def attend(
    cfg: TransformerConfig,
    q: Float[Array, "q n_heads d_head"],
    k: Float[Array, "k n_kv_heads d_head"],
    v: Float[Array, "k n_kv_heads d_head"],
    mask: Bool[Array, "q k"],
) -> Float[Array, "q n_heads d_head"]:
    """Grouped-query softmax attention with optional tanh soft-capping."""
    group = cfg.n_heads // cfg.n_kv_heads
    qg = q.reshape(q.shape[0], cfg.n_kv_heads, group, cfg.d_head)  # heads grouped by their kv head
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5
    scores = jnp.einsum("qhgd,khd->hgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("hgqk,khd->qhgd", probs, v)
    return out.reshape(q.shape[0], cfg.n_heads, cfg.d_head)


def qkv(
    cfg: TransformerConfig, p: Attention, x: Resid, positions: Slots, is_local: Array
) -> tuple[Array, Array, Array]:
    """Projected, normed and rotated queries, keys and values."""
    q, k, v = _proj_in(x, p.W_Q), _proj_in(x, p.W_K), _proj_in(x, p.W_V)
    if p.b_Q is not None:
        q, k, v = q + _like(p.b_Q, q), k + _like(p.b_K, k), v + _like(p.b_V, v)
    if p.q_norm is not None:
        q, k = norm(p.q_norm, q, cfg.norm_eps), norm(p.k_norm, k, cfg.norm_eps)
    if cfg.arch != "gpt2":
        theta = cfg.rope_theta
        if cfg.rope_local_theta is not None:
            theta = jnp.where(is_local, cfg.rope_local_theta, cfg.rope_theta)
        q, k = rope(q, positions, theta), rope(k, positions, theta)
    return q, k, v


def _proj_in(x: Resid, W: Float[Array, "d_model heads d_head"]) -> Float[Array, "seq heads d_head"]:
    """``einsum("sd,dhk->shk")`` as a 2-D matmul on ``W`` viewed as ``[d, heads * d_head]`` (a free
    reshape): XLA:CPU lowered the 3-D contraction's backward with a transposed copy of ``W`` at every
    call, while a 2-D matmul takes its transposed operand as it is (like the MLP's)."""
    y = x @ W.reshape(W.shape[0], -1)
    return y.reshape(*x.shape[:-1], W.shape[1], W.shape[2])


def attn_out(p: Attention, o: Float[Array, "seq n_heads d_head"]) -> Resid:
    W = p.W_O
    y = o.reshape(*o.shape[:-2], -1) @ W.reshape(-1, W.shape[-1])  # [s, h*k] @ [h*k, d]: see _proj_in
    return y if p.b_O is None else y + _like(p.b_O, y)


def mlp(cfg: TransformerConfig, p: MLP, x: Resid) -> Resid:
    h = x @ p.W_in
    if p.b_in is not None:
        h = h + _like(p.b_in, h)
    h = _act(cfg.act, x @ p.W_gate) * h if p.W_gate is not None else _act(cfg.act, h)
    y = h @ p.W_out
    return y if p.b_out is None else y + _like(p.b_out, y)


# ----------------------------------------------------------------------------- one block


@pytree_dataclass
class SeqInfo:
    """Per-example bookkeeping shared by every block of one pass."""

    slots: Slots
    positions: Slots
    valid: Valid


def seq_info(valid: Valid) -> SeqInfo:
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
    return SeqInfo(slots=jnp.arange(valid.shape[0], dtype=jnp.int32), positions=positions, valid=valid)


def _identity_hook(x: Array, slots: Array) -> Array:
    return x


@pytree_dataclass
class KV:
    """Cached keys/values a block's new slots attend over, besides their own (written in first).

    ``k``/``v`` hold ``n_keys`` slots (``*layer`` leading when stacked over blocks); ``positions`` and
    ``valid`` describe every key slot, the new ones included (the caller marks them valid).
    """

    k: Float[Array, "*layer n_keys n_kv_heads d_head"]
    v: Float[Array, "*layer n_keys n_kv_heads d_head"]
    positions: Int[Array, " n_keys"]
    valid: Bool[Array, " n_keys"]


def _write(buf: Array, new: Array, buf_slots: Array, new_slots: Array) -> Array:
    """``buf`` with rows ``new_slots`` replaced by ``new`` (slot axis first in both).

    A one-hot select rather than ``dynamic_update_slice``: under ``vmap`` the slot is a batched
    value and the update would lower to a scatter (measured slower per decode step on CPU).
    """
    hit = buf_slots[:, None] == new_slots[None, :]  # [buf, new]
    # each buffer row takes at most one new row; sum over the one-hot picks it exactly
    picked = jnp.einsum("bn,n...->b...", hit.astype(new.dtype), new)
    inside = jnp.expand_dims(jnp.any(hit, axis=1), tuple(range(1, buf.ndim)))
    return jnp.where(inside, picked, buf)


def block(
    cfg: TransformerConfig,
    p: Block,
    x: Float[Array, "q d_model"],
    info: SeqInfo,
    is_local: Bool[Array, ""],
    block_hooks: Mapping[str, Hook] | None = None,
    captured: dict[str, Array] | None = None,
    kv: KV | None = None,
) -> tuple[Float[Array, "q d_model"], Float[Array, "q n_kv_heads d_head"], Float[Array, "q n_kv_heads d_head"]]:
    """THE block, for full passes, cached suffixes and decode steps alike.

    ``x`` holds the new slots ``info.slots`` (contiguous). Without ``kv`` they attend over themselves
    (a full pass or a prefill); with ``kv`` their keys/values are written into the cache at their
    slots first and they attend over the whole cache (a decode step, or the solver's suffix over its
    cached prefix). ``block_hooks`` maps a point name to a hook; ``captured`` (if given) receives the
    residual at each point *before* that point's hook. Returns the residual leaving the block and the
    new slots' keys/values (for the caller to cache; dead code under jit when unused).
    """
    hooks = block_hooks or {}

    def at(point: str, h: Array) -> Array:
        if captured is not None:
            captured[point] = h
        return hooks.get(point, _identity_hook)(h, info.slots)

    x = at("resid_pre", x)
    q, k, v = qkv(cfg, p.attn, norm(p.ln1, x, cfg.norm_eps), info.positions, is_local)
    if kv is None:
        k_all, v_all, k_slots, k_pos, k_valid = k, v, info.slots, info.positions, info.valid
    else:
        k, v = k.astype(kv.k.dtype), v.astype(kv.v.dtype)
        k_slots = jnp.arange(kv.k.shape[0], dtype=jnp.int32)
        k_all, v_all = _write(kv.k, k, k_slots, info.slots), _write(kv.v, v, k_slots, info.slots)
        k_pos, k_valid = kv.positions, kv.valid
    mask = attention_mask(cfg, info.slots, k_slots, info.positions, k_pos, k_valid, is_local)
    a = attn_out(p.attn, attend(cfg, q, k_all, v_all, mask))
    if p.ln1_post is not None:
        a = norm(p.ln1_post, a, cfg.norm_eps)
    x = at("resid_mid", x + a)
    return at("resid_post", mlp_residual(cfg, p, x)), k, v


def mlp_residual(cfg: TransformerConfig, p: Block, x: Resid) -> Resid:
    """The second half of a block: ``x + post_norm(mlp(norm(x)))`` (shared with cached decoding)."""
    m = mlp(cfg, p.mlp, norm(p.ln2, x, cfg.norm_eps))
    if p.ln2_post is not None:
        m = norm(p.ln2_post, m, cfg.norm_eps)
    return x + m


# ----------------------------------------------------------------------------- whole model


def compute_dtype(cfg: TransformerConfig) -> jnp.dtype:
    return jnp.dtype(jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32)


def layer_is_local(cfg: TransformerConfig) -> Bool[Array, " layer"]:
    return jnp.asarray(cfg.layer_is_local, dtype=bool)


def embed(model: Transformer, tokens: Tokens, valid: Valid | None = None) -> Array:
    """Token (+ learned position) embedding, scaled for Gemma: the residual entering block 0."""
    cfg = model.cfg
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    x = model.W_E[tokens].astype(compute_dtype(cfg))
    if cfg.embed_scale != 1.0:
        # Gemma multiplies by sqrt(d_model) rounded to the compute dtype, as the reference does.
        x = x * jnp.asarray(cfg.embed_scale, dtype=x.dtype)
    if model.W_pos is not None:
        x = x + model.W_pos[seq_info(valid).positions].astype(x.dtype)
    return x


def unembed(model: Transformer, x: Resid) -> Logits:
    """Final norm, unembedding and (Gemma-2) final soft-cap; logits are float32."""
    cfg = model.cfg
    h = norm(model.ln_final, x, cfg.norm_eps)
    W_U = model.W_E.T if model.W_U is None else model.W_U
    logits = jnp.einsum("sd,dv->sv", h, W_U.astype(h.dtype), preferred_element_type=jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def _index_block(blocks: Block, i: int | Array) -> Block:
    return jax.tree.map(lambda a: a[i], blocks)


def split_blocks(model: Transformer, start: int, stop: int) -> tuple[Block, ...]:
    """Blocks ``start..stop-1`` as separate pytrees (static slices of the stack: copies), for
    ``run_layers(..., layers=)`` in a loop that would otherwise slice them on every iteration."""
    return tuple(_index_block(model.blocks, i) for i in range(start, stop))


# above this many bytes of blocks a loop keeps slicing the stack (a second copy of several GB is worse
# than the per-iteration copies); SmolLM2-135M's 30 blocks are 0.4 GB in float32
SPLIT_MAX_BYTES = 2 << 30


def split_pays(model: Transformer, start: int, stop: int, max_bytes: int = SPLIT_MAX_BYTES) -> bool:
    """Whether a loop over blocks ``start..stop-1`` should run on ``split_blocks`` sliced once outside
    it: on CPU (XLA:CPU copies every weight it slices inside a loop, at small batches as costly as the
    matmuls; measured in benchmarks/README.md) and while that second copy stays under ``max_bytes``.
    Off CPU (not measured there) the stacked weights, and no second copy in device memory."""
    per_block = sum(a.size // a.shape[0] * a.dtype.itemsize for a in jax.tree.leaves(model.blocks))
    return jax.default_backend() == "cpu" and per_block * (stop - start) <= max_bytes


@pytree_dataclass
class Pass:
    """What ``run_layers`` returns: the residual leaving the last block run, the captured residuals
    (before their hooks) and the new slots' keys/values of every block run (``[stop - start, ...]``)."""

    x: Float[Array, "q d_model"]
    captured: dict
    k: Float[Array, "n q n_kv_heads d_head"]
    v: Float[Array, "n q n_kv_heads d_head"]


def check_sites(cfg: TransformerConfig, sites: Iterable[Site], what: str) -> None:
    """Every site inside the model (a hook past the last block would otherwise be skipped)."""
    for s in sites:
        if s.layer >= cfg.n_layers:
            raise ValueError(_MSG_SITE_OUTSIDE.format(what=what, site=s, n=cfg.n_layers, last=cfg.n_layers - 1))


_MSG_SITE_OUTSIDE = "{what} at {site} is outside the model: it has {n} blocks (layers 0..{last})."


def run_layers(
    model: Transformer,
    x: Float[Array, "q d_model"],
    start: int,
    stop: int,
    hooks: Hooks | None = None,
    *,
    info: SeqInfo,
    kv: KV | None = None,
    capture: Sequence[Site] = (),
    layers: Sequence[Block] | None = None,
) -> Pass:
    """Blocks ``start .. stop-1`` over the new slots ``info`` (optionally attending over the cache
    ``kv``, stacked over blocks ``start..``): blocks with a hook or a capture run unrolled, the runs between
    them in ``lax.scan``. The one driver of ``block`` for teacher forcing, prefill, decode steps and
    the solver's cached suffix.

    ``layers`` (optional): blocks ``start, start+1, ..`` (at least up to ``stop - 1``) already sliced
    out of the stack by a caller that does it ONCE, outside its own loop (the solver's step loop).
    Then every block runs unrolled on them: XLA:CPU copies each weight it slices inside a loop before
    its matmul, in the forward and again in the backward, which at small windows costs as much as
    the matmuls themselves. Same ops; results equal up to float32 rounding (XLA may fuse differently)."""
    cfg = model.cfg
    if not 0 <= start <= stop <= cfg.n_layers:
        raise ValueError(f"run_layers: need 0 <= start <= stop <= n_layers={cfg.n_layers}, got {start}, {stop}.")
    hooks = {Site.parse(s): f for s, f in (hooks or {}).items()}
    capture = tuple(Site.parse(s) for s in capture)
    check_sites(cfg, hooks, "Hook")
    check_sites(cfg, capture, "Capture")
    local = layer_is_local(cfg)

    def layer_kv(i: int | Array) -> KV | None:  # the cache is stacked over blocks start..
        return None if kv is None else dataclasses.replace(kv, k=kv.k[i - start], v=kv.v[i - start])

    def body(h, i):
        # index the full stacks inside the loop: scanning over blocks[start:stop] would copy those
        # weights on every call (measured 3x slower per decode step with a hook in the middle)
        h, k, v = block(cfg, _index_block(model.blocks, i), h, info, local[i], kv=layer_kv(i))
        return h, (k, v)

    def run(h, lo, hi):  # blocks lo..hi-1 without hooks: a scan, or unrolled on pre-sliced ``layers``
        if layers is None:
            return jax.lax.scan(body, h, jnp.arange(lo, hi, dtype=jnp.int32))
        kk, vv = [], []
        for i in range(lo, hi):
            h, k, v = block(cfg, layers[i - start], h, info, local[i], kv=layer_kv(i))
            kk.append(k)
            vv.append(v)
        return h, (jnp.stack(kk), jnp.stack(vv))

    if layers is not None and len(layers) < stop - start:
        raise ValueError(f"run_layers: {len(layers)} pre-sliced blocks for blocks {start}..{stop - 1}.")

    special = sorted({s.layer for s in (*hooks, *capture) if start <= s.layer < stop})
    captured: dict[Site, Array] = {}
    ks, vs = [], []
    cursor = start
    for layer in [*special, stop]:
        if layer > cursor:
            x, (k, v) = run(x, cursor, layer)
            ks.append(k)
            vs.append(v)
        if layer == stop:
            break
        block_hooks = {s.point: f for s, f in hooks.items() if s.layer == layer}
        seen: dict[str, Array] = {}
        p = _index_block(model.blocks, layer) if layers is None else layers[layer - start]
        x, k, v = block(cfg, p, x, info, local[layer], block_hooks, seen, layer_kv(layer))
        captured.update({s: seen[s.point] for s in capture if s.layer == layer})
        ks.append(k[None])
        vs.append(v[None])
        cursor = layer + 1
    if not ks:  # no block run: empty key/value stacks
        empty = jnp.zeros((0, x.shape[0], cfg.n_kv_heads, cfg.d_head), x.dtype)
        return Pass(x=x, captured=captured, k=empty, v=empty)
    return Pass(x=x, captured=captured, k=jnp.concatenate(ks), v=jnp.concatenate(vs))


def run_blocks(
    model: Transformer,
    x: Resid,
    start: int,
    stop: int,
    hooks: Hooks | None = None,
    *,
    valid: Valid | None = None,
    capture: Sequence[Site] = (),
) -> tuple[Resid, dict[Site, Array]]:
    """Run blocks ``start .. stop-1`` of a whole sequence from the residual entering ``start``.

    Hooks and captures at layers outside ``[start, stop)`` are skipped (a site past the model's last
    block is an error). Returns the residual leaving block ``stop-1`` and ``{site: residual before
    its hook}`` for each captured site.
    """
    valid = jnp.ones(x.shape[:1], bool) if valid is None else valid
    out = run_layers(model, x, start, stop, hooks, info=seq_info(valid), capture=capture)
    return out.x, out.captured


def capture(
    model: Transformer,
    tokens: Tokens,
    sites: Sequence[Site | str],
    hooks: Hooks | None = None,
    *,
    valid: Valid | None = None,
) -> dict[Site, Resid]:
    """The residual at each of ``sites`` (before that site's hook), running only the blocks up to the
    last of them, with ``hooks`` applied on the way (e.g. the clamps, to read a defended state)."""
    sites = tuple(Site.parse(s) for s in sites)
    stop = max(s.layer for s in sites) + 1
    _, cap = run_blocks(model, embed(model, tokens, valid), 0, stop, hooks, valid=valid, capture=sites)
    return cap


def run_to(
    model: Transformer,
    tokens: Tokens,
    layer: int,
    hooks: Hooks | None = None,
    *,
    valid: Valid | None = None,
) -> Resid:
    """Residual entering block ``layer`` (before any hook at ``blocks.{layer}.hook_resid_pre``)."""
    x, _ = run_blocks(model, embed(model, tokens, valid), 0, layer, hooks, valid=valid)
    return x


def run_from(
    model: Transformer,
    resid: Resid,
    layer: int,
    hooks: Hooks | None = None,
    *,
    valid: Valid | None = None,
) -> Logits:
    """Logits from the residual entering block ``layer``; hooks at layers >= ``layer`` apply."""
    x, _ = run_blocks(model, resid, layer, model.cfg.n_layers, hooks, valid=valid)
    return unembed(model, x)


def forward(
    model: Transformer,
    tokens: Tokens,
    hooks: Hooks | None = None,
    *,
    valid: Valid | None = None,
) -> Logits:
    """Logits for one sequence, with interventions ``hooks`` applied at their sites."""
    return run_from(model, run_to(model, tokens, 0, valid=valid), 0, hooks, valid=valid)


def n_params(model: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(model))
