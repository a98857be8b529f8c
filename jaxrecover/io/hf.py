"""Hugging Face checkpoint folders <-> ``Transformer`` pytrees: every byte of model I/O.

Contract:
- A folder holds ``config.json`` plus either ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` with its shard files (the layout ``save_pretrained`` writes).
- Supported: Llama-style (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``; SmolLM2
  is Llama), GPT-2 (``GPT2LMHeadModel``, keys with or without ``transformer.``) and Gemma-2/3 text
  (``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``).
- One literal key map per architecture (``LLAMA_KEYS``, ``GPT2_KEYS``, ``GEMMA_KEYS``). Each entry
  names the codec that turns the file tensor into our ``[in, out]`` parameters, so every transpose
  and reshape a checkpoint needs is a named constant below.
- Loading is strict: every file key is consumed (a tied ``lm_head.weight`` must equal the
  embedding), every parameter is filled, every shape matches, and only floating tensors are
  accepted, and every value must be finite (no NaN/inf). Violations raise ``CheckpointError`` (a
  ``ValueError``) naming the file and the key.
- Parameters come back in the compute dtype (``cfg.dtype``). Gemma's ``(1 + w)`` RMSNorm scale is
  folded into ``w`` at load (in float32, then cast) and unfolded at save.
- ``save_transformer`` writes ``config.json`` + ``model.safetensors`` that both this module and
  ``transformers`` read back; files are written to a temporary folder and moved into place with
  ``os.replace``, so a crash never leaves a half-written file under the target name.

Not here: tokenizers, GGUF conversion, SAE weights.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrecover.model.config import TransformerConfig, from_hf_config
from jaxrecover.model.transformer import MLP, Attention, Block, Norm, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

_MSG_NO_WEIGHTS = (
    "{path}: no weights found. Expected '" + WEIGHTS_FILE + "' or a sharded '" + INDEX_FILE + "' "
    "(the layout transformers' save_pretrained(..., safe_serialization=True) writes)."
)
_MSG_UNREADABLE = (
    "{file}: not a readable safetensors file ({err}). The file may be truncated or corrupt "
    "(an interrupted download or copy); fetch or convert it again."
)
_MSG_UNEXPECTED = (
    "{file}: unexpected tensor {key!r} for a {arch} model with {n_layers} layers. Every tensor in a "
    "checkpoint must map onto a parameter; this one does not (wrong architecture in config.json, "
    "a config/weights mismatch, or an unsupported variant)."
)
_MSG_SHAPE = "{file}: tensor {key!r} has shape {got}, expected {want} from config.json."
_MSG_DTYPE = "{file}: tensor {key!r} has dtype {got}; only floating tensors ({ok}) are model parameters."
_MSG_MISSING = "{file}: missing tensor {key!r} (needed for parameter {param!r}, layer {layer})."
_MSG_NON_FINITE = (
    "{file}: tensor {key!r} holds {count} non-finite value(s) (NaN or inf) out of {size}. The "
    "checkpoint is corrupt or was saved from a diverged model; every forward pass would be NaN."
)
_MSG_TIED = (
    "{file}: {key!r} differs from the input embedding, but config.json ties the embeddings "
    "(tie_word_embeddings). Set tie_word_embeddings=false or fix the checkpoint."
)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match what its ``config.json`` promises."""


# ----------------------------------------------------------------------------- parameter layout


