"""Wrong inputs to a run fail with a clear message before any expensive stage (issue 11), and a resume
never reuses results made with another SAE."""

import os

import jax
import numpy as np
import pytest

from jaxrecover.data import datasets as datasets
from jaxrecover.experiment import common as C
from jaxrecover.paper import refusal
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_transformer, tiny_config


def _no_model(*a, **k):
    raise AssertionError("the model must not be loaded for a wrong input")


def test_header_only_csv_names_the_file(tmp_path):
    f = tmp_path / "advbench.csv"
    f.write_text("goal,target\n", encoding="utf-8")
    with pytest.raises(datasets.DatasetError, match="advbench.csv.*no data rows"):
        datasets.load_advbench_csv(f)


def test_non_utf8_csv_names_the_file(tmp_path):
    f = tmp_path / "latin1.csv"
    f.write_bytes("goal,target\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(datasets.DatasetError, match="latin1.csv.*not UTF-8"):
        datasets.load_advbench_csv(f)


def test_bad_dataset_fails_before_the_model_loads(tmp_path, monkeypatch):
    f = tmp_path / "empty.csv"
    f.write_text("goal,target\n", encoding="utf-8")
    monkeypatch.setattr(C, "load_model", _no_model)
    with pytest.raises(SystemExit, match="--dataset.*no data rows"):
        refusal.main(refusal.Config(dataset=f"advbench:{f}", out=str(tmp_path / "out")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_read_only_out_fails_before_the_model_loads(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setattr(C, "load_model", _no_model)
    with pytest.raises(SystemExit, match="cannot write"):
        refusal.main(refusal.Config(out=str(ro)))


def test_unwritable_out_fails_before_the_model_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(C, "load_model", _no_model)
    with pytest.raises(SystemExit, match="cannot create"):
        refusal.main(refusal.Config(out=str(blocker / "sub")))  # a file where a folder must go


def test_more_features_than_the_sae_has_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "load_model", _no_model)
    with pytest.raises(SystemExit, match="--n-features 99999"):
        refusal.main(refusal.Config(n_features=99999, out=str(tmp_path / "out")))


def test_hook_outside_the_model_is_an_error_not_ignored():
    from jaxrecover.model.transformer import forward

    model = random_transformer(jax.random.key(0), tiny_config("llama"))
    with pytest.raises(ValueError, match="outside the model"):
        forward(model, jax.numpy.arange(4), {Site(99): lambda x, s: x})


def test_resume_does_not_reuse_results_made_with_another_sae(tmp_path, monkeypatch):
    from jaxrecover.data import datasets as D
    from jaxrecover import testing

    texts = [i.prompt for i in D.load_harmful() + D.load_harmless()] + ["!"]
    tok = testing.word_level_tokenizer(texts)
    cfg_m = testing.tiny_config("llama", d_vocab=tok.tokenizer.get_vocab_size(), n_ctx=512, n_layers=2)
    model = testing.random_transformer(jax.random.PRNGKey(0), cfg_m)
    sae = testing.random_sae(cfg_m.d_model, 32, hook_name="blocks.0.hook_resid_post")
    cfg = refusal.Config(n_prompts=2, n_harmless=2, n_features=2, max_new_tokens=5, answer_tokens=2, max_flips=2,
                         steps=1, methods=("encoder",), attribution=False, require_flip=False, batch_size=2)
    calls = []
    from jaxrecover.recover import batch as runner

    real = runner.solve_batch  # every solve of the driver goes through it
    monkeypatch.setattr(runner, "solve_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    refusal.run(model, tok, {Site(0, "resid_post"): sae}, cfg, out)
    refusal.run(model, tok, {Site(0, "resid_post"): sae}, cfg, out)
    assert len(calls) == 1  # same contents: resumed
    other = jax.tree.map(lambda a: a * 1.5 if a.ndim == 2 else a, sae)  # same path, same shapes, other weights
    refusal.run(model, tok, {Site(0, "resid_post"): other}, cfg, out)
    assert len(calls) == 2  # swapped SAE: recomputed, never mixed
