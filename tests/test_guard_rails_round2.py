"""Guard rails, round 2 (issue 22): a user who brings their own model and SAE gets one line and exit
code 2 BEFORE the model loads, for every incompatibility (``jaxrecover.io.compat``)."""

import json

import pytest

from jaxrecover.cli import app as cli
from jaxrecover.io import compat as compat
from jaxrecover.io.hf import to_hf_config
from jaxrecover.experiment import common as C
from jaxrecover.sae.files import load_sae, save_sae
from jaxrecover.testing import random_sae, tiny_config


def _no_model(*a, **k):
    raise AssertionError("the model must not be loaded for a wrong input")


def _model_folder(path, *, d_model=576, n_layers=30, tokenizer=True, chat=True, name=""):
    """A model folder holding only what the checks read: config.json (+ tokenizer files)."""
    path.mkdir(parents=True)
    hf = to_hf_config(tiny_config("llama", d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_head=16))
    if name:
        hf["_name_or_path"] = name
    (path / "config.json").write_text(json.dumps(hf))
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"} if chat else {}))
    return path


def _run(argv, capsys):
    """``jaxrecover ARGV`` in-process: (exit code, stderr)."""
    code = cli.main(["--no-compile-cache", *argv])
    return code, capsys.readouterr().err


def _one_line(err):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]  # '[hh:mm:ss] stage'
    assert len(lines) == 1, err
    return lines[0]


# ---- the case of the issue: a 640-wide model, no --sae (the shipped 576-wide SAE is picked)


@pytest.mark.parametrize("setting", ["ioi", "refusal", "unlearning"])
def test_wide_model_without_sae_is_one_line_exit_2_before_the_model_loads(tmp_path, monkeypatch, capsys, setting):
    # before: the model loaded, then a raw JAX TypeError (dot_general (640,) vs (576,)), exit 1
    model = _model_folder(tmp_path / "gemma-like", d_model=640, n_layers=18)
    monkeypatch.setattr(C, "load_model", _no_model)
    code, err = _run(["run", setting, "--model-dir", str(model), "--out", str(tmp_path / "out")], capsys)
    line = _one_line(err)
    assert code == 2
    assert "d_in=576" in line and "d_model=640" in line and str(model) in line and "--sae" in line
    assert "shipped" in line  # says why a 576-wide SAE was used at all


def test_sae_of_another_width_names_both_numbers(tmp_path, monkeypatch, capsys):
    sae = save_sae(random_sae(48, 64, hook_name="blocks.1.hook_resid_post"), tmp_path / "sae")
    model = _model_folder(tmp_path / "m", d_model=576)
    monkeypatch.setattr(C, "load_model", _no_model)
    code, err = _run(["run", "ioi", "--model-dir", str(model), "--sae", str(sae), "--out", str(tmp_path / "o")], capsys)
    line = _one_line(err)
    assert code == 2 and "d_in=48" in line and "d_model=576" in line and str(sae) in line
    assert "shipped" not in line


def test_sae_layer_outside_the_model(tmp_path, monkeypatch, capsys):
    # before: Site(40) passed every check until the forward pass (the model had loaded)
    sae = save_sae(random_sae(576, 64, hook_name="blocks.40.hook_resid_post"), tmp_path / "sae")
    model = _model_folder(tmp_path / "m", d_model=576, n_layers=30)
    monkeypatch.setattr(C, "load_model", _no_model)
    code, err = _run(["run", "refusal", "--model-dir", str(model), "--sae", str(sae), "--out", str(tmp_path / "o")],
                     capsys)
    line = _one_line(err)
    assert code == 2 and "layer 40" in line and "30 layers" in line and str(sae) in line


@pytest.mark.parametrize("hook, word", [("blocks.2.hook_mlp_out", "MLP-output"), ("blocks.2.hook_attn_out", "attention"),
                                        ("embed_tokens", "embedding"), ("layers.6.mlp", "MLP-output")])
def test_non_residual_sae_hook_is_one_line_naming_file_and_hook(tmp_path, monkeypatch, capsys, hook, word):
    # before: Site.parse raised a ValueError without the file, exit 1 ("jaxrecover: error: ValueError")
    sae = save_sae(random_sae(576, 64, hook_name=hook), tmp_path / "sae")
    monkeypatch.setattr(C, "load_model", _no_model)
    for setting in ("ioi", "refusal"):
        code, err = _run(["run", setting, "--sae", str(sae), "--out", str(tmp_path / setting)], capsys)
        line = _one_line(err)
        assert code == 2 and hook in line and str(sae) in line and word in line and "resid" in line