def param_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of a ``cfg`` model: dotted path -> shape.

    Paths follow the dataclass fields (``"blocks.attn.W_Q"``); ``blocks.*`` shapes include the
    leading ``layer`` axis. This is the single description of which optional parameters exist.
    """
    D, L, H, K, dh, M, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab)
    layernorm = cfg.arch == "gpt2"  # LayerNorm has a bias; every other family uses RMSNorm
    if cfg.mlp_bias and cfg.arch != "gpt2":
        raise CheckpointError(f"mlp_bias=True is not supported for the gated MLP of arch {cfg.arch!r}.")
    s: dict[str, tuple[int, ...]] = {"W_E": (V, D), "ln_final.w": (D,)}
    if layernorm:
        s["ln_final.b"] = (D,)
    if cfg.arch == "gpt2":
        s["W_pos"] = (cfg.n_ctx, D)
    if not cfg.tied_embeddings:
        s["W_U"] = (D, V)
    norms = ["ln1", "ln2"] + (["ln1_post", "ln2_post"] if cfg.post_norms else [])
    for n in norms:
        s[f"blocks.{n}.w"] = (L, D)
        if layernorm:
            s[f"blocks.{n}.b"] = (L, D)
    s.update({
        "blocks.attn.W_Q": (L, D, H, dh),
        "blocks.attn.W_K": (L, D, K, dh),
        "blocks.attn.W_V": (L, D, K, dh),
        "blocks.attn.W_O": (L, H, dh, D),
        "blocks.mlp.W_in": (L, D, M),
        "blocks.mlp.W_out": (L, M, D),
    })
    if cfg.attn_bias:
        s.update({"blocks.attn.b_Q": (L, H, dh), "blocks.attn.b_K": (L, K, dh), "blocks.attn.b_V": (L, K, dh)})
    if cfg.attn_out_bias:
        s["blocks.attn.b_O"] = (L, D)
    if cfg.qk_norm:
        s.update({"blocks.attn.q_norm.w": (L, dh), "blocks.attn.k_norm.w": (L, dh)})
    if cfg.arch == "gpt2":
        s.update({"blocks.mlp.b_in": (L, M), "blocks.mlp.b_out": (L, D)})
    else:  # gated MLP: act(x @ W_gate) * (x @ W_in)
        s["blocks.mlp.W_gate"] = (L, D, M)
    return s


def build_transformer(cfg: TransformerConfig, params: Mapping[str, Any]) -> Transformer:
    """Assemble a ``Transformer`` from ``{path: array}`` with exactly the paths of ``param_shapes``."""
    want = param_shapes(cfg)
    if set(params) != set(want):
        raise CheckpointError(f"build_transformer: missing {sorted(set(want) - set(params))}, "
                              f"unexpected {sorted(set(params) - set(want))}.")

    def norm(prefix: str) -> Norm | None:
        return Norm(params[prefix + ".w"], params.get(prefix + ".b")) if prefix + ".w" in params else None

    g = lambda name: params.get("blocks." + name)  # noqa: E731 - optional block parameter or None
    attn = Attention(W_Q=g("attn.W_Q"), W_K=g("attn.W_K"), W_V=g("attn.W_V"), W_O=g("attn.W_O"),
                     b_Q=g("attn.b_Q"), b_K=g("attn.b_K"), b_V=g("attn.b_V"), b_O=g("attn.b_O"),
                     q_norm=norm("blocks.attn.q_norm"), k_norm=norm("blocks.attn.k_norm"))
    mlp = MLP(W_in=g("mlp.W_in"), W_out=g("mlp.W_out"), W_gate=g("mlp.W_gate"), b_in=g("mlp.b_in"), b_out=g("mlp.b_out"))
    blocks = Block(ln1=norm("blocks.ln1"), attn=attn, ln2=norm("blocks.ln2"), mlp=mlp,
                   ln1_post=norm("blocks.ln1_post"), ln2_post=norm("blocks.ln2_post"))
    return Transformer(cfg=cfg, W_E=params["W_E"], blocks=blocks, ln_final=norm("ln_final"),
                       W_pos=params.get("W_pos"), W_U=params.get("W_U"))


def flatten_transformer(model: Transformer) -> dict[str, Any]:
    """Inverse of ``build_transformer``: ``{dotted path: array}`` for every non-None leaf."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.metadata.get("static", False):
                continue
            value = getattr(obj, f.name)
            if value is None:
                continue
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value

    walk(model, "")
    return out


# ----------------------------------------------------------------------------- codecs


@dataclasses.dataclass(frozen=True)
class _Codec:
    """How one file tensor maps onto one or more of our parameters (per layer, no layer axis).

    ``file_shape(shapes)`` is the file shape implied by our parameter shapes; ``load`` and ``save``
    convert in each direction (float32 numpy arrays).
    """

    name: str
    file_shape: Callable[[list[tuple[int, ...]]], tuple[int, ...]]
    load: Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]
    save: Callable[[list[np.ndarray]], np.ndarray]


