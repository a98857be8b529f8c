"""The refusal experiment end to end on a tiny random model (plumbing, files, resume)."""

import dataclasses
import json

import jax
import pytest

from jaxrecover.recover import batch as runner
from jaxrecover.experiment import driver as driver



@pytest.fixture(scope="module")
def tiny():
    from jaxrecover.data import datasets as D
    from jaxrecover import testing
    from jaxrecover.core.sites import Site

    texts = [i.prompt for i in D.load_harmful() + D.load_harmless()] + ["!", "I'm sorry, I cannot help."]
    tok = testing.word_level_tokenizer(texts)
    cfg = testing.tiny_config("llama", d_vocab=tok.tokenizer.get_vocab_size(), n_ctx=512, n_layers=3)
    model = testing.random_transformer(jax.random.PRNGKey(0), cfg)
    sae = testing.random_sae(cfg.d_model, 64, hook_name="blocks.1.hook_resid_post")
    return model, tok, {Site(1, "resid_post"): sae}


def test_refusal_runs_writes_results_and_resumes(tiny, tmp_path, monkeypatch):
    from jaxrecover.paper import refusal

    model, tok, saes = tiny
    cfg = refusal.Config(n_prompts=4, n_harmless=4, n_features=4, max_new_tokens=6, answer_tokens=4, max_flips=2,
                         steps=2, suffix_len=2, cross_layer_gap=1, require_flip=False, batch_size=4, topk_attr=4)
    out = tmp_path / "refusal"
    cfg = dataclasses.replace(cfg, out=str(out))
    summary = driver.run(refusal.SETTING, cfg, prepared=refusal.prepare(cfg, model, tok, saes))
    for f in ("results.jsonl", "summary.json", "table.md", "refusal.csv", "recovery.png"):
        assert (out / f).is_file(), f
    ms = {m: s for m, s in summary["modes"].items() if not m.startswith("replay:")}
    assert set(ms) == {"jacobian", "none_cross", "encoder", "none", "soft_suffix"}
    # like-for-like twins share a delta site; each method carries its random-direction control
    assert ms["jacobian"]["delta_site"] == ms["none_cross"]["delta_site"] != ms["encoder"]["delta_site"] == ms["none"]["delta_site"]
    for m in ("jacobian", "encoder", "none"):
        rc = ms[m]["random_control"]
        assert rc["random"]["n"] == rc["seeds"] * rc["n_recovered"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {"non_refusal", "base_like", "drift_rel", "delta_norm"} <= set(rows[0])
    assert all("text" not in r for r in rows)  # completions are not written by default
    # encoder-null delta leaves a ReLU SAE's clamped features unchanged at the delta site
    enc = [r for r in rows if r["mode"] == "encoder"]
    assert max(r["drift_rel"] for r in enc) < 1e-3
    # budget: ||delta|| never exceeds the configured budget
    for m, s in ms.items():
        assert all(r["delta_norm"] <= s["budget"] * (1 + 1e-4) for r in rows if r["mode"] == m)
    for r in rows:  # recovered is the judge's verdict (non-refusal of the regenerated answer)
        assert r["recovered"] == r["non_refusal"]
    assert {t["component"] for t in summary["attribution"]["table"]} >= {"residual", "clamped_features", "topk_knockout"}
    # a rerun resumes every method from <out>/checkpoints and reproduces the records: solving again is an error
    def no_solve(*a, **k):
        raise AssertionError("a resumed run must not solve again")

    monkeypatch.setattr(runner, "solve_batch", no_solve)
    prepared = refusal.prepare(cfg, model, tok, saes)
    # nor regenerate and re-judge: the judge's verdicts are kept in the store, keyed by the deltas
    monkeypatch.setattr(refusal.judges, "assess_recovery_quality",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("judged again")))
    again = driver.run(refusal.SETTING, cfg, prepared=prepared)
    assert list((out / "checkpoints" / "judge").glob("refusal-*.jsonl"))
    rows2 = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows2] == [drop(r) for r in rows]
    assert again["modes"]["encoder"]["non_refusal"] == summary["modes"]["encoder"]["non_refusal"]


