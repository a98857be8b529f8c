"""Per-example recovery metrics (pure JAX, vmap-friendly) and the paper's uncertainty summaries.

Feature metrics compare the defended state ``z_def`` (delta = 0, clamps on) with the recovered state
``z_rec`` (delta applied) of the clamped features ``S`` at the measured positions, concatenated over
every measured site (paper-notes 2.10; epsilon 1e-8):

====================  ============================================================================
``drift_abs``         ``||z_rec - z_def||_2``  (the paper's absolute L2, used when ``z_def`` = 0)
``drift_rel``         ``||z_rec - z_def|| / (||z_def|| + 1e-8)``  (defended-feature drift)
``floor_violation``   ``||relu(z_def - z_rec)|| / (||z_def|| + 1e-8)``
``react_frac``        reactivated / eligible; eligible = ``z_def <= 0``, reactivated = ``z_rec > eta``
``zero_react``        recovered and ``max z_rec <= eta`` over the eligible entries
``decode_drift``      ``||(z_rec - z_def)_S @ W_dec[S]||``
``delta_norm``        ``||delta||_F``; ``delta_rel`` = ``||delta||_F / (||h_def||_F + 1e-8)`` at delta rows
====================  ============================================================================

Which residual the features are read from: at the delta site, ``h_def + delta``; at a clamp site
downstream of the delta site, the pre-clamp residual there (what the clamp acts on).

``wilson_interval`` and ``bootstrap_mean_ci`` reproduce the authors' ``compute_uncertainty_intervals``
(z = 1.959963984540054; 2000 resamples with ``random.Random(0).choice``, percentile indices
``int(0.025 * 1999)`` and ``int(0.975 * 1999)``).
"""

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from statistics import mean
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array

EPS = 1e-8
WILSON_Z = 1.959963984540054


def feature_metrics(
    z_def: Sequence[Array],
    z_rec: Sequence[Array],
    mask: Array,
    W_dec_S: Sequence[Array],
    eta: float = 0.0,
) -> dict[str, Array]:
    """Drift / reactivation / floor metrics over every measured site.

    Args:
        z_def: per site ``[n_var, seq, k_site]`` defended latents of ``S`` (delta = 0).
        z_rec: the same with delta.
        mask: ``[n_var, seq]`` bool, the measured positions.
        W_dec_S: per site ``[k_site, d]`` decoder rows of ``S``.
        eta: reactivation threshold.
    """
    m = [mask[:, :, None] for _ in z_def]
    dz = [jnp.where(mm, r - d, 0.0) for mm, r, d in zip(m, z_rec, z_def, strict=True)]
    zd = [jnp.where(mm, d, 0.0) for mm, d in zip(m, z_def, strict=True)]
    fl = [jnp.where(mm, jnp.maximum(d - r, 0.0), 0.0) for mm, r, d in zip(m, z_rec, z_def, strict=True)]

    def norm(xs: Sequence[Array]) -> Array:
        return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in xs))

    def total(xs: Sequence[Array]) -> Array:
        return sum(jnp.sum(x.astype(jnp.float32)) for x in xs)

    eligible = [mm & (d <= 0) for mm, d in zip(m, z_def, strict=True)]
    react = [e & (r > eta) for e, r in zip(eligible, z_rec, strict=True)]
    n_elig, n_react = total(eligible), total(react)
    max_elig = jnp.max(jnp.stack([jnp.max(jnp.where(e, r, -jnp.inf)) for e, r in zip(eligible, z_rec, strict=True)]))
    dec = [jnp.einsum("vsk,kd->vsd", x, W.astype(x.dtype)) for x, W in zip(dz, W_dec_S, strict=True)]
    drift_abs, def_norm = norm(dz), norm(zd)
    return {
        "drift_abs": drift_abs,
        "drift_rel": drift_abs / (def_norm + EPS),
        "floor_violation": norm(fl) / (def_norm + EPS),
        "defended_norm": def_norm,
        "n_eligible": n_elig,
        "n_reactivated": n_react,
        "react_frac": jnp.where(n_elig > 0, n_react / jnp.maximum(n_elig, 1.0), 0.0),
        "max_eligible": jnp.where(n_elig > 0, max_elig, 0.0),
        "no_reactivation": max_elig <= eta,
        "decode_drift": norm(dec),
    }


def delta_metrics(delta: Array, h_def_rows: Array, row_mask: Array) -> dict[str, Array]:
    """``||delta||_F`` and ``||delta||_F / (||h_def||_F + 1e-8)`` over the used rows."""
    w = row_mask[:, None]
    dn = jnp.sqrt(jnp.sum(jnp.square(jnp.where(w, delta, 0.0))))
    hn = jnp.sqrt(jnp.sum(jnp.square(jnp.where(w, h_def_rows.astype(jnp.float32), 0.0))))
    return {"delta_norm": dn, "delta_rel": dn / (hn + EPS)}


# ----------------------------------------------------------------------------- uncertainty


def wilson_interval(k: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes out of ``n`` (fractions; ``(nan, nan)`` if n = 0).

    >>> [round(100 * x, 1) for x in wilson_interval(23, 24)]
    [79.8, 99.3]
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt((p * (1.0 - p) + z * z / (4.0 * n)) / n) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_mean_ci(values: Iterable[float], n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: percentile bootstrap of the mean, exactly as the authors' script (finite
    values only; ``random.Random(seed)``; ``rng.choice`` per draw)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if not xs:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    n = len(xs)
    boots = sorted(mean(rng.choice(xs) for _ in range(n)) for _ in range(n_resamples))
    return (mean(xs), boots[int(0.025 * (n_resamples - 1))], boots[int(0.975 * (n_resamples - 1))])


_BINARY = ("recovered", "zero_reactivation", "clamp_flipped")
_CONTINUOUS = (
    "drift_abs", "drift_rel", "floor_violation", "react_frac", "decode_drift", "delta_norm", "delta_rel",
    "steps_to_success", "base_objective", "clamped_objective", "final_objective",
)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-example records: counts, rates and Wilson CIs for binary fields; means and
    bootstrap CIs for continuous ones (``steps_to_success`` over recovered examples only)."""
    out: dict[str, Any] = {"n": len(records)}
    for key in _BINARY:
        vals = [bool(r[key]) for r in records if key in r]
        if vals:
            k, n = sum(vals), len(vals)
            lo, hi = wilson_interval(k, n)
            out[key] = {"k": k, "n": n, "rate": k / n, "wilson_lo": lo, "wilson_hi": hi}
    for key in _CONTINUOUS:
        vals = [r[key] for r in records if key in r and (key != "steps_to_success" or r.get("recovered"))]
        vals = [v for v in vals if isinstance(v, (int, float)) and (key != "steps_to_success" or v >= 0)]
        if vals:
            m, lo, hi = bootstrap_mean_ci(vals)
            out[key] = {"mean": m, "boot_lo": lo, "boot_hi": hi, "n": len(vals)}
    return out
