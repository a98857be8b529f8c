"""How the unlearning defaults were chosen: valid flips, the strict questions they come from, and the
retain answers the clamp keeps (its side effect), for a grid of feature counts K and multipliers.
Writes GRID.md and grid.json into --out.

    .venv/bin/python experiments/unlearning_clamp_grid.py --out experiments/results/unlearning

The paper's rule for a good setting: >= 6 questions contributing flips; SAEBench's rule for a usable
clamp: side-effect (retain) accuracy >= 0.99. Same data and SAE as ``jaxrecover run unlearning``.
"""

import argparse
import json
from pathlib import Path

from jaxrecover.runtime import report as report
from jaxrecover.paper import unlearning as U


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/unlearning")
    ap.add_argument("--ks", default="50,100,200,300,400", help="feature counts K (comma list)")
    ap.add_argument("--multipliers", default="50,200,1000", help="clamp values: active features -> -m (comma list)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = U.prepare(U.Config(out=str(out)))
    rows = U.clamp_grid(prep, [int(k) for k in args.ks.split(",")], [float(m) for m in args.multipliers.split(",")])
    (out / "grid.json").write_text(json.dumps(rows, indent=1))
    table = [{"K": r["k"], "multiplier": r["multiplier"], "valid flips": r["valid_flips"],
              "questions with flips": f"{r['questions']} of {len(prep.kept)}",
              "retain answers kept": r["retain_kept"]["cell"] if r["retain_kept"] else "--",
              "flips per question": ", ".join(f"{q} {n}" for q, n in r["flips_per_question"].items())} for r in rows]
    report.write_markdown(out / "GRID.md", "Unlearning: flips and side effect per clamp", [
        ("Grid", report.markdown_table(table)),
        ("Notes", f"Strict forget questions: {len(prep.kept)}; retain orders re-asked: {len(prep.retain_items)} "
                  f"(retain questions right under all 24 orders). Command: `{' '.join(['python', *__import__('sys').argv])}`.\n")])
    print((out / "GRID.md").read_text())


if __name__ == "__main__":
    main()
