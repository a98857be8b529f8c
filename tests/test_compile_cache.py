"""The persistent compilation cache: the env var's values, an unusable folder, entries written and re-used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrecover.cli import app as cli
from jaxrecover.runtime import compile_cache as compile_cache

DEFAULT = Path("/default/xla")

# a program that compiles in well over MIN_COMPILE_TIME_S on any CPU (~0.5 s here), so it is written
_PROGRAM = """
import sys
from jaxrecover.runtime import compile_cache as compile_cache
print("FOLDER", compile_cache.enable())
import jax, jax.numpy as jnp

def f(x):
    for i in range(3):
        x = jnp.tanh(x @ x.T * (1.0 / (i + 1))) + x
    return x

print("SUM", float(jax.jit(f)(jnp.ones((16, 16))).sum()))
"""


@pytest.mark.parametrize("value", [None, "", "1", "on", "ON", " default "])
def test_resolve_default(value):
    assert compile_cache.resolve(value, DEFAULT) == DEFAULT


@pytest.mark.parametrize("value", ["0", "off", "OFF", "none", "false", "no"])
def test_resolve_off(value):
    assert compile_cache.resolve(value, DEFAULT) is None


def test_resolve_path(tmp_path):
    assert compile_cache.resolve(str(tmp_path / "x"), DEFAULT) == tmp_path / "x"
    assert compile_cache.resolve("~/somewhere", DEFAULT) == Path.home() / "somewhere"


def test_default_dir_is_under_the_jaxrecover_cache_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRECOVER_CACHE", str(tmp_path))
    d = compile_cache.default_dir()
    assert d.parent == tmp_path / "xla" and d.name == compile_cache.cpu_tag() and d.name.startswith("cpu-")
    assert compile_cache.default_dir("xla-tests").parent == tmp_path / "xla-tests"


def test_unwritable_folder_is_one_warning_line_and_no_cache(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert compile_cache.enable(blocker / "xla") is None  # a file where a folder must go
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compilation cache off" in err and str(blocker / "xla") in err
    assert compile_cache.enable("off") is None


def test_cli_accepts_no_compile_cache(capsys):
    assert cli.main(["--no-compile-cache", "list"]) == 0
    assert "refusal" in capsys.readouterr().out


def _run(env_value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, compile_cache.ENV: env_value, "JAX_LOG_COMPILES": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, timeout=120)


def test_entries_are_written_then_reused(tmp_path):
    folder = tmp_path / "cc"
    first = _run(str(folder))
    assert first.returncode == 0, first.stderr
    assert f"FOLDER {folder}" in first.stdout
    entries = sorted(p.name for p in folder.glob("jit_f-*-cache"))
    assert len(entries) == 1, sorted(os.listdir(folder))
    assert "Persistent compilation cache hit for 'jit_f'" not in first.stderr

    second = _run(str(folder))
    assert second.returncode == 0, second.stderr
    assert "Persistent compilation cache hit for 'jit_f'" in second.stderr
    assert sorted(p.name for p in folder.glob("jit_f-*-cache")) == entries  # re-used, not rewritten
    assert first.stdout.split("SUM")[1] == second.stdout.split("SUM")[1]

    off = _run("off")
    assert off.returncode == 0 and "FOLDER None" in off.stdout
    assert "Persistent compilation cache hit" not in off.stderr
