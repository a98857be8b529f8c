"""Convert a llama.cpp GGUF file into a Hugging Face style model folder (float32 safetensors).

Contract:
- ``gguf_to_hf_folder(gguf_path, out_dir)`` writes ``out_dir/`` with ``config.json`` (``LlamaForCausalLM``,
  ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM`` or ``Gemma3ForCausalLM``), ``model.safetensors`` (float32,
  Hugging Face key names), ``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template and
  ``add_bos_token``), ``generation_config.json`` and ``gguf_source.json`` (file name and sha256 of the
  source; callers use it as a cache marker).
- Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_1, ...
  whatever the installed ``gguf`` supports). Quantization error is NOT undone: the folder holds exactly
  the weights llama.cpp would run, widened to float32.
- Per-architecture storage conventions of llama.cpp's ``convert_hf_to_gguf.py`` are undone:
  - ``llama``: the rows of ``attn_q`` / ``attn_k`` are permuted so that RoPE rotates interleaved pairs
    (0,1), (2,3), ...; Hugging Face rotates half-split pairs (i, i + d_head/2). We apply the inverse
    permutation (same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``). Only
    ``LlamaModel`` does this in llama.cpp: ``qwen2`` and the Gemma families are stored unpermuted.
  - ``gemma2`` / ``gemma3``: Gemma RMSNorms scale by ``(1 + w)`` and llama.cpp stores ``w + 1`` for every
    ``*norm.weight`` (q/k norms included); we subtract 1 so the folder holds Hugging Face's ``w``.
    Values llama.cpp does not store are filled in the way llama.cpp itself fills them at load time
    (local RoPE base 10000, sliding-window pattern 2 / 6, attention scale ``1/sqrt(head_dim)`` except
    the 27B models, Gemma-2 soft-caps 50 / 30).
- The write is atomic: everything goes into a temporary folder next to ``out_dir`` that is renamed at
  the end, so a crash never leaves a half-written ``out_dir``.
- Only ``general.architecture`` in ``SUPPORTED_ARCHS`` converts, with plain RoPE (no scaling: Gemma-3
  4B and larger use linear RoPE scaling, which ``jaxrecover.model.transformer`` does not implement);
  anything else, and truncated or corrupt files, raise ``GGUFError`` naming the file.

Not here: downloading (``embedded``), loading into JAX (``io_hf``).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxrecover.model.tokenizer import tokenizer_from_gguf

PathLike = str | os.PathLike[str]

SOURCE_MARKER = "gguf_source.json"
SUPPORTED_ARCHS = ("llama", "qwen2", "gemma2", "gemma3")

_MSG_UNREADABLE = "{path}: not a readable GGUF file (truncated or corrupt?): {err}"
_MSG_ARCH = (
    "{path}: general.architecture={arch!r} is not supported; jaxrecover.io.gguf converts {supported} "
    "GGUF files only."
)
_MSG_MISSING_KEY = "{path}: GGUF metadata key {key!r} is missing."
_MSG_UNKNOWN_TENSOR = "{path}: tensor {name!r} has no Hugging Face {model} equivalent (unsupported variant?)."
_MSG_SHAPE = "{path}: tensor {name!r} has shape {shape}, expected {expected} from the metadata."
_MSG_MISSING_TENSORS = "{path}: tensors missing from the file: {names}."
_MSG_EXISTS = "{out_dir} already exists; pass overwrite=True to replace it."
_MSG_ROPE_SCALING = "{path}: RoPE scaling ({what}) is not supported; only plain RoPE converts."

# GGUF per-layer tensor name -> Hugging Face name (after "model.layers.{i}."), per architecture.
_LLAMA_LAYER_KEYS = {
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
# Gemma has four norms per block; note that GGUF "ffn_norm" is Gemma's PRE-feedforward norm, while the
# Llama "ffn_norm" is Hugging Face's post_attention_layernorm (the same slot, a different name).
_GEMMA2_LAYER_KEYS = _LLAMA_LAYER_KEYS | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA3_LAYER_KEYS = _GEMMA2_LAYER_KEYS | {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """How llama.cpp stores one architecture, and what Hugging Face calls it."""

    arch: str  # general.architecture
    hf_class: str  # config.json "architectures"
    model_type: str
    layer_keys: Mapping[str, str]
    rope_permuted: bool  # Q/K rows interleaved by llama.cpp's LlamaModel.permute
    norm_shift: float  # llama.cpp stores w + norm_shift for every *norm.weight
    qkv_bias: bool  # q/k/v biases always present (Qwen2)
    qk_norm: bool  # per-head q/k RMSNorm (Gemma-3)
    gemma_norms: bool  # four norms per block (Gemma-2/3)


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", _LLAMA_LAYER_KEYS, True, 0.0, False, False, False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", _LLAMA_LAYER_KEYS, False, 0.0, True, False, False),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", "gemma2", _GEMMA2_LAYER_KEYS, False, 1.0, False, False, True),
    "gemma3": Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", _GEMMA3_LAYER_KEYS, False, 1.0, False, True, True),
}
assert tuple(FAMILIES) == SUPPORTED_ARCHS

# llama.cpp (llama-model.cpp) hard-codes what the Gemma GGUF files do not say:
# - sliding-window layers: layer i is local iff i % n < n - 1 (n = 2 for Gemma-2, 6 for Gemma-3);
# - the local-layer RoPE base of Gemma-3 is 10000;
# - queries are scaled by 1/sqrt(head_dim), except the 27B models (46 / 62 layers), whose Hugging Face
#   query_pre_attn_scalar is hidden_size / num_attention_heads;
# - Gemma-2 soft-caps default to 50 (attention) and 30 (final logits).
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_SOFTCAP_DEFAULTS = {"gemma2": (50.0, 30.0), "gemma3": (None, None)}


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


def family_of(reader: Any, path: PathLike = "<gguf>") -> Family:
    """The ``Family`` of a GGUF file's ``general.architecture``; raises ``GGUFError`` for others."""
    arch = _meta(reader, "general.architecture", path)
    if arch not in FAMILIES:
        raise GGUFError(_MSG_ARCH.format(path=path, arch=arch, supported=SUPPORTED_ARCHS))
    return FAMILIES[arch]