AS_IS = _Codec("as_is", lambda s: s[0], lambda a, s: [a], lambda p: p[0])
# torch nn.Linear stores weight [out, in]; we apply x @ W with W [in, out].
LINEAR_T = _Codec("linear_t", lambda s: s[0][::-1], lambda a, s: [a.T], lambda p: p[0].T)
# q/k/v_proj: nn.Linear [heads*d_head, d_model] -> [d_model, heads, d_head] (heads are the major
# part of the output axis, as in HF's view(..., n_heads, d_head)).
LINEAR_T_TO_HEADS = _Codec(
    "linear_t_to_heads",
    lambda s: (s[0][1] * s[0][2], s[0][0]),
    lambda a, s: [a.T.reshape(s[0])],
    lambda p: p[0].reshape(p[0].shape[0], -1).T,
)
# o_proj: nn.Linear [d_model, heads*d_head] -> [heads, d_head, d_model].
LINEAR_T_FROM_HEADS = _Codec(
    "linear_t_from_heads",
    lambda s: (s[0][2], s[0][0] * s[0][1]),
    lambda a, s: [a.T.reshape(s[0])],
    lambda p: p[0].reshape(-1, p[0].shape[-1]).T,
)
# q/k/v biases: [heads*d_head] -> [heads, d_head].
BIAS_TO_HEADS = _Codec("bias_to_heads", lambda s: (s[0][0] * s[0][1],), lambda a, s: [a.reshape(s[0])],
                       lambda p: p[0].reshape(-1))
# Gemma RMSNorm multiplies by (1 + w); we store the folded scale so one norm() serves all families.
GEMMA_NORM = _Codec("gemma_norm", lambda s: s[0], lambda a, s: [a + 1.0], lambda p: p[0] - 1.0)
# GPT-2 Conv1D c_attn is already [in, out] = [d_model, 3 * heads*d_head], q|k|v concatenated.
CONV1D_QKV = _Codec(
    "conv1d_qkv",
    lambda s: (s[0][0], 3 * s[0][1] * s[0][2]),
    lambda a, s: [x.reshape(sh) for x, sh in zip(np.split(a, 3, axis=-1), s, strict=True)],
    lambda p: np.concatenate([x.reshape(x.shape[0], -1) for x in p], axis=-1),
)
CONV1D_QKV_BIAS = _Codec(
    "conv1d_qkv_bias",
    lambda s: (3 * s[0][0] * s[0][1],),
    lambda a, s: [x.reshape(sh) for x, sh in zip(np.split(a, 3), s, strict=True)],
    lambda p: np.concatenate([x.reshape(-1) for x in p]),
)
# GPT-2 Conv1D c_proj [heads*d_head, d_model] (already [in, out]) -> [heads, d_head, d_model].
CONV1D_FROM_HEADS = _Codec("conv1d_from_heads", lambda s: (s[0][0] * s[0][1], s[0][2]),
                           lambda a, s: [a.reshape(s[0])], lambda p: p[0].reshape(-1, p[0].shape[-1]))
# Old GPT-2 files carry the causal-mask buffers h.{i}.attn.bias / masked_bias: not parameters.
DROP_BUFFER = _Codec("drop_buffer", lambda s: (), lambda a, s: [], lambda p: np.zeros(()))

