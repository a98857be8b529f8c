"""Sweeps of recovery vs the number of clamped features K (paper App. I, Table 9) or the delta budget
(paper App. H, Fig. 8), encoder-projected vs unconstrained, on a small slice.

``--setting ioi | unlearning | tpp | refusal`` reuses that setting's ``prepare(cfg)`` once. For
refusal a method is a constraint (``none``, ``encoder``, ``jacobian``) and "recovered" is non-refusal
of the regenerated answer.

How the grid is solved:

- **K sweep**: ``evaluate(prepared, n_features=K, constraint=...)`` per grid point, one after
  another. K changes the clamp's feature count (array shapes, hence a new program) and the valid-flip
  set (recomputed per K, as in the paper), so grid points cannot share a batch; each point's
  examples are sharded over the devices.
- **budget sweep** (ioi, unlearning, tpp): every grid point has the same examples, clamps and shapes
  (only the radius of the post-step L2 clip differs), so ``evaluate(prepared, budgets=grid,
  constraint=...)`` solves the JOINT grid of budgets x examples as one batch per constraint
  (``suite.run_solver_budgets``: each example row carries its budget), sharded over every device of
  every process, and splits the results back per grid point: the same decisions as point by point,
  deltas and objectives equal up to fp32 rounding (tests/test_sweep_joint.py). The batch is
  ``len(budgets)`` times larger (``--per-device-batch`` bounds the memory); ``--joint-budgets false``
  solves point by point, and so does refusal (its evaluate regenerates and judges answers per point).
  A point's ``seconds`` is then its share of the joint solve.

Outputs (``--out``, default ``results/sweeps/<setting>_<kind>``): ``summary.json``,
``results.jsonl`` (every recovered example at every grid point), ``table.md``, ``sweep.csv``,
``recovery.png`` (rate with Wilson 95% band) and ``drift.png`` (mean act drift L2 with bootstrap 95%
band).

Paper references: Table 9 (refusal, K = 5..30, encoder-projected single-layer), App. H (WMDP, six flips,
budgets 0, 1, 2, 5, 10, 20: encoder 0/6, 0/6, 4/6, 6/6, 6/6 at 0, 2, 5, 10, 20, drift 0; none the same
rates with drift 2.25 at 20).

Run: ``jaxrecover run sweeps --setting unlearning --kind budget``.
"""

import dataclasses
import importlib
import time
from pathlib import Path
from typing import Any


from jaxrecover.experiment import common as C
from jaxrecover.experiment import driver as D_
from jaxrecover.experiment import suite as S
from jaxrecover.runtime import report as report

NAME = "sweeps"
F_ = dataclasses.field

