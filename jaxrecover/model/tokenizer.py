"""Text <-> token ids for model folders, and the tokenizer a GGUF file describes.

Contract:
- A model folder carries ``tokenizer.json`` (a serialized ``tokenizers.Tokenizer``) and, optionally,
  ``tokenizer_config.json`` (``chat_template`` and the special tokens, Hugging Face style) and
  ``config.json`` (fallback for the bos/eos/pad ids). ``load_tokenizer(folder)`` reads them into a
  frozen ``TextTokenizer`` record; everything else is a pure module-level function of that record.
- ``encode_batch`` pads on the LEFT (``valid`` is False there), so the last real token of every
  row sits in the last slot; this is the layout ``jaxrecover.model.transformer`` expects. Arrays are host
  NumPy arrays (``int32`` tokens, ``bool`` valid): tokenization never runs under ``jit``.
- ``tokenizer_from_gguf`` rebuilds the tokenizer llama.cpp uses for a GGUF file from its metadata
  (``tokenizer.ggml.*``): byte-level BPE (``model='gpt2'``: SmolLM2, Qwen2, Llama-3) or SentencePiece
  BPE (``model='llama'``: Gemma, Llama-2), with ``add_bos_token`` kept in both the tokenizer.json
  post-processor and ``TextTokenizer.add_bos``; ids are the file's own, so they match transformers'
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
# Pre-tokenizers that are one split regex before the byte-level mapping (llama-vocab.cpp's regex lists;
# the same strings as transformers' Qwen2 / Llama-3 tokenizers).
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
_PRE_KNOWN = _PRE_DIGITS_THEN_GPT2 + _PRE_GPT2 + tuple(_PRE_SPLITS)

# SentencePiece vocabularies (tokenizer.ggml.model == "llama"): Gemma files spell whitespace-only
# tokens with real spaces, never add a prefix space, and rank merges by file order (their scores do
# not follow the merge order), as transformers' GGUF loader (gemma_tokenizer) also assumes.
_SPM_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_SPACE = "\u2581"  # SentencePiece's visible space "▁"

_MSG_EMPTY = "{what}: got an empty prompt; pass at least one non-empty text."
_MSG_NO_TOKENIZER = (
    "{folder}: no tokenizer.json. A model folder needs a Hugging Face tokenizer.json next to config.json "
    "(see models/README.md); convert a GGUF file with jaxrecover.io.gguf.gguf_to_hf_folder to get one."
)
_MSG_UNSUPPORTED_TOKENIZER = (
    "{path}: tokenizer.ggml.model={model!r}, tokenizer.ggml.pre={pre!r} is not supported; jaxrecover builds "
    "SentencePiece tokenizers (tokenizer.ggml.model='llama') and byte-level BPE tokenizers "
    "(tokenizer.ggml.model='gpt2') with pre-tokenizer in {known}."
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
    add_bos: bool = False  # whether the model was trained with a BOS in front (SmolLM2: no; Gemma: yes)


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


def _byte_level_tokenizer(
    tokens: list[str], token_types: list[int], merges: list[str], pre: str
) -> tuple[tokenizers.Tokenizer, set[str]]:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and the vocabulary spellings it uses."""
    # Vocabulary entries are stored in the byte-level alphabet already; a control token spelled with
    # other characters (e.g. "<|im_start|>" is plain ASCII, fine) is re-spelled byte-wise so the BPE
    # model accepts it. transformers' GGUF loader does the same.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]

    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre in _PRE_SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in _PRE_DIGITS_THEN_GPT2:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # A control token outside the byte alphabet is a llama.cpp mislabel and would grow the vocabulary.
    control_ok = {t for t, kind in zip(tokens, token_types) if kind == _TOKEN_CONTROL and set(t) <= alphabet}
    return tok, control_ok | set(vocab)


