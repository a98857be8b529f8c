"""A built wheel carries the experiments and the shipped SAEs, and runs an experiment from an
unrelated folder (no source checkout on the path)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
from pathlib import Path
import jax
import jaxrecover
from jaxrecover import testing
from jaxrecover.cli import app as cli
from jaxrecover.data import datasets as D
from jaxrecover.paper import refusal
from jaxrecover.core.sites import Site

target = Path(sys.argv[1]).resolve()
assert Path(jaxrecover.__file__).resolve().is_relative_to(target), jaxrecover.__file__
sae_dir = jaxrecover.shipped_sae(9)
assert sae_dir.resolve().is_relative_to(target), sae_dir
assert jaxrecover.load_sae(sae_dir).d_sae == 4608
assert cli.main(["list"]) == 0

texts = [i.prompt for i in D.load_harmful() + D.load_harmless()] + ["!", "I'm sorry, I cannot help."]
tok = testing.word_level_tokenizer(texts)
cfg = testing.tiny_config("llama", d_vocab=tok.tokenizer.get_vocab_size(), n_ctx=512, n_layers=2)
model = testing.random_transformer(jax.random.PRNGKey(0), cfg)
saes = {Site(0, "resid_post"): testing.random_sae(cfg.d_model, 32, hook_name="blocks.0.hook_resid_post")}
rc = refusal.Config(n_prompts=2, n_harmless=2, n_features=2, max_new_tokens=5, answer_tokens=2, max_flips=2,
                    steps=1, methods=("encoder",), attribution=False, require_flip=False, batch_size=2)
summary = refusal.run(model, tok, saes, rc, Path("out"))
assert Path("out/table.md").is_file() and summary["recovered_on"] == 2
print("WHEEL_OK")
"""


@pytest.fixture(scope="module")
def wheel_target(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("jaxrecover-*.whl")
    target = tmp_path_factory.mktemp("site")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return target


def test_wheel_runs_an_experiment_from_an_unrelated_folder(wheel_target, tmp_path):
    assert (wheel_target / "jaxrecover" / "paper" / "refusal.py").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXRECOVER_SAE_WEIGHTS")}
    env["PYTHONPATH"] = str(wheel_target)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(wheel_target)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "WHEEL_OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


def test_cli_refuses_a_bad_value_before_loading_anything(wheel_target, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(wheel_target)
    for flags, needle in ((["--steps", "-5"], "--steps"), (["--attribution", "ture"], "true or false"),
                          (["--decode-delta", "foo"], "--decode-delta"), (["--budget", "-1"], "--budget"),
                          (["--lr", "nan"], "--lr"), (["--n-prompts", "0"], "--n-prompts")):
        run = subprocess.run([sys.executable, "-m", "jaxrecover.cli.app", "run", "refusal", *flags], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0, flags
        assert needle in run.stderr and "Traceback" not in run.stderr, (flags, run.stderr[-1500:])
        assert not (tmp_path / "results").exists()  # nothing written, nothing loaded
