"""Every setting at its defaults, then ONE report: ``REPORT.md`` with each setting's table next to the
paper's numbers, its plot, and a verdict per claim of the paper (reproduces / does not / cannot tell).

``jaxrecover run all`` runs ``refusal``, ``ioi``, ``unlearning`` and ``tpp`` into ``<out>/<setting>``
(a folder that already holds a finished ``summary.json`` is kept unless ``--rerun true``; each setting
resumes its own finished solves), then writes ``<out>/REPORT.md``. ``--report-only true`` only
(re)writes the report from the folders that exist.

Verdict rules: see ``RULES`` (printed in the report).
"""

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from jaxrecover.runtime import report as report
from jaxrecover.experiment import common as C

F_ = dataclasses.field
SETTINGS = ("refusal", "ioi", "unlearning", "tpp")
# reported when present: IOI with the TopK SAE (`run ioi --sae-release topk --n-features 128 --n-prompts 64
# --out <out>/ioi_topk`), refusal on an AdvBench-format CSV, the paper's refusal feature route and its closest variant that flips (commands
# in experiments/README.md)
# unlearning_k500_m50: the unlearning default before 2026-12-02 (60-question forget set, K=500, x50: 3 questions,
# but an unconstrained delta there moves the clamped features more often)
EXTRA = ("ioi_topk", "refusal_advbench_heldout", "refusal_steering_paper", "refusal_steering_variant",
         "unlearning_k500_m50")
# sweeps reported when present (`run sweeps --setting S --kind k|budget --out <out>/sweeps/S_kind`, commands
# in experiments/README.md)
SWEEPS = ("sweeps/refusal_k", "sweeps/refusal_k_steps90", "sweeps/refusal_budget", "sweeps/unlearning_k",
          "sweeps/unlearning_budget")
