"""``jaxrecover run defences`` (jaxrecover.paper.defences): the whole sweep, every defence on refusal and
IOI, end to end on a tiny random model; bad input refused in one line, exit 2, before the model loads."""

import itertools
import json

import jax
import pytest

from jaxrecover.core.sites import Site
from jaxrecover.paper import defences as DS


@pytest.fixture(scope="module")
def tiny():
    from jaxrecover import testing
    from jaxrecover.data import datasets as D

    texts = [i.prompt for i in D.load_harmful() + D.load_harmless()] + ["!", "I'm sorry, I cannot help."]
    texts += [t for _, _, t in D.load_ioi_templates()]
    texts += list(D.load_ioi_names()) + list(D.load_ioi_places()) + list(D.load_ioi_objects())
    tok = testing.word_level_tokenizer(texts)
    cfg = testing.tiny_config("llama", d_vocab=tok.tokenizer.get_vocab_size(), n_ctx=512, n_layers=3)
    model = testing.random_transformer(jax.random.PRNGKey(0), cfg)
    a = testing.random_sae(cfg.d_model, 64, hook_name="blocks.1.hook_resid_post")
    b = testing.random_sae(cfg.d_model, 64, seed=1, hook_name="blocks.2.hook_resid_post")
    inputs = DS.Inputs(Site(1, "resid_post"), a, "tiny-a", {Site(2, "resid_post"): (b, "tiny-b")})
    return model, tok, inputs


def _config(out, settings, **kw):
    small = {"budgets": (0.1, 0.5), "refusal_k": 4, "ioi_k": 4, "refusal_ks": (8,), "ioi_ks": (8,), "curve_ks": (16,),
             "game_rounds": 2, "game_budget": 0.5, "game_threshold": 0.0, "game_max_new": 2, "refusal_prompts": 4,
             "refusal_flips": 2, "refusal_steps": 2, "refusal_new_tokens": 4, "refusal_answer_tokens": 3,
             "ioi_prompts": 6, "ioi_flips": 2, "ioi_steps": 2, "side_prompts": 3, "side_tokens": 3,
             "require_flip": False, "random_control": 1}
    return DS.Config(out=str(out), settings=settings, **(small | kw))


def test_one_defence_runs_through_the_driver(tiny, tmp_path):
    """The error-free splice on IOI, one attacker, one budget: the setting's plumbing end to end (< 60 s)."""
    model, tok, inputs = tiny
    cfg = _config(tmp_path / "d", ("ioi",), defences=("splice",), attackers=("none",), budgets=(0.5,),
                  random_control=0)
    summary = DS.run(cfg, model=model, tok=tok, inputs=inputs)
    (p,) = summary["points"]
    assert (p["defence"], p["attacker"], p["budget_rel"], p["n"]) == ("splice", "none", 0.5, 2)
    assert 0.0 <= p["side_effects"]["top1_agree"] <= 1.0 and summary["rows"][0]["smallest_50"] in (None, 0.5)
    for f in ("results.jsonl", "summary.json", "table.md", "defences.csv", "defences_ioi_none.png"):
        assert (tmp_path / "d" / f).is_file(), f


@pytest.mark.slow
def test_the_sweep_runs_every_defence_on_ioi(tiny, tmp_path):
    """Every defence, both attackers, two budgets, the game and the side-effect curve, on IOI (~3-6 min)."""
    model, tok, inputs = tiny
    _check(DS.run(_config(tmp_path / "defences", ("ioi",)), model=model, tok=tok, inputs=inputs), tmp_path / "defences",
           ("ioi",))


@pytest.mark.slow
def test_the_sweep_runs_every_defence_on_both_settings(tiny, tmp_path):
    """The same on refusal too (judged by regenerated answers; with over-refusal as a side effect): ~6 min."""
    model, tok, inputs = tiny
    _check(DS.run(_config(tmp_path / "defences", ("refusal", "ioi")), model=model, tok=tok, inputs=inputs),
           tmp_path / "defences", ("refusal", "ioi"))