# Key maps: file key ({i} = layer) -> (codec, our parameter paths). Entries whose parameters a
# config does not have (biases, q/k norms, W_U when tied) are skipped for that config.
LLAMA_KEYS: dict[str, tuple[_Codec, tuple[str, ...]]] = {
    "model.embed_tokens.weight": (AS_IS, ("W_E",)),
    "model.norm.weight": (AS_IS, ("ln_final.w",)),
    "lm_head.weight": (LINEAR_T, ("W_U",)),
    "model.layers.{i}.input_layernorm.weight": (AS_IS, ("blocks.ln1.w",)),
    "model.layers.{i}.self_attn.q_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_Q",)),
    "model.layers.{i}.self_attn.k_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_K",)),
    "model.layers.{i}.self_attn.v_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_V",)),
    "model.layers.{i}.self_attn.q_proj.bias": (BIAS_TO_HEADS, ("blocks.attn.b_Q",)),
    "model.layers.{i}.self_attn.k_proj.bias": (BIAS_TO_HEADS, ("blocks.attn.b_K",)),
    "model.layers.{i}.self_attn.v_proj.bias": (BIAS_TO_HEADS, ("blocks.attn.b_V",)),
    "model.layers.{i}.self_attn.o_proj.weight": (LINEAR_T_FROM_HEADS, ("blocks.attn.W_O",)),
    "model.layers.{i}.self_attn.o_proj.bias": (AS_IS, ("blocks.attn.b_O",)),
    "model.layers.{i}.post_attention_layernorm.weight": (AS_IS, ("blocks.ln2.w",)),  # pre-MLP in Llama
    "model.layers.{i}.mlp.gate_proj.weight": (LINEAR_T, ("blocks.mlp.W_gate",)),
    "model.layers.{i}.mlp.up_proj.weight": (LINEAR_T, ("blocks.mlp.W_in",)),
    "model.layers.{i}.mlp.down_proj.weight": (LINEAR_T, ("blocks.mlp.W_out",)),
}

GEMMA_KEYS: dict[str, tuple[_Codec, tuple[str, ...]]] = {
    "model.embed_tokens.weight": (AS_IS, ("W_E",)),
    "model.norm.weight": (GEMMA_NORM, ("ln_final.w",)),
    "lm_head.weight": (LINEAR_T, ("W_U",)),
    "model.layers.{i}.input_layernorm.weight": (GEMMA_NORM, ("blocks.ln1.w",)),
    # Gemma's post_attention_layernorm normalises the attention OUTPUT (unlike Llama's of that name).
    "model.layers.{i}.post_attention_layernorm.weight": (GEMMA_NORM, ("blocks.ln1_post.w",)),
    "model.layers.{i}.pre_feedforward_layernorm.weight": (GEMMA_NORM, ("blocks.ln2.w",)),
    "model.layers.{i}.post_feedforward_layernorm.weight": (GEMMA_NORM, ("blocks.ln2_post.w",)),
    "model.layers.{i}.self_attn.q_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_Q",)),
    "model.layers.{i}.self_attn.k_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_K",)),
    "model.layers.{i}.self_attn.v_proj.weight": (LINEAR_T_TO_HEADS, ("blocks.attn.W_V",)),
    "model.layers.{i}.self_attn.o_proj.weight": (LINEAR_T_FROM_HEADS, ("blocks.attn.W_O",)),
    "model.layers.{i}.self_attn.q_norm.weight": (GEMMA_NORM, ("blocks.attn.q_norm.w",)),  # Gemma-3
    "model.layers.{i}.self_attn.k_norm.weight": (GEMMA_NORM, ("blocks.attn.k_norm.w",)),  # Gemma-3
    "model.layers.{i}.mlp.gate_proj.weight": (LINEAR_T, ("blocks.mlp.W_gate",)),
    "model.layers.{i}.mlp.up_proj.weight": (LINEAR_T, ("blocks.mlp.W_in",)),
    "model.layers.{i}.mlp.down_proj.weight": (LINEAR_T, ("blocks.mlp.W_out",)),
}

