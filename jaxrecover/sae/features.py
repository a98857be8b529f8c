"""Choosing the feature set S to clamp, the ways the paper's settings do.

- ``top_by_cosine``: SAE features whose decoder direction best aligns with a steering vector
  (refusal: mean harmful - mean harmless residual; Yeo et al.).
- ``attribution``: ``a_f = mean z_f * dM/dz_f`` with the gradient taken through the decoder, so it
  equals ``z_f * (W_dec[f] . dM/dh)`` (IOI, refusal LA scoring).
- ``forget_retain``: SAEBench unlearning selection: features frequent on the forget set and rare on
  the retain set.
- ``probe_features``: features most tied to one class of a linear probe (TPP).
- ``activation_stats``: how often a chosen set is active on given residual rows, and what its clamp
  writes into the residual there (why a clamp does or does not change the model).

All functions are pure and take per-example arrays already batched by the caller.
"""


import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxrecover.sae.clamp import Clamp
from jaxrecover.sae.autoencoder import SAE, encode, encode_features


def masked_mean(x: Float[Array, "batch seq d"], mask: Bool[Array, "batch seq"]) -> Float[Array, " d"]:
    """Mean over the masked (example, position) pairs."""
    w = mask.astype(x.dtype)[..., None]
    return (x * w).sum((0, 1)) / jnp.maximum(w.sum(), 1.0)


def top_by_cosine(sae: SAE, direction: Float[Array, " d"], k: int) -> Int[Array, " k"]:
    """The ``k`` features whose decoder rows have the largest cosine with ``direction``."""
    rows = sae.W_dec.astype(jnp.float32)
    cos = rows @ direction / (jnp.linalg.norm(rows, axis=-1) * jnp.linalg.norm(direction) + 1e-8)
    return jax.lax.top_k(cos, k)[1]


def attribution(
    sae: SAE,
    resid: Float[Array, "batch seq d"],
    grad_resid: Float[Array, "batch seq d"],
    mask: Bool[Array, "batch seq"],
) -> Float[Array, " d_sae"]:
    """``mean z_f * (dM/dh . W_dec[f])`` over masked positions (linear attribution through the
    decoder; the SAE error term carries no gradient to z, as in a pass-through SAE hook)."""
    z = encode(sae, resid.astype(jnp.float32))
    dz = grad_resid.astype(jnp.float32) @ sae.W_dec.T.astype(jnp.float32)
    return masked_mean(z * dz, mask)


def top_attribution(scores: Float[Array, " d_sae"], k: int, *, positive_only: bool = True) -> Int[Array, " k"]:
    """Top-``k`` by attribution; features with a_f > 0 first (the IOI code's rule: if fewer than
    ``k`` are positive, the rest are filled by |a_f|)."""
    if not positive_only:
        return jax.lax.top_k(jnp.abs(scores), k)[1]
    key = jnp.where(scores > 0, scores + jnp.abs(scores).max() + 1.0, jnp.abs(scores))
    return jax.lax.top_k(key, k)[1]


def forget_retain(
    z_forget: Float[Array, "n d_sae"],
    z_retain: Float[Array, "n2 d_sae"],
    k: int,
    *,
    retain_threshold: float = 0.01,
) -> Int[Array, " k"]:
    """SAEBench unlearning: firing frequency on forget text, among features whose retain frequency
    is at most ``retain_threshold``; ties broken by the forget/retain ratio."""
    f = (z_forget > 0).mean(0)
    r = (z_retain > 0).mean(0)
    score = jnp.where(r <= retain_threshold, f + 1e-3 * f / (r + 1e-6), -1.0)
    return jax.lax.top_k(score, k)[1]


def probe_features(sae: SAE, probe_w: Float[Array, " d"], k: int) -> Int[Array, " k"]:
    """Features whose decoder rows push the probe logit most (``W_dec @ w``), largest first."""
    return jax.lax.top_k(sae.W_dec.astype(jnp.float32) @ probe_w.astype(jnp.float32), k)[1]


def activation_stats(clamp: Clamp, resid: Float[Array, "n d"], slots: Int[Array, " n"], mask: Bool[Array, " n"]) -> dict[str, Array]:
    """Activity of ``clamp.features`` on the masked residual rows, and what ``clamp`` changes there.

    Rows are any residual vectors (e.g. every prompt position of a batch, flattened); ``slots`` are
    their sequence positions (for a clamp's ``slot_mask``).

    Returns:
        Per feature (``[k]``): ``frac_active`` (fraction of masked rows with ``z_f > 0``),
        ``mean_active`` (mean ``z_f`` over those rows; 0 when never active), ``mean_all`` (mean ``z_f``
        over all masked rows). Scalars: ``n_rows``, ``clamp_change`` (mean over masked rows of
        ``||clamp(h) - h||``, i.e. ``||D(clamp(z)) - D(z)||`` with the error term kept), ``resid_norm``
        (mean ``||h||``), ``clamp_change_rel`` (their ratio) and ``frac_changed`` (fraction of masked
        rows where the clamp moves ``h`` at all).

    >>> s = activation_stats(Clamp(sae, jnp.array([3]), jnp.array([3.0]), mode="scale"), h, jnp.arange(len(h)), m)
    >>> s["frac_active"]  # 0 for a feature that never fires, and then s["clamp_change"] == 0
    """
    z = encode_features(clamp.sae, resid, clamp.features).astype(jnp.float32)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    on = (z > 0).astype(jnp.float32) * m[:, None]
    change = jnp.linalg.norm((clamp(resid, slots) - resid).astype(jnp.float32), axis=-1)
    norm = jnp.linalg.norm(resid.astype(jnp.float32), axis=-1)
    mean_change, mean_norm = (change * m).sum() / n, (norm * m).sum() / n
    return {
        "frac_active": on.sum(0) / n,
        "mean_active": (z * on).sum(0) / jnp.maximum(on.sum(0), 1.0),
        "mean_all": (z * m[:, None]).sum(0) / n,
        "n_rows": m.sum(),
        "clamp_change": mean_change,
        "resid_norm": mean_norm,
        "clamp_change_rel": mean_change / jnp.maximum(mean_norm, 1e-12),
        "frac_changed": ((change > 0).astype(jnp.float32) * m).sum() / n,
    }
