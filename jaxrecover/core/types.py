"""Axis vocabulary and jaxtyping aliases: the contract every public signature uses.

Axis names
----------
- ``batch``   : independent examples (only at call sites that vmap; core functions are per-example)
- ``seq``     : token slots of one (padded) sequence; padding is on the left for prompts
- ``pos``     : the optimised token positions of a perturbation (a subset of ``seq``)
- ``d_model`` : residual stream width
- ``n_heads`` / ``n_kv_heads`` / ``d_head`` : attention heads, key/value heads (GQA), head width
- ``d_mlp``   : MLP hidden width
- ``d_vocab`` : vocabulary size
- ``d_sae``   : SAE dictionary width
- ``k``       : a selected set of SAE features
- ``layer``   : the stacked-block axis

Conventions: weights are stored ``[in, out]`` and applied as ``x @ W``. Core functions are written
for one example and batched with ``jax.vmap``.
"""

from jaxtyping import Array, Bool, Float, Int

Tokens = Int[Array, " seq"]
Valid = Bool[Array, " seq"]
Slots = Int[Array, " seq"]
Resid = Float[Array, "seq d_model"]
Logits = Float[Array, "seq d_vocab"]
Latents = Float[Array, "seq d_sae"]
Delta = Float[Array, "seq d_model"]

__all__ = ["Array", "Bool", "Float", "Int", "Tokens", "Valid", "Slots", "Resid", "Logits", "Latents", "Delta"]
