"""Shared machinery of the recovery experiments (``ioi``, ``unlearning``, ``tpp``, ``sweeps``).

- ``resolve_sae``: the SAE at ``--sae PATH`` or the shipped one at a layer (fails loudly if absent).
- ``run_solver``: ``jax.vmap`` of one ``recovery.make_solver`` over stacked examples, run as
  ``init -> advance (chunks, tqdm) -> finish``; clamps may be shared (``clamp_axes=None``) or one per
  example (``clamp_axes = {site: Clamp(None, 0, 0)}``).
- ``run_solver_budgets``: ``run_solver`` at several L2 budgets as ONE solve over the joint grid of
  budgets x examples (every grid point has the same shapes), split back per budget (budget sweeps).
- ``evaluate_deltas`` / ``evaluate_delta_sets``: measure given deltas (no optimisation) with the solver's
  own ``finish`` (the replay and shared-delta evaluations; several sets share one ``init``).
- ``replay_components``: split a recovered delta at the delta site into its clamped-feature,
  other-feature, top-k-feature and SAE-residual parts (paper App. J); every setting replays them.
- ``mode_summary`` / ``paper_table``: the paper's uncertainty summaries (Wilson / bootstrap 95%).

The helpers never loop over examples in Python on the hot path: every array op is vmapped.
"""

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.recover import solver as R
from jaxrecover.recover import batch as runner
from jaxrecover.runtime import report as report
from jaxrecover.sae.autoencoder import SAE, encode
from jaxrecover.core.sites import Site
from jaxrecover.experiment.common import say as say  # one progress line format for every setting


_MSG_NO_SAE = (
    "{path}: no SAE there. The shipped SmolLM2 SAEs live in sae_weights/smollm2-135m-instruct-res/"
    "blocks.{{9,15}}.hook_resid_post/ (experiments/train_saes.py writes them); pass --sae PATH to use "
    "another SAELens / Gemma Scope / sparsify SAE."
)


def default_out(out: str, name: str) -> Path:
    """``out`` or ``results/<name>`` in the current folder (``common.out_dir``)."""
    from jaxrecover.experiment.common import out_dir

    return out_dir(out, name)


def resolve_sae(path: str, layer: int) -> tuple[Site, SAE, str]:
    """``(site, sae, source)`` from ``path`` or the shipped SAE at ``blocks.{layer}.hook_resid_post``
    (``common.load_sae_at``: the one loader)."""
    from jaxrecover.experiment.common import load_sae_at
    from jaxrecover.io.shipped import shipped_sae

    p = Path(path) if path else shipped_sae(layer)
    if not p.exists():
        raise SystemExit(_MSG_NO_SAE.format(path=p))
    return (*load_sae_at(p), str(p))


def resid_and_grad(model: Any, tokens: Any, valid: Any, site: Site, metric: Any) -> tuple[Any, Any]:
    """Residual at ``site`` (before any hook) and ``dM/dh`` there, for one sequence.

    ``metric(logits [seq, vocab]) -> scalar``. The gradient is taken through an additive zero at the
    site, so it works for every point of a block.
    """
    from jaxrecover.model.transformer import embed, run_blocks, unembed

    x0, _ = run_blocks(model, embed(model, tokens, valid), 0, site.layer, valid=valid)

    def f(eps):
        hooks = {site: lambda r, s: r + eps}
        h, cap = run_blocks(model, x0, site.layer, model.cfg.n_layers, hooks, valid=valid, capture=(site,))
        return metric(unembed(model, h)), cap[site]

    eps = jnp.zeros(x0.shape, jnp.float32)
    (_, resid), g = jax.value_and_grad(f, has_aux=True)(eps)
    return resid, g


def resid_at(model: Any, tokens: Any, valid: Any, site: Site, hooks: Mapping | None = None) -> Any:
    """Residual at ``site`` (before its hook) for one sequence; blocks past the site are not run."""
    from jaxrecover.model.transformer import capture

    cap = capture(model, tokens, (site,), hooks, valid=valid)
    return cap[site]


