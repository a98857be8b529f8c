"""Training sparse autoencoders on residual-stream activations: TopK and JumpReLU, JAX + Optax.

Contract:
- Data: ``chunk_token_stream`` cuts tokenised documents into fixed-length chunks; ``activation_rows``
  turns one chunk's residual at a site into training rows, dropping slot 0 of every chunk (the
  attention-sink token, whose norm is tens of times the rest and would dominate the loss) and padding.
  ``harvest`` writes the rows of several sites from ONE pass of the model to float16 memmaps;
  ``ArrayBatches`` (random access, per-epoch seeded permutation) and ``shuffle_buffer`` (a seeded
  numpy shuffling buffer over a stream) make training batches.
- Training: ``train(cfg, batches, checkpoint_dir)`` runs a jitted step per batch from the host
  (the data live on the host, so this loop is a Python loop, not ``lax.scan``). Batch ``i`` is a pure
  function of ``(seed, i)``, so a killed run restarted with the same arguments resumes from its last
  orbax checkpoint and produces the same parameters as an uninterrupted run.
- Inputs are optionally scaled by one scalar ``s`` (so that ``E||s x||^2 = d_in``); ``to_sae`` folds
  ``s`` back into the biases and threshold, keeping decoder rows unit-norm: the shipped ``SAE`` takes
  raw residuals. (TopK and JumpReLU commute with a positive scale, so ``z_raw = z_scaled / s``.)
- Metrics are pure functions: ``explained_variance``, ``l0``, ``dead_fraction``, ``next_token_loss``,
  ``fraction_loss_recovered``; ``splice_losses`` measures next-token loss clean / SAE spliced /
  zero-ablated / mean-ablated for one chunk.
- One call (``jaxrecover train-sae``, ``experiments/train_saes.py``): ``train_sae_on_model(model, tok, docs,
  SAERun(layer=...), out_dir)`` tokenises (``corpus_texts``, ``corpus_chunks``: held-out documents disjoint
  from training), harvests, trains, saves ``out_dir/<hook_name>/`` in SAELens 6.x format, measures the
  SAVED file and writes ``CARD.md`` + ``metrics.json`` beside it; resumable through its work folder.

Losses (per example, written for one row and batched with ``vmap``):
- TopK (Gao et al. 2024): ``||x - x_hat||^2 / d_in`` + ``aux_coeff`` * AuxK loss, where AuxK
  reconstructs the residual error from the ``aux_k`` largest pre-activations of dead latents.
- JumpReLU (Rajamanoharan et al. 2024): ``||x - x_hat||^2 / d_in + l0_coeff * sum_i H(pre_i - t_i)``;
  the Heaviside step and the jump get straight-through gradients w.r.t. the threshold through a
  rectangle kernel of width ``bandwidth``; thresholds are trained as ``log t``, initialised either to
  the constant ``threshold_init`` or (``threshold_init_l0 > 0``) per latent from the data so that the
  initial L0 is ``threshold_init_l0``; ``threshold_lr_mult`` scales their Adam step (a log-threshold
  moves by ~``lr`` per step, so a short run needs a larger step for the thresholds to track the encoder).
  ``preact_coeff`` adds Anthropic's (2025) pre-activation loss ``sum_i relu(t_i - pre_i)`` (unit decoder
  rows), whose gradient lowers the thresholds and raises the pre-activations of latents below threshold
  (the only gradient a never-firing latent gets). ``aux_k > 0`` adds the AuxK term for JumpReLU too.
Decoder rows are kept unit-norm: the gradient component along each row is removed before the Adam
update and rows are renormalised after it.

Not here: disk formats (``sae_io``), the model loader (``io_hf`` / ``embedded``).
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.core.pytree import pytree_dataclass
from jaxrecover.sae.autoencoder import SAE, decode, encode
from jaxrecover.runtime.report import replace_file
from jaxrecover.core.sites import Site
from jaxrecover.model.transformer import Transformer, embed, run_blocks, run_from, run_to

PathLike = str | os.PathLike[str]

_MSG_BAD_ACTIVATION = "TrainConfig.activation must be 'topk' or 'jumprelu', got {act!r}."
_MSG_FEW_ROWS = "ArrayBatches: {n} rows is fewer than one batch of {batch}; harvest more activations."
_MSG_SITE = (
    "train_sae harvests residual sites of blocks below n_layers={n_layers}; got {site}. For "
    "blocks.L.hook_resid_post the model runs L+1 blocks."
)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that decides a training run (hashable; closed over by the jitted step).

    ``lr=None`` means ``4e-4 * sqrt(16384 / d_sae)`` (the 1/sqrt(width) scaling of Gao et al.).
    The schedule is a linear warm-up over ``warmup_steps``, constant, then a linear decay to zero over
    the last ``decay_frac`` of ``steps``.
    """

    d_in: int
    d_sae: int
    steps: int
    activation: str = "topk"  # "topk" | "jumprelu"
    k: int = 32  # topk only
    batch_size: int = 2048
    lr: float | None = None
    warmup_steps: int = 100
    decay_frac: float = 0.2
    b1: float = 0.9
    b2: float = 0.999
    aux_k: int = 0  # AuxK latents (0: off; Gao et al. use d_in // 2); jumprelu: the same dead-latent term
    aux_coeff: float = 1.0 / 32.0
    dead_tokens: int = 200_000  # a latent is dead if it has not fired in this many training rows
    normalize: bool = True  # train on s * x with E||s x||^2 = d_in; folded back by `to_sae`
    l0_coeff: float = 1e-3  # jumprelu only
    bandwidth: float = 1e-3  # jumprelu only, in normalised units
    threshold_init: float = 1e-3  # jumprelu only, in normalised units (a floor when threshold_init_l0 > 0)
    threshold_init_l0: float = 0.0  # jumprelu only: > 0 sets each latent's initial threshold from the data
    threshold_lr_mult: float = 1.0  # jumprelu only: the log-threshold Adam update is scaled by this
    preact_coeff: float = 0.0  # jumprelu only: pre-activation loss sum_i relu(t_i - pre_i) (revives dead latents)
    seed: int = 0
    checkpoint_every: int = 200
    hook_name: str = ""

    def __post_init__(self) -> None:
        if self.activation not in ("topk", "jumprelu"):
            raise ValueError(_MSG_BAD_ACTIVATION.format(act=self.activation))
        if self.activation == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"TrainConfig: need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}.")
        if not 0.0 <= self.threshold_init_l0 < self.d_sae:
            raise ValueError(f"TrainConfig: need 0 <= threshold_init_l0 < d_sae, got {self.threshold_init_l0}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 4e-4 * math.sqrt(16384 / self.d_sae)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Warm-up, constant, linear decay to 0 over the last ``decay_frac`` of training."""
    lr = cfg.learning_rate
    warm = max(1, min(cfg.warmup_steps, cfg.steps // 2))
    decay = max(1, int(cfg.steps * cfg.decay_frac))
    flat = max(0, cfg.steps - warm - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)],
        [warm, warm + flat],
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.adam(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2)


# ----------------------------------------------------------------------------- parameters and state


@pytree_dataclass
class Params:
    """Trainable SAE parameters in normalised units (``log_threshold`` for JumpReLU, else None)."""

    W_enc: Float[Array, "d_in d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_in"]
    b_dec: Float[Array, " d_in"]
    log_threshold: Float[Array, " d_sae"] | None = None


@pytree_dataclass
class TrainState:
    """Everything a checkpoint holds. ``since_fired[i]``: training rows since latent i last fired."""

    params: Params
    opt_state: Any
    step: Int[Array, ""]
    since_fired: Int[Array, " d_sae"]
    scale: Float[Array, ""]


def _unit_rows(W: Float[Array, "d_sae d_in"]) -> Float[Array, "d_sae d_in"]:
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-8)


def init_params(key: Array, cfg: TrainConfig, mean: Float[Array, " d_in"]) -> Params:
    """Unit-norm random decoder rows, ``W_enc = W_dec.T``, ``b_enc = 0``, ``b_dec`` = data mean."""
    W_dec = _unit_rows(jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32))
    log_t = None
    if cfg.activation == "jumprelu":
        log_t = jnp.full((cfg.d_sae,), math.log(cfg.threshold_init), jnp.float32)
    return Params(W_enc=W_dec.T, b_enc=jnp.zeros((cfg.d_sae,), jnp.float32), W_dec=W_dec,
                  b_dec=mean.astype(jnp.float32), log_threshold=log_t)


