"""GGUF conversion of the Gemma-2, Gemma-3 and Qwen2 families, and SentencePiece tokenizers from GGUF.

Each model test builds a tiny random float32 checkpoint with transformers, writes it to GGUF with
``gguf.GGUFWriter`` exactly as llama.cpp's ``convert_hf_to_gguf.py`` does for that architecture (tensor
names from ``gguf.get_tensor_name_map``, Gemma norms stored as ``w + 1``, no Q/K row permutation outside
``LlamaModel``, the same metadata keys and nothing more), all tensors F32 so dequantisation is exact.
Then the logits of jaxrecover's converted model (``gguf_to_hf_folder`` -> ``load_transformer`` ->
``forward``) are compared with transformers' own GGUF loading of the same file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``), and with the original model.

The tiny Gemma models use ``head_dim = query_pre_attn_scalar = 256`` and Gemma-3 the 6-layer
local/global pattern with a local RoPE base of 10000: these are the values llama.cpp (and transformers'
GGUF loader) assume because the GGUF files do not store them.

The tokenizer tests write a tiny SentencePiece vocabulary (control, user-defined, byte and normal
pieces, scores that do not follow file order) and compare ids with transformers' GGUF tokenizer.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp
import tokenizers
from test_gguf import TINY_MERGES, TINY_TOKENS

from jaxrecover.io.gguf import GGUFError, gguf_to_hf_folder
from jaxrecover.io.hf import load_transformer
from jaxrecover.model.tokenizer import encode_batch, load_tokenizer, tokenizer_from_gguf
from jaxrecover.model.transformer import forward

RTOL = 1e-4  # of the largest |logit|, fp32
SEQ = 12  # > the sliding window (4): local layers really differ from global ones

# ------------------------------------------------------------------------------------------------
# A tiny SentencePiece vocabulary, laid out like Gemma's (pad, eos, bos, unk first).

SPM_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_SPECIAL_TYPES = [3, 3, 3, 2, 4, 3]  # <start_of_turn> user-defined, the rest control / unknown
SPM_BYTES = [f"<0x{b:02X}>" for b in range(256)]
SPM_PIECES = (
    ["\u2581", "  ", "\u2581\u2581\u2581"]  # "  " is Gemma's real-space spelling of "▁▁"
    + list("abcdefghijklmnopqrstuvwxyzHTW,.!?'")
    + ["\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in", "ll", "lo", "llo", "\u2581he", "el", "hel",
       "\u2581hel", "\u2581hello", "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "er", "an", "\u2581an", "nd",
       "\u2581and", "ing", "\u2581T", "\u2581The", "ick", "\u2581qu", "\u2581quick", "ow", "\u2581br", "\u2581brown"]
)
SPM_TOKENS = SPM_SPECIAL + SPM_BYTES + SPM_PIECES
SPM_TYPES = SPM_SPECIAL_TYPES + [6] * 256 + [1] * len(SPM_PIECES)
# Scores NOT in file order: SentencePiece merges by score, Gemma files by position. For "hello" the
# score order merges e+l first (-> "hel" "lo"), the file order h+e first (-> "he" "llo").
_FIXED_SCORES = {"el": -1.0, "hel": -2.0, "lo": -3.0, "he": -10.0, "ll": -11.0, "llo": -12.0}
SPM_SCORES = [0.0] * (len(SPM_SPECIAL) + 256) + [
    _FIXED_SCORES.get(p, float(x)) for p, x in zip(SPM_PIECES, np.random.default_rng(7).uniform(-50, -20, len(SPM_PIECES)).round(2))
]
BOS, EOS, PAD, UNK = 2, 1, 0, 3

STRINGS = [
    "hello world",
    "ahello",
    "The quick brown fox",
    "hello  world   and",
    " leading space",
    "héllo wörld 日本 42!",
    "<start_of_turn>user\nhi<end_of_turn>",
    "<bos>hello",
    "tabs\tand\nnewlines",
]


def _add_spm_vocab(writer: gguf.GGUFWriter, *, gemma: bool, add_bos: bool | None = True) -> None:
    """What llama.cpp's ``_set_vocab_sentencepiece`` (+ Gemma's ``add_space_prefix(False)``) writes."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(SPM_TOKENS)
    writer.add_token_scores(SPM_SCORES)
    writer.add_token_types(SPM_TYPES)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    if gemma:
        writer.add_add_space_prefix(False)