def test_sparsify_mlp_and_embed_folders_are_refused_for_a_run(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    for name in ("layers.6.mlp", "embed_tokens"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({"d_in": 8, "k": 2, "num_latents": 16}))
        save_file({"encoder.weight": np.ones((16, 8), np.float32), "encoder.bias": np.zeros(16, np.float32),
                   "W_dec": np.ones((16, 8), np.float32), "b_dec": np.zeros(8, np.float32)}, str(folder / "sae.safetensors"))
        sae = load_sae(folder)  # the library loads it as-is (its hook is the folder name)...
        assert sae.hook_name == name
        with pytest.raises(SystemExit, match=rf"{name}.*not a residual-stream site"):  # ...a run refuses it
            C.load_saes([str(folder)], ())


def test_model_named_in_sae_metadata_differs_is_a_warning_not_an_error(tmp_path, monkeypatch, capsys):
    sae = save_sae(random_sae(576, 64, hook_name="blocks.1.hook_resid_post"), tmp_path / "sae",
                   extra_cfg={"model_name": "gpt2-small"})
    model = _model_folder(tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc", name="")
    monkeypatch.setattr(C, "load_model", _no_model)
    code, err = _run(["run", "ioi", "--model-dir", str(model), "--sae", str(sae), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "must not be loaded" in err  # the checks passed: it went on to load the model
    assert "warning" in err and "'gpt2-small'" in err and str(model) in err
    # the same name (any case, org prefix or HF cache folder) is no warning
    good = save_sae(random_sae(576, 64, hook_name="blocks.1.hook_resid_post"), tmp_path / "sae2",
                    extra_cfg={"model_name": "huggingfacetb/SmolLM2-135M"})
    assert compat.check_sae(compat.model_facts(model), load_sae(good), str(good)) == []
    assert compat.check_sae(compat.model_facts(""), load_sae(good), str(good))  # embedded is the -Instruct one


def test_tokenizer_and_chat_template_are_checked_when_needed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_model", _no_model)
    bare = _model_folder(tmp_path / "bare", tokenizer=False)
    code, err = _run(["run", "ioi", "--model-dir", str(bare), "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and "no tokenizer.json" in _one_line(err)
    base = _model_folder(tmp_path / "base", chat=False)
    code, err = _run(["run", "refusal", "--model-dir", str(base), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "no chat template" in _one_line(err) and "refusal" in err
    code, err = _run(["run", "ioi", "--model-dir", str(base), "--out", str(tmp_path / "o3")], capsys)
    assert "must not be loaded" in err  # ioi needs no chat template: it went on to load the model
    (base / "chat_template.jinja").write_text("{{ messages }}")  # transformers >= 4.43 writes it here
    compat.check_tokenizer(compat.model_facts(base), chat=True)


def test_model_folder_without_or_with_a_bad_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "load_model", _no_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(["run", "ioi", "--model-dir", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no config.json" in _one_line(err)
    (empty / "config.json").write_text("{not json")
    code, err = _run(["run", "ioi", "--model-dir", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "config.json" in _one_line(err) and "JSON" in err
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    code, err = _run(["run", "ioi", "--model-dir", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "hidden_size" in _one_line(err)  # the missing field, named
    (empty / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    code, err = _run(["run", "ioi", "--model-dir", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "T5ForConditionalGeneration" in _one_line(err)


def test_feature_ids_in_range():
    assert compat.check_feature_ids([0, 5, 63], 64, "sae") == [0, 5, 63]
    import numpy as np

    assert compat.check_feature_ids(np.array([1, 2]), 64, "sae") == [1, 2]
    for bad in ([64], [-1], [True], [2.0], ["3"]):
        with pytest.raises(SystemExit, match=r"--features: feature id .* out of range.*d_sae=64 .*0\.\.63"):
            compat.check_feature_ids(bad, 64, "sae")


def test_every_message_is_one_line(tmp_path):
    # messages are built from long constants: a stray newline would break the one-line rule
    with pytest.raises(SystemExit) as e:
        compat.check_sae(compat.model_facts(""), random_sae(8, 16, hook_name="blocks.0.hook_mlp_out"), "x\ny")
    assert "\n" not in str(e.value)


def test_cli_maps_every_message_exit_to_code_2(tmp_path, capsys):
    # one convention: SystemExit("one line") from any setting -> that line on stderr, exit 2 (was 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(["run", "ioi", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot create" in _one_line(err)


def test_refusal_help_and_readme_say_the_features_do_not_follow_the_prompts(capsys):
    # before: nothing told a user that --dataset changes the prompts but not the clamped features
    from pathlib import Path

    with pytest.raises(SystemExit):
        cli.main(["--no-compile-cache", "run", "refusal", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "same feature ids are clamped on every prompt set" in helptext
    readme = " ".join((Path(__file__).parents[1] / "README.md").read_text().split())
    assert "same feature ids are clamped on every prompt set" in readme


def test_inspect_checks_the_sae_against_the_model_before_loading_it(tmp_path, monkeypatch, capsys):
    # before: inspect loaded the model first, then died on Site.parse / check_clamps (exit 1)
    from jaxrecover.cli import inspect as I

    monkeypatch.setattr(I, "load_transformer", _no_model, raising=False)
    import jaxrecover.io.hf as io_hf

    monkeypatch.setattr(io_hf, "load_transformer", _no_model)
    wide = _model_folder(tmp_path / "wide", d_model=640, n_layers=18)
    sae = save_sae(random_sae(576, 64, hook_name="blocks.1.hook_resid_post"), tmp_path / "sae")
    code, err = _run(["inspect", "--model-dir", str(wide), "--sae", str(sae), "--features", "1,2"], capsys)
    assert code == 2 and "d_in=576" in _one_line(err) and "d_model=640" in err
    ok = _model_folder(tmp_path / "ok", d_model=576)
    code, err = _run(["inspect", "--model-dir", str(ok), "--sae", str(sae), "--features", "1,64"], capsys)
    assert code == 2 and "feature id 64" in _one_line(err) and "d_sae=64" in err
    mlp = save_sae(random_sae(576, 64, hook_name="blocks.1.hook_mlp_out"), tmp_path / "mlp")
    code, err = _run(["inspect", "--model-dir", str(ok), "--sae", str(mlp), "--features", "1"], capsys)
    assert code == 2 and "hook_mlp_out" in _one_line(err) and str(mlp) in err
