"""Text <-> token ids for model folders, and the tokenizer a GGUF file describes.

Contract:
- A model folder carries ``tokenizer.json`` (a serialized ``tokenizers.Tokenizer``) and, optionally,
  ``tokenizer_config.json`` (``chat_template`` and the special tokens, Hugging Face style) and
  ``config.json`` (fallback for the bos/eos/pad ids). ``load_tokenizer(folder)`` reads them into a
  frozen ``TextTokenizer`` record; everything else is a pure module-level function of that record.
- ``encode_batch`` pads on the LEFT (``valid`` is False there), so the last real token of every
  row sits in the last slot; this is the layout ``jaxrecover.transformer`` expects. Arrays are host
  NumPy arrays (``int32`` tokens, ``bool`` valid): tokenization never runs under ``jit``.
- ``tokenizer_from_gguf`` rebuilds the byte-level BPE tokenizer llama.cpp uses for a GGUF file from
  its metadata (``tokenizer.ggml.*``); ids are the file's own, so they match transformers'
  ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``.
- Chat templates are rendered with jinja2 (as transformers does) when it is installed, else with a
  built-in ChatML renderer that covers SmolLM2-style templates (default system prompt + ChatML turns).

Not here: model weights (``gguf_convert``), fetching the default model (``embedded``).
"""

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tokenizers
from jaxtyping import Bool, Int
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

PathLike = str | os.PathLike[str]
Message = Mapping[str, str]

# llama.cpp token types (tokenizer.ggml.token_type): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) that split every digit on its own before the
# GPT-2 regex (llama-vocab.cpp groups these under one regex list starting with "\p{N}"). This is
# also what SmolLM2's own tokenizer.json does (Digits(individual_digits=True) then ByteLevel).
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_GPT2 = ("gpt2", "default", "gpt-2")

_MSG_EMPTY = "{what}: got an empty prompt; pass at least one non-empty text."
_MSG_NO_TOKENIZER = (
    "{folder}: no tokenizer.json. A model folder needs a Hugging Face tokenizer.json next to config.json "
    "(see models/README.md); convert a GGUF file with jaxrecover.gguf_convert.gguf_to_hf_folder to get one."
)
_MSG_UNSUPPORTED_TOKENIZER = (
    "{path}: tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r} is not supported; jaxrecover builds "
    "byte-level BPE tokenizers (tokenizer.ggml.model='gpt2') with pre-tokenizer in {known}."
)
_MSG_NO_PAD = "{what}: the tokenizer has neither a pad id nor an eos id to pad with."


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids and chat template that go with it. Host-side only."""

    tokenizer: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None = None
    add_bos: bool = False  # whether the model was trained with a BOS in front (SmolLM2: no)


# ----------------------------------------------------------------------------------------------
# Building from a GGUF file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value of a ``gguf.GGUFReader`` (scalars, strings, lists), or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_from_gguf(reader: Any, path: PathLike = "<gguf>") -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Rebuild the byte-level BPE tokenizer described by a GGUF file's metadata.

    Args:
        reader: an open ``gguf.GGUFReader``.
        path: the file's path, for error messages only.

    Returns:
        ``(tokenizer, tokenizer_config)``: the ``tokenizers.Tokenizer`` (vocabulary ids exactly as in
        ``tokenizer.ggml.tokens``; control tokens are special added tokens) and a Hugging Face style
        ``tokenizer_config.json`` dict (special tokens, ``chat_template``, ``add_bos_token``).
    """
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _PRE_DIGITS_THEN_GPT2 + _PRE_GPT2:
        known = _PRE_DIGITS_THEN_GPT2 + _PRE_GPT2
        raise ValueError(_MSG_UNSUPPORTED_TOKENIZER.format(path=path, model=model, pre=pre, known=known))
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]

    # Vocabulary entries are stored in the byte-level alphabet already; a control token spelled with
    # other characters (e.g. "<|im_start|>" is plain ASCII, fine) is re-spelled byte-wise so the BPE
    # model accepts it. transformers' GGUF loader does the same.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|> ...) must match whole in text, never be split by BPE; a control
    # token outside the byte alphabet is a llama.cpp mislabel and would grow the vocabulary, so skip it.
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_USER_DEFINED and t in vocab
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt tokenizer has {tok.get_vocab_size(True)} ids, the file lists {len(tokens)}.")

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tok, config