# GPT-2 keys as GPT2LMHeadModel saves them; files from GPT2Model (the original hub upload) lack
# the "transformer." prefix, which _normalize_key strips before lookup.
GPT2_PREFIX = "transformer."
GPT2_KEYS: dict[str, tuple[_Codec, tuple[str, ...]]] = {
    "transformer.wte.weight": (AS_IS, ("W_E",)),
    "transformer.wpe.weight": (AS_IS, ("W_pos",)),
    "transformer.ln_f.weight": (AS_IS, ("ln_final.w",)),
    "transformer.ln_f.bias": (AS_IS, ("ln_final.b",)),
    "lm_head.weight": (LINEAR_T, ("W_U",)),
    "transformer.h.{i}.ln_1.weight": (AS_IS, ("blocks.ln1.w",)),
    "transformer.h.{i}.ln_1.bias": (AS_IS, ("blocks.ln1.b",)),
    "transformer.h.{i}.attn.c_attn.weight": (CONV1D_QKV, ("blocks.attn.W_Q", "blocks.attn.W_K", "blocks.attn.W_V")),
    "transformer.h.{i}.attn.c_attn.bias": (CONV1D_QKV_BIAS, ("blocks.attn.b_Q", "blocks.attn.b_K", "blocks.attn.b_V")),
    "transformer.h.{i}.attn.c_proj.weight": (CONV1D_FROM_HEADS, ("blocks.attn.W_O",)),
    "transformer.h.{i}.attn.c_proj.bias": (AS_IS, ("blocks.attn.b_O",)),
    "transformer.h.{i}.attn.bias": (DROP_BUFFER, ()),
    "transformer.h.{i}.attn.masked_bias": (DROP_BUFFER, ()),
    "transformer.h.{i}.ln_2.weight": (AS_IS, ("blocks.ln2.w",)),
    "transformer.h.{i}.ln_2.bias": (AS_IS, ("blocks.ln2.b",)),
    "transformer.h.{i}.mlp.c_fc.weight": (AS_IS, ("blocks.mlp.W_in",)),  # Conv1D: already [in, out]
    "transformer.h.{i}.mlp.c_fc.bias": (AS_IS, ("blocks.mlp.b_in",)),
    "transformer.h.{i}.mlp.c_proj.weight": (AS_IS, ("blocks.mlp.W_out",)),
    "transformer.h.{i}.mlp.c_proj.bias": (AS_IS, ("blocks.mlp.b_out",)),
}

KEY_MAPS = {"llama": LLAMA_KEYS, "gpt2": GPT2_KEYS, "gemma2": GEMMA_KEYS, "gemma3": GEMMA_KEYS}

# A tied model may still ship its output matrix; it is accepted only if it equals the embedding.
TIED_DUPLICATES = {"lm_head.weight": "W_E"}


@dataclasses.dataclass(frozen=True)
class _Slot:
    codec: _Codec
    params: tuple[str, ...]
    layer: int | None  # None: a model-level (unstacked) parameter


def _expand(cfg: TransformerConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, _Slot]:
    """Concrete file keys for ``cfg``: layer templates expanded; entries for absent params dropped."""
    out: dict[str, _Slot] = {}
    for key, (codec, params) in KEY_MAPS[cfg.arch].items():
        if any(p not in shapes for p in params):
            continue
        if "{i}" in key:
            out.update({key.format(i=i): _Slot(codec, params, i) for i in range(cfg.n_layers)})
        else:
            out[key] = _Slot(codec, params, None)
    return out


def _normalize_key(cfg: TransformerConfig, key: str) -> str:
    if cfg.arch == "gpt2" and not key.startswith(GPT2_PREFIX) and key != "lm_head.weight":
        return GPT2_PREFIX + key
    return key


def _per_layer(shape: tuple[int, ...], stacked: bool) -> tuple[int, ...]:
    return shape[1:] if stacked else shape