def test_refusal_is_a_setting_the_sweeps_drive(tiny, tmp_path):
    from jaxrecover.paper import refusal, sweeps

    model, tok, saes = tiny
    cfg = refusal.Config(n_prompts=3, n_harmless=3, n_features=4, max_new_tokens=6, answer_tokens=3, max_flips=2,
                         steps=2, require_flip=False, batch_size=4, out=str(tmp_path / "r"))
    prep = refusal.prepare(cfg, model, tok, saes)
    swept = sweeps.run_sweep(sweeps.Config(setting="refusal", kind="k", ks=(2, 4), constraints=("none", "encoder")),
                             refusal, prep)
    assert [(p["x"], p["constraint"]) for p in swept["points"]] == [(2, "none"), (2, "encoder"), (4, "none"), (4, "encoder")]
    for p in swept["points"]:
        assert p["summary"]["recovered"]["n"] == 2  # every point judged its 2 examples
        assert p["summary"]["n"] == 2


def test_refusal_feature_stats_and_a_zero_flip_run_says_why(tiny, tmp_path, monkeypatch):
    from jaxrecover.paper import refusal

    model, tok, saes = tiny
    # x1 scale: the clamp is the identity and changes nothing. The random model's short gibberish can
    # still read as degenerate, which the clamp-side judge counts as a refusal, so the judge is told
    # that nothing flipped: this tests the 0-flip path, not the judge.
    monkeypatch.setattr(refusal.judges, "strict_valid", lambda base, clamped: False)
    cfg = refusal.Config(n_prompts=3, n_harmless=3, n_features=4, max_new_tokens=4, answer_tokens=3, max_flips=2,
                         steps=2, batch_size=4, feature_method="steering", clamp_mode="scale", clamp_value=1.0)
    out = tmp_path / "refusal"
    cfg = dataclasses.replace(cfg, out=str(out))
    summary = driver.run(refusal.SETTING, cfg, prepared=refusal.prepare(cfg, model, tok, saes))
    assert summary["strict_valid"] == 0 and summary["modes"] == {}
    (site, st), = summary["feature_stats"].items()
    assert st["mode"] == "scale" and len(st["features"]) == 4
    for text in refusal.STAT_TEXTS:
        assert len(st[text]["frac_active"]) == 4
        assert all(0.0 <= x <= 1.0 for x in st[text]["frac_active"])
        assert st[text]["clamp_change"] == 0.0 and st[text]["resid_norm"] > 0
    assert st["last_token"]["n_rows"] == 3
    saved = json.loads((out / "summary.json").read_text())
    assert saved["feature_stats"] == summary["feature_stats"]
    table = (out / "table.md").read_text()
    assert "No recovery: no strict-valid flips among 3 prompts" in table and "(no rows)" not in table
    assert "activation statistics" in table and summary["no_flips"] in table


@pytest.mark.slow  # ~2 min (a prepare and four solves); the driver's plumbing is tests/test_sweeps_config.py
def test_refusal_relative_budget_sweep_scales_each_methods_own_budget(tiny, tmp_path):
    from jaxrecover.paper import refusal, sweeps

    model, tok, saes = tiny
    cfg = refusal.Config(n_prompts=3, n_harmless=3, n_features=4, max_new_tokens=6, answer_tokens=3, max_flips=2,
                         steps=2, require_flip=False, batch_size=4, cross_layer_gap=1, out=str(tmp_path / "r"))
    prep = refusal.prepare(cfg, model, tok, saes)
    swept = sweeps.run_sweep(sweeps.Config(setting="refusal", kind="budget", budgets=(0.1, 0.4), relative=True,
                                           constraints=("none_cross", "encoder")), refusal, prep)
    assert not swept["joint_budgets"]
    budget = {(p["x"], p["constraint"]): p["summary"]["budget"] for p in swept["points"]}
    for c in ("none_cross", "encoder"):  # budget_rel x the defended norm at the method's own site
        assert budget[0.4, c] == pytest.approx(4 * budget[0.1, c], rel=1e-6)
    assert budget[0.1, "none_cross"] != pytest.approx(budget[0.1, "encoder"], rel=1e-3)  # layer 0 vs layer 1 norms
    by = {(r["sweep_x"], r["mode"]): r for r in swept["records"]}
    for (x, c), r in by.items():
        assert r["delta_norm"] <= budget[x, c] * (1 + 1e-4)