def input_scale(x: Float[np.ndarray, "n d_in"]) -> float:
    """The scalar ``s`` with ``mean ||s x||^2 = d_in`` (SAELens ``expected_average_only_in``)."""
    x = np.asarray(x, np.float32)
    return float(math.sqrt(x.shape[-1] / float(np.mean(np.sum(x * x, axis=-1)))))


def quantile_thresholds(
    params: Params, x: Float[np.ndarray, "n d_in"], l0: float, floor: float
) -> Float[Array, " d_sae"]:
    """Per-latent thresholds at which each latent fires on a fraction ``l0 / d_sae`` of the
    (normalised) rows ``x``, so the initial mean L0 is ``l0``; at least ``floor``.

    With a threshold of ~1e-3 a freshly initialised JumpReLU SAE fires on about half its latents,
    and the L0 penalty (whose only gradient is through the thresholds, trained as ``log t`` with a
    step of ~``lr`` per Adam update) cannot raise them by the ~1000x needed within a short run.
    """
    x = jnp.asarray(x, jnp.float32)
    pre = (x - params.b_dec[None, :]) @ params.W_enc + params.b_enc[None, :]
    q = 1.0 - l0 / params.W_enc.shape[-1]
    return jnp.maximum(jnp.quantile(pre, q, axis=0), floor).astype(jnp.float32)


def init_state(cfg: TrainConfig, sample: Float[np.ndarray, "n d_in"]) -> TrainState:
    """Initial state; ``sample`` (a few thousand rows) sets the input scale and ``b_dec`` (and, with
    ``threshold_init_l0 > 0``, the JumpReLU thresholds, see ``quantile_thresholds``)."""
    s = input_scale(sample) if cfg.normalize else 1.0
    mean = jnp.asarray(np.mean(np.asarray(sample, np.float32), axis=0) * s)
    params = init_params(jax.random.PRNGKey(cfg.seed), cfg, mean)
    if cfg.activation == "jumprelu" and cfg.threshold_init_l0 > 0:
        x = np.asarray(sample, np.float32)[:8192] * s
        t = quantile_thresholds(params, x, cfg.threshold_init_l0, cfg.threshold_init)
        params = dataclasses.replace(params, log_threshold=jnp.log(t))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.asarray(s, jnp.float32))


def to_sae(state: TrainState, cfg: TrainConfig, *, fold_b_dec: bool = True) -> SAE:
    """The trained SAE in RAW residual units (normalisation folded in), float32.

    With ``x_n = s x``: ``pre_n = (x_n - b_dec) @ W_enc + b_enc`` equals ``s * pre_raw`` where
    ``pre_raw = (x - b_dec / s) @ W_enc + b_enc / s``, and TopK/JumpReLU commute with the positive
    scale, so dividing ``b_enc``, ``b_dec`` and the threshold by ``s`` gives latents ``z_n / s`` that
    decode (unchanged unit-norm ``W_dec``) to ``x_hat_n / s``.

    ``fold_b_dec=True`` also folds the input-side ``b_dec`` subtraction into ``b_enc``
    (``b_enc - b_dec @ W_enc``) so that the SAE has ``apply_b_dec_to_input=False``, the Gemma Scope
    convention every loader handles.
    """
    p, s = state.params, state.scale
    b_enc, b_dec = p.b_enc / s, p.b_dec / s
    threshold = None if p.log_threshold is None else jnp.exp(p.log_threshold) / s
    if fold_b_dec:
        b_enc = b_enc - b_dec @ p.W_enc
    return SAE(W_enc=p.W_enc, b_enc=b_enc, W_dec=p.W_dec, b_dec=b_dec, threshold=threshold,
               activation=cfg.activation, k=cfg.k if cfg.activation == "topk" else 0,
               apply_b_dec_to_input=not fold_b_dec, hook_name=cfg.hook_name)