def _single(value: Any, key: str, path: PathLike) -> Any:
    """A per-layer list whose entries all agree, as one value (some writers store one value per layer)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GGUFError(f"{path}: per-layer {key}={value} is not supported.")
        return value[0]
    return value


def _layer_types(reader: Any, arch: str, n_layers: int, path: PathLike) -> list[str]:
    """Hugging Face ``layer_types`` of a Gemma file: ``attention.sliding_window_pattern`` if present
    (an int period, or one bool per layer, True = sliding), else llama.cpp's built-in period."""
    pattern = _meta(reader, f"{arch}.attention.sliding_window_pattern", path, _SWA_PATTERN[arch])
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise GGUFError(f"{path}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers.")
        local = [bool(p) for p in pattern]
    else:
        n = int(pattern)
        if n < 1:
            raise GGUFError(f"{path}: {arch}.attention.sliding_window_pattern={n} must be >= 1.")
        local = [i % n < n - 1 for i in range(n_layers)]
    return ["sliding_attention" if is_local else "full_attention" for is_local in local]


def _gemma_config(reader: Any, fam: Family, base: dict[str, Any], path: PathLike) -> dict[str, Any]:
    """The Gemma-only ``config.json`` fields, with llama.cpp's defaults for what the file leaves out."""
    arch, n_layers = fam.arch, base["num_hidden_layers"]
    value_length = int(_meta(reader, f"{arch}.attention.value_length", path, base["head_dim"]))
    if value_length != base["head_dim"]:
        raise GGUFError(f"{path}: {arch}.attention.value_length={value_length} differs from key_length={base['head_dim']}.")
    scale = _meta(reader, f"{arch}.attention.scale", path, None)
    if scale is not None:  # newer writers state the query scale; Hugging Face wants its inverse square
        query_pre_attn_scalar = _f32(float(scale) ** -2)
    elif n_layers == _GEMMA_27B_LAYERS[arch]:
        query_pre_attn_scalar = base["hidden_size"] // base["num_attention_heads"]
    else:
        query_pre_attn_scalar = base["head_dim"]
    attn_cap, final_cap = _SOFTCAP_DEFAULTS[arch]
    attn_cap = _meta(reader, f"{arch}.attn_logit_softcapping", path, attn_cap)
    final_cap = _meta(reader, f"{arch}.final_logit_softcapping", path, final_cap)
    out = {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "attn_logit_softcapping": None if attn_cap is None else _f32(attn_cap),
        "final_logit_softcapping": None if final_cap is None else _f32(final_cap),
        "sliding_window": int(_meta(reader, f"{arch}.attention.sliding_window", path)),
        "layer_types": _layer_types(reader, arch, n_layers, path),
        "attention_bias": False,
    }
    if arch == "gemma3":
        out["rope_local_base_freq"] = _f32(_meta(reader, f"{arch}.rope.freq_base_swa", path, 10000.0))
    return out


