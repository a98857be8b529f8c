"""``jaxrecover convert`` (one GGUF file or its parts) and ``jaxrecover train-sae`` on tiny random models:
outputs, cards, and bad input refused in one line with exit code 2 before anything loads."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_gguf import write_tiny_gguf

from jaxrecover.cli import app as cli
from jaxrecover.io import hf as io_hf
from jaxrecover.sae import train as train_sae
from jaxrecover.io.gguf import gguf_to_hf_folder
from jaxrecover.sae.files import load_sae
from jaxrecover.testing import write_tiny_hf_checkpoint


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's own exits
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (transformers save_pretrained) with a word-level tokenizer over the shipped text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = write_tiny_hf_checkpoint(tmp_path_factory.mktemp("m") / "tiny-llama", "llama")
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    docs, _ = train_sae.corpus_texts("shipped")
    pre = pre_tokenizers.Whitespace()
    words = Counter(w for d in docs for w, _ in pre.pre_tokenize_str(d)).most_common(vocab_size - 3)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, (w, _) in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    return folder


# ----------------------------------------------------------------------------- convert


def test_convert_parts_equals_converting_the_whole_file(tmp_path, capsys):
    whole = tmp_path / "tiny.gguf"
    write_tiny_gguf(whole)
    data = whole.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        part = tmp_path / f"tiny.gguf.part{i:02d}"
        part.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(str(part))
    rc, out, err = run_cli(capsys, "convert", *parts, str(tmp_path / "from-parts"))
    assert rc == 0, err
    assert "LlamaForCausalLM" in out and "train-sae" in out
    ref = gguf_to_hf_folder(whole, tmp_path / "from-whole")
    got, want = load_file(str(tmp_path / "from-parts" / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    marker = json.loads((tmp_path / "from-parts" / "gguf_source.json").read_text())
    assert marker["file"] == "tiny.gguf" and [p["file"] for p in marker["parts"]] == [Path(p).name for p in parts]
    assert not list(tmp_path.glob(".from-parts.join-*"))  # the joined temporary file is gone
    # --parts gives the same
    rc, _, err = run_cli(capsys, "convert", "--parts", ",".join(parts), str(tmp_path / "via-option"))
    assert rc == 0, err
    assert io_hf.load_transformer(tmp_path / "via-option").cfg == io_hf.load_transformer(ref).cfg


def test_convert_bad_input_is_one_line_exit_2(tmp_path, capsys):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    (tmp_path / "exists").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    data = gguf.read_bytes()
    (tmp_path / "b.part01").write_bytes(data[len(data) // 2 :])
    cases = [
        (("convert", str(gguf)), "output folder"),
        (("convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")), "no such file"),
        (("convert", str(tmp_path / "notes.txt"), str(tmp_path / "o")), "not a GGUF file"),
        (("convert", str(tmp_path / "b.part01"), str(gguf), str(tmp_path / "o")), "pass every part, in order"),
        (("convert", str(gguf), str(tmp_path / "exists")), "--overwrite"),
        (("convert", str(gguf), str(gguf), str(tmp_path / "o")), "gguf-split shard"),
        (("convert", str(gguf), str(tmp_path / "other.gguf")), "not a GGUF file"),
    ]
    for argv, needle in cases:
        rc, _, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if not line.startswith("usage:")]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
    assert not (tmp_path / "o").exists()


def test_convert_truncated_gguf_is_exit_2(tmp_path, capsys):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    rc, _, err = run_cli(capsys, "convert", str(cut), str(tmp_path / "o"))
    assert rc == 2 and "cut.gguf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- train-sae


def test_train_sae_writes_a_saelens_folder_with_a_card(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "saes"
    rc, _, err = run_cli(capsys, "train-sae", "--model", str(tiny_model_dir), "--layer", "1", "--width", "64",
                         "--k", "8", "--tokens", "4096", "--batch-size", "256", "--seq-len", "32",
                         "--eval-tokens", "512", "--out", str(out), "--quiet")
    assert rc == 0, err
    folder = out / "blocks.1.hook_resid_post"
    assert {p.name for p in folder.iterdir()} == {"cfg.json", "sae_weights.safetensors", "CARD.md", "metrics.json"}
    assert not list(out.glob(".work-*"))  # the work folder is removed after a finished run
    sae = load_sae(folder)
    assert sae.hook_name == "blocks.1.hook_resid_post" and sae.activation == "topk" and sae.k == 8
    assert sae.d_in == io_hf.load_transformer(tiny_model_dir).cfg.d_model and sae.d_sae == 64
    m = json.loads((folder / "metrics.json").read_text())
    for key in ("ev", "l0", "dead_frac", "flr_zero", "flr_mean", "ce_clean", "ce_spliced"):
        assert np.isfinite(m["metrics"][key]), key
    assert m["metrics"]["l0"] == pytest.approx(8.0, abs=0.5)  # TopK: k active latents per token
    assert 0.0 <= m["metrics"]["dead_frac"] <= 1.0 and m["metrics"]["ev"] > 0.0
    assert m["train_config"]["steps"] == 4096 // 256 and set(m["seconds"]) >= {"harvest", "train", "evaluate", "total"}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["ev"] == m["metrics"]["ev"] and cfg["metadata"]["sae_lens_version"] >= "6"
    card = (folder / "CARD.md").read_text()
    assert "| EV | L0 | dead |" in card and "jaxrecover train-sae --model" in card
    # a second run into the same folder is refused before anything loads
    rc, _, err = run_cli(capsys, "train-sae", "--model", str(tiny_model_dir), "--layer", "1", "--out", str(out))
    assert rc == 2 and "--overwrite" in err


def test_train_sae_jumprelu_on_a_text_file(tiny_model_dir, tmp_path, capsys):
    docs, _ = train_sae.corpus_texts("shipped")
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(docs[:600]))
    rc, _, err = run_cli(capsys, "train-sae", "--model", str(tiny_model_dir), "--layer", "0", "--site", "resid_pre",
                         "--arch", "jumprelu", "--width", "48", "--k", "6", "--tokens", "2048", "--batch-size", "256",
                         "--seq-len", "32", "--eval-tokens", "256", "--corpus", str(text), "--out",
                         str(tmp_path / "jr"), "--quiet", "--save-dtype", "float32")
    assert rc == 0, err
    folder = tmp_path / "jr" / "blocks.0.hook_resid_pre"
    sae = load_sae(folder)
    assert sae.activation == "jumprelu" and sae.threshold is not None and sae.W_enc.dtype == np.float32
    assert "corpus.txt" in (folder / "CARD.md").read_text()


def test_train_sae_bad_input_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(io_hf, "load_transformer", no_load)
    base = ("train-sae", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"))
    cases = [
        ((*base, "--layer", "7"), "2 blocks"),
        ((*base, "--layer", "0", "--k", "0"), "k=0"),
        ((*base, "--layer", "0", "--tokens", "10"), "tokens=10"),
        ((*base, "--layer", "0", "--corpus", str(tmp_path / "none.txt")), "--corpus"),
        (("train-sae", "--model", "nobody/nothing", "--layer", "0", "--out", str(tmp_path / "o")), "nobody/nothing"),
        (("train-sae", "--model", str(tmp_path / "missing.gguf"), "--layer", "0", "--out", str(tmp_path / "o")),
         "missing.gguf"),
    ]
    for argv, needle in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
    rc, _, err = run_cli(capsys, "train-sae", "--layer", "0", "--site", "resid_mid", "--out", "x")  # argparse choices
    assert rc == 2 and "resid_mid" in err


def test_help_teaches(capsys):
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0 and "convert" in out and "train-sae" in out
    rc, out, _ = run_cli(capsys, "train-sae", "--help")
    assert rc == 0 and "examples:" in out and "--tokens" in out and "CE loss recovered" in out
    rc, out, _ = run_cli(capsys, "convert", "--help")
    assert rc == 0 and "gemma3" in out and "part" in out


def test_experiments_train_saes_is_a_thin_caller(tiny_model_dir, tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "train_saes.py"
    spec = importlib.util.spec_from_file_location("train_saes_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--model", str(tiny_model_dir), "--layers", "0", "1", "--width", "32", "--k", "4",
                           "--tokens", "1024", "--batch-size", "256", "--aux-k", "0", "--eval-tokens", "256",
                           "--corpus", "shipped", "--out-dir", str(tmp_path / "rel")])
    assert [r["hook_name"] for r in results] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for r in results:
        assert load_sae(tmp_path / "rel" / r["hook_name"]).d_sae == 32
        assert "experiments/train_saes.py" in (tmp_path / "rel" / r["hook_name"] / "CARD.md").read_text()
