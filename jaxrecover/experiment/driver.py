"""THE driver of every setting: one pipeline from a prepared setting to judged, summarised records.

A setting (``Setting``) supplies only what is its own:

- ``prepare(cfg, model=, tok=, sae=) -> prep``: its data, and the clean / clamped passes that do not
  depend on K, the budget or the method;
- ``case(prep, k) -> Case``: for K clamped features, the clamps, every candidate example, which of
  them are valid flips, a base record per candidate, the objective / success pair and summary fields;
- ``methods(prep, case, used) -> [Method]``: the constraint methods it offers (name, constraint,
  delta site; a sweep names one of them), and ``contrasts(prep, case, used) -> ([Method], info)``:
  the baselines run only in a full run (soft suffix, circuit ablation, ...);
- optionally ``judge(prep, case, method, used, deltas) -> [dict]`` (a setting whose success is judged
  on generations, like refusal, regenerates under the clamp with each delta here);
- ``table_rows``, ``notes``, ``plot`` (and ``csv_rows``) for its output files.

The driver owns everything else, once, for every setting: the budget grid (absolute, or relative to
the defended residual norm at each method's delta site), the method loop, one solve per method over
the joint grid of budgets x examples (``suite.run_solver_budgets``), records with per-example
``status``, the random-direction control, the attribution replays of the designated method, the
resume store (``suite.run_solver``'s content-keyed results under ``<out>/checkpoints``), stage
timings and the output files (``suite.write_outputs``).
"""

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.io import compat as compat
from jaxrecover.recover import solver as R
from jaxrecover.experiment import suite as S
from jaxrecover.core.sites import Site


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to recover, as the driver runs it. Every ``None`` field means "the case's".

    ``constraint`` is a strategy (``R.JacobianNull(method="sketch")``) or its name; ``config``
    overrides other ``RecoveryConfig`` fields (lr, drift_penalty, seed, ...); ``budget`` fixes this method's
    L2 budget (otherwise the grid's); ``budget_scale`` is the norm a relative budget multiplies
    as ``(median row norm, rows)``: ``budget = rel * median * sqrt(rows)`` (None: measured by the driver
    at the delta rows, ``budget_scale``). ``extra`` carries what the setting's judge needs. ``solve_on``
    (one example whose variants are all the flips) solves ONE shared delta and measures it on
    ``examples`` (the authors' IOI code). ``replay`` marks the method whose delta the attribution
    decomposes and replays."""

    name: str
    constraint: Any = "none"  # a strategy object or its name (R.constraint_named)
    delta_site: Site | None = None
    examples: Any = None
    records: Sequence[Mapping[str, Any]] | None = None
    model: Any = None
    clamps: Mapping[Site, Any] | None = None
    clamp_axes: Any = None
    solve_on: Any = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    budget: float | None = None
    budget_scale: tuple[float, int] | None = None
    random_control: bool = True
    replay: bool = False
    desc: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the setting's own (its judge reads it)


@dataclasses.dataclass
class Case:
    """A setting at one K: what every method recovers on.

    ``examples`` / ``records`` / ``is_flip`` cover every candidate (stacked ``R.Example``, one base
    record each); ``used`` (optional) are the candidates to recover on when the setting chooses them
    itself, else the driver takes the valid flips (every candidate with ``require_flip`` false),
    in ``order`` when given, capped at ``max_flips``. ``info`` becomes the head of every result."""

    clamps: dict[Site, Any]
    examples: R.Example | None
    is_flip: np.ndarray
    records: list[dict[str, Any]]
    objective: Callable
    success: Callable
    info: dict[str, Any]
    site: Site
    problem: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # RecoveryProblem extras
    clamp_axes: Any = None
    used: np.ndarray | None = None
    order: Callable[[np.ndarray], np.ndarray] | None = None


def _no_contrasts(prep: Any, case: Case, used: np.ndarray) -> tuple[list[Method], dict[str, Any]]:
    return [], {}


def default_summary(prep: Any, records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {**S.mode_summary(records), "seconds": seconds}


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a setting provides to the driver (module docstring). ``Config`` is its frozen config
    class (every field a CLI option); ``replay_parts`` are the attribution parts replayed."""

    name: str
    title: str
    Config: type
    prepare: Callable[..., Any]
    case: Callable[[Any, int], Case]
    methods: Callable[[Any, Case, np.ndarray], list[Method]]
    table_rows: Callable[[dict[str, Any]], list[dict[str, Any]]]
    notes: Callable[[Any, dict[str, Any]], str]
    plot: Callable[[Path, dict[str, Any]], None]
    contrasts: Callable[[Any, Case, np.ndarray], tuple[list[Method], dict[str, Any]]] = _no_contrasts
    judge: Callable[..., list[dict[str, Any]]] | None = None
    summarise: Callable[[Any, list[dict[str, Any]], float], dict[str, Any]] = default_summary
    csv_rows: Callable[[Mapping[str, Any]], list[dict[str, Any]]] = S.mode_csv_rows
    replay_parts: tuple[tuple[str, str], ...] = S.REPLAYED_PARTS
    load: Callable[[Any], Any] | None = None  # None: ``check_inputs`` (one SAE)
    finalise: Callable[[Any, dict[str, Any]], dict[str, Any]] = lambda prep, res: res


# ----------------------------------------------------------------------------- one evaluation


def pick(case: Case, cfg: Any) -> np.ndarray:
    """The candidates recovered on: the case's own choice, or its valid flips (all candidates with
    ``require_flip`` false), in the case's order, capped at ``cfg.max_flips``."""
    if case.used is not None:
        return np.asarray(case.used)
    pool = np.nonzero(case.is_flip)[0] if cfg.require_flip else np.arange(len(case.is_flip))
    if case.order is not None:
        pool = case.order(pool)
    return pool[: cfg.max_flips] if cfg.max_flips else pool


def _solver(case: Case, m: Method, cfg: Any, budget: float, clamps: Mapping[Site, Any]) -> R.Solver:
    site = m.delta_site or case.site
    problem = R.RecoveryProblem(delta_site=site, clamp_sites=tuple(clamps), **case.problem)
    rcfg = R.RecoveryConfig(steps=cfg.steps, lr=cfg.lr, budget=budget, constraint="none")
    return R.make_solver(problem, rcfg.replace(constraint=m.constraint, **dict(m.config)), case.objective, case.success)


def budget_scale(solver: R.Solver, model: Any, examples: R.Example, clamps: Mapping[Site, Any],
                 clamp_axes: Any = None) -> tuple[float, int]:
    """What a relative budget multiplies: ``(median ||h_def|| over the used delta rows, rows per
    example)``, the defended residual at the delta site from the solver's own ``init``."""
    ctx, _ = jax.jit(jax.vmap(solver.init, in_axes=(None, 0, clamp_axes)))(model, examples, clamps)
    rows = np.asarray(examples.delta_slots).reshape(S.runner._n(examples), -1) >= 0
    norms = np.linalg.norm(np.asarray(ctx.h_def_rows), axis=-1)
    return float(np.median(norms[rows])), int(rows.sum(1).max())


def _judge(setting: Setting, prep: Any, case: Case, m: Method, used: np.ndarray, deltas: np.ndarray,
           store: Path | None) -> list[dict[str, Any]]:
    """``setting.judge``, its verdicts kept in ``store`` under a key of everything they follow (the
    setting, its config, the method, the flips and the deltas' bytes): a resumed run does not
    regenerate and re-judge what it already judged."""
    if store is None:
        return setting.judge(prep, case, m, used, deltas)
    import hashlib
    import json

    from jaxrecover.runtime import report

    cfg = {k: v for k, v in dataclasses.asdict(prep.cfg).items() if k != "out"}
    h = hashlib.sha256(json.dumps([setting.name, cfg, m.name, m.desc, str(m.delta_site)], sort_keys=True, default=str).encode())
    h.update(np.asarray(used, np.int64).tobytes())
    h.update(np.ascontiguousarray(deltas, np.float32).tobytes())
    path = Path(store) / "judge" / f"{setting.name}-{m.name}-{h.hexdigest()[:20]}.jsonl"
    if path.exists():
        return report.read_jsonl(path)
    judged = setting.judge(prep, case, m, used, deltas)
    path.parent.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(path, judged)
    return judged


def _collect(setting: Setting, prep: Any, out: dict, mode: str, run: S.Run, base: Sequence[Mapping[str, Any]],
             judged: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    recs = [{**b, **r, "mode": mode, "seconds": run.seconds} for b, r in zip(base, run.records, strict=True)]
    for i, r in enumerate(recs):
        if "valid_flip" in r:  # the valid-flip set comes from the plain prompts, not from a variant's run
            r["clamp_flipped"] = r["valid_flip"]
        if judged is not None:  # a judged setting: recovered = the judge's verdict; non-finite never recovers
            j = judged[i]
            if r["status"] == "non_finite":
                j = {**j, **{k: False for k, v in j.items() if isinstance(v, bool)}}
            r.update(j)
            r["recovered"] = bool(j["recovered"])
        r["zero_reactivation"] = bool(r["recovered"]) and bool(r.get("no_reactivation", True))
    out["records"].extend(recs)
    out["modes"][mode] = setting.summarise(prep, recs, run.seconds)
    return recs


def _inputs(prep: Any, case: Case, m: Method, used: np.ndarray) -> tuple[Any, dict, Any, Any, list]:
    """``(model, clamps, clamp_axes, examples, base records)`` of ``m``: its own, or the case's."""
    if m.clamps is None:
        clamps, axes = case.clamps, case.clamp_axes
    else:
        clamps, axes = dict(m.clamps), m.clamp_axes
    ex = S.take(case.examples, used) if m.examples is None else m.examples
    base = [case.records[i] for i in used] if m.records is None else list(m.records)
    return (prep.model if m.model is None else m.model), clamps, axes, ex, base


def _run_method(setting: Setting, prep: Any, case: Case, m: Method, used: np.ndarray, grid: list[float],
                relative: bool, outs: list[dict], *, store: Path | None, progress: bool) -> list[S.Run]:
    from jaxrecover.experiment import common as C

    cfg = prep.cfg
    model, clamps, axes, ex, base = _inputs(prep, case, m, used)
    if m.budget is not None:
        budgets = [float(m.budget)] * len(grid)
    elif relative:
        probe = _solver(case, m, cfg, grid[0], clamps)
        median, rows = m.budget_scale if m.budget_scale is not None else budget_scale(probe, model, ex, clamps, axes)
        budgets = [float(float(b) * median * np.sqrt(rows)) for b in grid]
    else:
        budgets = list(grid)
    solver = _solver(case, m, cfg, budgets[0], clamps)
    desc = m.desc or f"{setting.name} {m.name}"
    distinct = sorted(set(budgets), key=budgets.index)
    if m.solve_on is not None:  # one shared delta, measured on every flip
        shared = S.run_solver_budgets(solver, model, m.solve_on, clamps, distinct, clamp_axes=axes, desc=desc,
                                      progress=progress, store=store)
        solved = [dataclasses.replace(S.evaluate_deltas(solver, model, ex, clamps, jnp.broadcast_to(
            r.result.delta, (len(base),) + r.result.delta.shape[1:]), clamp_axes=axes), seconds=r.seconds) for r in shared]
    else:
        solved = S.run_solver_budgets(solver, model, ex, clamps, distinct, clamp_axes=axes, desc=desc,
                                      progress=progress, store=store)
    runs = [solved[distinct.index(b)] for b in budgets]
    for out, b, run in zip(outs, budgets, runs, strict=True):
        judged = None
        if setting.judge:
            with C.stage(f"judge: {desc}"):
                judged = _judge(setting, prep, case, m, used, np.asarray(run.result.delta), store)
        _collect(setting, prep, out, m.name, run, base, judged)
        if m.random_control and getattr(cfg, "random_control", 0):  # replays at the solved norm: no budget
            with C.stage(f"random control: {desc}"):
                out["modes"][m.name] = S.with_random_control(out["modes"][m.name], cfg, solver, model, ex, clamps,
                                                             run, clamp_axes=axes)
        out["modes"][m.name]["delta_site"] = str(m.delta_site or case.site)
        if b != out["budget"]:  # a relative or method-own budget: the radius this method ran at
            out["modes"][m.name]["budget"] = b
    return runs


def _replays(setting: Setting, prep: Any, case: Case, m: Method, used: np.ndarray, out: dict, run: S.Run,
             budget: float, store: Path | None = None) -> None:
    """The attribution of ``m``'s delta (paper App. J): its parts at the delta site, each replayed
    under the clamp and judged like the method itself."""
    model, clamps, _, ex, base = _inputs(prep, case, m, used)
    site = m.delta_site or case.site
    solver = _solver(case, m, prep.cfg, budget, clamps)
    window = R.plan_window(solver, ex)
    ctx0, _ = jax.jit(jax.vmap(lambda m, e, c: R.init(solver, m, e, c, window), in_axes=(None, 0, None)))(model, ex, clamps)
    sae = clamps[site].sae
    parts = S.replay_components(sae, clamps[site].features, ctx0.h_def_rows, run.result.delta,
                                topk=getattr(prep.cfg, "topk_attr", 20))

    names = [part for part, _ in setting.replay_parts]
    judged = None
    if setting.judge:  # every part of every example judged in ONE call (one batched generation)
        judged = _judge(setting, prep, case, m, used, np.concatenate([np.asarray(parts[p]) for p in names]), store)
    n = len(base)
    reps = S.evaluate_delta_sets(solver, model, ex, clamps, [parts[p] for p in names])  # one init, every part
    for j, ((part, mode), rep) in enumerate(zip(setting.replay_parts, reps, strict=True)):
        _collect(setting, prep, out, mode, rep, base, None if judged is None else judged[j * n : (j + 1) * n])
    out["attribution_method"] = m.name


def evaluate(setting: Setting, prep: Any, *, n_features: int | None = None, budgets: Sequence[float] | None = None,
             relative: bool = False, constraint: str | None = None, store: Path | None = None,
             progress: bool = True) -> list[dict[str, Any]]:
    """Valid flips for K = ``n_features`` (default ``cfg.n_features``), then every method at every
    budget of ``budgets`` (default ``[cfg.budget]``; relative to each method's defended residual norm
    when ``relative``). With ``constraint`` only the method of that name runs (a sweep), without
    contrasts or attribution. Returns one result per budget: the case's info, ``modes`` (a summary
    per method) and ``records``."""
    cfg = prep.cfg
    k = n_features or cfg.n_features
    if budgets is None:  # the run's own budget: absolute, or relative when --budget 0 and --budget-rel > 0
        relative = relative or (cfg.budget == 0 and getattr(cfg, "budget_rel", 0.0) > 0)
        budgets = [cfg.budget_rel if relative else cfg.budget]
    grid = [float(b) for b in budgets]
    if not grid or any(not b >= 0 for b in grid):
        raise ValueError(f"budgets must be a non-empty list of numbers >= 0, got {grid}.")
    case = setting.case(prep, k)
    outs = [{**case.info, "budget": b, "modes": {}, "records": []} for b in grid]
    used = pick(case, cfg)
    for out in outs:
        out.setdefault("n_valid_flips", int(np.sum(case.is_flip)))
        out.setdefault("n_recovered_on", int(len(used)))
        out.setdefault("flip_indices", [int(i) for i in used])
    if not len(used):
        S.say(f"{setting.name}: K={k}: no valid flips among {len(case.is_flip)} candidates")
        return outs
    methods = setting.methods(prep, case, used)
    if constraint is not None:
        methods = [m for m in methods if m.name == constraint]
        if not methods:
            raise ValueError(f"{setting.name}: no method named {constraint!r}.")
    runs: dict[str, list[S.Run]] = {}
    for m in methods:
        runs[m.name] = _run_method(setting, prep, case, m, used, grid, relative, outs, store=store, progress=progress)
    if constraint is not None:
        return outs
    from jaxrecover.experiment import common as C

    replay = next((m for m in methods if m.replay), None)
    extra, info = setting.contrasts(prep, case, used)
    for j, out in enumerate(outs):
        out.update(info)
        if replay is not None and getattr(cfg, "attribution", False):
            with C.stage(f"attribution: {replay.name}"):
                _replays(setting, prep, case, replay, used, out, runs[replay.name][j], grid[j], store)
    for m in extra:
        if m.examples is not None and S.runner._n(m.examples) == 0:
            continue
        _run_method(setting, prep, case, m, used, grid, relative, outs, store=store, progress=progress)
    return outs


# ----------------------------------------------------------------------------- a run into a folder


def check_inputs(cfg: Any) -> tuple[Site, Any, str]:
    """The cheap checks of a run, before the model loads: the SAE and K against it."""
    from jaxrecover.recover import projections as proj

    sae = S.resolve_sae(cfg.sae[0] if cfg.sae else "", cfg.layers[0])
    compat.check_run(cfg.model_dir, [sae[1]], [sae[2]])  # width, site, layer, tokenizer: before the model loads
    if cfg.n_features > sae[1].d_sae:
        raise SystemExit(f"--n-features {cfg.n_features}: the SAE {sae[2]} has {sae[1].d_sae} features.")
    try:  # every setting runs the encoder-projected method
        proj.check_encoder_null_space(sae[1].W_enc.shape[0], cfg.n_features)
    except ValueError as e:
        raise SystemExit(f"--n-features {cfg.n_features}: {e}") from None
    return sae


def run(setting: Setting, cfg: Any, prepared: Any = None) -> dict[str, Any]:
    """See ``_run``; its stage timings are this run's only (a fresh ``stage_clock``)."""
    from jaxrecover.experiment import common as C

    with C.stage_clock():
        return _run(setting, cfg, prepared)


def _run(setting: Setting, cfg: Any, prepared: Any = None) -> dict[str, Any]:
    """A setting's default run into ``cfg.out`` (``results/<name>``): checks the folder and the SAE
    before anything is loaded, times each stage, writes results.jsonl, summary.json, table.md,
    ``<name>.csv`` and ``<name>.png``, prints the table. Rerunning resumes from the store.
    ``prepared`` (a ``setting.prepare`` result, e.g. on a model already in memory) skips the loading."""
    from jaxrecover.experiment import common as C

    t0 = time.time()
    out = S.default_out(cfg.out, setting.name)
    C.check_writable(out)
    prep = prepared
    if prep is None:
        loaded = (setting.load or check_inputs)(cfg)  # cheap: every bad input fails before the model loads
        with C.stage("prepare (model, SAE, data, clean and clamped passes)"):
            prep = setting.prepare(cfg, sae=loaded)
    res = setting.finalise(prep, evaluate(setting, prep, store=out / "checkpoints")[0])
    records = res.pop("records")
    summary = {"setting": setting.name, "config": dataclasses.asdict(cfg), "sae_path": prep.sae_path, "site": str(prep.site),
               "prepare_seconds": prep.seconds, "wall_seconds": time.time() - t0, **res}
    table = S.write_outputs(out, name=setting.name, records=records, summary=summary,
                            table_rows=setting.table_rows(res), csv_rows=setting.csv_rows(res),
                            notes=setting.notes(prep, res), title=setting.title)
    if res["modes"]:
        setting.plot(out, res)
    print(table)
    S.say(f"{setting.name}: wrote {out} in {time.time() - t0:.0f} s")
    return summary
