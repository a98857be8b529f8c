"""Tiny deterministic models for tests, benchmarks and experiments.

- ``tiny_config(arch)``: a small ``TransformerConfig`` per family (2-3 layers, d_model 32).
- ``random_transformer(key, cfg)``: random parameters of exactly the shapes ``io_hf.param_shapes``
  lists, scaled so activations and logits are O(1) (tests on near-zero logits prove nothing).
- ``write_tiny_hf_checkpoint(dir, arch, seed)``: a random checkpoint written by the REAL
  ``transformers`` library, the ground truth for parity tests. torch/transformers are imported
  inside the function: they are test-only dependencies.
"""

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.model.config import TransformerConfig
from jaxrecover.io.hf import build_transformer, param_shapes
from jaxrecover.model.transformer import Transformer

_TINY: dict[str, dict[str, Any]] = {
    "llama": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=97, n_ctx=64),
    "gpt2": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_head=8, d_mlp=128, d_vocab=97, n_ctx=64,
                 act="gelu_new", attn_bias=True, attn_out_bias=True, mlp_bias=True),
    "gemma2": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=97, n_ctx=64,
                   act="gelu_tanh", embed_scale=32**0.5, attn_scale=8**-0.5, attn_softcap=50.0, final_softcap=30.0,
                   sliding_window=4, layer_types=("local", "global"), post_norms=True),
    "gemma3": dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=64, d_vocab=97, n_ctx=64,
                   act="gelu_tanh", embed_scale=32**0.5, attn_scale=8**-0.5, rope_local_theta=10000.0,
                   rope_theta=1e6, sliding_window=4, layer_types=("local", "local", "global"), qk_norm=True,
                   post_norms=True),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> TransformerConfig:
    """A tiny ``TransformerConfig`` of family ``arch`` (``"llama" | "gpt2" | "gemma2" | "gemma3"``)."""
    if arch not in _TINY:
        raise ValueError(f"tiny_config: unknown arch {arch!r}; expected one of {sorted(_TINY)}.")
    return TransformerConfig(arch=arch, **{**_TINY[arch], **overrides})


def random_transformer(key: jax.Array, cfg: TransformerConfig) -> Transformer:
    """Random ``cfg`` model in ``cfg.dtype``: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.1^2), embeddings ~ N(0, 1) (so logits are O(1) with the final norm).

    Draws with numpy from a seed taken from ``key`` (deterministic per key): compiling ~30
    ``jax.random.normal`` calls costs seconds per config, which dominated the test run. ``key``
    must therefore be concrete; for shapes only, use ``build_transformer`` on ``param_shapes``.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    params = {}
    for path, shape in param_shapes(cfg).items():
        leaf = path.rsplit(".", 1)[-1]
        z = rng.standard_normal(shape, np.float32)
        if leaf == "w":  # a norm scale
            value = 1.0 + 0.1 * z
        elif leaf.startswith("b"):
            value = 0.1 * z
        elif path in ("W_E", "W_pos"):
            value = z
        elif leaf == "W_O":  # [.., heads, d_head, d_model]: the input is heads * d_head wide
            value = z * (shape[-3] * shape[-2]) ** -0.5
        elif leaf in ("W_Q", "W_K", "W_V"):  # [.., d_model, heads, d_head]
            value = z * shape[-3] ** -0.5
        else:  # [.., in, out]
            value = z * shape[-2] ** -0.5
        params[path] = jnp.asarray(value, dtype)
    return build_transformer(cfg, params)


# HF config classes and sizes per test family; "llama_untied" and "qwen2" exercise the branches
# (untied lm_head, q/k/v biases) that plain Llama does not.
_HF_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


def _hf_model(arch: str, overrides: dict[str, Any]) -> Any:
    import transformers as tf  # test-only dependency

    kw = dict(_HF_TINY)
    if arch in ("llama", "llama_untied"):
        kw.update(rope_theta=5000.0, tie_word_embeddings=arch == "llama", rms_norm_eps=1e-5)
        cls, conf = tf.LlamaForCausalLM, tf.LlamaConfig
    elif arch == "qwen2":
        kw.update(rope_theta=20000.0, tie_word_embeddings=False)
        cls, conf = tf.Qwen2ForCausalLM, tf.Qwen2Config
    elif arch == "mistral":
        kw.update(sliding_window=None, tie_word_embeddings=False)
        cls, conf = tf.MistralForCausalLM, tf.MistralConfig
    elif arch == "gpt2":
        kw = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=None,
                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls, conf = tf.GPT2LMHeadModel, tf.GPT2Config
    elif arch == "gemma2":
        # sliding_window 4 < the test sequence length, so local layers really differ from global.
        kw.update(sliding_window=4, query_pre_attn_scalar=8, attn_logit_softcapping=20.0,
                  final_logit_softcapping=15.0, layer_types=["sliding_attention", "full_attention"])
        cls, conf = tf.Gemma2ForCausalLM, tf.Gemma2Config
    elif arch == "gemma3":
        kw.update(num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=8,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
        cls, conf = tf.Gemma3ForCausalLM, tf.Gemma3TextConfig
    else:
        raise ValueError(f"write_tiny_hf_checkpoint: unknown arch {arch!r}.")
    kw.update(overrides)
    config = conf(**kw)
    config._attn_implementation = "eager"  # softcaps and sliding windows are exact on the eager path
    return cls(config)


def write_tiny_hf_checkpoint(dir: str | os.PathLike, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny model with ``transformers.save_pretrained`` into ``dir`` and return it.

    Args:
        dir: target folder (created).
        arch: ``"llama" | "llama_untied" | "qwen2" | "mistral" | "gpt2" | "gemma2" | "gemma3"``.
        seed: torch seed; the same seed gives the same weights.
        **overrides: extra HF config fields.

    Every parameter (norm scales and biases included) is re-drawn so that no parameter sits at a
    default that would hide a conversion bug (Gemma's zero-init norms, zero biases).
    """
    import torch  # test-only dependency

    torch.manual_seed(seed)
    model = _hf_model(arch, overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("norm.weight") or ".ln_" in name:
                gemma = arch.startswith("gemma")  # Gemma norms scale by (1 + w): centre w on 0
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn_like(p))
            elif "embed" in name or ".wte." in name or ".wpe." in name:
                p.copy_(torch.randn_like(p))
            else:  # nn.Linear [out, in] or GPT-2 Conv1D [in, out]: scale by the input width
                fan_in = p.shape[0] if arch == "gpt2" else p.shape[1]
                p.copy_(torch.randn_like(p) * fan_in**-0.5)
    out = Path(dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def word_level_tokenizer(texts: list[str]) -> Any:
    """A ``TextTokenizer`` whose vocabulary is every whitespace/punctuation-split word of ``texts``
    (ids 0 pad, 1 eos, 2 unknown): lets experiment pipelines run end to end on a tiny random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxrecover.model.tokenizer import TextTokenizer

    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {"<pad>": 0, "<eos>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre
    return TextTokenizer(tk, bos_id=None, eos_id=1, pad_id=0)


def random_sae(d_in: int, d_sae: int, *, seed: int = 0, hook_name: str = "", activation: str = "relu") -> Any:
    """A random SAE with unit-norm decoder rows and ``W_enc = W_dec.T`` (tied), zero biases."""
    from jaxrecover.sae.autoencoder import SAE

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    return SAE(W_enc=jnp.asarray(W.T.copy()), b_enc=jnp.zeros(d_sae, jnp.float32), W_dec=jnp.asarray(W),
               b_dec=jnp.zeros(d_in, jnp.float32), activation=activation, hook_name=hook_name)
