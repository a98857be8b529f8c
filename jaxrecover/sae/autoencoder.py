"""SAE math only: parameters and pure encode / decode. No I/O (see ``sae_io``), no hooks.

Conventions follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``, ``x_hat = z @ W_dec + b_dec``, computed in
the SAE's dtype with ``x`` cast to it first (as SAELens: a bf16 SAE rounds its input, then subtracts).
Activations:
- ``"relu"``     : ``z = relu(pre)``
- ``"jumprelu"`` : ``z = relu(pre) * (pre > threshold)`` (Gemma Scope)
- ``"topk"``     : keep the ``k`` largest pre-activations (then relu), zero the rest
"""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int

from jaxrecover.core.pytree import pytree_dataclass, static

ACTIVATIONS = ("relu", "jumprelu", "topk")


def _rows(v: Array, like: Array) -> Array:
    """Broadcast a per-feature vector over the leading axes of ``like`` explicitly (the tests run with
    ``jax_numpy_rank_promotion="raise"``, which forbids ``[seq, d] + [d]``)."""
    return jnp.broadcast_to(v, like.shape[:-1] + v.shape)


@pytree_dataclass
class SAE:
    """A sparse autoencoder at one site. Arrays are leaves; the rest is static metadata."""

    W_enc: Float[Array, "d_in d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_in"]
    b_dec: Float[Array, " d_in"]
    threshold: Float[Array, " d_sae"] | None = None
    activation: str = static("relu")
    k: int = static(0)
    apply_b_dec_to_input: bool = static(False)
    hook_name: str = static("")

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Unknown SAE activation {self.activation!r}; expected one of {ACTIVATIONS}.")
        if self.activation == "jumprelu" and self.threshold is None:
            raise ValueError("A jumprelu SAE needs a threshold array.")
        if self.activation == "topk" and self.k <= 0:
            raise ValueError(f"A topk SAE needs k > 0, got k={self.k}.")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[-2]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[-1]


def _sae_in(sae: SAE, x: Array) -> Array:
    """The encoder's input as SAELens forms it (``process_sae_in``): cast ``x`` to the SAE's dtype
    FIRST, then subtract ``b_dec``. The other order (subtract in float32, then round to bfloat16)
    differs for a bf16 SAE: max |d pre| 0.76 and 7 support flips against sae-lens 6.54 (issue 22)."""
    x = x.astype(sae.W_enc.dtype)
    if sae.apply_b_dec_to_input:
        x = x - _rows(sae.b_dec.astype(x.dtype), x)
    return x


def encode_pre(sae: SAE, x: Float[Array, "*seq d_in"]) -> Float[Array, "*seq d_sae"]:
    """Pre-activations. Affine in ``x``: the fact the encoder-null projection relies on."""
    x = _sae_in(sae, x)
    pre = x @ sae.W_enc
    return pre + _rows(sae.b_enc, pre)


def activate(sae: SAE, pre: Float[Array, "*seq d_sae"]) -> Float[Array, "*seq d_sae"]:
    """Apply the SAE's nonlinearity to pre-activations."""
    if sae.activation == "relu":
        return jax.nn.relu(pre)
    if sae.activation == "jumprelu":
        return jax.nn.relu(pre) * (pre > _rows(sae.threshold, pre)).astype(pre.dtype)
    # top-k: mask everything below the k-th largest value (ties keep all equal values, as SAELens' topk
    # keeps exactly k; ties have probability zero for float activations)
    kth = jax.lax.top_k(pre, sae.k)[0][..., -1:]
    return jax.nn.relu(pre) * (pre >= kth).astype(pre.dtype)


def encode(sae: SAE, x: Float[Array, "*seq d_in"]) -> Float[Array, "*seq d_sae"]:
    """Latents ``z = E(x)``."""
    return activate(sae, encode_pre(sae, x))


def encode_features(sae: SAE, x: Float[Array, "*seq d_in"], features: Int[Array, " k"]) -> Float[Array, "*seq k"]:
    """Latents of a feature subset only. For relu/jumprelu this reads just the ``k`` encoder columns
    (cheap inside an optimisation loop); top-k needs every pre-activation to rank them."""
    if sae.activation == "topk":
        return encode(sae, x)[..., features]
    pre = _sae_in(sae, x) @ sae.W_enc[:, features]
    pre = pre + _rows(sae.b_enc[features], pre)
    z = jax.nn.relu(pre)
    if sae.activation == "jumprelu":
        z = z * (pre > _rows(sae.threshold[features], pre)).astype(pre.dtype)
    return z


def decode(sae: SAE, z: Float[Array, "*seq d_sae"]) -> Float[Array, "*seq d_in"]:
    """Reconstruction ``x_hat = D(z)``."""
    x_hat = z @ sae.W_dec
    return x_hat + _rows(sae.b_dec, x_hat)


def reconstruct(sae: SAE, x: Float[Array, "*seq d_in"]) -> Float[Array, "*seq d_in"]:
    return decode(sae, encode(sae, x))


def astype(sae: SAE, dtype: DTypeLike) -> SAE:
    """Cast every array (threshold included) to ``dtype``."""
    return jax.tree.map(lambda a: a.astype(dtype), sae)
