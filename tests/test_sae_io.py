"""SAE loading from every on-disk format, written here exactly as the real tools write them.

Each round-trip test compares the loaded SAE against a numpy re-implementation of the *source
tool's* forward pass (SAELens standard/topk/jumprelu/gated, Gemma Scope, sparsify), so a wrong
transpose, a dropped b_dec subtraction or a mis-folded norm fails. ``tests/data/sparsify`` holds a
folder written by the real ``eai-sparsify`` 1.3.3 ``SparseCoder.save_to_disk`` with its outputs.
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxrecover.sae.autoencoder import SAE, decode, encode, reconstruct
from jaxrecover.sae.files import SAEFormatError, detect_format, load_sae, load_sae_with_cfg, save_sae

D_IN, D_SAE = 6, 10
DATA = Path(__file__).parent / "data"


def _rng_arrays(seed: int = 0, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def _saelens_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    return _rng_arrays(seed, W_enc=(D_IN, D_SAE), b_enc=(D_SAE,), W_dec=(D_SAE, D_IN), b_dec=(D_IN,))


def _x(seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, D_IN)).astype(np.float32)


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---- numpy references of the source tools' forward passes


def _ref_pre(t, x, apply_b_dec):
    return (x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"]


def _ref_topk(pre, k):
    out = np.zeros_like(pre)
    idx = np.argsort(pre, axis=-1)[:, -k:]
    np.put_along_axis(out, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
    return out


# ---- writers, one per real format


def _write_saelens_v6(folder: Path, arrays: dict, architecture: str, *, hook="blocks.3.hook_resid_post", **cfg_extra):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    cfg = {  # the keys SAELens 6.x SAEConfig.to_dict() writes
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.1", "sae_lens_training_version": "6.5.1", "dataset_path": "tiny",
                     "hook_name": hook, "model_name": "tiny-gpt2", "model_class_name": "HookedTransformer",
                     "hook_head_index": None, "context_size": 128, "seqpos_slice": [None],
                     "model_from_pretrained_kwargs": {}, "prepend_bos": True, "exclude_special_tokens": False,
                     "neuronpedia_id": None},
        "architecture": architecture,
    }
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _write_saelens_pre6(folder: Path, arrays: dict, **cfg_extra):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    cfg = {  # a SAELens 3.x/4.x training cfg (gpt2-small-res-jb style): hook_point, no architecture
        "model_name": "gpt2-small", "hook_point": "blocks.6.hook_resid_pre", "hook_point_layer": 6,
        "hook_point_head_index": None, "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False,
        "context_size": 128, "use_cached_activations": False, "d_in": D_IN, "d_sae": D_SAE,
        "b_dec_init_method": "geometric_median", "expansion_factor": 32, "lr": 4e-4, "l1_coefficient": 8e-5,
        "dtype": "torch.float32", "device": "cuda", "seed": 42, "n_checkpoints": 10,
    }
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _write_saelens_v5(folder: Path, arrays: dict, **cfg_extra):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    cfg = {  # SAELens 5.x SAEConfig.to_dict()
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "context_size": 128, "model_name": "tiny", "hook_name": "blocks.2.hook_resid_post", "hook_layer": 2,
        "hook_head_index": None, "prepend_bos": True, "dataset_path": "tiny", "dataset_trust_remote_code": True,
        "normalize_activations": "none", "dtype": "float32", "device": "cpu", "sae_lens_training_version": "5.5.0",
        "activation_fn_kwargs_extra": None, "neuronpedia_id": None, "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _gs_arrays(seed=0):
    a = _saelens_arrays(seed)
    a["threshold"] = np.abs(_rng_arrays(seed + 1, t=(D_SAE,))["t"]) * 0.5
    return a


def _write_sparsify(folder: Path, seed=0, **cfg_extra):
    folder.mkdir(parents=True, exist_ok=True)
    a = _rng_arrays(seed, **{"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_IN),
                             "b_dec": (D_IN,)})
    save_file(a, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": 3,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(cfg_extra)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, a


# ---- SAELens


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_v6_round_trip(tmp_path, architecture):
    a = _gs_arrays() if architecture == "jumprelu" else _saelens_arrays()
    extra = {"k": 3, "rescale_acts_by_decoder_norm": False} if architecture == "topk" else {}
    folder = _write_saelens_v6(tmp_path / "blocks.3.hook_resid_post", a, architecture, **extra)
    sae, cfg = load_sae_with_cfg(folder)
    assert cfg["_format"] == "saelens" and cfg["metadata"]["model_name"] == "tiny-gpt2"
    assert sae.hook_name == "blocks.3.hook_resid_post" and sae.apply_b_dec_to_input
    x = _x()
    pre = _ref_pre(a, x, True)
    want = {"standard": np.maximum(pre, 0), "topk": _ref_topk(pre, 3),
            "jumprelu": np.where(pre > a.get("threshold", 0), np.maximum(pre, 0), 0)}[architecture]
    _close(encode(sae, jnp.asarray(x)), want)
    _close(decode(sae, jnp.asarray(want, jnp.float32)), want @ a["W_dec"] + a["b_dec"])


def test_saelens_pre6_hook_point_defaults_to_b_dec_subtraction(tmp_path):
    a = _saelens_arrays()
    sae = load_sae(_write_saelens_pre6(tmp_path / "old", a))
    assert sae.hook_name == "blocks.6.hook_resid_pre" and sae.activation == "relu" and sae.apply_b_dec_to_input
    _close(encode(sae, jnp.asarray(_x())), np.maximum(_ref_pre(a, _x(), True), 0))


def test_saelens_v5_topk_from_activation_fn_kwargs(tmp_path):
    a = _saelens_arrays()
    sae = load_sae(_write_saelens_v5(tmp_path / "v5", a) / "sae_weights.safetensors")  # a file path works too
    assert (sae.activation, sae.k, sae.hook_name) == ("topk", 3, "blocks.2.hook_resid_post")
    _close(encode(sae, jnp.asarray(_x())), _ref_topk(_ref_pre(a, _x(), True), 3))


def test_saelens_v5_jumprelu_without_b_dec_subtraction(tmp_path):
    a = _gs_arrays()
    folder = _write_saelens_v5(tmp_path / "v5j", a, architecture="jumprelu", activation_fn_str="relu",
                               activation_fn_kwargs={}, apply_b_dec_to_input=False)
    sae = load_sae(folder)
    pre = _ref_pre(a, _x(), False)
    _close(encode(sae, jnp.asarray(_x())), np.where(pre > a["threshold"], pre, 0) * (pre > 0))


def test_saelens_jumprelu_log_threshold(tmp_path):
    a = _gs_arrays()
    stored = {k: v for k, v in a.items() if k != "threshold"}
    stored["log_threshold"] = np.log(a["threshold"])
    sae = load_sae(_write_saelens_v6(tmp_path / "lt", stored, "jumprelu"))
    _close(sae.threshold, a["threshold"])


def test_saelens_gated_becomes_equal_jumprelu(tmp_path):
    a = _saelens_arrays()
    del a["b_enc"]
    a.update(_rng_arrays(3, b_gate=(D_SAE,), b_mag=(D_SAE,), r_mag=(D_SAE,)))
    sae = load_sae(_write_saelens_v6(tmp_path / "g", a, "gated"))
    x = _x() - a["b_dec"]  # SAELens subtracts b_dec (apply_b_dec_to_input=True)
    gate = (x @ a["W_enc"] + a["b_gate"]) > 0
    mag = np.maximum(x @ (a["W_enc"] * np.exp(a["r_mag"])) + a["b_mag"], 0)
    assert sae.activation == "jumprelu"
    _close(encode(sae, jnp.asarray(_x())), gate * mag, tol=1e-4)


def test_saelens_topk_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    a = _saelens_arrays()
    folder = _write_saelens_v6(tmp_path / "r", a, "topk", k=3, rescale_acts_by_decoder_norm=True)
    sae = load_sae(folder)
    norm = np.linalg.norm(a["W_dec"], axis=-1)
    z = _ref_topk(_ref_pre(a, _x(), True) * norm, 3)  # SAELens TopKSAE.encode with rescaling
    _close(encode(sae, jnp.asarray(_x())), z, tol=1e-4)
    _close(reconstruct(sae, jnp.asarray(_x())), (z / norm) @ a["W_dec"] + a["b_dec"], tol=1e-4)


def test_saelens_unit_scaling_factor_is_dropped_and_others_refused(tmp_path):
    a = {**_saelens_arrays(), "scaling_factor": np.ones(D_SAE, np.float32)}
    load_sae(_write_saelens_pre6(tmp_path / "ones", a))
    a["scaling_factor"] = np.full(D_SAE, 2.0, np.float32)
    with pytest.raises(SAEFormatError, match="scaling_factor"):
        load_sae(_write_saelens_pre6(tmp_path / "twos", a))


def test_bf16_weights_and_dtype_override(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    a = _saelens_arrays()
    folder = _write_saelens_v6(tmp_path / "bf16", a, "standard")
    torch_save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in a.items()}, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert sae.W_enc.dtype == jnp.bfloat16 and sae.b_dec.dtype == jnp.bfloat16
    _close(sae.W_enc.astype(jnp.float32), a["W_enc"], tol=1e-2)
    assert load_sae(folder, dtype=jnp.float32).W_dec.dtype == jnp.float32


# ---- save_sae


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_save_load_round_trip(tmp_path, activation):
    a = _gs_arrays()
    sae = SAE(W_enc=jnp.asarray(a["W_enc"]), b_enc=jnp.asarray(a["b_enc"]), W_dec=jnp.asarray(a["W_dec"]),
              b_dec=jnp.asarray(a["b_dec"]), threshold=jnp.asarray(a["threshold"]) if activation == "jumprelu" else None,
              activation=activation, k=2 if activation == "topk" else 0, apply_b_dec_to_input=activation != "jumprelu",
              hook_name="blocks.1.hook_resid_post")
    folder = save_sae(sae, tmp_path / "rel" / "blocks.1.hook_resid_post", extra_cfg={"model_name": "tiny"})
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back, cfg = load_sae_with_cfg(folder)
    assert cfg["metadata"]["model_name"] == "tiny" and cfg["metadata"]["hook_name"] == sae.hook_name
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # SAELens reads it as 6.x
    assert (back.activation, back.k, back.apply_b_dec_to_input, back.hook_name) == (
        sae.activation, sae.k, sae.apply_b_dec_to_input, sae.hook_name)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sae, name))


def test_save_replaces_existing_folder_atomically(tmp_path):
    a = _saelens_arrays()
    sae = SAE(*(jnp.asarray(a[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")), hook_name="h")
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_sae(sae, target)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folders left behind


# ---- Gemma Scope


def test_gemma_scope_npz(tmp_path):
    a = _gs_arrays()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **a)
    sae = load_sae(folder)
    assert detect_format(folder) == "gemma_scope"
    assert sae.hook_name == "blocks.12.hook_resid_post" and not sae.apply_b_dec_to_input
    pre = _ref_pre(a, _x(), False)  # Gemma Scope: no b_dec subtraction
    _close(encode(sae, jnp.asarray(_x())), np.where(pre > a["threshold"], pre, 0) * (pre > 0))
    mlp = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "width_16k" / "average_l0_10"
    mlp.mkdir(parents=True)
    np.savez(mlp / "params.npz", **a)
    assert load_sae(mlp / "params.npz").hook_name == "blocks.3.hook_mlp_out"


def test_gemma_scope_hook_from_caller_or_error(tmp_path):
    np.savez(tmp_path / "params.npz", **_gs_arrays())
    with pytest.raises(SAEFormatError, match="hook_name"):
        load_sae(tmp_path)
    assert load_sae(tmp_path, hook_name="blocks.0.hook_resid_pre").hook_name == "blocks.0.hook_resid_pre"


def test_gemma_scope_2_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    a = _gs_arrays()
    folder = tmp_path / "resid_post" / "layer_7_width_16k_l0_small"
    folder.mkdir(parents=True)
    lower = {k.lower(): torch.from_numpy(v).to(torch.bfloat16) for k, v in a.items()}
    torch_save(lower, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": "model.layers.7.output", "hf_hook_point_out": "model.layers.7.output", "width": D_SAE,
        "model_name": "google/gemma-3-1b-pt", "architecture": "jump_relu", "l0": 20, "affine_connection": False,
        "type": "sae"}))
    sae, cfg = load_sae_with_cfg(folder, dtype=jnp.float32)
    assert cfg["_format"] == "gemma_scope_2" and cfg["l0"] == 20
    assert sae.hook_name == "blocks.7.hook_resid_post" and not sae.apply_b_dec_to_input
    _close(sae.W_enc, a["W_enc"], tol=1e-2)
    # without config.json the hook comes from the folder name
    (folder / "config.json").unlink()
    assert load_sae(folder / "params.safetensors").hook_name == "blocks.7.hook_resid_post"


# ---- sparsify


def test_sparsify_layout(tmp_path):
    folder, a = _write_sparsify(tmp_path / "layers.4")
    sae = load_sae(folder)
    assert (sae.activation, sae.k, sae.hook_name, sae.apply_b_dec_to_input) == ("topk", 3, "blocks.4.hook_resid_post",
                                                                              True)
    x = _x()
    pre = (x - a["b_dec"]) @ a["encoder.weight"].T + a["encoder.bias"]  # sparsify: x - b_dec, nn.Linear
    z = _ref_topk(pre, 3)
    _close(encode(sae, jnp.asarray(x)), z)
    _close(decode(sae, jnp.asarray(z, jnp.float32)), z @ a["W_dec"] + a["b_dec"])


def test_sparsify_file_written_by_the_real_package():
    """``tests/data/sparsify`` was written by eai-sparsify 1.3.3 (SparseCoder(6, num_latents=16, k=3))."""
    sae = load_sae(DATA / "sparsify" / "layers.2")
    want = np.load(DATA / "sparsify" / "expected.npz")
    x = jnp.asarray(want["x"])
    _close(encode(sae, x), want["z"])
    _close(reconstruct(sae, x), want["sae_out"])


def test_sparsify_package_round_trip(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=3))
    coder.save_to_disk(tmp_path / "layers.1")
    x = torch.randn(4, D_IN)
    sae = load_sae(tmp_path / "layers.1")
    _close(reconstruct(sae, jnp.asarray(x.numpy())), coder(x).sae_out.detach().numpy(), tol=1e-4)


# ---- errors: each names the file and the key or field


def _expect(path_part: str, key: str):
    return pytest.raises(SAEFormatError, match=rf"(?s){path_part}.*{key}")


def test_error_missing_and_extra_tensors(tmp_path):
    a = _saelens_arrays()
    with _expect("sae_weights.safetensors", "b_dec"):
        load_sae(_write_saelens_v6(tmp_path / "m", {k: v for k, v in a.items() if k != "b_dec"}, "standard"))
    with _expect("sae_weights.safetensors", "W_extra"):
        load_sae(_write_saelens_v6(tmp_path / "e", {**a, "W_extra": a["b_dec"]}, "standard"))
    with _expect("sae_weights.safetensors", "threshold"):
        load_sae(_write_saelens_v6(tmp_path / "t", a, "jumprelu"))


def test_error_shape_mismatch_against_cfg(tmp_path):
    with _expect("sae_weights.safetensors", "W_enc"):
        load_sae(_write_saelens_v6(tmp_path / "s", _saelens_arrays(), "standard", d_sae=D_SAE + 1))


def test_error_non_float_tensor(tmp_path):
    a = {**_saelens_arrays(), "b_enc": np.zeros(D_SAE, np.int32)}
    with _expect("sae_weights.safetensors", "b_enc"):
        load_sae(_write_saelens_v6(tmp_path / "i", a, "standard"))


def test_error_truncated_files(tmp_path):
    folder = _write_saelens_v6(tmp_path / "cut", _saelens_arrays(), "standard")
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[:-7])
    with _expect("sae_weights.safetensors", "unreadable"):
        load_sae(folder)
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", **_gs_arrays())
    (tmp_path / "gs" / "params.npz").write_bytes((tmp_path / "gs" / "params.npz").read_bytes()[:100])
    with _expect("params.npz", "unreadable"):
        load_sae(tmp_path / "gs", hook_name="h")
    (folder / "cfg.json").write_text("{not json")
    with _expect("cfg.json", "JSON"):
        load_sae(folder)


@pytest.mark.parametrize(
    ("field", "value"),
    [("normalize_activations", "expected_average_only_in"), ("reshape_activations", "hook_z"),
     ("architecture", "transcoder")],
)
def test_error_unsupported_saelens_options(tmp_path, field, value):
    arch = value if field == "architecture" else "standard"
    extra = {} if field == "architecture" else {field: value}
    folder = _write_saelens_v6(tmp_path / field, _saelens_arrays(), arch, **extra)
    with _expect("cfg.json", field):
        load_sae(folder)


def test_error_pre6_hook_z_and_head_index(tmp_path):
    with _expect("cfg.json", "hook_z SAEs are not supported"):
        load_sae(_write_saelens_pre6(tmp_path / "z", _saelens_arrays(), hook_point="blocks.1.attn.hook_z"))
    with _expect("cfg.json", "hook_head_index"):
        load_sae(_write_saelens_pre6(tmp_path / "h", _saelens_arrays(), hook_point_head_index=3))


def test_non_residual_hook_loads_as_is(tmp_path):
    sae = load_sae(_write_saelens_v6(tmp_path / "mlp", _saelens_arrays(), "standard", hook="blocks.2.hook_mlp_out"))
    assert sae.hook_name == "blocks.2.hook_mlp_out"


@pytest.mark.parametrize("field", ["skip_connection", "transcode"])
def test_error_sparsify_unsupported(tmp_path, field):
    folder, _ = _write_sparsify(tmp_path / "layers.0", **{field: True})
    with _expect("cfg.json", field):
        load_sae(folder)


def test_error_sparsify_w_skip_tensor(tmp_path):
    folder, a = _write_sparsify(tmp_path / "layers.0")
    save_file({**a, "W_skip": np.zeros((D_IN, D_IN), np.float32)}, str(folder / "sae.safetensors"))
    with _expect("sae.safetensors", "W_skip"):
        load_sae(folder)


def test_error_gemma_scope_missing_threshold_and_transcoder(tmp_path):
    np.savez(tmp_path / "params.npz", **_saelens_arrays())
    with _expect("params.npz", "threshold"):
        load_sae(tmp_path, hook_name="h")
    gs2 = tmp_path / "gs2"
    gs2.mkdir()
    save_file({k.lower(): v for k, v in _gs_arrays().items()}, str(gs2 / "params.safetensors"))
    (gs2 / "config.json").write_text(json.dumps({"type": "transcoder", "hf_hook_point_in": "model.layers.1.output"}))
    with _expect("config.json", "type"):
        load_sae(gs2)


def test_error_no_sae_and_missing_cfg(tmp_path):
    with pytest.raises(SAEFormatError, match="no SAE found"):
        load_sae(tmp_path)
    save_file(_saelens_arrays(), str(tmp_path / "sae_weights.safetensors"))
    with _expect("cfg.json", "missing config"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "nope")