def _add_bpe_vocab(writer: gguf.GGUFWriter, *, add_bos: bool = False) -> None:
    """A Qwen2-style byte-level vocabulary (``_set_vocab_gpt2`` with pre-tokenizer 'qwen2')."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TINY_TOKENS)
    writer.add_token_types([3] * 3 + [1] * (len(TINY_TOKENS) - 3))
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)


# ------------------------------------------------------------------------------------------------
# Tiny transformers checkpoints and their llama.cpp-style GGUF files

_TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1,
             "max_position_embeddings": 128, "rms_norm_eps": 1e-6}


def _hf_model(family: str):
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**_TINY, num_hidden_layers=2, vocab_size=len(TINY_TOKENS),
                                       rope_theta=20000.0, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**_TINY, num_hidden_layers=2, vocab_size=len(SPM_TOKENS), head_dim=256,
                                        query_pre_attn_scalar=256, sliding_window=4, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0, pad_token_id=PAD, bos_token_id=BOS,
                                        eos_token_id=EOS)
        cls = transformers.Gemma2ForCausalLM
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(**_TINY, num_hidden_layers=6, vocab_size=len(SPM_TOKENS), head_dim=256,
                                            query_pre_attn_scalar=256, sliding_window=4, pad_token_id=PAD,
                                            bos_token_id=BOS, eos_token_id=EOS)
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"  # exact soft-caps and sliding windows
    torch.manual_seed({"qwen2": 1, "gemma2": 2, "gemma3": 3}[family])
    model = cls(cfg).eval()
    with torch.no_grad():  # re-draw everything: no norm sits at a default that hides a +1 / -1 bug
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("norm.weight"):
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + 0.3 * torch.randn_like(p))
            elif "embed" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
    return model


def _write_gguf(
    model, family: str, path: Path, extra_kv: dict[str, tuple] | None = None, *, add_bos: bool | None = None
) -> None:
    """Write ``model`` the way llama.cpp's Qwen2Model / Gemma2Model / Gemma3Model converters do."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny-{family}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if family == "qwen2":
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        _add_bpe_vocab(writer, add_bos=bool(add_bos))
    else:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
        writer.add_sliding_window(c.sliding_window)
        if family == "gemma2":
            writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
            writer.add_final_logit_softcapping(c.final_logit_softcapping)
        else:
            writer.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
        _add_spm_vocab(writer, gemma=True, add_bos=True if add_bos is None else add_bos)
    for key, value in (extra_kv or {}).items():  # (value, gguf.GGUFValueType)
        writer.add_key_value(key, *value)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family)
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    for name, w in model.state_dict().items():
        if family.startswith("gemma") and name == "lm_head.weight":
            continue  # Gemma converters skip it: tied to the embedding
        data = w.detach().float().numpy()
        if family.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's (1 + w) scale
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """family -> (original HF model, GGUF path, converted folder)."""
    out = {}
    for family in ("qwen2", "gemma2", "gemma3"):
        root = tmp_path_factory.mktemp(family)
        model = _hf_model(family)
        path = root / f"tiny-{family}.gguf"
        _write_gguf(model, family, path)
        out[family] = (model, path, root / "conv")
    return out


