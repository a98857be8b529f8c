"""Refusal sweeps (paper App. H/I): recovery and drift as the clamped feature set K or the budget grows.

Each point is one ``refusal`` run (same prompts, same model and SAEs; base answers cached in the
sweep folder) with one recovery method (default: the single-layer encoder projection, as in the
paper's K sweep). Valid flips are recomputed for each K. Writes ``sweep.json``, ``table.md``,
``sweep.csv`` and ``recovery.png`` / ``drift.png``.
"""

import dataclasses
import time
from dataclasses import field
from typing import Any

from jaxrecover.paper import common as C
from jaxrecover.paper import refusal
from jaxrecover import report


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(C.RunConfig):
    kind: str = field(default="k", metadata={"help": "k (feature-set size) | budget (relative budget)"})
    ks: tuple[int, ...] = field(default=(5, 10, 20, 40, 60), metadata={"help": "K values (paper 5..61)"})
    budget_rels: tuple[float, ...] = field(default=(0.0, 0.02, 0.05, 0.1, 0.25), metadata={"help": "budgets relative to ||h_def|| at the delta rows"})
    method: str = field(default="encoder", metadata={"help": "encoder | jacobian | none"})
    n_prompts: int = field(default=32, metadata={"help": "harmful prompts per point"})
    max_flips: int = field(default=6, metadata={"help": "flips recovered per point"})
    steps: int = field(default=20, metadata={"help": "optimisation steps"})

    def __post_init__(self) -> None:
        super().__post_init__()
        C.check_choice("kind", self.kind, ("k", "budget"))
        C.check_choice("method", self.method, ("encoder", "jacobian", "none"))
        for k in self.ks:
            C.check_range("ks", k, 1)
        for b in self.budget_rels:
            C.check_range("budget_rels", b, 0.0)


def main(cfg: Config) -> dict[str, Any]:
    t0 = time.time()
    out = C.out_dir(cfg.out, "refusal_sweep")
    model, tok = C.load_model(cfg.model_dir, cfg.dtype)
    saes = C.load_saes(cfg.sae, cfg.layers)
    base = refusal.Config(n_prompts=cfg.n_prompts, max_flips=cfg.max_flips, steps=cfg.steps, methods=(cfg.method,),
                          attribution=False, model_dir=cfg.model_dir, sae=cfg.sae, layers=cfg.layers, dtype=cfg.dtype)
    if cfg.kind == "k":
        points = [("K", k, dataclasses.replace(base, n_features=k)) for k in cfg.ks]
    elif cfg.kind == "budget":
        # budget_rel 0 would mean "use --budget"; a tiny positive budget stands for 0
        points = [("budget_rel", b, dataclasses.replace(base, budget_rel=max(b, 1e-9))) for b in cfg.budget_rels]
    else:
        raise SystemExit(f"--kind {cfg.kind!r}: expected k or budget.")
    rows = []
    for name, value, rc in points:
        C.say(f"sweep point {name}={value}")
        point_out = out / f"{name}_{value}"
        point_out.mkdir(parents=True, exist_ok=True)
        cache = out / "base_cache.json"
        if cache.exists():  # share base answers across points (same prompts and generation length)
            (point_out / "base_cache.json").write_text(cache.read_text())
        s = refusal.run(model, tok, saes, rc, point_out)
        if not cache.exists() and (point_out / "base_cache.json").exists():
            cache.write_text((point_out / "base_cache.json").read_text())
        m = s["methods"].get(cfg.method)
        rows.append({
            name: value, "strict_valid": s["strict_valid"], "recovered_on": s["recovered_on"],
            "non_refusal": m["non_refusal"]["cell"] if m else "--", "base_like": m["base_like"]["cell"] if m else "--",
            "non_refusal_rate": m["non_refusal"]["rate"] if m else None, "nr_lo": m["non_refusal"]["lo"] if m else None,
            "nr_hi": m["non_refusal"]["hi"] if m else None, "drift_rel": m["drift_rel"]["mean"] if m else None,
            "drift_lo": m["drift_rel"]["lo"] if m else None, "drift_hi": m["drift_rel"]["hi"] if m else None,
            "delta_rel": m["delta_rel"]["mean"] if m else None,
        })
    report.write_json(out / "sweep.json", {"config": dataclasses.asdict(cfg), "rows": rows, "wall_s": time.time() - t0})
    report.write_csv(out / "sweep.csv", rows)
    name = points[0][0]
    cols = [name, "strict_valid", "recovered_on", "non_refusal", "base_like", "drift_rel", "delta_rel"]
    report.write_markdown(out / "table.md", f"Refusal {cfg.kind} sweep ({cfg.method})", [
        ("Results (Wilson / bootstrap 95% CIs)", report.markdown_table(rows, cols)),
        ("Paper (App. I, K sweep, Gemma-2-2B-it, AdvBench)", "K=5: 16/17, K=10: 36/36, K=20: 42/45, K=40: 61/62, K=61: 64/64 non-refusal; drift 0.24-0.48 (absolute L2)\n"),
    ])
    ok = [r for r in rows if r["non_refusal_rate"] is not None]
    if ok:
        xs = [r[name] for r in ok]
        report.line_plot(out / "recovery.png", xs, {"non-refusal": [r["non_refusal_rate"] for r in ok]}, xlabel=name,
                         ylabel="rate", errors={"non-refusal": ([r["nr_lo"] for r in ok], [r["nr_hi"] for r in ok])})
        report.line_plot(out / "drift.png", xs, {"drift (rel)": [r["drift_rel"] for r in ok]}, xlabel=name,
                         ylabel="relative drift", errors={"drift (rel)": ([r["drift_lo"] for r in ok], [r["drift_hi"] for r in ok])})
    print((out / "table.md").read_text())
    return {"rows": rows}