# ----------------------------------------------------------------------------- losses


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _step_fn(pre: Float[Array, " d_sae"], threshold: Float[Array, " d_sae"], bandwidth: float) -> Array:
    """Heaviside ``H(pre - threshold)`` with the straight-through threshold gradient."""
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre: Array, threshold: Array, bandwidth: float) -> tuple[Array, tuple[Array, Array]]:
    return _step_fn(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth: float, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    pre, threshold = res
    kernel = (jnp.abs((pre - threshold) / bandwidth) < 0.5).astype(pre.dtype)  # rectangle K
    return jnp.zeros_like(pre), -g * kernel / bandwidth


_step_fn.defvjp(_step_fwd, _step_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump_relu(pre: Float[Array, " d_sae"], threshold: Float[Array, " d_sae"], bandwidth: float) -> Array:
    """``pre * H(pre - threshold)``; d/dpre is the mask, d/dthreshold the kernel estimate."""
    return pre * (pre > threshold).astype(pre.dtype)


def _jump_fwd(pre: Array, threshold: Array, bandwidth: float) -> tuple[Array, tuple[Array, Array]]:
    return _jump_relu(pre, threshold, bandwidth), (pre, threshold)


def _jump_bwd(bandwidth: float, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    pre, threshold = res
    mask = (pre > threshold).astype(pre.dtype)
    kernel = (jnp.abs((pre - threshold) / bandwidth) < 0.5).astype(pre.dtype)
    return g * mask, -g * threshold * kernel / bandwidth


_jump_relu.defvjp(_jump_fwd, _jump_bwd)


def _topk_mask(pre: Float[Array, " d_sae"], k: int) -> Float[Array, " d_sae"]:
    kth = jax.lax.top_k(pre, k)[0][-1:]
    return (pre >= kth).astype(pre.dtype)


def example_loss(cfg: TrainConfig, p: Params, x: Float[Array, " d_in"], dead: Bool[Array, " d_sae"]) -> tuple[Array, Any]:
    """Loss of one normalised row ``x``; returns ``(loss, aux outputs)``."""
    pre = (x - p.b_dec) @ p.W_enc + p.b_enc
    if cfg.activation == "topk":
        z = jax.nn.relu(pre) * jax.lax.stop_gradient(_topk_mask(pre, cfg.k))
        l0_term = jnp.zeros((), pre.dtype)
        preact_term = jnp.zeros((), pre.dtype)
    else:
        threshold = jnp.exp(p.log_threshold)
        z = _jump_relu(jax.nn.relu(pre), threshold, cfg.bandwidth)
        l0_term = jnp.sum(_step_fn(pre, threshold, cfg.bandwidth))
        # decoder rows are unit-norm, so the pre-activation loss's ||W_dec_i|| weights are 1
        preact_term = jnp.sum(jax.nn.relu(threshold - pre)) if cfg.preact_coeff > 0 else jnp.zeros((), pre.dtype)
    x_hat = z @ p.W_dec + p.b_dec
    err = x - x_hat
    mse = jnp.sum(err * err) / cfg.d_in
    aux = jnp.zeros((), pre.dtype)
    if cfg.aux_k > 0:
        # AuxK: the dead latents' top pre-activations reconstruct the (fixed) residual error. For JumpReLU
        # the same term (on relu(pre), thresholds ignored) moves dead latents' encoders towards the error,
        # which lifts their pre-activations back over their thresholds.
        pre_dead = jnp.where(dead, pre, -1e30)
        z_aux = jax.nn.relu(pre_dead) * jax.lax.stop_gradient(_topk_mask(pre_dead, cfg.aux_k))
        e = jax.lax.stop_gradient(err)
        e_hat = z_aux @ p.W_dec
        # normalised by ||e||^2 (per row) so the term is scale free; zero when nothing is dead
        aux = jnp.sum(jnp.square(e - e_hat)) / jnp.maximum(jnp.sum(e * e), 1e-8) * jnp.any(dead).astype(pre.dtype)
    loss = mse + cfg.aux_coeff * aux + cfg.l0_coeff * l0_term + cfg.preact_coeff * preact_term
    fired = z > 0
    return loss, (mse, aux, jnp.sum(fired.astype(jnp.int32)), fired)


def _project_out_row_parallel(g: Float[Array, "d_sae d_in"], W: Float[Array, "d_sae d_in"]) -> Array:
    """Remove the gradient component along each (unit) decoder row: the norm constraint's tangent."""
    return g - jnp.sum(g * W, axis=-1, keepdims=True) * W


def make_train_step(cfg: TrainConfig) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """``step(state, x_raw [batch, d_in]) -> (state, metrics)``, jitted; ``x_raw`` is unnormalised."""
    opt = make_optimizer(cfg)

    def batch_loss(params: Params, x: Array, dead: Array) -> tuple[Array, Any]:
        loss, extras = jax.vmap(functools.partial(example_loss, cfg), in_axes=(None, 0, None))(params, x, dead)
        return jnp.mean(loss), extras

    @jax.jit
    def step(state: TrainState, x_raw: Array) -> tuple[TrainState, dict[str, Array]]:
        x = x_raw.astype(jnp.float32) * state.scale
        dead = state.since_fired >= cfg.dead_tokens
        (loss, (mse, aux, l0_rows, fired)), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, x, dead)
        grads = dataclasses.replace(grads, W_dec=_project_out_row_parallel(grads.W_dec, state.params.W_dec))
        with jax.numpy_dtype_promotion("standard"):  # optax computes `b1 ** count` (float ** int32)
            updates, opt_state = opt.update(grads, state.opt_state, state.params)
        if cfg.activation == "jumprelu" and cfg.threshold_lr_mult != 1.0:
            updates = dataclasses.replace(updates, log_threshold=updates.log_threshold * cfg.threshold_lr_mult)
        params = optax.apply_updates(state.params, updates)
        params = dataclasses.replace(params, W_dec=_unit_rows(params.W_dec))
        any_fired = jnp.any(fired, axis=0)
        since = jnp.where(any_fired, 0, state.since_fired + x.shape[0])
        total_var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True))) / (x.shape[0] * cfg.d_in)
        metrics = {
            "loss": loss,
            "mse": jnp.mean(mse),
            "ev": 1.0 - jnp.mean(mse) / total_var,
            "aux": jnp.mean(aux),
            "l0": jnp.mean(l0_rows.astype(jnp.float32)),
            "dead": jnp.mean((since >= cfg.dead_tokens).astype(jnp.float32)),
        }
        new = TrainState(params=params, opt_state=opt_state, step=state.step + 1, since_fired=since,
                         scale=state.scale)
        return new, metrics

    return step


# ----------------------------------------------------------------------------- data


def chunk_token_stream(docs: Iterable[Sequence[int]], seq_len: int, sep_id: int | None) -> Int[np.ndarray, "n seq"]:
    """Concatenate tokenised documents (``sep_id`` between them) and cut into ``seq_len`` chunks.

    The incomplete tail is dropped, so every chunk is all real tokens (no padding).
    """
    stream: list[int] = []
    for ids in docs:
        stream.extend(int(i) for i in ids)
        if sep_id is not None:
            stream.append(int(sep_id))
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


def training_positions(valid: Bool[Array, " seq"]) -> Bool[Array, " seq"]:
    """Real tokens except the first real one of the chunk (the attention sink)."""
    first = jnp.argmax(valid)  # first True (left padding)
    return valid & (jnp.arange(valid.shape[0]) != first)


def activation_rows(
    resid: Float[np.ndarray, "seq d"], valid: Bool[np.ndarray, " seq"] | None = None
) -> Float[np.ndarray, "rows d"]:
    """Host-side: the training rows of one chunk's residual (sink and padding dropped)."""
    valid_np = np.ones(resid.shape[0], bool) if valid is None else np.asarray(valid, bool)
    keep = np.asarray(training_positions(jnp.asarray(valid_np)))
    return np.asarray(resid)[keep]


def site_stop(site: Site) -> int:
    """Blocks to run to see ``site``: block L for resid_pre, block L+1 for mid/post."""
    return site.layer if site.point == "resid_pre" else site.layer + 1


