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
    from jaxrecover import report

    header, rule, row = report.markdown_table([{"||delta||": 3.0, "method": "a|b"}]).splitlines()
    # an unescaped "|" would split a cell: every line has exactly the 2 columns' 3 separators
    assert [line.replace("\\|", "").count("|") for line in (header, rule, row)] == [3, 3, 3]
