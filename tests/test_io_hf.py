"""Checkpoint I/O: save -> load round trips, and every strictness rule raising with file + key."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxrecover.io import hf as io_hf
from jaxrecover.io.hf import CheckpointError, flatten_transformer, load_transformer, save_transformer
from jaxrecover.testing import random_transformer, tiny_config


def _same(a, b):
    fa, fb = flatten_transformer(a), flatten_transformer(b)
    assert a.cfg == b.cfg and fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


@pytest.fixture
def saved(tmp_path):
    """A tiny untied Llama written by save_transformer: (folder, model)."""
    model = random_transformer(jax.random.key(0), tiny_config("llama", tied_embeddings=False))
    return save_transformer(model, tmp_path / "m"), model


def _edit_weights(folder, fn):
    f = folder / io_hf.WEIGHTS_FILE
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return f


@pytest.mark.parametrize(
    "cfg",
    [tiny_config("llama"), tiny_config("llama", tied_embeddings=False), tiny_config("llama", attn_bias=True),
     tiny_config("llama", attn_bias=True, attn_out_bias=True), tiny_config("gpt2"), tiny_config("gemma2"),
     tiny_config("gemma3"), tiny_config("gemma3", dtype="bfloat16")],
    ids=["llama", "untied", "qwen2", "llama_bias", "gpt2", "gemma2", "gemma3", "gemma3_bf16"],
)
def test_save_load_round_trip(tmp_path, cfg):
    model = random_transformer(jax.random.key(3), cfg)
    save_transformer(model, tmp_path / "m")
    back = load_transformer(tmp_path / "m", dtype=cfg.dtype)
    if cfg.arch.startswith("gemma"):  # (w - 1) then (+ 1) is not bit-exact in float32
        for k, v in flatten_transformer(back).items():
            np.testing.assert_allclose(np.asarray(v, np.float32), np.asarray(flatten_transformer(model)[k], np.float32),
                                       atol=1e-6 if cfg.dtype == "float32" else 2e-2, err_msg=k)
        assert back.cfg == model.cfg
    else:
        _same(back, model)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind


def test_bf16_file_loads_as_float32(tmp_path):
    m16 = random_transformer(jax.random.key(0), tiny_config("llama", dtype="bfloat16"))
    save_transformer(m16, tmp_path / "m")
    assert load_file(tmp_path / "m" / io_hf.WEIGHTS_FILE)["model.embed_tokens.weight"].dtype.name == "bfloat16"
    m32 = load_transformer(tmp_path / "m", dtype="float32")
    assert m32.W_E.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(m32.W_E), np.asarray(m16.W_E, np.float32))


def test_missing_key(saved):
    folder, _ = saved
    f = _edit_weights(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'") as e:
        load_transformer(folder)
    assert str(f) in str(e.value)


def test_extra_key(saved):
    folder, _ = saved
    f = _edit_weights(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.rotary_emb\.inv_freq'") as e:
        load_transformer(folder)
    assert str(f) in str(e.value)


def test_layer_beyond_config_is_extra(saved):
    folder, _ = saved
    _edit_weights(folder, lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        load_transformer(folder)


def test_wrong_shape(saved):
    folder, _ = saved
    _edit_weights(folder, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(31,\), expected \(32,\)"):
        load_transformer(folder)


def test_integer_dtype(saved):
    folder, _ = saved
    _edit_weights(folder, lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype I32"):
        load_transformer(folder)


@pytest.mark.parametrize("cut", [5, 1000])
def test_truncated_file(saved, cut):
    folder, _ = saved
    f = folder / io_hf.WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_transformer(folder)
    assert str(f) in str(e.value)


def test_garbage_file(saved):
    folder, _ = saved
    (folder / io_hf.WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_transformer(folder)


def test_unknown_architecture(saved):
    folder, _ = saved
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"Unknown architecture 'BertModel'.*config\.json"):
        load_transformer(folder)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_transformer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(io_hf.to_hf_config(tiny_config("llama"))))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_transformer(tmp_path)


def test_tied_duplicate_accepted_only_if_equal(tmp_path):
    model = random_transformer(jax.random.key(0), tiny_config("llama"))
    folder = save_transformer(model, tmp_path / "m")
    _edit_weights(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    _same(load_transformer(folder), model)
    _edit_weights(folder, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1.0}))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' differs from the input embedding"):
        load_transformer(folder)


def test_gpt2_keys_without_prefix_and_mask_buffers(tmp_path):
    """The original GPT-2 upload has no 'transformer.' prefix and stores causal-mask buffers."""
    model = random_transformer(jax.random.key(0), tiny_config("gpt2"))
    folder = save_transformer(model, tmp_path / "m")

    def strip(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)

    _edit_weights(folder, strip)
    _same(load_transformer(folder), model)


def test_sharded_checkpoint(tmp_path):
    model = random_transformer(jax.random.key(0), tiny_config("gemma2"))
    folder = save_transformer(model, tmp_path / "m")
    tensors = load_file(folder / io_hf.WEIGHTS_FILE)
    (folder / io_hf.WEIGHTS_FILE).unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, folder / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (folder / io_hf.INDEX_FILE).write_text(json.dumps(index))
    reloaded = load_transformer(folder)
    expected = load_transformer(save_transformer(model, tmp_path / "single"))
    _same(reloaded, expected)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_transformer(folder)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous files untouched and no temporary folder."""
    model = random_transformer(jax.random.key(0), tiny_config("llama"))
    folder = save_transformer(model, tmp_path / "m")
    (folder / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(io_hf, "save_file", boom)
    other = random_transformer(jax.random.key(1), tiny_config("llama"))
    with pytest.raises(OSError, match="disk full"):
        save_transformer(other, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]
    monkeypatch.undo()
    save_transformer(other, folder)  # overwriting keeps unrelated files
    _same(load_transformer(folder), other)
    assert (folder / "tokenizer.json").exists()


def test_config_round_trip_and_rejection():
    for arch in ("llama", "gpt2", "gemma2", "gemma3"):
        cfg = tiny_config(arch)
        assert io_hf.from_hf_config(io_hf.to_hf_config(cfg)) == cfg
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        io_hf.to_hf_config(tiny_config("llama", embed_scale=2.0))