def _tokens(d_vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, d_vocab, SEQ)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens[None])).logits[0].numpy()


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])
def test_logits_match_transformers_gguf_loader(family_files, family):
    original, path, folder = family_files[family]
    gguf_to_hf_folder(path, folder)
    ours_model = load_transformer(folder)
    assert ours_model.cfg.arch == {"qwen2": "llama", "gemma2": "gemma2", "gemma3": "gemma3"}[family]
    tokens = _tokens(ours_model.cfg.d_vocab)
    ours = np.asarray(jax.jit(lambda t: forward(ours_model, t))(jnp.asarray(tokens, jnp.int32)))

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ref = _torch_logits(ref_model, tokens)
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    print(f"\n[gguf {family}] max |logit diff| vs transformers GGUF = {diff:.2e} (logit scale {scale:.1f})")
    assert diff <= RTOL * scale
    # And transformers' GGUF reading agrees with the model the file was written from.
    np.testing.assert_allclose(_torch_logits(original, tokens), ref, atol=RTOL * scale)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])
def test_converted_weights_and_config(family_files, family, tmp_path):
    """Hugging Face names and values come back (Gemma norms w, not w + 1; Qwen2 Q/K unpermuted)."""
    from safetensors.numpy import load_file

    original, path, _ = family_files[family]
    out = gguf_to_hf_folder(path, tmp_path / "conv")
    got = load_file(str(out / "model.safetensors"))
    want = {k: v.detach().float().numpy() for k, v in original.state_dict().items()}
    if family.startswith("gemma"):
        want.pop("lm_head.weight")
    assert set(got) == set(want)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, atol=1e-6, rtol=0, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    c = original.config
    assert cfg["architectures"] == [type(original).__name__]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (
        c.hidden_size, c.num_hidden_layers, c.num_key_value_heads)
    if family.startswith("gemma"):
        assert cfg["layer_types"] == list(c.layer_types)
        assert cfg["query_pre_attn_scalar"] == 256 and cfg["sliding_window"] == 4
        assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (
            c.attn_logit_softcapping, c.final_logit_softcapping)
        assert cfg["tie_word_embeddings"] is True
    else:
        assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 20000.0