def _check(summary, out, settings):
    for f in ("results.jsonl", "summary.json", "table.md", "defences.csv", *(f"defences_{s}_{a}.png" for s in settings
                                                                            for a in ("projected", "none"))):
        assert (out / f).is_file(), f
    pts = summary["points"]
    assert {p["setting"] for p in pts} == set(settings)
    for s in settings:
        defences = {p["defence"] for p in pts if p["setting"] == s}
        assert defences == {"clamp", "splice", "multi_layer", "dense", "game"}, (s, defences)
        for p in pts:  # every point: both budgets, n and a Wilson interval, side effects
            assert p["budget_rel"] in (0.1, 0.5) and p["n"] == 2 and 0 <= p["recovered"]["lo"] <= p["recovered"]["hi"] <= 1
            assert 0.0 <= p["side_effects"]["top1_agree"] <= 1.0 and p["side_effects"]["kl_mean"] >= -1e-6
        ml = [p for p in pts if p["setting"] == s and p["defence"] == "multi_layer"]
        assert {p["attacker"] for p in ml} == {"projected", "none"}
    assert all("harmless_refusal" in p["side_effects"] for p in pts if p["setting"] == "refusal")
    # the game: one per attacker and setting, ranks grow from 0, round 0 is the clamp itself
    assert len(summary["games"]) == 2 * len(settings)
    for g in summary["games"]:
        ranks = [r["basis_rank"] for r in g["rounds"]]
        assert ranks[0] == 0 and all(x < y for x, y in itertools.pairwise(ranks))
        assert all(r["side_effects"] for r in g["rounds"])
    # the side-effect curve covers the baseline K, the recovered K and the curve-only K
    assert {c["k"] for c in summary["curve"] if c["setting"] == "ioi"} == {4, 8, 16}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {"setting", "defence", "variant", "budget_rel", "recovered", "mode"} <= set(rows[0])
    for r in rows:  # a solved delta stays within the budget its point ran at
        p = next(p for p in pts if (p["setting"], p["defence"], p["variant"], p["attacker"], p["budget_rel"]) ==
                 (r["setting"], r["defence"], r["variant"], r["mode"], r["budget_rel"]))
        assert r["delta_norm"] <= p["budget"] * (1 + 1e-4) + 1e-6
    # projected attacker at one site is encoder-null: the clamped latents there do not move
    enc = [r for r in rows if r["mode"] == "projected" and r["defence"] in ("clamp", "splice", "dense")]
    assert enc and max(r["drift_rel"] for r in enc) < 1e-3
    assert summary["rows"] and summary["verdicts"]
    text = DS.report_section(json.loads((out / "summary.json").read_text()), out)
    assert "not within the grid" in text or ">= 50%" in text


def _cli(args, capsys, monkeypatch, out):
    from jaxrecover.cli import app
    from jaxrecover.experiment import common

    def no_model(*a, **k):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(common, "load_model", no_model)
    try:
        code = app.main(["run", "defences", "--out", str(out), *args])
    except SystemExit as e:  # a Config value: argparse prints its usage, then the one error line, exit 2
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("args, match", [
    (["--extra-layers", "40"], "has 30 layers"),
    (["--extra-sae", "sae_weights/gemma-3-270m-res/blocks.9.hook_resid_post"], "d_in"),
    (["--ioi-ks", "100000"], "K=100000"),
    (["--game-max-new", "0"], "empty"),
    (["--game-budget", "0.3"], "not in --budgets"),
])
def test_bad_input_is_one_line_exit_2_before_the_model_loads(args, match, capsys, monkeypatch, tmp_path):
    import os

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code, err = _cli(args, capsys, monkeypatch, tmp_path / "out")
    assert code == 2
    assert match in err[-1], err  # the message is the last line, one line
    if not err[0].startswith("usage"):  # a check after the Config: nothing but that line
        assert len(err) == 1, err