# ----------------------------------------------------------------------------- running the solver


@dataclasses.dataclass
class Run:
    """A batched solver result plus its per-example records (``recovery.result_records``)."""

    result: Any
    records: list[dict[str, Any]]
    seconds: float
    ctx: Any = None


def run_solver(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    *,
    clamp_axes: Any = None,
    desc: str = "recover",
    progress: bool = True,
    store: Path | None = None,
) -> Run:
    """All examples at once (``runner.solve_batch``: windowed steps, chunked under a progress bar).

    With ``store`` (a folder) a finished result is read back instead of solved
    (``runner.solve_batch(store=...)``: the experiments' one resume scheme)."""
    from jaxrecover.experiment.common import stage

    t0 = time.time()
    key = None if store is None else runner.result_key(solver, model, examples, clamps, clamp_axes)
    saved = None if key is None else runner.load_solved(store, key, desc)
    if saved is not None:
        return Run(saved, runner.result_records(saved), time.time() - t0)
    with stage(f"solve: {desc}"):
        res = jax.device_get(runner.solve_batch(solver, model, examples, clamps, clamp_axes=clamp_axes,
                                                progress=progress, desc=desc))
    if key is not None:  # the key is hashed once (the model's fingerprint is ~1 s on SmolLM2)
        runner.save_solved(store, key, res, desc)
    return Run(res, runner.result_records(res), time.time() - t0)


_MSG_BUDGETS_SET = (
    "run_solver_budgets: the examples already carry per-example budgets (Example.budget); pass "
    "examples without them: every example is solved once per budget in {budgets}."
)


def run_solver_budgets(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    budgets: Sequence[float],
    *,
    clamp_axes: Any = None,
    desc: str = "recover",
    progress: bool = True,
    store: Path | None = None,
) -> list[Run]:
    """``run_solver`` at every L2 budget in ``budgets``, as ONE solve over the joint grid.

    Grid points of a budget sweep share every shape (same examples, same clamps; only the radius of
    the post-step clip differs), so the examples are tiled once per budget (budget-major: row
    ``j * n + i`` is example ``i`` at ``budgets[j]``), each row carries its radius in
    ``Example.budget``, and ``runner.solve_batch`` shards all ``len(budgets) * n`` rows over every
    (global) device in one compiled program, instead of one smaller solve per budget. Per-example
    clamps (``clamp_axes`` entries 0) are tiled with the examples; shared ones stay shared.
    ``solver.cfg.budget`` is not used. With one budget this is ``run_solver`` with ``cfg.budget`` set
    to it (the same store key as before).

    Returns one ``Run`` per budget with what separate solves give: the same decisions, and deltas and
    objectives equal up to fp32 rounding (XLA may sum in another order for another batch size; see
    README "Scale-out"). ``seconds`` is the joint solve's wall time split evenly over the budgets.
    The joint batch is ``len(budgets)`` times larger: ``--per-device-batch`` bounds its memory.

    >>> runs = run_solver_budgets(solver, model, examples, clamps, (1.0, 5.0, 20.0))  # 8 examples
    >>> [len(r.records) for r in runs]
    [8, 8, 8]
    """
    from jaxrecover.runtime.sharding import map_batched

    budgets = [float(b) for b in budgets]
    if not budgets or any(not b >= 0 for b in budgets):
        raise ValueError(f"run_solver_budgets: budgets must be a non-empty list of numbers >= 0, got {budgets}.")
    if examples.budget is not None:
        raise ValueError(_MSG_BUDGETS_SET.format(budgets=budgets))
    if len(budgets) == 1:
        one = R.make_solver(solver.problem, solver.cfg.replace(budget=budgets[0]), solver.objective, solver.success)
        return [run_solver(one, model, examples, clamps, clamp_axes=clamp_axes, desc=desc, progress=progress,
                           store=store)]
    n, nb = runner._n(examples), len(budgets)

    def tile(a: Any) -> Any:  # budget-major copies along the example axis
        return jnp.tile(jnp.asarray(a), (nb,) + (1,) * (jnp.ndim(a) - 1))

    grid = dataclasses.replace(jax.tree.map(tile, examples), budget=jnp.repeat(jnp.asarray(budgets, jnp.float32), n))
    grid_clamps = map_batched(dict(clamps), clamp_axes, lambda c: jax.tree.map(tile, c), lambda c: c)
    run = run_solver(solver, model, grid, grid_clamps, clamp_axes=clamp_axes, progress=progress, store=store,
                     desc=f"{desc} x {nb} budgets")
    parts = [jax.tree.map(lambda a: a[j * n : (j + 1) * n], run.result) for j in range(nb)]  # noqa: B023
    return [Run(p, runner.result_records(p), run.seconds / nb) for p in parts]


