"""Model and SAE resolution (jaxrecover.io.resolve) against fake Hugging Face cache layouts in tmp_path:
``models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>, refs/main}``, as
``huggingface_hub`` writes them. Nothing is downloaded."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_gguf import write_tiny_gguf

from jaxrecover.io import hf as io_hf
from jaxrecover.io import resolve as resolve
from jaxrecover.sae.files import load_sae, save_sae
from jaxrecover.testing import random_sae, write_tiny_hf_checkpoint

REV = "0123456789abcdef0123456789abcdef01234567"


def hf_cache_entry(hub: Path, repo_id: str, src: Path, *, rev: str = REV, ref: str | None = "main",
                   kind: str = "model") -> Path:
    """Move the files under ``src`` into a hub cache entry the way huggingface_hub lays it out."""
    repo = hub / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(rev)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("JAXRECOVER_CACHE", str(tmp_path / "jxr-cache"))
    return hub


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def test_repo_id_resolves_through_refs_main_and_loads(hub, tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    snap = hf_cache_entry(hub, "test-org/tiny-llama", src)
    folder = resolve.resolve_model("test-org/tiny-llama")
    assert folder == snap and (folder / "config.json").is_symlink()  # the snapshot path, links kept
    model = io_hf.load_transformer(folder)
    ref = io_hf.load_transformer(tiny_llama_dir)
    assert model.cfg == ref.cfg
    got, want = io_hf.flatten_transformer(model), io_hf.flatten_transformer(ref)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_revision_by_commit_and_by_branch(hub, tiny_llama_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    hf_cache_entry(hub, "o/m", src, ref="dev")  # only a dev branch: main is not there
    assert resolve.resolve_model(f"o/m@{REV}").name == REV
    assert resolve.resolve_model("o/m@dev").name == REV
    with pytest.raises(resolve.ResolveError, match="refs/main"):
        resolve.resolve_model("o/m")


def test_hf_home_is_used_when_hub_cache_is_unset(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve.hf_hub_dirs() == [tmp_path / "hf" / "hub"]
    src = tmp_path / "src"
    shutil.copytree(tiny_llama_dir, src)
    hf_cache_entry(tmp_path / "hf" / "hub", "o/m", src)
    assert (resolve.resolve_model("o/m") / "config.json").exists()


def test_missing_model_is_one_line_naming_every_place(hub):
    with pytest.raises(resolve.ResolveError) as err:
        resolve.resolve_model("nobody/nothing")
    msg = str(err.value)
    assert "\n" not in msg and str(hub / "models--nobody--nothing") in msg and "nobody/nothing" in msg
    assert "downloaded" in msg  # says it does not download


def test_folder_without_config_and_non_gguf_file_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(resolve.ResolveError, match="config.json"):
        resolve.resolve_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(resolve.ResolveError, match="not a folder, a .gguf file"):
        resolve.resolve_model(tmp_path / "weights.bin")


def test_gguf_is_converted_once_into_the_cache(hub, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    said: list[str] = []
    first = resolve.resolve_model(gguf, say=said.append)
    assert first.parent == tmp_path / "jxr-cache" / "converted" and len(said) == 1
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve.resolve_model(gguf, say=said.append) == first and len(said) == 1  # cached: no second conversion
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert resolve.peek_n_layers(resolve.classify_model(str(gguf))) == io_hf.load_transformer(first).cfg.n_layers


def test_sae_by_release_and_id_saelens_layout(hub, tmp_path):
    src = tmp_path / "sae-src"
    sae = random_sae(16, 40, seed=3, hook_name="blocks.8.hook_resid_pre")
    save_sae(sae, src / "blocks.8.hook_resid_pre")
    hf_cache_entry(hub, "jbloom/GPT2-Small-SAEs-Reformatted", src)
    path = resolve.resolve_sae(release="gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    got = load_sae(path)
    assert got.hook_name == "blocks.8.hook_resid_pre" and got.d_in == 16 and got.d_sae == 40
    np.testing.assert_array_equal(np.asarray(got.W_dec), np.asarray(sae.W_dec))
    with pytest.raises(resolve.ResolveError, match="blocks.9.hook_resid_pre.*absent"):
        resolve.resolve_sae(release="gpt2-small-res-jb", sae_id="blocks.9.hook_resid_pre")


def test_gemma_scope_canonical_id_keeps_the_layer_from_the_snapshot_path(hub, tmp_path):
    rng = np.random.default_rng(0)
    d_in, d_sae = 8, 12
    src = tmp_path / "gs" / "layer_12" / "width_16k" / "average_l0_82"
    src.mkdir(parents=True)
    np.savez(src / "params.npz", W_enc=rng.standard_normal((d_in, d_sae)).astype(np.float32),
             W_dec=rng.standard_normal((d_sae, d_in)).astype(np.float32), b_enc=np.zeros(d_sae, np.float32),
             b_dec=np.zeros(d_in, np.float32), threshold=np.full(d_sae, 0.1, np.float32))
    hf_cache_entry(hub, "google/gemma-scope-2b-pt-res", tmp_path / "gs")
    path = resolve.resolve_sae(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_12/width_16k/canonical")
    assert path.parts[-3:] == ("layer_12", "width_16k", "average_l0_82")
    sae = load_sae(path)  # params.npz is a symlink into blobs/: the hook comes from the unresolved path
    assert sae.hook_name == "blocks.12.hook_resid_post" and sae.activation == "jumprelu"
    same = resolve.resolve_sae(release="gemma-scope-2b-pt-res", sae_id="layer_12/width_16k/average_l0_82")
    assert same == path


def test_unknown_release_names_the_nearest_and_bad_ids_are_one_line():
    with pytest.raises(resolve.ResolveError) as err:
        resolve.resolve_sae(release="gemma-scope-2b-res", sae_id="layer_3/width_16k/canonical")
    assert "gemma-scope-2b-pt-res" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(resolve.ResolveError, match="ids look like"):
        resolve.resolve_sae(release="gpt2-small-res-jb", sae_id="layer_3")
    with pytest.raises(resolve.ResolveError, match="nearest ids: layer_12/width_16k/canonical"):
        resolve.resolve_sae(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_12/width_16/canonical")
    with pytest.raises(resolve.ResolveError, match="no such file"):
        resolve.resolve_sae("/nonexistent/sae")


def test_registry_entries_are_well_formed():
    reg = resolve.registry()
    assert {"gemma-scope-2b-pt-res", "gemma-scope-2b-pt-res-canonical", "gemma-scope-9b-pt-res-canonical",
            "gpt2-small-res-jb", "llama_scope_lxr_8x"} <= set(reg)
    for name, entry in reg.items():
        assert entry["repo_id"].count("/") == 1, name
        repo_id, inner = resolve.sae_path_in_release(name, entry["example_id"])
        assert repo_id == entry["repo_id"] and inner and "{" not in inner, name
    assert resolve.sae_path_in_release("llama_scope_lxr_8x", "l15r_8x")[1] == "Llama3_1-8B-Base-L15R-8x"
    assert json.loads(json.dumps(reg)) == reg
