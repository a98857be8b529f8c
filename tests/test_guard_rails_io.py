"""Guard rails (issue 11) for files: non-finite weights, the embedded cache, result files, checkpoints'
temporary folders and Gemma Scope paths. Each test names the "Measured now" case it pins down.
"""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrecover.runtime import checkpoint as ckpt
from jaxrecover.io import embedded as embedded
from jaxrecover.io import hf as io_hf
from jaxrecover.runtime import report as report
from jaxrecover.io.hf import CheckpointError, load_transformer, save_transformer
from jaxrecover.sae.files import SAEFormatError, load_sae
from jaxrecover.testing import random_transformer, tiny_config

D_IN, D_SAE = 6, 10


def _arrays(seed: int = 0, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _sae_arrays(**extra) -> dict[str, np.ndarray]:
    return _arrays(W_enc=(D_IN, D_SAE), b_enc=(D_SAE,), W_dec=(D_SAE, D_IN), b_dec=(D_IN,), **extra)


def _gs_arrays() -> dict[str, np.ndarray]:
    a = _sae_arrays()
    a["threshold"] = np.full((D_SAE,), 0.1, np.float32)
    return a


def _saelens(folder: Path, arrays: dict, architecture: str = "standard", hook: str = "blocks.1.hook_resid_post",
             **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.1", "hook_name": hook}, **cfg}))
    return folder


def _npz(folder: Path, arrays: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **(arrays if arrays is not None else _gs_arrays()))
    return folder / "params.npz"


def _poison(a: dict, key: str, value: float) -> dict:
    out = {k: v.copy() for k, v in a.items()}
    out[key].reshape(-1)[1] = value
    return out


# ---- non-finite SAE weights, every format (before: an SAE with NaN in W_enc loaded, the run exited 0)


def test_saelens_nan_is_refused_with_file_and_tensor(tmp_path):
    folder = _saelens(tmp_path / "s", _poison(_sae_arrays(), "W_enc", np.nan))
    with pytest.raises(SAEFormatError, match=r"(?s)sae_weights.safetensors.*'W_enc'.*1 non-finite"):
        load_sae(folder)


def test_gemma_scope_npz_inf_is_refused(tmp_path):
    f = _npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5",
             _poison(_gs_arrays(), "threshold", np.inf))
    with pytest.raises(SAEFormatError, match=r"(?s)params.npz.*'threshold'.*non-finite"):
        load_sae(f)


def test_gemma_scope_2_nan_is_refused(tmp_path):
    folder = tmp_path / "resid_post" / "layer_2_width_16k_l0_small"
    folder.mkdir(parents=True)
    save_file({k.lower(): v for k, v in _poison(_gs_arrays(), "b_enc", np.nan).items()},
              str(folder / "params.safetensors"))
    with pytest.raises(SAEFormatError, match=r"(?s)params.safetensors.*'b_enc'.*non-finite"):
        load_sae(folder)


def test_sparsify_nan_is_refused(tmp_path):
    folder = tmp_path / "layers.0"
    folder.mkdir()
    a = _arrays(**{"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)})
    save_file(_poison(a, "encoder.weight", -np.inf), str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "k": 3, "d_in": D_IN}))
    with pytest.raises(SAEFormatError, match=r"(?s)sae.safetensors.*'encoder.weight'.*non-finite"):
        load_sae(folder)


def test_overflow_in_conversion_or_cast_is_refused(tmp_path):
    big = _sae_arrays()
    big["W_enc"] = big["W_enc"] * 1e6  # finite in float32, inf in float16
    with pytest.raises(SAEFormatError, match=r"(?s)'W_enc' becomes non-finite after conversion to float16"):
        load_sae(_saelens(tmp_path / "big", big), dtype=jnp.float16)
    jr = {**_sae_arrays(), "log_threshold": np.full((D_SAE,), 1000.0, np.float32)}  # exp(1000) = inf
    with pytest.raises(SAEFormatError, match=r"'threshold' becomes non-finite"):
        load_sae(_saelens(tmp_path / "jr", jr, "jumprelu"))


# ---- non-finite model weights


def test_model_nan_is_refused_with_file_and_tensor(tmp_path):
    model = random_transformer(jax.random.key(0), tiny_config("llama", tied_embeddings=False))
    folder = save_transformer(model, tmp_path / "m")
    f = folder / io_hf.WEIGHTS_FILE
    tensors = load_file(f)
    key = "model.layers.1.self_attn.q_proj.weight"
    tensors[key][3, 4] = np.nan
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"(?s)model.safetensors.*'{key}'.*1 non-finite"):
        load_transformer(folder)