def evaluate_deltas(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    deltas: Any,
    *,
    clamp_axes: Any = None,
) -> Run:
    """Measure fixed ``deltas [n, rows, d]`` (no optimisation) with the solver's ``finish``."""
    return evaluate_delta_sets(solver, model, examples, clamps, [deltas], clamp_axes=clamp_axes)[0]


def evaluate_delta_sets(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    sets: Sequence[Any],
    *,
    clamp_axes: Any = None,
) -> list[Run]:
    """``evaluate_deltas`` for several sets of deltas (each ``[n, rows, d]``, e.g. the attribution's
    parts) in ONE compiled call: each example's ``init`` (prefix, clamped and base passes) runs once
    and ``finish`` is vmapped over its sets. One ``Run`` per set; ``seconds`` split evenly."""
    t0 = time.time()
    window = R.plan_window(solver, examples)  # the solve's own window: a solved delta measures as solved

    def one(model, ex, cl, deltas):  # deltas [sets, rows, d]
        ctx, state = R.init(solver, model, ex, cl, window)

        def measure(delta):
            st = dataclasses.replace(state, delta=delta.astype(jnp.float32), step=jnp.zeros((), jnp.int32))
            return R.finish(solver, model, ex, cl, ctx, st, window)

        return jax.vmap(measure)(deltas)

    stacked = jnp.stack([jnp.asarray(d) for d in sets], axis=1)  # [n, sets, rows, d]
    res = jax.device_get(jax.jit(jax.vmap(one, in_axes=(None, 0, clamp_axes, 0)))(model, examples, clamps, stacked))
    seconds = (time.time() - t0) / len(sets)
    out = []
    for j in range(len(sets)):
        part = jax.tree.map(lambda a: a[:, j], res)  # noqa: B023
        out.append(Run(part, runner.result_records(part), seconds))
    return out