# the defence sweep's folder (`run defences --out <out>/defences`): its own "Defences" section, written
# by jaxrecover.paper.defences.report_section, not the generic per-folder section
DEFENCES = "defences"
# relative drift at or below this is 0 up to float32 rounding (the encoder-null property is exact in
# float64: tests/test_shipped.py measures 2e-13)
DRIFT_ZERO = 1e-5
RULES = (
    "A rate claim reproduces when our rate is at least 80% of the paper's and the lower end of our Wilson 95% "
    "interval is at least half the paper's rate; it does not when the upper end is below 80% of the paper's; "
    "otherwise it cannot be told (too few examples). An ordering claim (A below B) reproduces when A's "
    "bootstrap 95% interval lies below B's, does not when it lies above, and cannot be told when they overlap "
    "or one side was not run. 'size' rows compare sample sizes only."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    out: str = F_(default="", metadata={"help": "results root ('' = results/ in the current folder); each setting writes <out>/<setting>"})
    settings: tuple[str, ...] = F_(default=SETTINGS, metadata={"help": "settings to run, comma-separated"})
    rerun: bool = F_(default=False, metadata={"help": "rerun a setting whose folder already has a summary.json"})
    report_only: bool = F_(default=False, metadata={"help": "only (re)write REPORT.md from the existing folders"})

    def __post_init__(self) -> None:
        C.check_choice("settings", self.settings, SETTINGS)


# ----------------------------------------------------------------------------- verdicts


def _frac(cell: Any) -> tuple[int, int] | None:
    """``(k, n)`` from a rate dict or a 'k/n ...' cell."""
    if isinstance(cell, dict):
        return (cell["k"], cell["n"]) if "k" in cell else None
    m = re.match(r"\s*(\d+)/(\d+)", str(cell))
    return (int(m.group(1)), int(m.group(2))) if m else None


def rate_verdict(ours: dict | str | None, paper: float) -> str:
    """Ours vs the paper's rate (see the module docstring)."""
    from jaxrecover.recover.metrics import wilson_interval

    kn = _frac(ours) if ours is not None else None
    if not kn or not kn[1]:
        return "cannot tell (not run)"
    k, n = kn
    lo, hi = wilson_interval(k, n)
    if k / n >= 0.8 * paper and lo >= 0.5 * paper:
        return "reproduces"
    return "does not" if hi < 0.8 * paper else "cannot tell"


def order_verdict(low: dict | None, high: dict | None) -> str:
    """Whether ``low`` lies below ``high`` (bootstrap intervals, see the module docstring)."""
    if not low or not high or low.get("mean") is None or high.get("mean") is None:
        return "cannot tell (not run)"
    if low["hi"] < high["lo"]:
        return "reproduces"
    if low["lo"] > high["hi"]:
        return "does not"
    return "cannot tell (intervals overlap)"


def _paper_rate(text: str) -> float:
    k, n = _frac(text)
    return k / n


def _cell(x: Any) -> str:
    if isinstance(x, dict):
        return x.get("cell") or (f"{x['mean']:.3g} [{x['lo']:.3g}, {x['hi']:.3g}]" if x.get("mean") is not None else "--")
    return "--" if x is None else str(x)


def route_statistic(res: dict[str, Any]) -> str:
    """A refusal run's feature statistics in one phrase: how often its clamped features are active and
    how far its clamp moves the residual."""
    st = next(iter((res.get("feature_stats") or {}).values()), None)
    if not st:
        return "no feature statistics"
    p, last, c = st["prompt"], st["last_token"], st["compliance_text"]
    live = sum(x > 0 for x in p["frac_active"])
    value = f"x{st['values'][0]:g}" if st["mode"] == "scale" else f"{st['mode']} {min(st['values']):.3g}-{max(st['values']):.3g}"
    return (f"{live}/{len(st['features'])} clamped features ever active on the prompts, on "
            f"{100 * sum(p['frac_active']) / len(p['frac_active']):.1f}% of prompt positions on average; the {value} clamp "
            f"moves h by {p['clamp_change_rel']:.3f} ‖h‖ per prompt position, {last['clamp_change_rel']:.2f} ‖h‖ at "
            f"the last prompt token, {c['clamp_change_rel']:.3f} ‖h‖ on compliant answer text")


def claims(results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One row per claim of the paper that these settings test, with our number and a verdict."""
    from jaxrecover.paper import ioi, refusal, tpp, unlearning
    from jaxrecover.experiment import suite as S

    rows: list[dict[str, str]] = []

    def add(setting: str, claim: str, paper: str, ours: str, verdict: str) -> None:
        rows.append({"setting": setting, "claim": claim, "paper": paper, "ours": ours, "verdict": verdict})

    def ioi_drift(setting: str, claim: str, res: dict[str, Any]) -> None:  # encoder below none, paper's IOI numbers
        enc, none = (res["modes"].get(m, {}).get("drift_abs") for m in ("encoder", "none"))
        add(setting, claim, f"{ioi.PAPER['encoder']['drift_abs']} < {ioi.PAPER['none']['drift_abs']}",
            f"{_cell(enc)} vs {_cell(none)}", order_verdict(enc, none))

    def unlearning_drift(setting: str, res: dict[str, Any]) -> None:  # encoder below none, with the drifted counts
        enc, none = (res["modes"].get(m, {}) for m in ("encoder", "none"))
        add(setting, "encoder-null drift below unconstrained drift (abs L2, readout slot; flips with drift > 1e-3)",
            f"{unlearning.PAPER['encoder']['drift_abs']} < {unlearning.PAPER['none']['drift_abs']} "
            f"({unlearning.PAPER['encoder']['drift_gt_1e-3']} vs {unlearning.PAPER['none']['drift_gt_1e-3']})",
            f"{_cell(enc.get('drift_abs'))} vs {_cell(none.get('drift_abs'))} ({S.count_cell(enc, 'drift_gt_1e-3')} vs "
            f"{S.count_cell(none, 'drift_gt_1e-3')})", order_verdict(enc.get("drift_abs"), none.get("drift_abs")))

    r = results.get("refusal")
    if r:
        m = r.get("methods") or r["modes"]  # refusal results before the one driver: "methods"
        jac = m.get("jacobian", {})
        add("refusal", "Jacobian-projected recovery restores non-refusal on most strict-valid flips",
            refusal.PAPER["jacobian"]["nonref"], _cell(jac.get("non_refusal")),
            rate_verdict(jac.get("non_refusal"), _paper_rate(refusal.PAPER["jacobian"]["nonref"])))
        add("refusal", "the Jacobian projection keeps the clamped features closer than the same attack without it "
            "(relative drift, jacobian < none_cross)", f"{refusal.PAPER['jacobian']['drift']} < {refusal.PAPER['none_cross']['drift']}",
            f"{_cell(jac.get('drift_rel'))} vs {_cell(m.get('none_cross', {}).get('drift_rel'))}",
            order_verdict(jac.get("drift_rel"), m.get("none_cross", {}).get("drift_rel")))
        enc = m.get("encoder", {}).get("drift_rel")
        add("refusal", "single-layer encoder-null recovery leaves the clamped features unchanged (drift 0)", "0",
            _cell(enc), "cannot tell (not run)" if not enc else
            ("reproduces" if enc["hi"] <= DRIFT_ZERO else "does not (with a TopK SAE the projection fixes the "
                                                           "clamped pre-activations, not the top-k selection)"))
        table = {t["component"]: t for t in (r.get("attribution") or {}).get("table", [])}
        if table:
            cl, res_ = table.get("clamped_features", {}), table.get("residual", {})
            k, n = _frac(cl.get("non_refusal")) or (1, 1)
            add("refusal", "the clamped-feature part of delta alone does not recover (replay)", refusal.PAPER_REPLAY["clamped_features"],
                _cell(cl.get("non_refusal")), "reproduces" if k <= 0.1 * max(1, n) else "does not")
            add("refusal", "the SAE-residual part of delta alone recovers (replay)", refusal.PAPER_REPLAY["residual"],
                _cell(res_.get("non_refusal")), rate_verdict(res_.get("non_refusal"), _paper_rate(refusal.PAPER_REPLAY["residual"])))
    sp = results.get("refusal_steering_paper")
    if sp:
        add("refusal (paper's feature route)", "harmful-harmless steering features (top-cosine candidates, attribution "
            "ranking) with the x3 scale clamp make the model refuse: strict-valid flips", "24 (AdvBench, 520 prompts)",
            f"{sp['strict_valid']}/{sp['n_prompts']}, because {route_statistic(sp)}",
            "does not (this model)" if not sp["strict_valid"] else "size")
    sv = results.get("refusal_steering_variant")
    if sv:
        c = sv["config"]
        svm = sv.get("methods") or sv["modes"]
        jac = svm.get("jacobian", {})
        add(f"refusal (steering route, {c['clamp_mode']} {c['clamp_value']:g})", "closest variant of the paper's route "
            "that flips: Jacobian-projected recovery restores non-refusal on its strict-valid flips",
            refusal.PAPER["jacobian"]["nonref"],
            f"{sv['strict_valid']}/{sv['n_prompts']} flips ({route_statistic(sv)}); jacobian {_cell(jac.get('non_refusal'))}, "
            f"none_cross {_cell(svm.get('none_cross', {}).get('non_refusal'))}",
            rate_verdict(jac.get("non_refusal"), _paper_rate(refusal.PAPER["jacobian"]["nonref"])))
    i = results.get("ioi")
    if i:
        for mode in ("none", "encoder"):
            s = i["modes"].get(mode, {})
            add("ioi", f"{mode}: recovery of the name-mover preference (logit diff > 0)", ioi.PAPER[mode]["recovered"],
                _cell(s.get("recovered")), rate_verdict(s.get("recovered"), _paper_rate(ioi.PAPER[mode]["recovered"])))
        ioi_drift("ioi", "encoder-null drift below unconstrained drift (abs L2)", i)
        add("ioi", "valid flips (clean > 0, clamped <= 0)", ioi.PAPER["valid_flips"],
            f"{i.get('n_valid_flips')}/{i.get('n_prompts')}; recovered on {i.get('n_recovered_on')}", "size")
    it = results.get("ioi_topk")
    if it:
        ioi_drift("ioi (TopK SAE)", "encoder-null drift below unconstrained drift (abs L2); with a TopK SAE the -5 "
                  "clamp pushes the clamped latents below the top-k cut, so both read 0", it)
    u = results.get("unlearning")
    if u:
        for mode in ("encoder", "none"):
            s = u["modes"].get(mode, {})
            add("unlearning", f"{mode}: recovery of the unlearned answer", unlearning.PAPER[mode]["recovered"],
                _cell(s.get("recovered")), rate_verdict(s.get("recovered"), _paper_rate(unlearning.PAPER[mode]["recovered"])))
        unlearning_drift("unlearning", u)
        rk = u.get("retain_kept")
        if rk:
            add("unlearning", "the clamp is selective: retain answers (right under all 24 orders) stay right",
                unlearning.PAPER["retain_kept"], rk["cell"], "reproduces" if rk["rate"] >= 0.99 else "does not")
        add("unlearning", "valid flips / distinct questions", unlearning.PAPER["valid_flips"],
            f"{u.get('n_valid_flips')} ({sum(1 for v in (u.get('flips_per_question') or {}).values() if v)} questions); "
            f"recovered on {u.get('n_recovered_on')}", "size")
    u0 = results.get("unlearning_k500_m50")
    if u0:
        unlearning_drift("unlearning (K=500, x50, 60 questions)", u0)
    t = results.get("tpp")
    if t:
        for mode in ("encoder", "none"):
            tm = t["modes"].get(mode, {}).get("target_mean", {})
            for key, label in (("recovered", "recovery"), ("zero_reactivation", "zero-reactivation recovery")):
                ours, paper = tm.get(key), tpp.PAPER[mode][key]
                verdict = "cannot tell (not run)" if ours is None else ("reproduces" if ours >= 0.8 * paper else "does not")
                add("tpp", f"{mode}: {label} (target mean over classes)", f"{paper:.3f}",
                    "--" if ours is None else f"{ours:.3f}", verdict)
    return rows


def sweep_claims(sweeps: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The sweeps' rows of the claims table: the paper's K-sweep claim (refusal, encoder recovery stays
    high for K = 5-20) and, per budget sweep, the smallest budget at which each method recovers."""
    from jaxrecover.paper import sweeps as SW

    rows = []
    k = sweeps.get("sweeps/refusal_k")
    if k:
        pts = [p for p in k["points"] if p["constraint"] == "encoder" and 5 <= p["x"] <= 20]
        verdicts = [rate_verdict(p["summary"].get("recovered"), _paper_rate(SW.PAPER_K_REFUSAL[p["x"]]))
                    for p in pts if p["x"] in SW.PAPER_K_REFUSAL]
        ours = "; ".join(f"K={p['x']}: {_cell(p['summary'].get('recovered'))}" for p in pts)
        verdict = ("cannot tell (not run)" if not verdicts else "does not" if "does not" in verdicts else
                   "reproduces" if all(v == "reproduces" for v in verdicts) else "cannot tell")
        rows.append({"setting": "refusal (K sweep)", "claim": "encoder-projected recovery stays high for K = 5-20",
                     "paper": "93.3-100% (" + ", ".join(f"K={x}: {v}" for x, v in SW.PAPER_K_REFUSAL.items() if x <= 20) + ")",
                     "ours": ours or "--", "verdict": verdict})
    # paper's smallest budgets (App. H WMDP, 6 flips; the authors' AdvBench Jacobian sweep, code only, absolute
    # norms on Gemma-2-2B)
    paper = {("unlearning", "encoder"): "5 (4/6) / 10 (6/6)", ("unlearning", "none"): "5 (4/6) / 10 (6/6)",
             ("refusal", "jacobian"): "abs. 5 (4/24) / 20 (22/24), code only"}
    for name, res in sweeps.items():
        relative = res["config"].get("relative", False)
        for r in res.get("smallest_budget") or []:
            rows.append({"setting": f"{res['config']['setting']} (budget sweep)",
                         "claim": f"{r['constraint']}: smallest budget that recovers any flip / >= 90% of them",
                         "paper": paper.get((res["config"]["setting"], r["constraint"]), "--"), "ours": f"{SW._smallest_cell(r['any'], relative)} / {SW._smallest_cell(r['full'], relative)}",
                         "verdict": "size"})
    return rows


def controls(results: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """The random-direction control of every method that has one."""
    rows = []
    for name, res in results.items():
        modes = res.get("methods") or res.get("modes") or {}
        for mode, s in modes.items():
            rc = s.get("random_control") if isinstance(s, dict) else None
            if rc:
                rows.append({"setting": name, "method": mode, "recovered deltas": str(rc["n_recovered"]),
                             "seeds": str(rc["seeds"]), "random direction, same norm (replayed)": _cell(rc["random"])})
    return rows


# ----------------------------------------------------------------------------- report


def write_report(root: Path) -> Path:
    """``root/REPORT.md`` from the settings' folders under ``root``."""
    known = SETTINGS + EXTRA  # in this order; then any other setting's folder (a new setting needs no edit here)
    others = tuple(sorted(p.parent.name for p in root.glob("*/summary.json") if p.parent.name not in (*known, DEFENCES)
                          and '"setting":' in p.read_text()))  # written by the one driver
    results = {n: json.loads((root / n / "summary.json").read_text()) for n in known + others
               if (root / n / "summary.json").is_file()}
    if not results:
        raise SystemExit(f"{root}: no setting folder with a summary.json; run `jaxrecover run all` first.")
    sweeps = {n: json.loads((root / n / "summary.json").read_text()) for n in SWEEPS if (root / n / "summary.json").is_file()}
    ctl = controls(results)
    sections = [
        ("What this is", "Every setting of the paper run on the embedded default (SmolLM2-135M-Instruct with the "
                         "project's SAEs), each next to the paper's numbers (Gemma-2-2B / Gemma Scope). Rates: Wilson "
                         "95%; means: bootstrap 95%. " + RULES + "\n"),
        ("Claims", report.markdown_table(claims(results) + sweep_claims(sweeps))),
        ("Random-direction control", report.markdown_table(ctl) if ctl else "(not run)\n"),
    ]
    for name, res in {**results, **sweeps}.items():
        cfg = res.get("config", {})
        changed = {k: v for k, v in cfg.items() if k not in ("out", "model_dir", "sae")}
        body = (root / name / "table.md").read_text() if (root / name / "table.md").is_file() else ""
        body = body.split("\n", 1)[1] if body.startswith("# ") else body  # drop its title
        pngs = sorted(p.name for p in (root / name).glob("*.png"))
        body = body.replace("\n## ", "\n#### ") + "".join(f"\n![{name} {p}]({name}/{p})\n" for p in pngs)
        wall = res.get("wall_s", res.get("wall_seconds"))
        sections.append((f"{name}", f"Settings: `{json.dumps(changed, default=str)}`; wall {wall or 0:.0f} s.\n\n{body}"))
    if (root / DEFENCES / "summary.json").is_file():
        from jaxrecover.paper import defences

        summary = json.loads((root / DEFENCES / "summary.json").read_text())
        sections.append(("Defences", defences.report_section(summary, root / DEFENCES, DEFENCES)))
    out = root / "REPORT.md"
    report.write_markdown(out, "jaxrecover: the paper's findings on the embedded default", sections)
    return out


def main(cfg: Config) -> dict[str, Any]:
    from jaxrecover.paper import load

    root = C.out_dir(cfg.out or "results", "")
    t0 = time.time()
    if not cfg.report_only:
        for name in cfg.settings:
            folder = root / name
            if (folder / "summary.json").is_file() and not cfg.rerun:
                C.say(f"all: {name}: {folder}/summary.json exists; kept (--rerun true to run it again)")
                continue
            mod = load(name)
            C.say(f"all: running {name} into {folder}")
            mod.main(mod.Config(out=str(folder)))
    path = write_report(root)
    C.say(f"all: wrote {path} in {time.time() - t0:.0f} s")
    return {"report": str(path)}