PAPER_BUDGET_WMDP = {0: ("0/6", "0/6"), 2: ("0/6", "0/6"), 5: ("4/6", "4/6"), 10: ("6/6", "6/6"), 20: ("6/6", "6/6")}
PAPER_K_REFUSAL = {5: "16/17", 10: "36/36", 15: "45/45", 20: "42/45", 30: "58/59"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    setting: str = F_(default="ioi", metadata={"help": "ioi | unlearning | refusal"})
    kind: str = F_(default="k", metadata={"help": "k (number of clamped features) | budget"})
    ks: tuple[int, ...] = F_(default=(5, 10, 15, 20, 30, 40, 60), metadata={"help": "K grid (comma list)"})
    budgets: tuple[float, ...] = F_(default=(1.0, 2.0, 5.0, 10.0, 20.0, 40.0), metadata={"help": "budget grid"})
    constraints: tuple[str, ...] = F_(default=("none", "encoder"), metadata={"help": "constraints compared"})
    max_flips: int = F_(default=4, metadata={"help": "valid flips recovered per grid point (small slice)"})
    steps: int = F_(default=0, metadata={"help": "optimisation steps (0 = the experiment's default)"})
    n_prompts: int = F_(default=0, metadata={"help": "ioi / refusal: prompts scanned for flips (0 = the setting's default)"})
    max_questions: int = F_(default=0, metadata={"help": "unlearning: questions through the strict filter (0 = the setting's default)"})
    joint_budgets: bool = F_(default=True, metadata={
        "help": "budget sweep: solve every budget x example in one sharded batch (off: point by point)"})
    relative: bool = F_(default=False, metadata={
        "help": "budget sweep: the grid is budget_rel, a multiple of the defended residual norm at each "
                "method's own delta rows (refusal: layer 6 for jacobian / none_cross, 9 for encoder / none), so "
                "methods and models are compared at equal relative size"})

    def __post_init__(self) -> None:
        super().__post_init__()
        C.check_choice("setting", self.setting, ("ioi", "unlearning", "tpp", "refusal"))
        C.check_choice("kind", self.kind, ("k", "budget"))
        C.check_choice("constraints", self.constraints, ("none", "encoder", "jacobian", "none_cross"))
        if self.setting != "refusal" and set(self.constraints) - {"none", "encoder"}:
            raise ValueError(f"--constraints {','.join(self.constraints)}: {self.setting} is single-layer; "
                             "jacobian and none_cross are refusal's cross-layer methods (use none, encoder).")
        for k in self.ks:
            C.check_range("ks", k, 1)
        for b in self.budgets:
            # budget_rel 0 would leave refusal no budget at all (its Config refuses it mid-sweep otherwise)
            C.check_range("budgets", b, 0.0, strict_lo=self.relative)


def _load(setting: str) -> Any:
    from jaxrecover.paper import SETTINGS

    return importlib.import_module(SETTINGS[setting])


def _sub_config(cfg: Config, mod: Any) -> Any:
    """The experiment's Config with the sweep's slice settings (only fields it has)."""
    names = {f.name for f in dataclasses.fields(mod.Config)}
    over = {"model_dir": cfg.model_dir, "sae": cfg.sae, "layers": cfg.layers, "dtype": cfg.dtype, "max_flips": cfg.max_flips,
            "suffix": False, "attribution": False, "out": str(Path(cfg.out or "/tmp") / "sub")}
    over.update({k: v for k, v in (("n_prompts", cfg.n_prompts), ("max_questions", cfg.max_questions)) if v})
    if cfg.steps:
        over["steps"] = cfg.steps
    return mod.Config(**{k: v for k, v in over.items() if k in names})


def run_sweep(cfg: Config, mod: Any, prepared: Any = None, store: Path | None = None) -> dict[str, Any]:
    """Evaluate every grid point for every constraint through the one driver (finished solves
    resumable from ``store``); returns points + records. ``mod`` is a setting module (its ``SETTING``)."""
    setting = mod.SETTING
    prep = prepared if prepared is not None else setting.prepare(_sub_config(cfg, mod))
    grid = list(cfg.ks) if cfg.kind == "k" else list(cfg.budgets)
    results: dict[tuple[Any, str], tuple[dict[str, Any], float]] = {}  # (x, constraint) -> (result, seconds)
    # a judged setting (refusal) regenerates per point; relative budgets differ per method: point by point
    joint = cfg.kind == "budget" and cfg.joint_budgets and not cfg.relative and setting.judge is None
    for c in cfg.constraints if joint else ():  # one solve per constraint over budgets x examples
        t0 = time.time()
        per_point = D_.evaluate(setting, prep, constraint=c, store=store, budgets=tuple(float(x) for x in grid))
        share = (time.time() - t0) / len(grid)
        for x, res in zip(grid, per_point, strict=True):
            results[x, c] = res, share
    for x in grid if not joint else ():
        for c in cfg.constraints:
            kw = ({"n_features": int(x), "budgets": None} if cfg.kind == "k" else
                  {"budgets": (float(x),), "relative": cfg.relative})
            t0 = time.time()
            results[x, c] = D_.evaluate(setting, prep, constraint=c, store=store, **kw)[0], time.time() - t0
    points, records = [], []
    for x in grid:  # grid-major, as the point-by-point loop runs
        for c in cfg.constraints:
            res, seconds = results[x, c]
            ms = res["modes"].get(c, {})
            ms = ms.get("all_flips", ms)  # tpp-style nesting
            points.append({"x": x, "constraint": c, "n_valid_flips": res.get("n_valid_flips", 0),
                           "n_recovered_on": res.get("n_recovered_on", res.get("n_valid_flips", 0)),
                           "summary": ms, "seconds": seconds})
            records += [{**r, "sweep_x": x} for r in res.get("records", [])]
            rec = ms.get("recovered") or {}
            S.say(f"sweeps {cfg.setting} {cfg.kind}={x} {c}: flips {res.get('n_valid_flips', 0)}, "
                  f"recovered {rec.get('k', 0)}/{rec.get('n', 0)}")
    return {"grid": grid, "points": points, "records": records, "joint_budgets": joint}


def smallest_budgets(points: list[dict[str, Any]], constraints: tuple[str, ...], *, full: float = 0.9) -> list[dict[str, Any]]:
    """Per constraint, the smallest grid budget at which it recovers any flip and at which it recovers at
    least ``full`` of them, each with the mean ||delta|| / ||h_def|| measured there (the relative size
    the attack actually used); None where no grid point gets there."""
    rows = []
    for c in constraints:
        pts = sorted((p for p in points if p["constraint"] == c), key=lambda p: p["x"])

        def first(ok: Any) -> dict[str, Any] | None:
            p = next((p for p in pts if (r := (p["summary"].get("recovered") or {})).get("n") and ok(r["rate"])), None)
            return None if p is None else {"budget": p["x"], "delta_rel": (p["summary"].get("delta_rel") or {}).get("mean"),
                                           "recovered": p["summary"]["recovered"]}
        rows.append({"constraint": c, "any": first(lambda r: r > 0), "full": first(lambda r: r >= full)})
    return rows


def _smallest_cell(x: dict[str, Any] | None, relative: bool) -> str:
    if x is None:
        return "not within the grid"
    r, rel = x["recovered"], x["delta_rel"]
    size = f"budget_rel {x['budget']:g}" if relative else f"budget {x['budget']:g}"
    return f"{size} ({r['k']}/{r['n']}; mean ||delta||/||h_def|| {rel:.3f})" if rel is not None else f"{size} ({r['k']}/{r['n']})"


def main(cfg: Config) -> dict[str, Any]:
    with C.stage_clock():  # this sweep's stage timings only
        return _main(cfg)


def _main(cfg: Config) -> dict[str, Any]:
    t0 = time.time()
    mod = _load(cfg.setting)  # Config already refused unknown settings and kinds
    out = S.default_out(cfg.out, f"sweeps/{cfg.setting}_{cfg.kind}")
    res = run_sweep(cfg, mod, store=out / "checkpoints")
    xs = res["grid"]
    label = "K (clamped features)" if cfg.kind == "k" else ("budget_rel" if cfg.relative else "budget ||delta||_F")
    rows, csv_rows = [], []
    series_r, err_r, series_d, err_d = {}, {}, {}, {}
    for c in cfg.constraints:
        pts = [p for p in res["points"] if p["constraint"] == c]
        rate = [(p["summary"].get("recovered") or {}).get("rate") for p in pts]
        series_r[c] = [r if r is not None else float("nan") for r in rate]
        err_r[c] = ([(p["summary"].get("recovered") or {}).get("lo", float("nan")) for p in pts],
                    [(p["summary"].get("recovered") or {}).get("hi", float("nan")) for p in pts])
        dr = [p["summary"].get("drift_abs") or {} for p in pts]
        series_d[c] = [d.get("mean") if d.get("mean") is not None else float("nan") for d in dr]
        err_d[c] = ([d.get("lo", float("nan")) for d in dr], [d.get("hi", float("nan")) for d in dr])
    for x in xs:
        row: dict[str, Any] = {cfg.kind: x}
        for c in cfg.constraints:
            p = next(p for p in res["points"] if p["x"] == x and p["constraint"] == c)
            row["valid flips"] = p["n_valid_flips"]
            row[f"recovery {c}"] = S.cell(p["summary"], "recovered")
            row[f"drift {c}"] = S.cell(p["summary"], "drift_abs")
            csv_rows.append({cfg.kind: x, "constraint": c, "n_valid_flips": p["n_valid_flips"],
                             "n": p["summary"].get("n", 0),
                             **{k: (p["summary"].get(k) or {}).get("mean", (p["summary"].get(k) or {}).get("rate"))
                                for k in ("recovered", "drift_abs", "drift_rel", "react_frac", "zero_reactivation")},
                             "seconds": p["seconds"]})
        if cfg.kind == "budget" and cfg.setting == "unlearning" and int(x) in PAPER_BUDGET_WMDP:
            row["paper enc / none (WMDP 6 flips)"] = " / ".join(PAPER_BUDGET_WMDP[int(x)])
        if cfg.kind == "k" and cfg.setting == "refusal" and int(x) in PAPER_K_REFUSAL:
            row["paper (refusal, encoder)"] = PAPER_K_REFUSAL[int(x)]
        rows.append(row)
    report.line_plot(out / "recovery.png", xs, series_r, xlabel=label, ylabel="recovery rate (Wilson 95%)",
                     title=f"{cfg.setting}: recovery vs {cfg.kind}", errors=err_r, logx=cfg.kind == "budget")
    report.line_plot(out / "drift.png", xs, series_d, xlabel=label, ylabel="act drift L2 (bootstrap 95%)",
                     title=f"{cfg.setting}: drift vs {cfg.kind}", errors=err_d, logx=cfg.kind == "budget")
    smallest = smallest_budgets(res["points"], cfg.constraints) if cfg.kind == "budget" else []
    summary = {"config": dataclasses.asdict(cfg), "points": res["points"], "smallest_budget": smallest,
               "wall_seconds": time.time() - t0}
    notes = (f"At most {cfg.max_flips} valid flips per grid point; steps "
             f"{cfg.steps or 'experiment default'}; SAE `{', '.join(cfg.sae) or cfg.sae_release + ' (shipped)'}`. Rates: Wilson 95%; drift: "
             "bootstrap 95%. The valid-flip set is recomputed per K.\n")
    if smallest:
        notes += "\nSmallest budget at which each method recovers (grid points; relative size measured there):\n\n" + \
            report.markdown_table([{"method": r["constraint"], "recovers any flip": _smallest_cell(r["any"], cfg.relative),
                                    "recovers >= 90%": _smallest_cell(r["full"], cfg.relative)} for r in smallest])
    table = S.write_outputs(out, name="sweep", records=res["records"], summary=summary, table_rows=rows,
                            csv_rows=csv_rows, notes=notes, title=f"Sweep: {cfg.setting}, recovery vs {cfg.kind}")
    print(table)
    S.say(f"sweeps: wrote {out} in {time.time() - t0:.0f} s")
    return summary