# ----------------------------------------------------------------------------- reading


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Shard file -> the keys the index promises in it (None: a single, unindexed file)."""
    index, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err!r}).") from err
        files: dict[Path, list[str] | None] = {}
        for key, name in weight_map.items():
            files.setdefault(folder / name, []).append(key)  # type: ignore[union-attr]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard {f.name!r} is listed but {f} does not exist.")
        return files
    if single.exists():
        return {single: None}
    raise CheckpointError(_MSG_NO_WEIGHTS.format(path=folder))


def _read_tensor(handle: Any, key: str, file: Path) -> np.ndarray:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, TypeError, ValueError) as err:
        # Older safetensors builds cannot hand bf16 to numpy; jax arrays can carry it.
        if handle.get_slice(key).get_dtype() == "BF16":
            with safe_open(file, framework="flax") as f:
                return np.asarray(f.get_tensor(key))
        raise CheckpointError(_MSG_UNREADABLE.format(file=file, err=err)) from err


def _finite(file: Path, key: str, a: np.ndarray) -> np.ndarray:
    """``a`` unchanged if every value is finite; one vectorised pass (counts only on failure)."""
    finite = np.isfinite(a)
    if not finite.all():
        count = int(finite.size - np.count_nonzero(finite))
        raise CheckpointError(_MSG_NON_FINITE.format(file=file, key=key, count=count, size=finite.size))
    return a


def load_transformer(path: str | os.PathLike, *, dtype: str = "float32") -> Transformer:
    """Load a Hugging Face checkpoint folder as a ``Transformer`` in compute dtype ``dtype``.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: ``"float32"`` or ``"bfloat16"``; parameters are cast to it (``cfg.dtype``).

    Returns:
        The model, parameters as ``jax.Array`` on the default device.

    Raises:
        CheckpointError: missing/extra/misshaped/non-float/non-finite tensors, tied-weight mismatch, a corrupt
            or truncated file, or a missing ``config.json``; the message names file and key.
        ValueError: an unknown or unsupported architecture in ``config.json``.

    >>> model = load_transformer("models/smollm2-135m")
    >>> logits = forward(model, jnp.array([1, 2, 3]))
    """
    folder = Path(path)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file}: missing; a checkpoint folder needs config.json next to the weights.")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({err}).") from err
    cfg = from_hf_config(hf, where=str(cfg_file), dtype=dtype)
    shapes = param_shapes(cfg)
    slots = _expand(cfg, shapes)
    target = _np_dtype(dtype)
    arrays = {p: np.empty(s, target) for p, s in shapes.items()}
    filled = {p: np.zeros(s[0] if p.startswith("blocks.") else 1, bool) for p, s in shapes.items()}
    tied: list[tuple[Path, str, np.ndarray]] = []
    seen: set[str] = set()

    for file, promised in _weight_files(folder).items():
        try:
            handle_cm = safe_open(file, framework="numpy")
            handle = handle_cm.__enter__()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(_MSG_UNREADABLE.format(file=file, err=err)) from err
        try:
            keys = list(handle.keys())
            if promised is not None and set(promised) - set(keys):
                missing = sorted(set(promised) - set(keys))[0]
                raise CheckpointError(f"{file}: the index promises tensor {missing!r} but the shard lacks it.")
            for key in keys:
                if key in seen:
                    raise CheckpointError(f"{file}: tensor {key!r} appears in more than one shard.")
                seen.add(key)
                info = handle.get_slice(key)
                if info.get_dtype() not in _FLOAT_DTYPES:
                    raise CheckpointError(_MSG_DTYPE.format(file=file, key=key, got=info.get_dtype(), ok=_FLOAT_DTYPES))
                got = tuple(info.get_shape())
                name = _normalize_key(cfg, key)
                if name in TIED_DUPLICATES and cfg.tied_embeddings:
                    want = shapes[TIED_DUPLICATES[name]]
                    if got != want:
                        raise CheckpointError(_MSG_SHAPE.format(file=file, key=key, got=got, want=want))
                    tied.append((file, key, _finite(file, key, _read_tensor(handle, key, file))))
                    continue
                slot = slots.get(name)
                if slot is None:
                    raise CheckpointError(_MSG_UNEXPECTED.format(file=file, key=key, arch=cfg.arch, n_layers=cfg.n_layers))
                per = [_per_layer(shapes[p], slot.layer is not None) for p in slot.params]
                if slot.codec is DROP_BUFFER:
                    continue
                want = tuple(slot.codec.file_shape(per))
                if got != want:
                    raise CheckpointError(_MSG_SHAPE.format(file=file, key=key, got=got, want=want))
                # Convert in float32: the Gemma (1 + w) fold and reshapes are exact there.
                raw = _finite(file, key, _read_tensor(handle, key, file).astype(np.float32))
                values = slot.codec.load(raw, per)
                for p, v in zip(slot.params, values, strict=True):
                    if slot.layer is None:
                        arrays[p][...] = v.astype(target)
                        filled[p][0] = True
                    else:
                        arrays[p][slot.layer] = v.astype(target)
                        filled[p][slot.layer] = True
        finally:
            handle_cm.__exit__(None, None, None)

    where = folder / INDEX_FILE if (folder / INDEX_FILE).exists() else folder / WEIGHTS_FILE
    for p, done in filled.items():
        if not done.all():
            layer = int(np.argmin(done)) if p.startswith("blocks.") else None
            key = next((k for k, s in slots.items() if p in s.params and s.layer == layer), p)
            raise CheckpointError(_MSG_MISSING.format(file=where, key=key, param=p, layer=layer))
    for file, key, value in tied:
        if not np.array_equal(value.astype(target), arrays["W_E"]):
            raise CheckpointError(_MSG_TIED.format(file=file, key=key))
    return build_transformer(cfg, {p: jnp.asarray(a) for p, a in arrays.items()})


# ----------------------------------------------------------------------------- writing


def to_hf_config(cfg: TransformerConfig) -> dict[str, Any]:
    """The ``config.json`` dict that ``from_hf_config`` (and ``transformers``) read back as ``cfg``.

    Raises ``ValueError`` if ``cfg`` is not expressible in any supported HF architecture.
    """
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    common = dict(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.d_head, intermediate_size=cfg.d_mlp,
        vocab_size=cfg.d_vocab, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tied_embeddings, **ids,
    )
    if cfg.arch == "llama":
        qwen2 = cfg.attn_bias and not cfg.attn_out_bias
        hf: dict[str, Any] = dict(
            architectures=["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            model_type="qwen2" if qwen2 else "llama",
            hidden_act={"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.act, cfg.act),
            rope_theta=cfg.rope_theta, attention_bias=cfg.attn_bias, mlp_bias=False, **common,
        )
    elif cfg.arch == "gpt2":
        hf = dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_mlp, vocab_size=cfg.d_vocab, n_positions=cfg.n_ctx,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function={"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.act, cfg.act),
            tie_word_embeddings=cfg.tied_embeddings, **ids,
        )
    else:
        is3 = cfg.arch == "gemma3"
        scalar = (cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5) ** -2
        hf = dict(
            architectures=["Gemma3ForCausalLM" if is3 else "Gemma2ForCausalLM"],
            model_type="gemma3_text" if is3 else "gemma2",
            hidden_activation="gelu_pytorch_tanh", rope_theta=cfg.rope_theta,
            query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
            attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
            sliding_window=cfg.sliding_window, attention_bias=False,
            layer_types=["sliding_attention" if local else "full_attention" for local in cfg.layer_is_local],
            **common,
        )
        if is3:
            hf["rope_local_base_freq"] = cfg.rope_local_theta
    hf["torch_dtype"] = cfg.dtype
    back = from_hf_config(hf, where="to_hf_config", dtype=cfg.dtype)
    if back != cfg.replace(n_ctx=back.n_ctx):
        diff = {f.name: (getattr(cfg, f.name), getattr(back, f.name)) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(back, f.name)}
        raise ValueError(f"to_hf_config: this config has no Hugging Face equivalent; differing fields {diff}.")
    return hf


def save_transformer(model: Transformer, path: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face folder: ``config.json`` + ``model.safetensors``.

    Both files are first written into a temporary folder next to ``path`` and then moved into place
    with ``os.replace`` (atomic per file), so no file under ``path`` is ever half-written. Other files
    already in ``path`` (a tokenizer, say) are kept. Tensors are stored in the model's dtype.

    Raises:
        CheckpointError: ``path`` already holds a sharded index (mixing layouts would be ambiguous).

    >>> save_transformer(model, "/tmp/tiny"); load_transformer("/tmp/tiny")
    """
    cfg = model.cfg
    folder = Path(path)
    if (folder / INDEX_FILE).exists():
        raise CheckpointError(f"{folder / INDEX_FILE}: refusing to write {WEIGHTS_FILE} next to a sharded index.")
    hf = to_hf_config(cfg)
    params = {p: np.asarray(jax.device_get(a), np.float32) for p, a in flatten_transformer(model).items()}
    shapes = param_shapes(cfg)
    if set(params) != set(shapes):
        raise CheckpointError(f"save_transformer: model parameters {sorted(params)} do not match its config.")
    target = _np_dtype(cfg.dtype)
    tensors: dict[str, np.ndarray] = {}
    for key, slot in _expand(cfg, shapes).items():
        if slot.codec is DROP_BUFFER:
            continue
        values = [params[p] if slot.layer is None else params[p][slot.layer] for p in slot.params]
        tensors[key] = np.ascontiguousarray(slot.codec.save(values).astype(target))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})  # "pt": transformers checks it
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        folder.mkdir(exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):  # weights first: config.json last marks completion
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
