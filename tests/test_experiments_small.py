"""Smoke tests of the recovery experiments (ioi, unlearning, tpp, sweeps) on a tiny random model.

Each experiment's ``main`` runs end to end on a 2-layer random llama, a word-level tokenizer built
from the project's own data files, and a tiny random ReLU SAE at ``blocks.0.hook_resid_post``; the
test checks the output files and their fields. ``require_flip=False`` makes the experiments recover on
every candidate example, since a random model gives no guaranteed valid flips.
"""

import importlib
import json
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name):
    return importlib.import_module(f"jaxrecover.paper.{name}")


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, (site, sae, label)) shared by every test of this module."""
    from jaxrecover.data import datasets as D
    from jaxrecover import testing
    from jaxrecover.core.sites import Site

    texts = [t for _, _, t in D.load_ioi_templates()]
    texts += list(D.load_ioi_names()) + list(D.load_ioi_places()) + list(D.load_ioi_objects())
    for q in D.load_qa_bio() + D.load_qa_retain():
        texts.append(D.format_mcq(q.question, q.choices))
    texts += [b.text for b in D.load_tpp()] + ["!"]
    tok = testing.word_level_tokenizer(texts)
    cfg = testing.tiny_config("llama", d_vocab=tok.tokenizer.get_vocab_size(), n_ctx=512)
    model = testing.random_transformer(jax.random.PRNGKey(0), cfg)
    sae = testing.random_sae(cfg.d_model, 64, hook_name="blocks.0.hook_resid_post")
    return model, tok, (Site(0, "resid_post"), sae, "tiny-random")


@pytest.fixture
def patched(tiny, monkeypatch):
    model, tok, sae = tiny
    from jaxrecover.experiment import common as common
    from jaxrecover.experiment import suite as suite

    monkeypatch.setattr(common, "load_model", lambda *a, **k: (model, tok))
    monkeypatch.setattr(suite, "resolve_sae", lambda *a, **k: sae)
    # the compatibility checks read the model's config.json: here the model is the tiny one above
    from jaxrecover.io import compat as compat

    monkeypatch.setattr(compat, "model_facts", lambda *a, **k: compat.ModelFacts(
        "tiny-random", model.cfg.d_model, model.cfg.n_layers, (), None))
    return tiny


def _check(out: Path, name: str, mode_keys=("none", "encoder")):
    for f in ("results.jsonl", "summary.json", "table.md", f"{name}.csv", f"{name}.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows, "no per-example records"
    for key in ("recovered", "drift_abs", "decode_drift", "react_frac", "delta_norm", "mode", "zero_reactivation"):
        assert key in rows[0], key
    for m in mode_keys:
        assert m in summary["modes"], m
    for r in rows:
        if not r["mode"].startswith("replay"):  # replayed components are not clipped
            assert r["delta_norm"] <= summary["budget"] * (1 + 1e-4) + 1e-5
    return summary, rows


def test_ioi_small(patched, tmp_path, monkeypatch):
    ioi = _load("ioi")
    cfg = ioi.Config(out=str(tmp_path), n_prompts=6, n_features=8, steps=3, max_flips=3, suffix_len=2,
                     budget=2.0, require_flip=False)
    ioi.main(cfg)
    summary, rows = _check(tmp_path, "ioi", ("none", "encoder", "soft_suffix", "replay_clamped_feature"))
    assert summary["n_recovered_on"] == 3
    enc = [r for r in rows if r["mode"] == "encoder"]
    # the encoder-null delta leaves the clamped (relu) features' pre-activations unchanged
    assert max(r["drift_abs"] for r in enc) < 1e-3
    rc = summary["modes"]["encoder"]["random_control"]  # random deltas of the same norm, 3 seeds each
    assert rc["random"]["n"] == 3 * rc["n_recovered"]
    # a rerun reads every finished solve back from <out>/checkpoints: solving again is an error
    from jaxrecover.recover import batch as runner

    def no_solve(*a, **k):
        raise AssertionError("a resumed run must not solve again")

    monkeypatch.setattr(runner, "solve_batch", no_solve)
    ioi.main(cfg)
    _, rows2 = _check(tmp_path, "ioi")
    def same(r):  # wall time differs between the run and its resume
        return {k: v for k, v in r.items() if k != "seconds"}

    assert [same(r) for r in rows2] == [same(r) for r in rows]


@pytest.mark.slow
def test_ioi_shared_delta(patched, tmp_path):
    ioi = _load("ioi")
    cfg = ioi.Config(out=str(tmp_path), n_prompts=4, n_features=8, steps=2, max_flips=3, suffix=False,
                     attribution=False, shared_delta=True, require_flip=False)
    ioi.main(cfg)
    _, rows = _check(tmp_path, "ioi")
    none = [r for r in rows if r["mode"] == "none"]
    assert len({round(r["delta_norm"], 5) for r in none}) == 1  # one delta for every prompt


def test_unlearning_small(patched, tmp_path):
    unl = _load("unlearning")
    cfg = unl.Config(out=str(tmp_path), n_features=8, max_questions=2, min_correct=0, max_flips=3, steps=3,
                     attribution=False, require_flip=False)
    unl.main(cfg)
    summary, _ = _check(tmp_path, "unlearning")
    # the clamp's side effect: the retain orders the base model got right (2 questions x 24 orders at most),
    # re-asked under the clamp
    kept = summary["retain_kept"]
    assert 0 < kept["n"] <= 48 and 0 <= kept["k"] <= kept["n"]
    assert "retain answers still right under the clamp" in (tmp_path / "table.md").read_text()


def test_unlearning_clamp_grid_counts_flips_and_side_effect(patched, tmp_path):
    unl = _load("unlearning")
    prep = unl.prepare(unl.Config(out=str(tmp_path), max_questions=2, min_correct=0, steps=1))
    assert prep.cfg.multiplier == 200.0
    rows = unl.clamp_grid(prep, [4, 8], [0.0, 200.0])
    assert [(r["k"], r["multiplier"]) for r in rows] == [(4, 0.0), (8, 0.0), (4, 200.0), (8, 200.0)]
    for r in rows:
        assert sum(r["flips_per_question"].values()) == r["valid_flips"] <= len(prep.items)
        assert r["questions"] == len(r["flips_per_question"])
        assert r["retain_kept"]["n"] == len(prep.retain_items)
    # the grid's flips are the ones evaluate would recover on: the same clamp (prep's multiplier), the same forward
    ok, _ = unl.clamp_effect(prep, unl.make_clamp(prep, 8))
    assert rows[3]["valid_flips"] == int((~ok).sum()) != rows[1]["valid_flips"]


@pytest.mark.slow
def test_unlearning_answer_scoring(patched, tmp_path):
    unl = _load("unlearning")
    cfg = unl.Config(out=str(tmp_path), scoring="answer", n_features=8, max_questions=1, min_correct=0, max_flips=2,
                     steps=2, attribution=False, require_flip=False)
    unl.main(cfg)
    _check(tmp_path, "unlearning")


def test_tpp_small(patched, tmp_path):
    tpp = _load("tpp")
    cfg = tpp.Config(out=str(tmp_path), n_features=4, steps=3, probe_steps=20, max_flips=2,
                     require_flip=False)
    tpp.main(cfg)
    summary, _ = _check(tmp_path, "tpp")
    assert set(summary["per_class"]) == {"attorney", "chef", "nurse", "software_engineer", "teacher"}
    assert "target_mean" in summary["modes"]["encoder"]


def test_sweeps_small(patched, tmp_path):
    sweeps = _load("sweeps")
    sub = _load("ioi")
    cfg = sweeps.Config(setting="ioi", kind="budget", budgets=(0.0, 1.0), constraints=("encoder",), out=str(tmp_path),
                        max_flips=2, steps=2, n_prompts=4)
    prep = sub.prepare(sub.Config(n_prompts=4, n_features=8, steps=2, max_flips=2, suffix=False,
                                  attribution=False, require_flip=False))
    res = sweeps.run_sweep(cfg, sub, prep)
    assert len(res["points"]) == 2 and res["joint_budgets"]  # one solve over both budgets x the prompts
    zero = [p for p in res["points"] if p["x"] == 0.0]
    assert all(p["summary"]["delta_norm"]["mean"] == 0.0 for p in zero)
    # split back per grid point, the joint solve's records are the point-by-point sweep's (fp32: the
    # joint batch is twice as large, so XLA may sum in another order)
    apart = sweeps.run_sweep(dataclasses_replace(cfg, joint_budgets=False), sub, prep)
    assert not apart["joint_budgets"] and len(apart["records"]) == len(res["records"]) == 4
    for a, b in zip(res["records"], apart["records"], strict=True):
        assert (a["sweep_x"], a["prompt"], a["mode"], a["recovered"]) == (b["sweep_x"], b["prompt"], b["mode"], b["recovered"])
        for key in ("final_objective", "delta_norm", "drift_abs"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    with pytest.raises(ValueError, match="--setting 'nope'"):  # an unknown setting is refused, not skipped
        dataclasses_replace(cfg, setting="nope")


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)
