"""Convert a llama.cpp GGUF file into a Hugging Face style model folder (float32 safetensors).

Contract:
- ``gguf_to_hf_folder(gguf_path, out_dir)`` writes ``out_dir/`` with ``config.json``
  (``LlamaForCausalLM``), ``model.safetensors`` (float32, Hugging Face key names),
  ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template), ``generation_config.json``
  and ``gguf_source.json`` (file name and sha256 of the source; callers use it as a cache marker).
- Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_1, ...
  whatever the installed ``gguf`` supports). Quantization error is NOT undone: the folder holds exactly
  the weights llama.cpp would run, widened to float32.
- llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` so that RoPE rotates interleaved
  pairs (0,1), (2,3), ...; Hugging Face Llama rotates half-split pairs (i, i + d_head/2). We apply the
  inverse permutation (same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``).
- The write is atomic: everything goes into a temporary folder next to ``out_dir`` that is renamed at
  the end, so a crash never leaves a half-written ``out_dir``.
- Only ``general.architecture == "llama"`` is supported (SmolLM2, Llama-2/3 without RoPE scaling,
  ...); anything else, and truncated or corrupt files, raise ``GGUFError`` naming the file.

Not here: downloading (``embedded``), loading into JAX (``io_hf``).
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxrecover.tokenizer import tokenizer_from_gguf

PathLike = str | os.PathLike[str]

SOURCE_MARKER = "gguf_source.json"
SUPPORTED_ARCHS = ("llama",)

_MSG_UNREADABLE = "{path}: not a readable GGUF file (truncated or corrupt?): {err}"
_MSG_ARCH = (
    "{path}: general.architecture={arch!r} is not supported; jaxrecover.gguf_convert converts {supported} "
    "GGUF files only."
)
_MSG_MISSING_KEY = "{path}: GGUF metadata key {key!r} is missing."
_MSG_UNKNOWN_TENSOR = "{path}: tensor {name!r} has no Hugging Face Llama equivalent (unsupported variant?)."
_MSG_SHAPE = "{path}: tensor {name!r} has shape {shape}, expected {expected} from the metadata."
_MSG_MISSING_TENSORS = "{path}: tensors missing from the file: {names}."
_MSG_EXISTS = "{out_dir} already exists; pass overwrite=True to replace it."
_MSG_ROPE_SCALING = "{path}: RoPE scaling ({what}) is not supported; only plain RoPE converts."

# GGUF per-layer tensor name -> Hugging Face name (after "model.layers.{i}.").
_LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def open_gguf(path: PathLike) -> Any:
    """``gguf.GGUFReader`` for ``path``; any parse failure becomes a ``GGUFError`` naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise GGUFError(_MSG_UNREADABLE.format(path=path, err=f"{type(err).__name__}: {err}")) from err
    return reader


def _meta(reader: Any, key: str, path: PathLike, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFError(_MSG_MISSING_KEY.format(path=path, key=key))
        return default
    return field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value at float32 precision (9.999999747e-06 -> 1e-05), as HF configs write it."""
    return float(f"{float(value):.7g}")


def hf_config_from_gguf(reader: Any, path: PathLike = "<gguf>") -> dict[str, Any]:
    """``config.json`` (``LlamaForCausalLM``) from the GGUF metadata; raises for non-llama files."""
    arch = _meta(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(_MSG_ARCH.format(path=path, arch=arch, supported=SUPPORTED_ARCHS))
    for what in ("rope.scaling.type", "rope.scaling.factor"):
        value = _meta(reader, f"{arch}.{what}", path, None)
        if value not in (None, "none", 1.0, 0.0):
            raise GGUFError(_MSG_ROPE_SCALING.format(path=path, what=f"{arch}.{what}={value!r}"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(_MSG_ROPE_SCALING.format(path=path, what="rope_freqs.weight"))
    d_model = int(_meta(reader, f"{arch}.embedding_length", path))
    n_heads = int(_meta(reader, f"{arch}.attention.head_count", path))
    n_kv = _meta(reader, f"{arch}.attention.head_count_kv", path, n_heads)
    if isinstance(n_kv, list):  # some writers store one value per layer
        if len(set(n_kv)) != 1:
            raise GGUFError(f"{path}: per-layer head_count_kv={n_kv} is not supported.")
        n_kv = n_kv[0]
    d_head = int(_meta(reader, f"{arch}.attention.key_length", path, d_model // n_heads))
    tokens = _meta(reader, "tokenizer.ggml.tokens", path, None)
    vocab = _meta(reader, f"{arch}.vocab_size", path, None if tokens is None else len(tokens))
    if vocab is None:
        vocab = int(next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[1])

    def token_id(key: str) -> int | None:
        value = _meta(reader, f"tokenizer.ggml.{key}", path, None)
        return None if value is None else int(value)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(_meta(reader, f"{arch}.feed_forward_length", path)),
        "num_hidden_layers": int(_meta(reader, f"{arch}.block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": d_head,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length", path, 2048)),
        "rms_norm_eps": _f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _f32(_meta(reader, f"{arch}.rope.freq_base", path, 10000.0)),
        "rope_scaling": None,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "torch_dtype": "float32",
    }


def _reverse_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for RoPE.

    llama.cpp stores, per head, rows ``[r0, r_h, r1, r_{h+1}, ...]`` (``h = d_head/2``): the interleaved
    pair layout. Reading rows as ``(head, d_head/2, 2)`` and swapping the last two axes gives back the
    half-split layout ``[r0, r1, ..., r_{h-1}, r_h, ...]``. Works for weights ``[out, in]`` and biases ``[out]``.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, path: PathLike) -> str:
    if name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_KEYS:
        return f"model.layers.{int(parts[1])}.{_LAYER_KEYS[parts[2]]}.{parts[3]}"
    raise GGUFError(_MSG_UNKNOWN_TENSOR.format(path=path, name=name))


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face ``[out, in]`` shape for every weight the config implies."""
    d, v, m = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    per_layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (m, d),
        "mlp.up_proj.weight": (m, d),
        "mlp.down_proj.weight": (d, m),
    }
    if cfg["attention_bias"]:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in per_layer.items()}
    return shapes