def spm_merges(vocab: Mapping[str, int], rank: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    ``rank`` of the merged token first (ties: shorter left piece first, then vocabulary order).

    This is SentencePiece's BPE rule (merge the adjacent pair whose union scores highest) written as the
    ordered merge list a ``tokenizers.models.BPE`` needs; it is the order transformers'
    ``generate_merges`` produces, so ids match its GGUF loader.
    """
    found: list[tuple[str, str, float]] = []
    for piece, score in rank.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep the order above
    return [(left, right) for left, right, _ in found]


def _spm_tokenizer(
    tokens: list[str], scores: list[float], arch: str, add_space_prefix: bool, unk: str | None
) -> tuple[tokenizers.Tokenizer, set[str]]:
    """SentencePiece BPE (``tokenizer.ggml.model == "llama"``): ``▁`` for spaces, ``<0xNN>`` byte fallback."""
    gemma = arch in _SPM_GEMMA_ARCHS
    if gemma:  # "  " (real spaces) is Gemma's spelling of the token "▁▁"
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    rank = {t: -float(i) for t, i in vocab.items()} if gemma else {t: float(scores[i]) for t, i in vocab.items()}
    model = models.BPE(vocab=vocab, merges=spm_merges(vocab, rank), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    # split=False: SentencePiece sees the whole text as one piece, spaces included (as "▁").
    scheme = "first" if add_space_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []))
    return tok, set(tokens)


def _special_post_processor(
    tok: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    """A ``TemplateProcessing`` that adds BOS / EOS as the GGUF asks (``add_special_tokens=True`` only),
    so a Hugging Face loader of the folder encodes like llama.cpp; ``None`` when nothing is added."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not (add_bos or add_eos):
        return None
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    special = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_from_gguf(reader: Any, path: PathLike = "<gguf>") -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """Rebuild the tokenizer described by a GGUF file's metadata.

    ``tokenizer.ggml.model == "gpt2"`` gives byte-level BPE (``tokenizer.ggml.merges``, pre-tokenizer from
    ``tokenizer.ggml.pre``); ``"llama"`` gives SentencePiece BPE (merges from ``tokenizer.ggml.scores``,
    ``<0xNN>`` byte fallback, ``tokenizer.ggml.add_space_prefix``). Control tokens (type 3) are special
    added tokens and user-defined ones (type 4) plain added tokens: both match whole in text.

    Args:
        reader: an open ``gguf.GGUFReader``.
        path: the file's path, for error messages only.

    Returns:
        ``(tokenizer, tokenizer_config)``: the ``tokenizers.Tokenizer`` (vocabulary ids exactly as in
        ``tokenizer.ggml.tokens``; its post-processor adds BOS / EOS when the file says so) and a Hugging
        Face style ``tokenizer_config.json`` dict (special tokens, ``chat_template``, ``add_bos_token``).
    """
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    arch = _field(reader, "general.architecture")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError(f"{path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing or empty.")
    token_types: list[int] = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))

    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}={int(i)} is outside the {len(tokens)}-token vocabulary.")
        return None if i is None else tokens[int(i)]

    if model == "gpt2" and pre in _PRE_KNOWN:
        merges = list(_field(reader, "tokenizer.ggml.merges", []))
        tok, known = _byte_level_tokenizer(tokens, token_types, merges, pre)
        add_bos_default = False
    elif model == "llama":
        scores = list(_field(reader, "tokenizer.ggml.scores", []))
        gemma = arch in _SPM_GEMMA_ARCHS
        if len(scores) != len(tokens) and not gemma:
            raise ValueError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens.")
        add_space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", not gemma)) and not gemma
        tok, known = _spm_tokenizer(tokens, scores, arch, add_space_prefix, name("unknown_token_id"))
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
    else:
        raise ValueError(_MSG_UNSUPPORTED_TOKENIZER.format(path=path, model=model, pre=pre, known=_PRE_KNOWN))

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_CONTROL and t in known
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types)
        if kind == _TOKEN_USER_DEFINED and t in known and tok.token_to_id(t) is not None
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt tokenizer has {tok.get_vocab_size(True)} ids, the file lists {len(tokens)}.")

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    bos, eos = name("bos_token_id"), name("eos_token_id")
    template = _special_post_processor(tok, bos, eos, add_bos, add_eos)
    if template is not None:
        # Byte-level keeps its offset-fixing post-processor; the template runs after it.
        current = tok.post_processor
        tok.post_processor = template if current is None else processors.Sequence([current, template])

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{arch}.context_length", 2048)),
    }
    chat_template = _field(reader, "tokenizer.chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
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


_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)


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
    add_bos: bool | None = None,
) -> tuple[Int[np.ndarray, "batch seq"], Bool[np.ndarray, "batch seq"]]:
    """Tokenize texts into one LEFT-padded ``[batch, seq]`` array.

    Args:
        tok: the tokenizer record.
        texts: the texts (a single string is a batch of one). Special tokens written in the text
            (``<|im_start|>``) are matched whole.
        pad_to: round ``seq`` up to a multiple of this (length buckets keep ``jit`` from recompiling).
        add_bos: put ``tok.bos_id`` in front of every row. ``None`` (default) follows the model:
            ``tok.add_bos`` (the GGUF's ``add_bos_token``; True for Gemma, False for SmolLM2), and a row
            that already starts with BOS (a chat template that writes ``<bos>``) gets no second one.

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
    if add_bos is None and tok.add_bos and tok.bos_id is not None:
        rows = [r if r[:1] == [tok.bos_id] else [tok.bos_id, *r] for r in rows]
    elif add_bos:
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