@functools.partial(jax.jit, static_argnames=("sites",))
def _capture_batch(model: Transformer, tokens: Int[Array, "batch seq"], *, sites: tuple[Site, ...]) -> Array:
    # the model is an argument, not a closure: closed-over weights would be baked into the program
    # as constants (slow to compile, and one compile per model)
    stop = max(site_stop(s) for s in sites)

    def one(t: Int[Array, " seq"]) -> Float[Array, "n_sites seq d_model"]:
        capture = [s for s in sites if s.point != "resid_pre" or s.layer < stop]
        x, seen = run_blocks(model, embed(model, t), 0, stop, capture=capture)
        return jnp.stack([seen[s] if s in seen else x for s in sites])  # resid_pre of `stop` is the output

    return jnp.moveaxis(jax.vmap(one)(tokens), 1, 0)


def make_capture(model: Transformer, sites: Sequence[Site]) -> Callable[[Array], Array]:
    """``fn(tokens [batch, seq]) -> [n_sites, batch, seq, d_model]`` (jitted, vmapped): one pass of
    the model up to the deepest site gives every site's residual."""
    sites = tuple(Site.parse(s) for s in sites)
    if max(site_stop(s) for s in sites) > model.cfg.n_layers:
        raise ValueError(_MSG_SITE.format(n_layers=model.cfg.n_layers, site=max(sites)))
    return lambda tokens: _capture_batch(model, tokens, sites=sites)