def random_control(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    result: Any,
    *,
    seeds: int = 3,
    seed: int = 0,
    clamp_axes: Any = None,
) -> dict[str, Any]:
    """For every recovered delta, ``seeds`` random deltas of the same norm in the same constraint
    subspace (``recovery.random_direction``), replayed under the clamp and judged by the solver's own
    success criterion. Returns the random deltas' success count over the recovered examples
    (Wilson 95%), pooled over seeds, plus per-example random success fractions."""
    from jaxrecover.experiment.common import rates

    ok = np.asarray(result.success, bool) & ~np.asarray(result.non_finite, bool)
    idx = np.flatnonzero(ok)
    if idx.size == 0 or seeds < 1:
        return {"seeds": seeds, "n_recovered": 0, "random": rates([], "w")}
    ex, deltas = take(examples, idx), jnp.asarray(np.asarray(result.delta)[idx])
    # per-example clamp leaves (axis 0 in ``clamp_axes``) follow the examples; shared ones stay
    cl = clamps if clamp_axes is None else jax.tree.map(
        lambda ax, sub: sub if ax is None else take(sub, idx), clamp_axes, dict(clamps), is_leaf=lambda x: x is None)

    window = R.plan_window(solver, ex)  # the solve's window: slots before it have zero Jacobian rows

    def one(model, ex, cl, delta, keys):
        # the seeds share one init and (vmap leaves what does not depend on the key unbatched) one
        # constraint basis: the exact Jacobian's VJPs run once per example, not once per seed
        ctx, state = R.init(solver, model, ex, cl, window)

        def per_seed(key):
            rd = R.random_direction(solver, model, ex, cl, delta, key, ctx, window)
            res = R.finish(solver, model, ex, cl, ctx, dataclasses.replace(state, delta=rd, step=jnp.zeros((), jnp.int32)),
                           window)
            return res.success & ~res.non_finite

        return jax.vmap(per_seed)(keys)

    fn = jax.jit(jax.vmap(one, in_axes=(None, 0, clamp_axes, 0, 0)))
    keys = jax.random.split(jax.random.key(seed), (seeds, idx.size))
    wins = np.asarray(fn(model, ex, cl, deltas, jnp.swapaxes(keys, 0, 1))).T  # [seeds, n]
    return {"seeds": seeds, "n_recovered": int(idx.size), "random": rates([{"w": w} for w in wins.ravel()], "w"),
            "per_example": {int(i): float(f) for i, f in zip(idx, wins.mean(0))}}


def with_random_control(summary: dict[str, Any], cfg: Any, solver: R.Solver, model: Any, examples: R.Example,
                        clamps: Mapping[Site, Any], run: Run, *, clamp_axes: Any = None) -> dict[str, Any]:
    """``summary`` plus ``random_control`` (``random_control``) and its pooled rate as ``random_dir``
    (a table cell), when ``cfg.random_control`` > 0."""
    if not getattr(cfg, "random_control", 0):
        return summary
    rc = random_control(solver, model, examples, clamps, run.result, seeds=cfg.random_control, seed=cfg.seed,
                        clamp_axes=clamp_axes)
    return {**summary, "random_control": rc, "random_dir": rc["random"]}


def replay_components(sae: SAE, features: Any, h_def_rows: Any, delta: Any, topk: int = 20) -> dict[str, Any]:
    """THE decomposition of recovered deltas (paper App. J), for every setting: ``delta [n, rows, d]``
    at the delta site with ``dz = E(h_def + delta) - E(h_def)`` per row gives

    - ``clamped_features = dz_S @ W_dec[S]`` and ``other_features = dz_{not S} @ W_dec``;
    - ``topk_features``: the ``topk`` largest ``|dz|`` outside S decoded, and ``topk_knockout = delta - topk_features``;
    - ``residual = delta - dz @ W_dec`` (what the SAE does not explain), and ``full = delta``.
    """
    inS = jnp.zeros(sae.d_sae, bool).at[jnp.asarray(features)].set(True)
    topk = min(topk, sae.d_sae)

    def one(sae, h, d):
        dz = encode(sae, h + d) - encode(sae, h)  # [rows, d_sae]
        other_dz = jnp.where(inS, 0.0, dz)
        clamped, other = jnp.where(inS, dz, 0.0) @ sae.W_dec, other_dz @ sae.W_dec
        thresh = jax.lax.top_k(jnp.abs(other_dz), topk)[0][..., -1:]
        top = jnp.where(jnp.abs(other_dz) >= thresh, other_dz, 0.0) @ sae.W_dec
        return {"full": d, "residual": d - (clamped + other), "other_features": other, "topk_features": top,
                "clamped_features": clamped, "topk_knockout": d - top}

    fn = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    return jax.device_get(fn(sae, jnp.asarray(h_def_rows), jnp.asarray(delta)))