def gguf_tensors_to_hf(reader: Any, cfg: dict[str, Any], path: PathLike = "<gguf>") -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its Hugging Face name, Q/K un-permuted, shapes checked."""
    from gguf.quants import dequantize

    expected = _expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        try:
            # GGUF lists dims innermost-first; the reader's array (and dequantize's result) is
            # row-major [out, in], which is already Hugging Face's nn.Linear layout.
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except Exception as err:
            raise GGUFError(f"{path}: cannot dequantize {tensor.name!r} ({tensor.tensor_type.name}): {err}") from err
        if name not in expected:
            raise GGUFError(_MSG_UNKNOWN_TENSOR.format(path=path, name=tensor.name))
        if w.shape != expected[name]:
            raise GGUFError(_MSG_SHAPE.format(path=path, name=tensor.name, shape=w.shape, expected=expected[name]))
        if ".self_attn.q_proj." in name:
            w = _reverse_rope_permute(w, cfg["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            w = _reverse_rope_permute(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise GGUFError(_MSG_MISSING_TENSORS.format(path=path, names=missing[:8] + (["..."] if len(missing) > 8 else [])))
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_to_hf_folder(gguf_path: PathLike, out_dir: PathLike, *, overwrite: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face model folder.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to create (its parent is created if needed).
        overwrite: replace an existing ``out_dir`` (still atomically: the old folder is only removed
            once the new one is complete).

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        GGUFError: truncated/corrupt file, unsupported architecture or tensor, shape mismatch.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.

    >>> gguf_to_hf_folder("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-135m-instruct")  # doctest: +SKIP
    PosixPath('models/smollm2-135m-instruct')
    """
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(_MSG_EXISTS.format(out_dir=out_dir))
    reader = open_gguf(gguf_path)
    cfg = hf_config_from_gguf(reader, gguf_path)
    tok, tok_cfg = tokenizer_from_gguf(reader, gguf_path)
    if tok.get_vocab_size(with_added_tokens=True) != cfg["vocab_size"]:
        raise GGUFError(f"{gguf_path}: tokenizer has {tok.get_vocab_size(True)} ids, vocab_size={cfg['vocab_size']}.")
    tensors = gguf_tensors_to_hf(reader, cfg, gguf_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_json(tmp / "config.json", cfg)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        _write_json(tmp / "generation_config.json", generation)
        source = {
            "file": gguf_path.name,
            "sha256": sha256_file(gguf_path),
            "general.name": _meta(reader, "general.name", gguf_path, None),
            "converter": "jaxrecover.gguf_convert",
            "format_version": 1,
        }
        _write_json(tmp / SOURCE_MARKER, source)  # written last: its presence means the folder is complete
        # mkdtemp makes a private 0700 folder; a converted model is meant to be shared like any cache.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():  # overwrite: swap, then remove the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)  # atomic on POSIX; fails if another process created out_dir meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