# ----------------------------------------------------------------------------------------------
# Loading from a folder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_tokenizer(folder: PathLike) -> TextTokenizer:
    """Load ``folder/tokenizer.json`` (+ ``tokenizer_config.json``, ``config.json``) as a ``TextTokenizer``.

    Special ids come from the token strings in ``tokenizer_config.json``, falling back to the
    ``*_token_id`` fields of ``config.json``.

    >>> tok = load_tokenizer(default_model_dir())  # doctest: +SKIP
    >>> decode(tok, encode_batch(tok, ["Hi"])[0][0])  # doctest: +SKIP
    'Hi'
    """
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(_MSG_NO_TOKENIZER.format(folder=folder))
    tok = tokenizers.Tokenizer.from_file(str(path))
    tcfg = _read_json(folder / "tokenizer_config.json")
    mcfg = _read_json(folder / "config.json")

    def ident(name: str) -> int | None:
        token = tcfg.get(f"{name}_token")
        if isinstance(token, dict):  # AddedToken serialisation
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
        value = mcfg.get(f"{name}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        return None if value is None else int(value)

    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TextTokenizer(
        tokenizer=tok,
        bos_id=ident("bos"),
        eos_id=ident("eos"),
        pad_id=ident("pad"),
        chat_template=template,
        add_bos=bool(tcfg.get("add_bos_token", False)),
    )


# ----------------------------------------------------------------------------------------------
# Chat template


_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def _as_messages(messages: str | Sequence[Message], what: str) -> list[dict[str, str]]:
    if isinstance(messages, str):
        if not messages.strip():
            raise ValueError(_MSG_EMPTY.format(what=what))
        return [{"role": "user", "content": messages}]
    out = [dict(m) for m in messages]
    if not out:
        raise ValueError(_MSG_EMPTY.format(what=what))
    for m in out:
        if "role" not in m or "content" not in m:
            raise ValueError(f"{what}: every message needs 'role' and 'content', got keys {sorted(m)}.")
    return out


def _render_chatml(template: str | None, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """ChatML without jinja2; the default system turn is taken from the template when it has one."""
    parts = []
    default = _CHATML_SYSTEM.search(template or "")
    if default is not None and messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _render_jinja(tok: TextTokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Render like transformers: sandboxed jinja2, trim_blocks + lstrip_blocks, special tokens in scope."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)

    def text(i: int | None) -> str:
        return "" if i is None else (tok.tokenizer.id_to_token(i) or "")

    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=text(tok.bos_id),
        eos_token=text(tok.eos_id),
        pad_token=text(tok.pad_id),
    )


def apply_chat_template(
    tok: TextTokenizer,
    messages: str | Sequence[Message],
    add_generation_prompt: bool = True,
    *,
    use_jinja: bool | None = None,
) -> str:
    """Format a conversation the way the model was fine-tuned to see it.

    Args:
        tok: the tokenizer record (its ``chat_template``, else plain ChatML).
        messages: a user string, or ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: end with the opening of an assistant turn.
        use_jinja: force (True) or forbid (False) jinja2; ``None`` uses it when installed.

    Returns:
        The prompt text; special tokens appear as text and are matched whole by ``encode_batch``.

    >>> apply_chat_template(tok, "What is the capital of France?")  # doctest: +SKIP
    '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n<|im_start|>user\\n...'
    """
    msgs = _as_messages(messages, "apply_chat_template")
    if use_jinja is None:
        try:
            import jinja2  # noqa: F401

            use_jinja = tok.chat_template is not None
        except ImportError:
            use_jinja = False
    if use_jinja:
        if tok.chat_template is None:
            raise ValueError("apply_chat_template: use_jinja=True but the tokenizer has no chat_template.")
        return _render_jinja(tok, tok.chat_template, msgs, add_generation_prompt)
    return _render_chatml(tok.chat_template, msgs, add_generation_prompt)


# ----------------------------------------------------------------------------------------------
# Encoding / decoding


def encode_batch(
    tok: TextTokenizer,
    texts: str | Sequence[str],
    *,
    pad_to: int | None = None,
    add_bos: bool = False,
) -> tuple[Int[np.ndarray, "batch seq"], Bool[np.ndarray, "batch seq"]]:
    """Tokenize texts into one LEFT-padded ``[batch, seq]`` array.

    Args:
        tok: the tokenizer record.
        texts: the texts (a single string is a batch of one). Special tokens written in the text
            (``<|im_start|>``) are matched whole.
        pad_to: round ``seq`` up to a multiple of this (length buckets keep ``jit`` from recompiling).
        add_bos: put ``tok.bos_id`` in front of every row.

    Returns:
        ``(tokens, valid)``: ``int32`` ids with ``tok.pad_id`` (else ``eos_id``) in the padding, and a
        ``bool`` mask that is False on the padding.

    >>> tokens, valid = encode_batch(tok, ["Hi", "Hello there"], pad_to=8)  # doctest: +SKIP
    >>> tokens.shape, valid.sum(axis=1)  # doctest: +SKIP
    ((2, 8), array([1, 2]))
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not t for t in texts):
        raise ValueError(_MSG_EMPTY.format(what="encode_batch"))
    if pad_to is not None and pad_to < 1:
        raise ValueError(f"encode_batch: pad_to must be a positive int, got {pad_to}.")
    rows = [e.ids for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False)]
    if add_bos:
        if tok.bos_id is None:
            raise ValueError("encode_batch: add_bos=True but the tokenizer has no bos id.")
        rows = [[tok.bos_id, *r] for r in rows]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    if pad is None:
        raise ValueError(_MSG_NO_PAD.format(what="encode_batch"))
    seq = max(len(r) for r in rows)
    if pad_to is not None:
        seq = -(-seq // pad_to) * pad_to
    tokens = np.full((len(rows), seq), pad, dtype=np.int32)
    valid = np.zeros((len(rows), seq), dtype=bool)
    for i, r in enumerate(rows):
        if r:  # left padding: the real tokens end at the last slot
            tokens[i, seq - len(r) :] = r
            valid[i, seq - len(r) :] = True
    return tokens, valid


def decode(tok: TextTokenizer, ids: Sequence[int] | np.ndarray | jax.Array, *, skip_special_tokens: bool = False) -> str:
    """Token ids (one row, e.g. ``tokens[i][valid[i]]``) back to text."""
    flat = np.asarray(ids).reshape(-1).tolist()
    return tok.tokenizer.decode([int(i) for i in flat], skip_special_tokens=skip_special_tokens)
