"""`jaxrecover run all --report-only`: one REPORT.md from the settings' folders, a verdict per claim."""

import shutil
from pathlib import Path

from jaxrecover.paper import all as A

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def test_verdict_rules():
    assert A.rate_verdict({"k": 23, "n": 24}, 23 / 24) == "reproduces"
    assert A.rate_verdict("1/24 (4.2% ...)", 23 / 24) == "does not"
    assert A.rate_verdict({"k": 1, "n": 2}, 1.0) == "cannot tell"  # 2 examples cannot rule it out
    assert A.rate_verdict(None, 0.5).startswith("cannot tell")
    lo, hi = {"mean": 0.1, "lo": 0.08, "hi": 0.12}, {"mean": 0.2, "lo": 0.15, "hi": 0.25}
    assert A.order_verdict(lo, hi) == "reproduces"
    assert A.order_verdict(hi, lo) == "does not"
    assert A.order_verdict(lo, {"mean": 0.11, "lo": 0.09, "hi": 0.13}).startswith("cannot tell")


def test_report_from_committed_results(tmp_path):
    for name in A.SETTINGS:
        if (RESULTS / name / "summary.json").is_file():
            shutil.copytree(RESULTS / name, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
    out = A.main(A.Config(out=str(tmp_path), report_only=True))
    text = Path(out["report"]).read_text()
    assert "## Claims" in text and "## refusal" in text
    rows = A.claims({n: __import__("json").loads((tmp_path / n / "summary.json").read_text())
                     for n in A.SETTINGS if (tmp_path / n / "summary.json").is_file()})
    assert rows and all(r["verdict"].split(" ")[0] in ("reproduces", "does", "cannot", "size") for r in rows)
    assert any(r["setting"] == "refusal" for r in rows)


def test_markdown_cells_keep_their_columns():
    from jaxrecover.runtime import report as report

    header, rule, row = report.markdown_table([{"||delta||": 3.0, "method": "a|b"}]).splitlines()
    # an unescaped "|" would split a cell: every line has exactly the 2 columns' 3 separators
    assert [line.replace("\\|", "").count("|") for line in (header, rule, row)] == [3, 3, 3]


def _sweep(setting, kind, points, relative=False):
    from jaxrecover.paper import sweeps

    pts = [{"x": x, "constraint": c, "summary": {"recovered": {"k": k, "n": n, "rate": k / n, "cell": f"{k}/{n}"}}}
           for x, c, k, n in points]
    return {"config": {"setting": setting, "kind": kind, "relative": relative}, "points": pts,
            "smallest_budget": sweeps.smallest_budgets(pts, tuple(dict.fromkeys(p["constraint"] for p in pts)))
            if kind == "budget" else []}


def test_sweep_claims_judge_the_k_range_and_name_the_smallest_budget():
    good = _sweep("refusal", "k", [(5, "encoder", 24, 24), (10, "encoder", 24, 24), (20, "encoder", 23, 24),
                                   (40, "encoder", 3, 24), (5, "none", 0, 24)])
    (row,) = A.sweep_claims({"sweeps/refusal_k": good})
    assert row["verdict"] == "reproduces" and "K=40" not in row["ours"]  # only K = 5-20 is the paper's claim
    bad = _sweep("refusal", "k", [(5, "encoder", 24, 24), (20, "encoder", 2, 24)])
    assert A.sweep_claims({"sweeps/refusal_k": bad})[0]["verdict"] == "does not"
    budget = _sweep("refusal", "budget", [(0.05, "jacobian", 0, 12), (0.1, "jacobian", 5, 12), (0.2, "jacobian", 12, 12),
                                          (0.05, "none", 0, 12), (0.2, "none", 0, 12)], relative=True)
    rows = A.sweep_claims({"sweeps/refusal_budget": budget})
    assert [r["verdict"] for r in rows] == ["size", "size"]
    assert rows[0]["ours"].startswith("budget_rel 0.1 (5/12") and "budget_rel 0.2 (12/12" in rows[0]["ours"]
    assert rows[1]["ours"] == "not within the grid / not within the grid"


def test_report_includes_a_sweep_folder(tmp_path):
    import json

    shutil.copytree(RESULTS / "tpp", tmp_path / "tpp", ignore=shutil.ignore_patterns("checkpoints"))
    folder = tmp_path / "sweeps" / "refusal_budget"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(_sweep("refusal", "budget", [(0.1, "encoder", 3, 4)], relative=True)))
    (folder / "table.md").write_text("# Sweep\n\n## Results\n\n| a |\n|---|\n| 1 |\n")
    text = Path(A.main(A.Config(out=str(tmp_path), report_only=True))["report"]).read_text()
    assert "## sweeps/refusal_budget" in text and "budget_rel 0.1 (3/4" in text