def hf_config_from_gguf(reader: Any, path: PathLike = "<gguf>") -> dict[str, Any]:
    """``config.json`` (Llama, Qwen2, Gemma-2 or Gemma-3) from the GGUF metadata; raises for other files."""
    fam = family_of(reader, path)
    arch = fam.arch
    for what in ("rope.scaling.type", "rope.scaling.factor"):
        value = _meta(reader, f"{arch}.{what}", path, None)
        if value not in (None, "none", 1.0, 0.0):
            raise GGUFError(_MSG_ROPE_SCALING.format(path=path, what=f"{arch}.{what}={value!r}"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError(_MSG_ROPE_SCALING.format(path=path, what="rope_freqs.weight"))
    d_model = int(_meta(reader, f"{arch}.embedding_length", path))
    n_heads = int(_single(_meta(reader, f"{arch}.attention.head_count", path), "head_count", path))
    n_kv = _single(_meta(reader, f"{arch}.attention.head_count_kv", path, n_heads), "head_count_kv", path)
    d_head = int(_meta(reader, f"{arch}.attention.key_length", path, d_model // n_heads))
    tokens = _meta(reader, "tokenizer.ggml.tokens", path, None)
    vocab = _meta(reader, f"{arch}.vocab_size", path, None if tokens is None else len(tokens))
    if vocab is None:
        vocab = int(next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[1])

    def token_id(key: str) -> int | None:
        value = _meta(reader, f"tokenizer.ggml.{key}", path, None)
        return None if value is None else int(value)

    # llama.cpp's loader falls back to a RoPE base of 10000 (Gemma-2 files never state one).
    rope_theta = _f32(_meta(reader, f"{arch}.rope.freq_base", path, 10000.0))
    cfg: dict[str, Any] = {
        "architectures": [fam.hf_class],
        "model_type": fam.model_type,
        "hidden_size": d_model,
        "intermediate_size": int(_single(_meta(reader, f"{arch}.feed_forward_length", path), "feed_forward_length", path)),
        "num_hidden_layers": int(_meta(reader, f"{arch}.block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": d_head,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length", path, 2048)),
        "rms_norm_eps": _f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": rope_theta,
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
    if fam.qkv_bias:
        # Qwen2 always has q/k/v biases (and no o bias); its config has no attention_bias switch.
        del cfg["attention_bias"]
        cfg["use_sliding_window"] = False
    if fam.gemma_norms:
        del cfg["mlp_bias"]
        cfg |= _gemma_config(reader, fam, cfg, path)
    return cfg


def _reverse_rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for RoPE.

    llama.cpp stores, per head, rows ``[r0, r_h, r1, r_{h+1}, ...]`` (``h = d_head/2``): the interleaved
    pair layout. Reading rows as ``(head, d_head/2, 2)`` and swapping the last two axes gives back the
    half-split layout ``[r0, r1, ..., r_{h-1}, r_h, ...]``. Works for weights ``[out, in]`` and biases ``[out]``.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, fam: Family, path: PathLike) -> str:
    if name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in fam.layer_keys:
        return f"model.layers.{int(parts[1])}.{fam.layer_keys[parts[2]]}.{parts[3]}"
    raise GGUFError(_MSG_UNKNOWN_TENSOR.format(path=path, name=name, model=fam.hf_class))


def _expected_shapes(cfg: dict[str, Any], fam: Family) -> dict[str, tuple[int, ...]]:
    """Hugging Face ``[out, in]`` shape for every weight the config implies."""
    d, v, m = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    dh = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh
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
    if fam.qkv_bias or cfg.get("attention_bias"):
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if fam.gemma_norms:
        per_layer |= {"pre_feedforward_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,)}
    if fam.qk_norm:
        per_layer |= {"self_attn.q_norm.weight": (dh,), "self_attn.k_norm.weight": (dh,)}
    for i in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in per_layer.items()}
    return shapes


def gguf_tensors_to_hf(reader: Any, cfg: dict[str, Any], path: PathLike = "<gguf>") -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its Hugging Face name, llama.cpp's storage conventions
    undone (Q/K row permutation for llama, ``w + 1`` Gemma norms), shapes checked."""
    from gguf.quants import dequantize

    fam = family_of(reader, path)
    expected = _expected_shapes(cfg, fam)
    out: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, fam, path)
        try:
            # GGUF lists dims innermost-first; the reader's array (and dequantize's result) is
            # row-major [out, in], which is already Hugging Face's nn.Linear layout.
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except Exception as err:
            raise GGUFError(f"{path}: cannot dequantize {tensor.name!r} ({tensor.tensor_type.name}): {err}") from err
        if name not in expected:
            raise GGUFError(_MSG_UNKNOWN_TENSOR.format(path=path, name=tensor.name, model=fam.hf_class))
        if w.shape != expected[name]:
            raise GGUFError(_MSG_SHAPE.format(path=path, name=tensor.name, shape=w.shape, expected=expected[name]))
        if fam.rope_permuted and ".self_attn.q_proj." in name:
            w = _reverse_rope_permute(w, cfg["num_attention_heads"])
        elif fam.rope_permuted and ".self_attn.k_proj." in name:
            w = _reverse_rope_permute(w, cfg["num_key_value_heads"])
        if fam.norm_shift and tensor.name.endswith("norm.weight"):
            w = w - np.float32(fam.norm_shift)
        out[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise GGUFError(_MSG_MISSING_TENSORS.format(path=path, names=missing[:8] + (["..."] if len(missing) > 8 else [])))
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_to_hf_folder(gguf_path: PathLike, out_dir: PathLike, *, overwrite: bool = False) -> Path:
    """Convert a llama, qwen2, gemma2 or gemma3 GGUF file into a Hugging Face model folder.

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
            "converter": "jaxrecover.io.gguf",
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
