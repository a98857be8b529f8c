"""``jaxrecover audit`` (issue 20) on tiny random models: a config-file audit end to end through the CLI
(output folder, resume), every behaviour on another model family through ``run_audit``, a model and
an SAE named by Hugging Face repo id / SAELens release in a fake HF cache, and every bad input as one
line with exit code 2 before any model weight loads."""

import json
import shutil
from pathlib import Path

import jax
import pytest
from test_resolve import hf_cache_entry

from jaxrecover import testing
from jaxrecover.audit import config as audit_config
from jaxrecover.cli import app as cli
from jaxrecover.io import hf
from jaxrecover.sae.files import save_sae

WORDS = ["the", "cat", "dog", "bird", "fish", "sat", "ran", "sang", "swam", "on", "in", "under", "over",
         "mat", "tree", "pond", "sky", "a", "red", "blue", "green", "big", "small", "and", "then", "today",
         "was", "very", "happy", "sad", "near", "far", "home"]
CONTRAST = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "plus", "minus",
            "equals", "number", "count"]
NAMES = ("Mary", "John", "Anna", "Paul")


def _prompts(n: int, words: tuple | list, seed: int, length: int = 6) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=length - i % 3)) for i in range(n)]


def _tokenizer(folder: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocab) <= 97, len(vocab)  # the tiny models' d_vocab
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}user : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}then{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>",
                                                              "chat_template": template}))


def _model(folder: Path, arch: str) -> Path:
    model = testing.random_transformer(jax.random.PRNGKey(3), testing.tiny_config(arch))
    hf.save_transformer(model, folder)
    texts = list(WORDS) + CONTRAST + list(NAMES) + ["Question", "Answer", ":", ".", "A", "B", "C", "D", "user", "then"]
    _tokenizer(folder, [" ".join(texts)])
    return folder


