"""Static, hashable architecture descriptions, and conversion from Hugging Face ``config.json``.

One ``TransformerConfig`` covers three families:
- ``"llama"``: Llama / SmolLM2 / Qwen2 / Mistral (RMSNorm, RoPE, GQA, SwiGLU, tied or untied).
- ``"gpt2"``: learned positions, LayerNorm, GELU MLP, Conv1D weights stored ``[in, out]``.
- ``"gemma2"`` / ``"gemma3"``: (1 + w) RMSNorm folded at load time, pre+post norms around attention
  and MLP, sqrt(d_model) embedding scale, attention/final logit soft-capping (Gemma-2), q/k norms
  (Gemma-3), alternating local (sliding-window) and global attention.
"""

import dataclasses
from typing import Any

ARCHS = ("llama", "gpt2", "gemma2", "gemma3")

_MSG_UNKNOWN_ARCH = (
    "Unknown architecture {arch!r} in {where}: jaxrecover supports Llama-style (LlamaForCausalLM, "
    "Qwen2ForCausalLM, MistralForCausalLM), GPT-2 (GPT2LMHeadModel) and Gemma-2/3 "
    "(Gemma2ForCausalLM, Gemma3ForCausalLM)."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Everything static about a decoder-only transformer. Hashable: used as a jit static arg."""

    arch: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int = 2048
    norm_eps: float = 1e-5
    act: str = "silu"  # "silu" | "gelu_new" | "gelu_tanh"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma-3 local layers use their own base
    tied_embeddings: bool = True
    attn_bias: bool = False  # q/k/v biases (Qwen2, GPT-2, Llama attention_bias=True)
    attn_out_bias: bool = False  # output-projection bias (GPT-2, Llama attention_bias=True; not Qwen2)
    mlp_bias: bool = False
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    attn_scale: float | None = None  # None -> 1/sqrt(d_head); Gemma: query_pre_attn_scalar**-0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer "global" | "local"; () -> all global
    qk_norm: bool = False
    post_norms: bool = False  # Gemma: norms after attention and MLP outputs
    dtype: str = "float32"  # compute dtype: "float32" | "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(_MSG_UNKNOWN_ARCH.format(arch=self.arch, where="TransformerConfig"))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}.")
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")

    @property
    def layer_is_local(self) -> tuple[bool, ...]:
        return tuple(t == "local" for t in self.layer_types) or (False,) * self.n_layers

    def replace(self, **changes: Any) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


def _rope_theta(hf: dict[str, Any], where: str, layer_type: str, legacy_key: str, default: float) -> float:
    """RoPE base for one attention type, from either config layout.

    transformers >= 5 writes ``rope_parameters`` (``{"rope_theta", "rope_type"}``, or one such dict
    per layer type for Gemma-3); older files use top-level ``rope_theta`` / ``rope_local_base_freq``
    plus ``rope_scaling``. Reading only the old keys would silently fall back to the default base.
    """
    params = hf.get("rope_parameters")
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get(legacy_key, default)}
    elif layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    kind = params.get("rope_type", params.get("type"))
    if kind not in (None, "default"):
        raise ValueError(f"{where}: RoPE type {kind!r} ({params!r}) is not supported (only plain RoPE).")
    return float(params.get("rope_theta", default))


def _activation(hf: dict[str, Any], where: str, keys: tuple[str, ...], supported: dict[str, str]) -> str:
    """Our activation name for the first of ``keys`` present, or an error naming the field."""
    for key in keys:
        if hf.get(key) is not None:
            if hf[key] not in supported:
                raise ValueError(f"{where}: {key}={hf[key]!r} is not supported (expected one of {list(supported)}).")
            return supported[hf[key]]
    return next(iter(supported.values()))


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(hf: dict[str, Any], *, where: str = "config.json", dtype: str = "float32") -> TransformerConfig:
    """Build a ``TransformerConfig`` from a Hugging Face ``config.json`` dict.

    Raises ``ValueError`` naming ``where`` and the field for anything unsupported.
    """
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    name = archs[0]
    model_type = hf.get("model_type", "")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: use the text tower
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    ids = dict(
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
    )
    if model_type in ("llama", "qwen2", "mistral") or name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("mlp_bias"):
            raise ValueError(f"{where}: mlp_bias=true is not supported for gated (SwiGLU) MLPs.")
        # Llama's attention_bias covers q/k/v/o; Qwen2 always has q/k/v biases and no o bias.
        is_qwen2 = model_type == "qwen2" or name == "Qwen2ForCausalLM"
        attn_bias = bool(hf.get("attention_bias", False)) or is_qwen2
        if hf.get("sliding_window") and model_type == "mistral":
            raise ValueError(f"{where}: Mistral sliding_window={hf['sliding_window']} is not supported.")
        return TransformerConfig(
            arch="llama",
            d_model=d_model,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_head=hf.get("head_dim") or d_model // n_heads,
            d_mlp=hf["intermediate_size"],
            d_vocab=hf["vocab_size"],
            n_ctx=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            act=_activation(hf, where, ("hidden_act",), {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}),
            rope_theta=_rope_theta(hf, where, "full_attention", "rope_theta", 10000.0),
            tied_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
            attn_bias=attn_bias,
            attn_out_bias=attn_bias and not is_qwen2,
            dtype=dtype,
            **ids,
        )
    if model_type == "gpt2" or name == "GPT2LMHeadModel":
        d_model = hf["n_embd"]
        for field, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if bool(hf.get(field, ok)) != ok:
                raise ValueError(f"{where}: GPT-2 {field}={hf[field]!r} is not supported (need {ok}).")
        return TransformerConfig(
            arch="gpt2",
            d_model=d_model,
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            n_kv_heads=hf["n_head"],
            d_head=d_model // hf["n_head"],
            d_mlp=hf.get("n_inner") or 4 * d_model,
            d_vocab=hf["vocab_size"],
            n_ctx=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            act=_activation(hf, where, ("activation_function",), {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh"}),
            tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
            attn_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            dtype=dtype,
            **ids,
        )
    if model_type in ("gemma2", "gemma3_text") or name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        d_model, n_layers = hf["hidden_size"], hf["num_hidden_layers"]
        is3 = model_type == "gemma3_text" or name == "Gemma3ForCausalLM"
        if "layer_types" in hf and hf["layer_types"]:
            types = tuple("local" if t == "sliding_attention" else "global" for t in hf["layer_types"])
        elif is3:
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            types = tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers))
        else:  # Gemma-2 alternates, starting with a local layer
            types = tuple("local" if i % 2 == 0 else "global" for i in range(n_layers))
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: use_bidirectional_attention=true is not supported (decoder-only).")
        if hf.get("attention_bias"):
            raise ValueError(f"{where}: attention_bias=true is not supported for Gemma.")
        return TransformerConfig(
            arch="gemma3" if is3 else "gemma2",
            d_model=d_model,
            n_layers=n_layers,
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf["num_key_value_heads"],
            d_head=hf["head_dim"],
            d_mlp=hf["intermediate_size"],
            d_vocab=hf["vocab_size"],
            n_ctx=hf.get("max_position_embeddings", 8192),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            act=_activation(hf, where, ("hidden_activation", "hidden_act"), {"gelu_pytorch_tanh": "gelu_tanh"}),
            rope_theta=_rope_theta(hf, where, "full_attention", "rope_theta", 10000.0),
            rope_local_theta=_rope_theta(hf, where, "sliding_attention", "rope_local_base_freq", 10000.0) if is3 else None,
            tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
            embed_scale=float(d_model) ** 0.5,
            attn_scale=float(hf.get("query_pre_attn_scalar", hf["head_dim"])) ** -0.5,
            attn_softcap=hf.get("attn_logit_softcapping"),
            final_softcap=hf.get("final_logit_softcapping"),
            sliding_window=hf.get("sliding_window"),
            layer_types=types,
            qk_norm=is3,
            post_norms=True,
            dtype=dtype,
            **ids,
        )
    raise ValueError(_MSG_UNKNOWN_ARCH.format(arch=name, where=where))