def harvest(
    model: Transformer,
    chunks: Int[np.ndarray, "n seq"],
    sites: Sequence[Site],
    out_paths: Sequence[PathLike],
    *,
    batch_chunks: int = 8,
    progress: bool = True,
) -> list[np.memmap]:
    """Write the training rows of every site to float16 memmaps ``[n * (seq - 1), d_model]``.

    One model pass per batch of chunks serves all sites. Resumable: ``{path}.done`` records how many
    chunks are written (the first path's marker decides where a rerun continues). Values are clipped to the float16 range.
    """
    from tqdm import tqdm

    n, seq = chunks.shape
    rows_per = seq - 1
    d = model.cfg.d_model
    paths = [Path(p) for p in out_paths]
    maps = []
    for p in paths:
        mode = "r+" if p.exists() and p.stat().st_size == n * rows_per * d * 2 else "w+"
        maps.append(np.memmap(p, np.float16, mode, shape=(n * rows_per, d)))
    done_file = paths[0].with_suffix(paths[0].suffix + ".done")
    start = int(done_file.read_text()) if done_file.exists() and maps[0].mode == "r+" else 0
    capture = make_capture(model, sites)
    limit = float(np.finfo(np.float16).max)
    bar = tqdm(total=n, initial=start, disable=not progress, desc="harvest", unit="chunk")
    for i in range(start, n, batch_chunks):
        j = min(n, i + batch_chunks)
        batch = chunks[i:j]
        if batch.shape[0] < batch_chunks:  # keep one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_chunks - batch.shape[0], 0)])
        acts = np.asarray(capture(jnp.asarray(batch)), np.float32)[:, : j - i, 1:]  # drop slot 0
        for m, a in zip(maps, acts, strict=True):
            m[i * rows_per : j * rows_per] = np.clip(a.reshape(-1, d), -limit, limit).astype(np.float16)
        if (j // batch_chunks) % 16 == 0 or j == n:
            for m, p in zip(maps, paths, strict=True):
                m.flush()
                replace_file(p.with_suffix(p.suffix + ".done"), str(j).encode())  # atomic: read back on resume
        bar.update(j - i)
    bar.close()
    return maps


class ArrayBatches:
    """Random-access batches over an ``[n, d]`` array (e.g. a memmap): batch ``i`` is a pure function
    of ``(seed, i)``. Each epoch is a fresh seeded permutation; the last partial batch is dropped."""

    def __init__(self, rows: Float[np.ndarray, "n d"], batch_size: int, seed: int = 0):
        if rows.shape[0] < batch_size:
            raise ValueError(_MSG_FEW_ROWS.format(n=rows.shape[0], batch=batch_size))
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.per_epoch = rows.shape[0] // batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rows.shape[0]))
        return np.sort(self._perm[1][j * self.batch_size : (j + 1) * self.batch_size])  # sorted: fast memmap reads

    def __call__(self, start: int) -> Iterator[np.ndarray]:
        step = start
        while True:
            yield np.asarray(self.rows[self.indices(step)], np.float32)
            step += 1


def shuffle_buffer(
    blocks: Iterable[np.ndarray], batch_size: int, buffer_rows: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Seeded shuffling buffer over a stream of row blocks (e.g. activations of successive chunks).

    Fills to ``buffer_rows``, then emits a batch of rows drawn uniformly from the buffer and refills
    their places, so rows from nearby tokens are spread over many batches. Deterministic given the
    stream and ``seed``; to resume a stream at batch ``i``, replay it and skip ``i`` batches.
    """
    rng = np.random.default_rng(seed)
    buf: np.ndarray | None = None
    fill = 0
    for block in blocks:
        block = np.asarray(block, np.float32)
        if buf is None:
            buf = np.empty((buffer_rows, block.shape[-1]), np.float32)
        while block.shape[0]:
            take = min(buffer_rows - fill, block.shape[0])
            buf[fill : fill + take], block, fill = block[:take], block[take:], fill + take
            if fill == buffer_rows:
                idx = rng.choice(buffer_rows, batch_size, replace=False)
                yield buf[idx].copy()
                # move the tail rows into the emptied slots, so the buffer refills at its end
                keep = np.setdiff1d(np.arange(buffer_rows), idx)
                buf[: buffer_rows - batch_size] = buf[keep]
                fill = buffer_rows - batch_size
    if buf is not None:  # drain what is left
        order = rng.permutation(fill)
        for i in range(0, fill - batch_size + 1, batch_size):
            yield buf[order[i : i + batch_size]].copy()


def stream_activations(
    model: Transformer, chunks: Int[np.ndarray, "n seq"], site: Site, batch_chunks: int = 8
) -> Iterator[np.ndarray]:
    """Training rows of ``site``, one block per batch of chunks, computed on the fly."""
    capture = make_capture(model, [site])
    for i in range(0, chunks.shape[0] - batch_chunks + 1, batch_chunks):
        acts = np.asarray(capture(jnp.asarray(chunks[i : i + batch_chunks])), np.float32)[0]
        yield np.concatenate([activation_rows(a) for a in acts])


# ----------------------------------------------------------------------------- training loop


def _checkpoint_manager(directory: PathLike, cfg: TrainConfig) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=cfg.checkpoint_every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def restore_or_init(cfg: TrainConfig, sample: np.ndarray, checkpoint_dir: PathLike | None) -> TrainState:
    """The latest checkpoint in ``checkpoint_dir`` if there is one, else a fresh state."""
    state = init_state(cfg, sample)
    if checkpoint_dir is None:
        return state
    import orbax.checkpoint as ocp

    mngr = _checkpoint_manager(checkpoint_dir, cfg)
    last = mngr.latest_step()
    if last is None:
        return state
    leaves, treedef = jax.tree.flatten(state)
    abstract = {f"{i:04d}": ocp.utils.to_shape_dtype_struct(a) for i, a in enumerate(leaves)}
    restored = mngr.restore(last, args=ocp.args.StandardRestore(abstract))
    mngr.close()
    return jax.tree.unflatten(treedef, [restored[f"{i:04d}"] for i in range(len(leaves))])


def train(
    cfg: TrainConfig,
    batches: Callable[[int], Iterator[np.ndarray]],
    sample: Float[np.ndarray, "n d_in"],
    *,
    checkpoint_dir: PathLike | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    log_every: int = 50,
    log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainState:
    """Train (or resume) an SAE.

    Args:
        cfg: the run's configuration.
        batches: ``batches(start_step)`` yields raw ``[batch_size, d_in]`` rows for steps
            ``start_step, start_step + 1, ...`` (e.g. ``ArrayBatches``). Must be deterministic.
        sample: rows used once at initialisation for the input scale and ``b_dec``.
        checkpoint_dir: orbax checkpoints every ``cfg.checkpoint_every`` steps and at the end;
            an existing checkpoint is resumed.
        stop_at: stop after this step (simulates an interruption in tests); default ``cfg.steps``.
        progress: show a tqdm bar.
        log_every, log: call ``log(step, metrics)`` every ``log_every`` steps.

    Returns:
        The final ``TrainState`` (``to_sae`` turns it into a raw-unit ``SAE``).
    """
    from tqdm import tqdm

    state = restore_or_init(cfg, sample, checkpoint_dir)
    start, stop = int(state.step), min(cfg.steps, stop_at if stop_at is not None else cfg.steps)
    mngr = _checkpoint_manager(checkpoint_dir, cfg) if checkpoint_dir is not None else None
    step_fn = make_train_step(cfg)
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=cfg.hook_name or "train", unit="step")
    it = batches(start)
    for i in range(start, stop):
        state, metrics = step_fn(state, jnp.asarray(next(it)))
        if mngr is not None and ((i + 1) % cfg.checkpoint_every == 0 or i + 1 == stop):
            mngr.save(i + 1, args=_standard_save(state), force=True)
        if (i + 1) % log_every == 0 or i + 1 == stop:
            values = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if log is not None:
                log(i + 1, values)
        bar.update(1)
    bar.close()
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    return state


def _standard_save(state: TrainState) -> Any:
    # Checkpoints hold the flat leaves (keyed by index): orbax rebuilds custom pytree nodes with
    # placeholder values, which the runtime-type-checked dataclasses here reject.
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave({f"{i:04d}": a for i, a in enumerate(jax.tree.leaves(state))})


# ----------------------------------------------------------------------------- metrics


def explained_variance(x: Float[Array, "n d"], x_hat: Float[Array, "n d"]) -> Float[Array, ""]:
    """``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over rows."""
    x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
    resid = jnp.sum(jnp.square(x - x_hat))
    total = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return 1.0 - resid / total


def l0(z: Float[Array, "n d_sae"]) -> Float[Array, ""]:
    """Mean number of non-zero latents per row."""
    return jnp.mean(jnp.sum((z != 0).astype(jnp.float32), axis=-1))


def dead_fraction(since_fired: Int[Array, " d_sae"], window: int) -> Float[Array, ""]:
    """Fraction of latents that have not fired in the last ``window`` rows."""
    return jnp.mean((since_fired >= window).astype(jnp.float32))


def fired_counts(z: Float[Array, "n d_sae"]) -> Int[Array, " d_sae"]:
    """How many rows each latent fires on (host-side accumulation gives held-out dead fractions)."""
    return jnp.sum((z > 0).astype(jnp.int32), axis=0)


def next_token_loss(
    logits: Float[Array, "seq d_vocab"], tokens: Int[Array, " seq"], valid: Bool[Array, " seq"] | None = None
) -> Float[Array, ""]:
    """Mean cross-entropy of predicting ``tokens[t+1]`` from ``logits[t]`` over real pairs."""
    logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[1:, None], axis=-1)[:, 0]
    mask = jnp.ones(nll.shape, jnp.float32) if valid is None else (valid[1:] & valid[:-1]).astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def fraction_loss_recovered(clean: Any, spliced: Any, ablated: Any) -> Any:
    """``(L_ablated - L_spliced) / (L_ablated - L_clean)`` (SAELens / SAEBench "loss recovered")."""
    return (ablated - spliced) / (ablated - clean)


def splice_losses(
    model: Transformer,
    sae: SAE,
    site: Site,
    mean_resid: Float[Array, " d_model"],
    tokens: Int[Array, " seq"],
    max_norm: Float[Array, ""] | float = float("inf"),
) -> dict[str, Array]:
    """Next-token loss of one chunk: clean, with the SAE reconstruction spliced in at ``site``,
    with the residual zero-ablated and mean-ablated there; plus the chunk's EV terms.

    Only training positions are replaced: slot 0 (the attention sink) and rows whose norm is
    ``>= max_norm`` (secondary sinks, see ``norm_ceiling``) keep their residual in every variant and
    are left out of the EV/L0 sums: the SAE never saw them, and ablating them would measure the
    sinks, not the SAE. The prefix up
    to ``site`` is computed once; replacing the residual entering block ``L+1`` is the same as a
    hook at ``blocks.L.hook_resid_post``.
    """
    site = Site.parse(site)
    stop = site_stop(site)
    if site.point == "resid_mid":
        raise ValueError("splice_losses supports resid_pre / resid_post sites.")
    resid = run_to(model, tokens, stop)
    x32 = resid.astype(jnp.float32)
    small = jnp.linalg.norm(x32, axis=-1) < max_norm
    keep = (training_positions(jnp.ones(tokens.shape, bool)) & small)[:, None]
    z = encode(sae, x32.astype(sae.W_enc.dtype))
    x_hat = decode(sae, z).astype(jnp.float32)
    variants = {
        "clean": x32,
        "spliced": jnp.where(keep, x_hat, x32),
        "zero": jnp.where(keep, 0.0, x32),
        "mean": jnp.where(keep, mean_resid.astype(jnp.float32)[None, :], x32),
    }
    out = {name: next_token_loss(run_from(model, v.astype(resid.dtype), stop), tokens) for name, v in variants.items()}
    w = keep.astype(jnp.float32)
    out["sq_err"] = jnp.sum(jnp.square(x32 - x_hat) * w)
    out["l0_sum"] = jnp.sum((z != 0).astype(jnp.float32) * w)
    out["sum_x"] = jnp.sum(x32 * w, axis=0)  # for the held-out total variance
    out["sum_xx"] = jnp.sum(jnp.square(x32) * w)
    out["fired"] = jnp.sum(((z > 0) & keep).astype(jnp.int32), axis=0)
    out["n_rows"] = jnp.sum(keep.astype(jnp.int32))
    return out


@functools.partial(jax.jit, static_argnames=("site",))
def _splice_batch(
    model: Transformer, sae: SAE, mean: Array, tokens: Array, max_norm: Array, *, site: Site
) -> dict[str, Array]:
    return jax.vmap(lambda t: splice_losses(model, sae, site, mean, t, max_norm))(tokens)


def norm_ceiling(rows: Float[np.ndarray, "n d"], factor: float = 10.0) -> float:
    """``factor`` x the median row norm. Above it sit the massive-activation tokens (at middle layers
    of SmolLM2: ``<|endoftext|>`` and some newlines, norms ~100x the median) that carry almost all
    the variance of a layer while being ~0.1% of tokens; training and metrics leave them out."""
    norms = np.linalg.norm(np.asarray(rows, np.float32), axis=-1)
    return float(factor * np.median(norms))


def evaluate(
    model: Transformer,
    sae: SAE,
    site: Site,
    chunks: Int[np.ndarray, "n seq"],
    mean_resid: Float[np.ndarray, " d_model"],
    *,
    max_norm: float = float("inf"),
    batch_chunks: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Held-out quality of ``sae`` at ``site`` over ``chunks`` (every chunk's slot 0 and rows with
    norm ``>= max_norm`` excluded, see ``splice_losses``).

    Returns ``ev``, ``l0``, ``dead_frac`` (latents that never fire on these rows), ``ce_clean``,
    ``ce_spliced``, ``ce_zero``, ``ce_mean``, ``flr_zero``, ``flr_mean``, ``n_tokens`` (rows
    measured), ``n_excluded`` (rows past slot 0 left out for their norm).
    """
    from tqdm import tqdm

    mean_j = jnp.asarray(mean_resid, jnp.float32)
    site = Site.parse(site)

    def fn(tokens: Array) -> dict[str, Array]:
        return _splice_batch(model, sae, mean_j, tokens, jnp.asarray(max_norm, jnp.float32), site=site)

    sums: dict[str, float] = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0, "sq_err": 0.0, "l0_sum": 0.0}
    fired = np.zeros(sae.d_sae, np.int64)
    # EV needs the total variance of held-out rows: accumulate sum x and sum x^2 (float64 on host)
    sx, sxx, rows, n_done, n_all = 0.0, 0.0, 0, 0, 0
    usable = chunks.shape[0] - chunks.shape[0] % batch_chunks
    for i in tqdm(range(0, usable, batch_chunks), disable=not progress, desc="evaluate"):
        batch = jnp.asarray(chunks[i : i + batch_chunks])
        out = fn(batch)
        for key in sums:
            sums[key] += float(np.sum(np.asarray(out[key], np.float64)))
        fired += np.asarray(out["fired"]).sum(axis=0)
        sx = sx + np.asarray(out["sum_x"], np.float64).sum(0)
        sxx += float(np.sum(np.asarray(out["sum_xx"], np.float64)))
        rows += int(np.sum(np.asarray(out["n_rows"])))
        n_all, n_done = n_all + batch.shape[0] * (batch.shape[1] - 1), n_done + batch.shape[0]
    total_var = sxx - float(np.sum(np.square(sx))) / rows
    ce = {k: sums[k] / n_done for k in ("clean", "spliced", "zero", "mean")}
    return {
        "ev": 1.0 - sums["sq_err"] / total_var,
        "l0": sums["l0_sum"] / rows,
        "dead_frac": float(np.mean(fired == 0)),
        "ce_clean": ce["clean"],
        "ce_spliced": ce["spliced"],
        "ce_zero": ce["zero"],
        "ce_mean": ce["mean"],
        "flr_zero": fraction_loss_recovered(ce["clean"], ce["spliced"], ce["zero"]),
        "flr_mean": fraction_loss_recovered(ce["clean"], ce["spliced"], ce["mean"]),
        "n_tokens": rows,
        "n_excluded": n_all - rows,
    }


# ----------------------------------------------------------------------------- one call: model + text -> SAE folder

SHIPPED_CORPUS = "shipped"  # the prompt sets shipped inside the package (jaxrecover.data.corpus builtin sources)
RUN_SITES = ("resid_pre", "resid_post")
_MSG_RUN_SITE = "site {site!r}: train-sae trains on resid_pre or resid_post."
_MSG_RUN_LAYER = "layer {layer}: the model has {n_layers} blocks (layers 0..{last})."
_MSG_FEW_TOKENS = (
    "the corpus gives {n_train} training tokens after holding out {n_eval} for evaluation; need at least one "
    "batch ({batch}); use a larger --corpus or smaller --batch-size / --eval-tokens."
)
_MSG_NO_EVAL = "the corpus has too few documents to hold out {want} evaluation tokens (got {got}); lower --eval-tokens."


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAERun:
    """One ``jaxrecover train-sae`` run: where, what architecture, how much data.

    ``tokens`` is the number of training rows the optimiser sees (``steps * batch_size``); the corpus
    gives at most ``tokens`` unique rows (chunks of ``seq_len``, slot 0 dropped) and is cycled in seeded
    epochs when it has fewer. ``eval_tokens`` come from documents at the other end of the (seeded)
    shuffle, never trained on. ``None`` fields take defaults that depend on the model width
    (``aux_k = d_model // 2`` for TopK as Gao et al.) or on the budget (``dead_tokens``).
    """

    layer: int
    site: str = "resid_post"
    activation: str = "topk"
    width: int = 4096
    k: int = 32
    tokens: int = 400_000
    seq_len: int = 128
    eval_tokens: int = 4096
    batch_size: int = 1024
    lr: float | None = None
    aux_k: int | None = None
    dead_tokens: int | None = None
    l0_coeff: float = 3e-4  # jumprelu: the shipped SmolLM2 JumpReLU release's values
    bandwidth: float = 0.025
    threshold_init_l0: float = 0.0  # 0: 4 * k (capped below width)
    threshold_lr_mult: float = 3.0
    outlier_factor: float = 10.0
    harvest_batch: int = 8
    save_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.site not in RUN_SITES:
            raise ValueError(_MSG_RUN_SITE.format(site=self.site))
        if self.activation not in ("topk", "jumprelu"):
            raise ValueError(_MSG_BAD_ACTIVATION.format(act=self.activation))
        checks = [("layer", self.layer >= 0, ">= 0"), ("width", self.width > 0, "> 0"),
                  ("k", 0 < self.k <= self.width, f"in 1..width ({self.width})"),
                  ("seq_len", self.seq_len >= 8, ">= 8"), ("batch_size", self.batch_size > 0, "> 0"),
                  ("tokens", self.tokens >= self.batch_size, f">= batch_size ({self.batch_size})"),
                  ("eval_tokens", self.eval_tokens >= self.seq_len, f">= seq_len ({self.seq_len})"),
                  ("outlier_factor", self.outlier_factor > 1.0, "> 1"),
                  ("save_dtype", self.save_dtype in ("float32", "bfloat16"), "float32 or bfloat16")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {want}.")

    @property
    def hook_name(self) -> str:
        return str(Site(self.layer, self.site))

    def train_config(self, d_in: int) -> TrainConfig:
        steps = max(1, self.tokens // self.batch_size)
        jump = self.activation == "jumprelu"
        init_l0 = self.threshold_init_l0 or min(4.0 * self.k, self.width / 2)
        return TrainConfig(
            d_in=d_in, d_sae=self.width, steps=steps, activation=self.activation, k=min(self.k, self.width),
            batch_size=self.batch_size, lr=self.lr, aux_k=d_in // 2 if self.aux_k is None else self.aux_k,
            dead_tokens=self.dead_tokens or max(self.batch_size, min(250_000, self.tokens // 8)),
            l0_coeff=self.l0_coeff, bandwidth=self.bandwidth, threshold_init_l0=init_l0 if jump else 0.0,
            threshold_lr_mult=self.threshold_lr_mult if jump else 1.0, seed=self.seed + self.layer,
            checkpoint_every=max(25, steps // 10), warmup_steps=min(100, steps // 10), hook_name=self.hook_name)


def corpus_texts(corpus: str, seed: int = 0) -> tuple[list[str], str]:
    """``(documents, description)`` for ``corpus``: ``"shipped"`` (the package's prompt sets), a
    ``.jsonl`` file (one ``{"text": ...}`` per line, as ``jaxrecover.data.corpus.write_corpus`` writes) or a
    plain text file (documents separated by blank lines). Seeded shuffle of the documents."""
    import random

    if corpus == SHIPPED_CORPUS:
        from jaxrecover.data import corpus as corpus_mod

        docs = [d.text for d in corpus_mod.iter_documents(("chat_prompts", "project_text"))]
        what = "the text shipped with jaxrecover (chat_prompts + project_text of jaxrecover.data.corpus)"
    else:
        path = Path(corpus)
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            import json

            docs = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
        else:
            from jaxrecover.data.corpus import chunk_text

            paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
            docs = [c for p in paragraphs for c in chunk_text(p)]
        what = f"{path.name} ({path.stat().st_size:,} bytes)"
    docs = [d for d in docs if d.strip()]
    random.Random(seed).shuffle(docs)
    return docs, what


def corpus_chunks(
    tok: Any, docs: Sequence[str], seq_len: int, max_train_tokens: int, eval_tokens: int
) -> tuple[Int[np.ndarray, "n seq"], Int[np.ndarray, "m seq"]]:
    """Train and held-out chunks from disjoint documents: held-out from the tail of ``docs``, training
    from the head. Documents are separated by the tokenizer's EOS; a model trained with a BOS (Gemma)
    gets one at slot 0 of every chunk (dropped from the rows anyway, like the attention sink)."""
    ids = [e.ids for e in tok.tokenizer.encode_batch(list(docs), add_special_tokens=False)]
    bos = tok.bos_id if tok.add_bos and tok.bos_id is not None else None
    body = seq_len - (bos is not None)

    def chunks(doc_ids: list[list[int]], limit: int) -> np.ndarray:
        out = chunk_token_stream(doc_ids, body, tok.eos_id)[: max(1, -(-limit // (seq_len - 1)))]
        return out if bos is None else np.concatenate([np.full((out.shape[0], 1), bos, np.int32), out], axis=1)

    n_tail, seen = 0, 0
    while n_tail < len(ids) and seen < eval_tokens + seq_len:  # +seq_len: the last partial chunk is cut
        seen, n_tail = seen + len(ids[-1 - n_tail]) + 1, n_tail + 1
    eval_chunks = chunks(ids[len(ids) - n_tail :][::-1], eval_tokens)
    if eval_chunks.shape[0] * (seq_len - 1) < eval_tokens // 2 or n_tail >= len(ids):
        raise ValueError(_MSG_NO_EVAL.format(want=eval_tokens, got=eval_chunks.shape[0] * (seq_len - 1)))
    return chunks(ids[: len(ids) - n_tail], max_train_tokens), eval_chunks


def _card(spec: SAERun, tcfg: TrainConfig, result: dict[str, Any]) -> str:
    """``CARD.md`` of one trained SAE: what, on what, how good (held-out), how long."""
    m, d = result["metrics"], result["data"]
    arch = "TopK" if spec.activation == "topk" else "JumpReLU"
    rows = [
        f"# {result['model_name']} {spec.hook_name} {arch} SAE (jaxrecover train-sae)",
        "",
        (f"SAELens 6.x folder (`cfg.json` + `sae_weights.safetensors`, {spec.save_dtype}); raw residual inputs "
        "(training-time scale folded into the biases), `apply_b_dec_to_input=False`, unit-norm decoder rows. "
        "Load with `jaxrecover.load_sae(folder)` or SAELens `SAE.load_from_disk(folder)`."),
        "",
        f"- Model: {result['model_name']} ({result['model_source']}), d_model {tcfg.d_in}",
        f"- Site: `{spec.hook_name}`; architecture {arch}, width {spec.width}"
        + (f", k {tcfg.k}, AuxK {tcfg.aux_k}" if spec.activation == "topk" else
           f", L0 coefficient {tcfg.l0_coeff:g}, bandwidth {tcfg.bandwidth:g}, AuxK {tcfg.aux_k}"),
        (f"- Data: {d['corpus']}; {d['train_unique_tokens']:,} unique training tokens in {d['train_chunks']} chunks of "
        f"{spec.seq_len} (slot 0 and {d['rows_above_ceiling']:,} rows with norm >= {spec.outlier_factor:g}x the median "
        f"left out), seen {d['epochs']:.2f} times; held-out {m['n_tokens']:,} tokens from other documents"),
        (f"- Training: {tcfg.steps} Adam steps of {tcfg.batch_size} rows ({tcfg.steps * tcfg.batch_size:,} tokens "
        f"seen), lr {tcfg.learning_rate:.2e}, seed {tcfg.seed}"),
        f"- Wall time: {result['seconds']['total']:.0f} s in all ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items() if k != "total") + f"); {result['cpu']}",
        "",
        "## Quality (held-out, measured on the saved file)",
        "",
        "| EV | L0 | dead | CE clean | CE spliced | CE zero-abl. | CE mean-abl. | CE loss recovered (zero) | (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {m['ev']:.3f} | {m['l0']:.1f} | {m['dead_frac']:.3f} | {m['ce_clean']:.3f} | {m['ce_spliced']:.3f} | "
        f"{m['ce_zero']:.3f} | {m['ce_mean']:.3f} | {m['flr_zero']:.3f} | {m['flr_mean']:.3f} |"),
        "",
        ("EV = 1 - sum||x - x_hat||^2 / sum||x - mean x||^2; L0 = mean active latents per token; dead = latents that "
        "never fire on the held-out tokens; CE = next-token cross-entropy (nats) with the residual at the site "
        "replaced by the reconstruction / zeros / the training mean at every measured position; CE loss recovered "
        "= (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)."),
        "",
        "## Command",
        "",
        "```bash",
        result.get("command") or "(Python call)",
        "```",
        "",
    ]
    return "\n".join(rows)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def train_sae_on_model(
    model: Transformer,
    tok: Any,
    docs: Sequence[str],
    spec: SAERun,
    out_dir: PathLike,
    *,
    model_name: str = "",
    model_source: str = "",
    corpus_name: str = "",
    work_dir: PathLike | None = None,
    keep_work: bool = False,
    command: str = "",
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenise ``docs``, harvest ``spec``'s site once, train, save ``out_dir/<hook_name>/`` (SAELens
    6.x), measure the SAVED file on held-out chunks and write ``CARD.md`` + ``metrics.json`` next to it.

    Every stage resumes from ``work_dir`` (default ``out_dir/.work-<hook_name>``; removed at the end
    unless ``keep_work``): rerunning the same call after an interruption continues where it stopped.
    Returns the ``metrics.json`` content (quality figures under ``"metrics"``, stage wall times under
    ``"seconds"``).
    """
    import json
    import shutil
    import time

    from jaxrecover.sae.autoencoder import astype
    from jaxrecover.sae.files import load_sae, save_sae

    n_layers = model.cfg.n_layers
    site = Site(spec.layer, spec.site)
    if site_stop(site) > n_layers or spec.layer >= n_layers:
        raise ValueError(_MSG_RUN_LAYER.format(layer=spec.layer, n_layers=n_layers, last=n_layers - 1))
    d_in = model.cfg.d_model
    tcfg = spec.train_config(d_in)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir / f".work-{spec.hook_name}"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = t0 = time.time()

    train_chunks, eval_chunks = corpus_chunks(tok, docs, spec.seq_len, spec.tokens, spec.eval_tokens)
    n_train = train_chunks.shape[0] * (spec.seq_len - 1)
    if n_train < spec.batch_size:
        raise ValueError(_MSG_FEW_TOKENS.format(n_train=n_train, n_eval=spec.eval_tokens, batch=spec.batch_size))
    seconds["tokenize"] = time.time() - t0
    say(f"data: {train_chunks.shape[0]} training chunks ({n_train:,} tokens), {eval_chunks.shape[0]} held-out chunks")

    t0 = time.time()
    acts_path = work / f"{spec.hook_name}.f16"
    rows = harvest(model, train_chunks, [site], [acts_path], batch_chunks=spec.harvest_batch, progress=progress)[0]
    rows = np.asarray(rows)
    seconds["harvest"] = time.time() - t0

    rng = np.random.default_rng(spec.seed)
    ceiling = norm_ceiling(rows[rng.choice(rows.shape[0], min(rows.shape[0], 65536), replace=False)],
                           spec.outlier_factor)
    keep = np.linalg.norm(rows.astype(np.float32), axis=-1) < ceiling
    rows, n_dropped = rows[keep], int(np.sum(~keep))
    if rows.shape[0] < spec.batch_size:
        raise ValueError(_MSG_FEW_TOKENS.format(n_train=rows.shape[0], n_eval=spec.eval_tokens, batch=spec.batch_size))
    sample = rows[rng.choice(rows.shape[0], min(rows.shape[0], 16384), replace=False)].astype(np.float32)

    t0 = time.time()
    last: dict[str, float] = {}
    state = train(tcfg, ArrayBatches(rows, tcfg.batch_size, seed=tcfg.seed), sample, checkpoint_dir=work / "ckpt",
                  progress=progress, log_every=max(1, min(25, tcfg.steps // 4)), log=lambda i, m: last.update(m))
    seconds["train"] = time.time() - t0

    folder = out_dir / spec.hook_name
    extra = {"model_name": model_name, "model_source": model_source, "context_size": spec.seq_len,
             "prepend_bos": bool(tok.add_bos), "training_tokens": int(tcfg.steps * tcfg.batch_size),
             "trained_with": f"jaxrecover train-sae ({spec.activation})", "exclude_first_position": True,
             "excluded_norm_ceiling": ceiling}
    dtype = jnp.bfloat16 if spec.save_dtype == "bfloat16" else jnp.float32
    save_sae(astype(to_sae(state, tcfg), dtype), folder, extra_cfg=extra)

    t0 = time.time()
    saved = astype(load_sae(folder), jnp.float32)
    mean = np.asarray(rows[:: max(1, rows.shape[0] // 65536)], np.float32).mean(0)
    # four CE variants of float32 logits per chunk: keep a batch's logits near 1 GiB (Gemma's 262k vocab: 2 chunks)
    per_chunk = spec.seq_len * int(model.W_E.shape[0]) * 16
    eval_batch = max(1, min(8, eval_chunks.shape[0], 2**30 // per_chunk))
    usable = eval_chunks.shape[0] - eval_chunks.shape[0] % eval_batch
    metrics = evaluate(model, saved, site, eval_chunks[:usable], mean, max_norm=ceiling,
                       batch_chunks=eval_batch, progress=progress)
    metrics["train_dead_frac"] = last.get("dead", float("nan"))
    metrics["train_ev_last_batch"] = last.get("ev", float("nan"))
    seconds["evaluate"] = time.time() - t0
    seconds["total"] = time.time() - t_all

    result: dict[str, Any] = {
        "hook_name": spec.hook_name, "model_name": model_name, "model_source": model_source,
        "metrics": metrics, "seconds": seconds, "cpu": _cpu_name(), "command": command,
        "spec": dataclasses.asdict(spec),
        "train_config": {k: v for k, v in dataclasses.asdict(tcfg).items()},
        "data": {"corpus": corpus_name, "documents": len(docs), "train_chunks": int(train_chunks.shape[0]),
                 "train_unique_tokens": int(rows.shape[0]), "rows_above_ceiling": n_dropped, "norm_ceiling": ceiling,
                 "eval_chunks": int(usable), "epochs": tcfg.steps * tcfg.batch_size / rows.shape[0]},
    }
    # the quality figures also go in cfg.json's metadata (SAELens keeps unknown metadata keys)
    cfg_file = folder / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["metadata"].update({k: metrics[k] for k in ("ev", "l0", "dead_frac", "flr_zero", "flr_mean")})
    replace_file(cfg_file, (json.dumps(cfg, indent=2) + "\n").encode())  # atomic: a kill never truncates cfg.json
    replace_file(folder / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())
    replace_file(folder / "CARD.md", _card(spec, tcfg, result).encode())
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    say(f"saved {folder}: EV {metrics['ev']:.3f}, L0 {metrics['l0']:.1f}, dead {metrics['dead_frac']:.3f}, "
        f"CE loss recovered {metrics['flr_zero']:.3f} (zero-abl.), {seconds['total']:.0f} s")
    return result