def test_model_inf_in_bf16_file_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    model = random_transformer(jax.random.key(0), tiny_config("llama", dtype="bfloat16"))
    folder = save_transformer(model, tmp_path / "m")
    f = folder / io_hf.WEIGHTS_FILE
    tensors = tload(f)
    tensors["model.norm.weight"][0] = torch.inf
    tsave(tensors, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.norm.weight'.*non-finite"):
        load_transformer(folder, dtype="bfloat16")


# ---- Gemma Scope paths


def test_gemma_scope_layer_comes_only_from_below_the_release(tmp_path):
    # before: the first layer_<N> anywhere in the path won: this loaded as blocks.7.hook_resid_post
    f = _npz(tmp_path / "runs_layer_7" / "gemma-scope-2b-pt-mlp" / "layer_3" / "width_16k" / "average_l0_10")
    assert load_sae(f).hook_name == "blocks.3.hook_mlp_out"
    nested = _npz(tmp_path / "gemma-scope-2b-pt-mlp" / "copy" / "gemma-scope-2b-pt-res" / "layer_4" / "width_16k"
                  / "average_l0_9")
    assert load_sae(nested).hook_name == "blocks.4.hook_resid_post"  # the nearest release decides


def test_gemma_scope_hf_cache_symlink_layout(tmp_path):
    # before: params.npz was resolved into blobs/, losing layer_5
    repo = tmp_path / "hub" / "models--google--gemma-scope-2b-pt-res"
    blob = repo / "blobs" / "9f2c0a"
    blob.parent.mkdir(parents=True)
    np.savez(blob.with_suffix(".npz"), **_gs_arrays())
    blob.with_suffix(".npz").rename(blob)
    link_dir = repo / "snapshots" / "abc123" / "layer_5" / "width_16k" / "average_l0_20"
    link_dir.mkdir(parents=True)
    (link_dir / "params.npz").symlink_to(os.path.relpath(blob, link_dir))
    assert load_sae(link_dir / "params.npz").hook_name == "blocks.5.hook_resid_post"
    assert load_sae(link_dir).hook_name == "blocks.5.hook_resid_post"


def test_gemma_scope_2_without_config_in_symlink_layout(tmp_path):
    blob = tmp_path / "blobs" / "77aa"
    blob.parent.mkdir()
    save_file({k.lower(): v for k, v in _gs_arrays().items()}, str(blob))
    folder = tmp_path / "snapshots" / "r1" / "mlp_out" / "layer_9_width_16k_l0_small"
    folder.mkdir(parents=True)
    (folder / "params.safetensors").symlink_to(blob)
    assert load_sae(folder).hook_name == "blocks.9.hook_mlp_out"


def test_gemma_scope_without_release_folder_needs_hook_name(tmp_path):
    f = _npz(tmp_path / "layer_3" / "width_16k" / "average_l0_10")
    with pytest.raises(SAEFormatError, match=r"(?s)params.npz.*release folder.*hook_name="):
        load_sae(f)
    assert load_sae(f, hook_name="blocks.3.hook_resid_post").hook_name == "blocks.3.hook_resid_post"


def test_gemma_scope_transcoders_are_refused(tmp_path):
    # before: transcoders loaded silently as residual SAEs
    f = _npz(tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_10")
    with pytest.raises(SAEFormatError, match=r"(?s)params.npz.*transcoders are not supported"):
        load_sae(f)


def test_hook_z_saes_are_refused_alike_in_every_format(tmp_path):
    # before: Gemma Scope -att files loaded as attn.hook_z while SAELens hook_z files were refused
    att = _npz(tmp_path / "gemma-scope-2b-pt-att" / "layer_3" / "width_16k" / "average_l0_10")
    lens = _saelens(tmp_path / "z", _sae_arrays(), hook="blocks.3.attn.hook_z")
    for path, file in ((att, "params.npz"), (lens, "cfg.json")):
        with pytest.raises(SAEFormatError, match=rf"(?s){file}.*attention hook_z SAEs are not supported"):
            load_sae(path)


# ---- embedded cache (a fake converter in tmp_path; the real ~/.cache is never touched)


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """``default_model_dir(cache_dir=tmp_path)`` with a 64 KiB fake conversion; returns the call log."""
    calls = {"convert": [], "hash": 0}
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def convert(src, out_dir, *, overwrite=False):
        out = Path(out_dir)
        calls["convert"].append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(np.random.default_rng(len(calls["convert"])).bytes(1 << 16))
        (out / embedded.SOURCE_MARKER).write_text(json.dumps({"sha256": embedded.GGUF_SHA256}))
        return out

    real_sha = embedded.sha256_file

    def counting_sha(path):
        calls["hash"] += 1
        return real_sha(path)

    monkeypatch.setattr(embedded, "locate_gguf", lambda cache_dir=None, allow_download=True: gguf)
    monkeypatch.setattr(embedded, "gguf_to_hf_folder", convert)
    monkeypatch.setattr(embedded, "sha256_file", counting_sha)
    monkeypatch.setattr(embedded, "_VERIFIED", {})
    return calls


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_embedded_records_model_sha256_and_hashes_once_per_process(tmp_path, fake_embedded):
    folder = embedded.default_model_dir(tmp_path)
    marker = json.loads((folder / embedded.SOURCE_MARKER).read_text())
    assert marker["model_sha256"] == _sha(folder / "model.safetensors")
    assert len(fake_embedded["convert"]) == 1
    hashes = fake_embedded["hash"]
    for _ in range(3):
        assert embedded.default_model_dir(tmp_path) == folder
    assert len(fake_embedded["convert"]) == 1 and fake_embedded["hash"] == hashes  # no rehash in-process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", embedded.DEFAULT_MODEL_NAME]


def test_embedded_flipped_bytes_are_reconverted(tmp_path, fake_embedded, monkeypatch, capsys):
    # before: 1 MiB of flipped bytes gave exit 0 and every base token id 0
    folder = embedded.default_model_dir(tmp_path)
    model = folder / "model.safetensors"
    st = model.stat()
    data = bytearray(model.read_bytes())
    data[100:4196] = bytes(b ^ 0xFF for b in data[100:4196])
    model.write_bytes(bytes(data))
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot keeps the mtime
    monkeypatch.setattr(embedded, "_VERIFIED", {})  # a new process
    assert embedded.default_model_dir(tmp_path) == folder
    assert len(fake_embedded["convert"]) == 2
    assert "does not match" in capsys.readouterr().err
    marker = json.loads((folder / embedded.SOURCE_MARKER).read_text())
    assert marker["model_sha256"] == _sha(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf", embedded.DEFAULT_MODEL_NAME]


def test_embedded_old_marker_without_model_hash_is_reconverted(tmp_path, fake_embedded, capsys):
    folder = tmp_path / embedded.DEFAULT_MODEL_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    (folder / embedded.SOURCE_MARKER).write_text(json.dumps({"sha256": embedded.GGUF_SHA256}))
    embedded.default_model_dir(tmp_path)
    assert len(fake_embedded["convert"]) == 1 and "records no sha256" in capsys.readouterr().err
    assert json.loads((folder / embedded.SOURCE_MARKER).read_text())["model_sha256"] == _sha(folder / "model.safetensors")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_embedded_removes_leftovers_of_a_killed_conversion(tmp_path, fake_embedded):
    # before: a SIGKILL during conversion left a 517 MB temporary folder forever
    prefix = f".{embedded.DEFAULT_MODEL_NAME}.convert-{embedded._host()}-"
    dead = tmp_path / f"{prefix}{_dead_pid()}-0a0b0c0d"
    alive = tmp_path / f"{prefix}{os.getppid()}-01020304"  # a running process's conversion
    legacy_old = tmp_path / f".{embedded.DEFAULT_MODEL_NAME}.tmp-abc123"
    legacy_new = tmp_path / f".{embedded.DEFAULT_MODEL_NAME}.tmp-def456"
    for d in (dead, alive, legacy_old, legacy_new):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    hour_ago = time.time() - 2 * 3600
    os.utime(legacy_old, (hour_ago, hour_ago))
    embedded.default_model_dir(tmp_path)
    assert not dead.exists() and not legacy_old.exists()
    assert alive.exists() and legacy_new.exists()


def test_embedded_staging_name_is_unique_per_process(tmp_path, fake_embedded):
    embedded.default_model_dir(tmp_path)
    staging = fake_embedded["convert"][0].parent.name
    assert staging.startswith(f".{embedded.DEFAULT_MODEL_NAME}.convert-")
    _host, pid, token = staging.rsplit("-", 2)
    assert int(pid) == os.getpid() and len(token) == 8


# ---- result files and checkpoints


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_result_files_honour_the_umask(tmp_path, umask):
    # before: mkstemp made every result file 0600 whatever the umask
    old = os.umask(umask)
    try:
        report.write_json(tmp_path / "summary.json", {"a": 1})
        report.write_jsonl(tmp_path / "results.jsonl", [{"a": 1}])
        report.write_csv(tmp_path / "m.csv", [{"a": 1}])
        report.write_markdown(tmp_path / "t.md", "T", [("h", "b")])
    finally:
        os.umask(old)
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "results.jsonl", "summary.json", "t.md"]


def test_result_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(report.os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    for _ in range(2):
        report.write_json(tmp_path / "summary.json", {})
    assert len(set(seen)) == 2 and all(f".{os.getpid()}." in name for name in seen)


def test_result_plot_is_atomic_and_honours_the_umask(tmp_path):
    pytest.importorskip("matplotlib")
    old = os.umask(0o022)
    try:
        report.line_plot(tmp_path / "p.png", [1.0, 2.0], {"a": [1.0, 2.0]}, xlabel="x", ylabel="y")
    finally:
        os.umask(old)
    png = tmp_path / "p.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_checkpoint_does_not_delete_another_runs_temporary(tmp_path):
    # before: orbax saved step N into the fixed N.orbax-checkpoint-tmp, deleting it first if it existed
    mngr = ckpt.open_manager(tmp_path, "run")
    other = tmp_path / "run" / "3.orbax-checkpoint-tmp"  # another process, mid-save of step 3
    other.mkdir(parents=True)
    (other / "sentinel").write_text("mine")
    ckpt.save_state(mngr, 3, {"x": jnp.arange(3.0)})
    assert (other / "sentinel").read_text() == "mine"
    step, back = ckpt.restore_state(mngr, {"x": jnp.zeros(3)})
    assert step == 3 and np.array_equal(back["x"], np.arange(3.0))


def test_checkpoint_temporary_name_is_unique_and_stale_ones_are_removed(tmp_path):
    from etils import epath

    a = ckpt.UniqueTemporaryPath.from_final(epath.Path(tmp_path / "7")).get().name
    b = ckpt.UniqueTemporaryPath.from_final(epath.Path(tmp_path / "7")).get().name
    assert a != b and a.startswith(f"7.orbax-checkpoint-tmp-{os.getpid()}-")
    run = tmp_path / "run"
    dead = run / f"5.orbax-checkpoint-tmp-{_dead_pid()}-00aa"
    alive = run / f"5.orbax-checkpoint-tmp-{os.getppid()}-00bb"
    for d in (dead, alive):
        d.mkdir(parents=True)
    ckpt.open_manager(tmp_path, "run")
    assert not dead.exists() and alive.exists()