def test_gemma3_rope_scaling_is_refused(tmp_path):
    """Gemma-3 4B+ files carry linear RoPE scaling, which the forward does not implement: say so."""
    path = tmp_path / "scaled.gguf"
    scaling = {"gemma3.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
               "gemma3.rope.scaling.factor": (8.0, gguf.GGUFValueType.FLOAT32)}
    _write_gguf(_hf_model("gemma3"), "gemma3", path, scaling)
    with pytest.raises(GGUFError, match=r"scaled\.gguf.*gemma3\.rope\.scaling"):
        gguf_to_hf_folder(path, tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


# ------------------------------------------------------------------------------------------------
# SentencePiece tokenizers


def _write_tokenizer_gguf(path: Path, arch: str, *, add_bos: bool | None = True) -> None:
    """A metadata-only GGUF: the hyper-parameters transformers' config reader wants, and the vocabulary."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(96)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    _add_spm_vocab(writer, gemma=arch.startswith("gemma"), add_bos=add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def spm_pair(request, tmp_path_factory):
    """(ours: tokenizers.Tokenizer, our tokenizer_config, transformers' GGUF tokenizer) for one arch."""
    path = tmp_path_factory.mktemp("spm") / f"spm-{request.param}.gguf"
    _write_tokenizer_gguf(path, request.param)
    ours, cfg = tokenizer_from_gguf(gguf.GGUFReader(path), path)
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return request.param, ours, cfg, hf


def test_spm_ids_match_transformers(spm_pair):
    arch, ours, cfg, hf = spm_pair
    for text in STRINGS:
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == hf(text, add_special_tokens=False).input_ids, (arch, text)
        # With special tokens: BOS in front, as the file asks (add_bos_token=True).
        with_bos = ours.encode(text).ids
        assert with_bos == hf(text).input_ids == [BOS, *got], (arch, text)
    assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<bos>" and cfg["unk_token"] == "<unk>"


def test_spm_merges_follow_the_right_order(spm_pair):
    """Score order and file order segment "ahello" differently; each arch uses the order transformers
    uses (scores for SentencePiece files, file order for Gemma), and only non-Gemma adds a prefix space."""
    arch, ours, _, hf = spm_pair
    got = ours.encode("ahello", add_special_tokens=False).tokens
    assert got == hf.convert_ids_to_tokens(hf("ahello", add_special_tokens=False).input_ids)
    assert got == {"llama": ["\u2581a", "hel", "lo"], "gemma3": ["a", "he", "llo"]}[arch]


def test_spm_special_and_byte_pieces(spm_pair):
    arch, ours, _, hf = spm_pair
    ids = ours.encode("<start_of_turn>x<end_of_turn>", add_special_tokens=False).ids
    assert ids[0] == SPM_TOKENS.index("<start_of_turn>") and ids[-1] == SPM_TOKENS.index("<end_of_turn>")
    ids = ours.encode("日", add_special_tokens=False).ids  # not in the vocabulary: UTF-8 byte fallback
    assert [SPM_TOKENS[i] for i in ids][-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    for text in STRINGS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False), text
        if arch == "gemma3":  # no prefix space to lose: decoding gives the text back
            assert ours.decode(ids, skip_special_tokens=False) == text


def test_spm_add_bos_defaults_to_true_and_false_is_kept(tmp_path):
    """llama.cpp adds BOS to a SentencePiece vocabulary without the flag; an explicit False is kept."""
    for flag, want in ((None, True), (False, False)):
        path = tmp_path / f"bos-{flag}.gguf"
        _write_tokenizer_gguf(path, "llama", add_bos=flag)
        tok, cfg = tokenizer_from_gguf(gguf.GGUFReader(path), path)
        assert cfg["add_bos_token"] is want
        assert (tok.encode("hello").ids[0] == BOS) is want


def test_folder_keeps_add_bos(family_files, tmp_path):
    """The HF folder the converter writes adds BOS like the GGUF says (tokenizer.json post-processor,
    tokenizer_config.json, and jaxrecover's own encode_batch), without doubling a template's <bos>."""
    _, path, _ = family_files["gemma2"]
    folder = gguf_to_hf_folder(path, tmp_path / "conv")
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf_folder = transformers.AutoTokenizer.from_pretrained(folder)
    hf_gguf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in STRINGS:
        assert raw.encode(text).ids == hf_folder(text).input_ids == hf_gguf(text).input_ids, text
        assert raw.encode(text).ids[0] == BOS
    tok = load_tokenizer(folder)
    assert tok.add_bos and tok.bos_id == BOS
    tokens, valid = encode_batch(tok, ["hello world", "<bos>hello world"])
    rows = [t[v].tolist() for t, v in zip(tokens, valid)]
    assert rows[0] == rows[1] == hf_gguf("hello world").input_ids
    assert encode_batch(tok, "hello", add_bos=False)[0][0, 0] != BOS


BYTE_LEVEL_STRINGS = ["the in a the", "In 1492, x12y  8 apples\n\n 3", "don't  stop\tnow", "héllo 日本 ½ ①"]


def test_qwen2_pre_tokenizer_ids_match_transformers(family_files):
    """Byte-level BPE with tokenizer.ggml.pre='qwen2' (one split regex, digits one by one)."""
    _, path, _ = family_files["qwen2"]
    ours, cfg = tokenizer_from_gguf(gguf.GGUFReader(path), path)
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in BYTE_LEVEL_STRINGS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == text
    assert cfg["add_bos_token"] is False and ours.encode("the").ids == ours.encode("the", add_special_tokens=False).ids


def test_byte_level_add_bos_reaches_the_folder(tmp_path):
    """A byte-level file with add_bos_token=True (Llama-3 style): tokenizer.json adds BOS like the GGUF."""
    path = tmp_path / "bos.gguf"
    _write_gguf(_hf_model("qwen2"), "qwen2", path, add_bos=True)
    folder = gguf_to_hf_folder(path, tmp_path / "conv")
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in BYTE_LEVEL_STRINGS:
        assert raw.encode(text).ids == hf(text).input_ids, text
        assert raw.encode(text).ids[0] == 0
    assert load_tokenizer(folder).add_bos