def _sae(folder: Path, d_in: int = 32, layer: int = 1, d_sae: int = 64) -> Path:
    sae = testing.random_sae(d_in, d_sae, seed=layer, hook_name=f"blocks.{layer}.hook_resid_post")
    return save_sae(sae, folder, extra_cfg={"model_name": "tiny"})


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A tiny Llama folder with a word-level tokenizer and a chat template, SAEs, prompt files."""
    root = tmp_path_factory.mktemp("audit")
    _model(root / "model", "llama")
    _sae(root / "sae")
    _sae(root / "sae-narrow", d_in=16)
    _sae(root / "sae-deep", layer=5)
    _jsonl(root / "prompts.jsonl", [{"prompt": p} for p in _prompts(10, WORDS, 0)])
    (root / "contrast.csv").write_text("text\n" + "".join(p + "\n" for p in _prompts(10, CONTRAST, 1)))
    _jsonl(root / "mcq.jsonl", [{"question": f"the {a} sat on the", "choices": ["mat", "tree", "pond", "sky"], "answer": i % 4}
                                for i, a in enumerate(("cat", "dog", "bird", "fish", "cat", "dog"))])
    _jsonl(root / "pairs.jsonl", [{"prompt": f"{a} and {b} ran home then {b} was happy near", "target": a, "foil": b}
                                  for a in NAMES for b in NAMES if a != b][:6])
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


CONFIG = """\
# a tiny audit: zero-ablate the features that fire most on the prompts, recover the continuation
model = "model"
sae = ["sae"]
behaviour = "continuation"
prompts = "prompts.jsonl"
contrast_prompts = "contrast.csv"
clamp_rule = "contrast"
n_features = 8
clamp_mode = "set"
clamp_value = 10.0
answer_tokens = 3
max_new_tokens = 4
steps = 4
lr = 0.5
max_flips = 3
random_control = 1
out = "results"
"""


def test_config_file_audit_end_to_end_through_the_cli_and_resume(world, capsys):
    cfg = world / "audit.toml"
    cfg.write_text(CONFIG)
    rc, _, err = run_cli(capsys, "audit", str(cfg))
    assert rc == 0, err
    res = world / "results"
    for f in ("results.jsonl", "summary.json", "table.md", "audit.csv", "audit.png"):
        assert (res / f).is_file(), f
    summary = json.loads((res / "summary.json").read_text())
    assert summary["setting"] == "audit" and summary["behaviour"] == "continuation"
    assert summary["n_valid_flips"] >= 1 and summary["n_recovered_on"] == min(3, summary["n_valid_flips"])
    assert summary["config"]["steps"] == 4 and len(summary["features"]["blocks.1.hook_resid_post"]) == 8
    modes = set(summary["modes"])
    assert {"encoder", "none", "replay_clamped_feature", "replay_sae_residual"} <= modes
    enc = summary["modes"]["encoder"]
    assert {"recovered", "reproduced", "base_like", "token_match", "drift_abs", "random_control"} <= set(enc)
    assert enc["budget"] > 0  # relative budget: budget_rel x the defended residual norm
    assert any(k.startswith("solve: audit") for k in summary["stage_s"])
    rows = [json.loads(line) for line in (res / "results.jsonl").read_text().splitlines()]
    assert all(r["valid_flip"] and r["status"] in ("recovered", "not_recovered") for r in rows)
    assert max(r["drift_abs"] for r in rows if r["mode"] == "encoder") < 1e-4  # ReLU SAE: encoder-null is exact
    # a flag overrides the file; the rerun resumes the solves from <out>/checkpoints
    rc, _, err = run_cli(capsys, "audit", str(cfg), "--random-control", "0")
    assert rc == 0, err
    assert "resumed from" in err and "base answers: cached" in err


@pytest.mark.parametrize("arch,behaviour", [("gemma3", "choice"), ("gpt2", "logit_diff"), ("gemma2", "refusal")])
def test_every_behaviour_on_another_family_by_repo_id_and_release(world, tmp_path, monkeypatch, arch, behaviour):
    from jaxrecover.audit import run_audit

    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HF_HOME", raising=False)
    hf_cache_entry(hub, f"test-org/tiny-{arch}", _model(tmp_path / "m", arch))
    _sae(tmp_path / "s" / "blocks.1.hook_resid_post")
    _sae(tmp_path / "s" / "blocks.0.hook_resid_post", layer=0)
    hf_cache_entry(hub, "jbloom/GPT2-Small-SAEs-Reformatted", tmp_path / "s")  # the gpt2-small-res-jb release
    prompts = {"choice": world / "mcq.jsonl", "logit_diff": world / "pairs.jsonl", "refusal": world / "prompts.jsonl"}
    # explicit ids, except logit_diff: SAEBench forget/retain selection against a second prompt file
    clamp = ({"clamp_rule": "forget_retain", "contrast_prompts": str(world / "contrast.csv"), "n_features": 5,
              "retain_threshold": 1.0} if behaviour == "logit_diff" else
             {"clamp_rule": "explicit", "features": (("blocks.1.hook_resid_post", (1, 2, 3, 4, 5)),)})
    ids = ("blocks.1.hook_resid_post",)
    if behaviour == "choice":  # two SAEs: clamps at two sites, one list of ids per SAE in the order named
        ids, clamp["features"] = ("blocks.1.hook_resid_post", "blocks.0.hook_resid_post"), (("0", (1, 2, 3, 4, 5)), ("1", (7, 8)))
    summary = run_audit({
        "model": f"test-org/tiny-{arch}", "sae_release": "gpt2-small-res-jb", "sae_id": ids,
        "behaviour": behaviour, "prompts": str(prompts[behaviour]), "choice_format": "cloze", **clamp,
        "clamp_mode": "set", "clamp_value": (4.0,),
        "require_flip": False, "max_flips": 2, "steps": 3, "answer_tokens": 2, "max_new_tokens": 3,
        "random_control": 0, "attribution": False, "methods": ("encoder",), "out": str(tmp_path / "out")})
    assert summary["n_recovered_on"] == 2 and summary["modes"]["encoder"]["n"] == 2
    assert len(summary["features"]["blocks.1.hook_resid_post"]) == 5 and summary["clamp_rule"] == clamp["clamp_rule"]
    if behaviour == "choice":
        assert summary["features"]["blocks.0.hook_resid_post"] == [7, 8] and summary["site"] == "blocks.0.hook_resid_post"
    assert "gpt2-small-res-jb" not in summary["sae_path"] and "snapshots" in summary["sae_path"]
    if behaviour == "refusal":  # judged on regenerated text by the refusal judge
        assert {"non_refusal", "base_like", "strict_base_like"} <= set(summary["modes"]["encoder"])


def _bad_cases(w: Path) -> list[tuple[str, list[str], str]]:
    """(config text, extra CLI args, what the one line must say)."""
    base = f'model = "{w / "model"}"\nsae = ["{w / "sae"}"]\nprompts = "{w / "prompts.jsonl"}"\ncontrast_prompts = "{w / "contrast.csv"}"\n'
    return [
        (base + "stepz = 3\n", [], "unknown key 'stepz' (did you mean 'steps'?)"),
        (base + 'steps = "ten"\n', [], "key 'steps' must be an integer, got 'ten'"),
        (base + "features = [1.5]\nclamp_rule = \"explicit\"\n", [], "key 'features' must be a list of integer"),
        (base + "steps = [\n", [], "not valid TOML"),
        (base.replace("prompts.jsonl", "nope.jsonl"), [], "nope.jsonl: no such file"),
        (base, ["--steps", "ten"], "--steps 'ten': expected an integer"),
        (base, ["--stepz", "3"], "--stepz: unknown option (did you mean --steps?)"),
        (base, ["--behaviour", "refusl"], "behaviour 'refusl': expected continuation | refusal | choice | logit_diff (did you mean 'refusal'?)"),
        (base.replace(f'sae = ["{w / "sae"}"]', 'sae_release = "gemma-scope-2b-pt-re"\nsae_id = ["x"]'), [], "is not in jaxrecover's registry"),
        (base.replace(f'sae = ["{w / "sae"}"]', 'sae_release = "gpt2-small-res-jb"\nsae_id = ["blocks.1.hook_resid_post"]'), [], "not in the local Hugging Face cache"),
        (base.replace('/sae"]', '/sae-narrow"]'), [], "the SAE reads vectors of width d_in=16, but the model"),
        (base.replace('/sae"]', '/sae-deep"]'), [], "is at layer 5, but the model"),
        (base.replace('/sae"]', '/no-sae"]'), [], "no-sae' not found"),
        (base.replace(str(w / "model"), "test-org/absent"), [], "model 'test-org/absent' not found"),
        (base + 'clamp_rule = "explicit"\nfeatures = [3, 64]\n', [], "feature id 64 is out of range: the SAE"),
        (base + 'clamp_rule = "explicit"\n', [], "clamp_rule explicit: features names no feature id"),
        (base + 'clamp_rule = "explicit"\nfeatures = {"blocks.0.hook_resid_post" = [1]}\n', [], "features: no SAE at blocks.0.hook_resid_post"),
        (base + 'clamp_rule = "explicit"\nfeatures = [1, 2, 3]\nclamp_value = [1.0, 2.0]\n', [], "clamp_value: 2 values for 3 explicit features"),
        (base + "n_features = 40\n", [], "encoder-null projection: 40 clamped features on a 32-dimensional residual"),
        (base + 'behaviour = "choice"\n', [], "line 1: 'choices' must list at least 2"),
        (base + "budget = 0.0\nbudget_rel = 0.0\n", [], "leaves no budget"),
        (base.replace(str(w / "model"), str(w / "no-template")) + 'behaviour = "refusal"\n', [], "no chat template"),
        # a .gguf model is checked from its header, before the one-time conversion
        (base.replace(str(w / "model"), str(w / "tiny.gguf")), [], "the SAE reads vectors of width d_in=32, but the model"),
    ]


def test_every_bad_input_is_one_line_exit_2_before_the_model_loads(world, tmp_path, monkeypatch, capsys):
    from test_gguf import write_tiny_gguf

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("JAXRECOVER_CACHE", str(tmp_path / "jxr-cache"))
    if not (world / "tiny.gguf").exists():
        write_tiny_gguf(world / "tiny.gguf")
    no_template = world / "no-template"
    if not no_template.exists():
        shutil.copytree(world / "model", no_template)
        cfg = json.loads((no_template / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(hf, "load_transformer", no_load)
    rc, _, err = run_cli(capsys, "audit", str(tmp_path / "missing.toml"))
    assert rc == 2 and "missing.toml: no such file" in err and len(err.strip().splitlines()) == 1
    for i, (text, extra, want) in enumerate(_bad_cases(world)):
        path = tmp_path / f"bad{i}.toml"
        path.write_text(text)
        rc, _, err = run_cli(capsys, "audit", str(path), *extra, "--out", str(tmp_path / f"out{i}"))
        lines = err.strip().splitlines()
        assert rc == 2, (want, err)
        assert want in lines[-1] and len([ln for ln in lines if "warning" not in ln]) == 1, (want, err)
    assert not (tmp_path / "jxr-cache" / "converted").exists()  # the GGUF was never converted


def test_help_teaches_and_the_example_config_is_valid(capsys):
    rc, out, _ = run_cli(capsys, "audit", "--help")
    assert rc == 0
    for flag in audit_config.FIELDS:
        assert "--" + flag.replace("_", "-") in out
    assert "audit_example.toml" in out
    cfg = audit_config.load_config(audit_config.example_path())
    assert cfg.model == "" and cfg.behaviour == "continuation"