def stack(examples: Sequence[R.Example]) -> R.Example:
    """Stack per-example pytrees on a new leading axis (host-side, numpy)."""
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *examples)


REPLAYED_PARTS = (("clamped_features", "replay_clamped_feature"), ("residual", "replay_sae_residual"))


def take(tree: Any, idx: Sequence[int] | np.ndarray) -> Any:
    idx = np.asarray(idx, dtype=np.int32)
    return jax.tree.map(lambda a: a[idx], tree)


# ----------------------------------------------------------------------------- summaries


def mode_summary(records: Sequence[Mapping[str, Any]], drift_key: str = "drift_abs") -> dict[str, Any]:
    """Wilson rates for recovered / zero-reactivation, bootstrap means for the continuous metrics."""
    from jaxrecover.experiment.common import mean_ci, rates

    out: dict[str, Any] = {"n": len(records)}
    if not records:
        return out
    out["recovered"] = rates(records, "recovered")
    if all("zero_reactivation" in r for r in records):
        out["zero_reactivation"] = rates(records, "zero_reactivation")
    for key in ("final_objective", "drift_abs", "drift_rel", "decode_drift", "react_frac", "floor_violation",
                "delta_norm", "delta_rel", "steps_to_success"):
        if any(r.get(key) is not None for r in records):
            vals = [r for r in records if key != "steps_to_success" or (r.get("recovered") and r[key] >= 0)]
            out[key] = mean_ci(vals, key)
    drifted = [dict(r, drifted=(r.get(drift_key) or 0.0) > 1e-3) for r in records]
    out["drift_gt_1e-3"] = rates(drifted, "drifted")
    return out


def cell(summary: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """Table cell for a summary entry (rate cell or mean [lo, hi])."""
    v = summary.get(key)
    if v is None:
        return "--"
    if "cell" in v and "k" in v:
        return v["cell"]
    if v.get("mean") is None:
        return "--"
    return f"{v['mean']:.{digits}f} [{v['lo']:.{digits}f}, {v['hi']:.{digits}f}]"


def count_cell(summary: Mapping[str, Any], key: str) -> str:
    v = summary.get(key)
    return "--" if v is None else f"{v['k']}/{v['n']}"


def write_outputs(
    out: Path,
    *,
    name: str,
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    table_rows: Sequence[Mapping[str, Any]],
    csv_rows: Sequence[Mapping[str, Any]],
    notes: str,
    title: str,
) -> str:
    """results.jsonl, summary.json, table.md, ``{name}.csv``; returns the markdown table."""
    from jaxrecover.experiment.common import stage_times

    stages = stage_times()
    report.write_jsonl(out / "results.jsonl", records)
    report.write_json(out / "summary.json", {**summary, "stage_s": stages})
    report.write_csv(out / f"{name}.csv", csv_rows)
    cols = list(dict.fromkeys(k for r in table_rows for k in r))
    paper = [c for c in cols if c.startswith("paper")]
    table = report.markdown_table(table_rows, [c for c in cols if c not in paper] + paper)
    timing = report.markdown_table([{"stage": k, "seconds": f"{v:.1f}"} for k, v in stages.items()])
    report.write_markdown(out / "table.md", title, [("Results (ours vs paper)", table), ("Notes", notes),
                                                    ("Where the time went (wall s)", timing)])
    return table + "\n\nWhere the time went (wall s):\n" + timing


def mode_csv_rows(res: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per mode: the mean (or rate) of each summarised metric."""
    return [{"mode": m, **{k: (v.get("mean", v.get("rate")) if isinstance(v, dict) else v) for k, v in s.items()}}
            for m, s in res["modes"].items()]


@dataclasses.dataclass
class Prepared:
    """What every setting's ``prepare`` returns first (a setting adds its own fields after these)."""

    cfg: Any
    model: Any
    tok: Any
    site: Site
    sae: Any
    sae_path: str


def finite(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None
