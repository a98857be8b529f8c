"""PyTorch reference of single-layer post-intervention recovery, in the paper's own style.

What it computes (the same problem as ``jaxrecover.recover.solver``):

- The defended state at one residual site ``blocks.{L}.hook_{resid_pre|resid_post}``: a closed-form
  SAE clamp that keeps the SAE error term, ``h_def = h + (clamp(z_S) - z_S) @ W_dec[S]``. ``z_S`` is
  computed from ``h`` inside the hook and nothing is detached, so gradients flow through the clamp and
  the error term alike (SAELens detaches its error term; that gives the wrong recovery gradient).
- The recovery perturbation ``delta [rows, d_model]`` is added after the clamp at the rows' token
  positions (``AddDelta``).
- Each step: forward, ``loss = -objective``, backward, project ``delta.grad`` row by row onto the
  null space of the clamped features' encoder columns ``A = W_enc[:, S]`` (ridge solve as in the
  paper's code, or the exact pseudo-inverse / QR projector), ``torch.optim.Adam`` step, optionally
  re-project ``delta``, then clip ``||delta||_F`` to the budget.

Adam equivalence with optax: both use bias-corrected moments and put ``eps`` outside the square root,
``update = lr * m_hat / (sqrt(v_hat) + eps)``; ``torch.optim.Adam(lr, betas, eps)`` and
``optax.adam(lr, b1, b2, eps)`` take identical steps on identical gradients.

Two execution modes, same numbers:

- ``recover_per_example``: the paper's loop. One example at a time, a forward hook registered on
  ``model.model.layers[L]`` (a pre-hook for ``resid_pre``), the full HF forward every step.
- ``recover_batched``: every example at once. The residual entering block ``L`` is computed once
  (``run_to``); each step runs only blocks ``L..`` (``run_from``), optionally under ``torch.compile``.
  One Adam over the stacked ``delta [batch, rows, d_model]`` is exactly per-example Adam (it is
  elementwise), the loss is the sum of per-example losses (examples do not interact), and the budget
  clip is per example.
- ``recover_batched(cache=True)``: the same, plus the JAX engine's sequence-axis caching and
  read-slot unembedding (``jaxrecover.recover.solver.Window``). Once per solve, ONE pass over the whole
  sequence from block ``L`` on (clamps on, ``delta = 0``) records the keys/values of the slots before
  the first delta slot ``cut`` at every block (``prefix_kv``; causal attention: ``delta`` cannot change
  them). Each step then runs only slots ``cut..seq`` through the HF decoder layers, whose attention
  gets the cached keys/values through a duck-typed cache (``_KV``, HF's ``cache.update`` hook), and
  ``lm_head`` runs only on slots ``read..seq`` (the slots the objective reads). Same objective as the
  full path up to float rounding.

Not here: cross-layer Jacobian projection, generation, padding (examples share one length).
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

POINTS = ("resid_pre", "resid_post")
OBJECTIVES = ("continuation_logprob", "logit_diff", "choice_margin")
PROJECTIONS = ("none", "ridge", "pinv", "qr")
CLAMP_MODES = ("set", "zero", "scale", "negative_on_positive", "floor", "ceiling")

_MSG_SITE = "site {site!r}: the torch reference supports 'blocks.{{L}}.hook_resid_pre' and 'blocks.{{L}}.hook_resid_post'."


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchRecoveryConfig:
    """Hyper-parameters of one recovery run; mirrors ``jaxrecover.recover.solver.RecoveryConfig``.

    Attributes:
        layer: block index of the site.
        point: ``"resid_pre"`` (input of block ``layer``) or ``"resid_post"`` (its output).
        steps: optimisation steps.
        lr, b1, b2, eps: Adam hyper-parameters (torch defaults for betas/eps).
        budget: ``||delta||_F`` bound per example, enforced by rescaling after every step.
        projection: ``"ridge"`` (paper code, ``(A^T A + ridge I)^-1``), ``"pinv"``, ``"qr"`` or ``"none"``.
        ridge: ridge of the ``"ridge"`` projector.
        reproject: also project ``delta`` itself after each Adam step (Adam's scaling leaves the null space).
        clip_eps: the ``1e-8`` in ``delta * budget / (||delta|| + clip_eps)``.
        objective: ``"continuation_logprob" | "logit_diff" | "choice_margin"``; "recovered" is the
            matching ``jaxrecover.recover.objectives`` success predicate at the final ``delta``.
    """

    layer: int
    point: str = "resid_post"
    steps: int = 20
    lr: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    budget: float = 20.0
    projection: str = "ridge"
    ridge: float = 1e-4
    reproject: bool = False
    clip_eps: float = 1e-8
    objective: str = "logit_diff"

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(_MSG_SITE.format(site=f"blocks.{self.layer}.hook_{self.point}"))
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}.")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")


# ----------------------------------------------------------------------------- SAE and clamp


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchSAE:
    """SAELens-convention SAE: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None
    activation: str = "relu"  # "relu" | "jumprelu" | "topk"
    k: int = 0  # topk only
    apply_b_dec_to_input: bool = False

    @classmethod
    def from_jax(cls, sae: Any, device: str | torch.device = "cpu") -> "TorchSAE":
        """Copy a ``jaxrecover.sae.autoencoder.SAE`` (float32)."""
        import numpy as np

        t = lambda a: None if a is None else torch.from_numpy(np.array(a, dtype=np.float32)).to(device)  # noqa: E731
        if sae.activation not in ("relu", "jumprelu", "topk"):
            raise ValueError(f"TorchSAE supports relu/jumprelu/topk, got {sae.activation!r}.")
        return cls(W_enc=t(sae.W_enc), b_enc=t(sae.b_enc), W_dec=t(sae.W_dec), b_dec=t(sae.b_dec),
                   threshold=t(sae.threshold), activation=sae.activation, k=int(getattr(sae, "k", 0) or 0),
                   apply_b_dec_to_input=sae.apply_b_dec_to_input)

    def encode_features(self, x: Tensor, features: Tensor) -> Tensor:
        """Latents of the selected features only: ``[..., d_in] -> [..., k]`` (float32).

        relu/jumprelu read only the selected encoder columns; top-k needs every pre-activation to
        rank them (``relu(pre) * (pre >= k-th largest)``, as ``jaxrecover.sae.autoencoder.activate``)."""
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        if self.activation == "topk":
            pre = x @ self.W_enc + self.b_enc
            kth = torch.topk(pre, self.k, dim=-1).values[..., -1:]
            return (torch.relu(pre) * (pre >= kth).to(pre.dtype))[..., features]
        pre = x @ self.W_enc[:, features] + self.b_enc[features]
        z = torch.relu(pre)
        if self.activation == "jumprelu":
            z = z * (pre > self.threshold[features]).to(pre.dtype)
        return z


def clamp_latents(mode: str, z_S: Tensor, values: Tensor) -> Tensor:
    """Defended values of the selected latents (same table as ``jaxrecover.sae.clamp``)."""
    if mode == "set":
        return values.expand_as(z_S)
    if mode == "zero":
        return torch.zeros_like(z_S)
    if mode == "scale":
        return z_S * values
    if mode == "negative_on_positive":
        return torch.where(z_S > 0, values.expand_as(z_S), z_S)
    if mode == "floor":
        return torch.maximum(z_S, values)
    if mode == "ceiling":
        return torch.minimum(z_S, values)
    raise ValueError(f"Unknown clamp mode {mode!r}; expected one of {CLAMP_MODES}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchClamp:
    """Closed-form clamp keeping the SAE error: ``h + (clamp(z_S) - z_S) @ W_dec[S]``, nothing detached."""

    sae: TorchSAE
    features: Tensor  # long [k]
    values: Tensor  # float [k]
    mode: str = "set"

    def __call__(self, h: Tensor) -> Tensor:
        z_S = self.sae.encode_features(h, self.features)
        dz = clamp_latents(self.mode, z_S, self.values) - z_S
        return h + (dz @ self.sae.W_dec[self.features]).to(h.dtype)

    @property
    def encoder_columns(self) -> Tensor:
        """``A = W_enc[:, S]`` (``[d_in, k]``): the directions the projection keeps ``delta`` away from."""
        return self.sae.W_enc[:, self.features]


# ----------------------------------------------------------------------------- projection and clip


def null_projector(A: Tensor, kind: str, ridge: float = 1e-4) -> Tensor:
    """``P [d, d]`` with ``g @ P`` the projection of rows ``g`` onto ``null(A^T)``; ``A = W_enc[:, S]``.

    - ``"ridge"``: ``I - A (A^T A + ridge I)^-1 A^T`` (the paper's code).
    - ``"pinv"``:  ``I - A pinv(A)`` (the paper's equation, ``(A^T A)^+``).
    - ``"qr"``:    ``I - Q Q^T`` with ``Q`` from a reduced QR of ``A`` (equal to ``pinv`` for full rank).
    - ``"none"``:  ``I``.
    Computed in float64 then cast to float32: the projector is built once, so its accuracy is free.
    """
    d = A.shape[0]
    A64 = A.double()
    eye = torch.eye(d, dtype=torch.float64, device=A.device)
    if kind == "none":
        P = eye
    elif kind == "ridge":
        gram = A64.T @ A64 + ridge * torch.eye(A.shape[1], dtype=torch.float64, device=A.device)
        P = eye - A64 @ torch.linalg.solve(gram, A64.T)
    elif kind == "pinv":
        P = eye - A64 @ torch.linalg.pinv(A64)
    elif kind == "qr":
        Q, _ = torch.linalg.qr(A64, mode="reduced")
        P = eye - Q @ Q.T
    else:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {kind!r}.")
    return P.float()


@torch.no_grad()
def clip_budget_(delta: Tensor, budget: float, clip_eps: float) -> None:
    """In place: ``delta <- delta * budget / (||delta||_F + clip_eps)`` where ``||delta||_F > budget``,
    per example (the norm is over the last two axes ``[rows, d_model]``)."""
    norm = torch.linalg.vector_norm(delta, dim=(-2, -1), keepdim=True)
    scale = torch.where(norm > budget, budget / (norm + clip_eps), torch.ones_like(norm))
    delta.mul_(scale)


# ----------------------------------------------------------------------------- examples and objectives


@dataclasses.dataclass(frozen=True, kw_only=True)
class TorchExamples:
    """A batch of same-length examples (leading axis ``batch``; one token variant per example).

    Attributes:
        tokens: long ``[batch, seq]``.
        delta_slots: long ``[batch, rows]``: token positions of the ``delta`` rows.
        target: the objective's fields, each with a leading ``batch`` axis, named as the fields of the
            matching ``jaxrecover.recover.objectives`` target (variant axis dropped):

            - ``continuation_logprob``: ``ids [b, seq]`` (next-token targets), ``weights [b, seq]``.
            - ``logit_diff``: ``slot [b]``, ``io [b]``, ``s [b]``.
            - ``choice_margin``: ``slot [b]``, ``choice_ids [b, n_choice]``, ``correct [b]``.
    """

    tokens: Tensor
    delta_slots: Tensor
    target: dict[str, Tensor]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, i: int) -> "TorchExamples":
        """Example ``i`` as a batch of one."""
        return TorchExamples(tokens=self.tokens[i : i + 1], delta_slots=self.delta_slots[i : i + 1],
                             target={k: v[i : i + 1] for k, v in self.target.items()})

    def to(self, device: str | torch.device) -> "TorchExamples":
        return TorchExamples(tokens=self.tokens.to(device), delta_slots=self.delta_slots.to(device),
                             target={k: v.to(device) for k, v in self.target.items()})


def _choice_logits(logits: Tensor, t: dict[str, Tensor]) -> Tensor:
    batch = torch.arange(logits.shape[0], device=logits.device)
    return logits.float()[batch, t["slot"]].gather(-1, t["choice_ids"])  # [b, n_choice]


def objective_values(name: str, logits: Tensor, t: dict[str, Tensor]) -> Tensor:
    """Per-example objective ``[batch]`` from logits ``[batch, seq, vocab]`` (higher is better).

    Same definitions as ``jaxrecover.recover.objectives`` (one variant per example):

    - ``continuation_logprob``: weighted mean of ``log p(ids[t] | logits[t])`` over slots.
    - ``logit_diff``: ``logit[io] - logit[s]`` at ``slot``.
    - ``choice_margin``: ``logit[choice[correct]] - mean(logits of the other choices)`` at ``slot``.
    """
    if name == "continuation_logprob":
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok = lp.gather(-1, t["ids"].clamp(0, logits.shape[-1] - 1)[..., None])[..., 0]  # [b, seq]
        w = t["weights"].float()
        return (tok * w).sum(-1) / w.sum(-1).clamp_min(1e-8)
    if name == "logit_diff":
        batch = torch.arange(logits.shape[0], device=logits.device)
        at = logits.float()[batch, t["slot"]]  # [b, vocab]
        return at[batch, t["io"]] - at[batch, t["s"]]
    if name == "choice_margin":
        c = _choice_logits(logits, t)
        correct = c.gather(-1, t["correct"][:, None])[:, 0]
        return correct - (c.sum(-1) - correct) / (c.shape[-1] - 1)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}.")


def success_values(name: str, logits: Tensor, t: dict[str, Tensor]) -> Tensor:
    """Per-example "recovered" decision ``[batch]`` (bool), as ``jaxrecover.recover.objectives``' predicates.

    - ``continuation_logprob``: greedy argmax reproduces every scored target token.
    - ``logit_diff``: ``logit[io] > logit[s]``.
    - ``choice_margin``: the correct choice has the largest choice logit.
    """
    if name == "continuation_logprob":
        hit = logits.argmax(-1) == t["ids"]
        return (hit | (t["weights"] <= 0)).all(-1)
    if name == "logit_diff":
        return objective_values(name, logits, t) > 0
    if name == "choice_margin":
        return _choice_logits(logits, t).argmax(-1) == t["correct"]
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}.")


# ----------------------------------------------------------------------------- HF model plumbing


def load_hf_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """``AutoModelForCausalLM`` from a local HF folder, eager attention, eval mode, weights frozen."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model


Hook = Callable[[Tensor], Tensor]
SiteKey = tuple[int, str]  # (layer, point)


def parse_site(site: "str | SiteKey") -> SiteKey:
    """``"blocks.{L}.hook_{point}"`` (or ``(L, point)``, or a ``jaxrecover.Site``) -> ``(L, point)``."""
    if isinstance(site, tuple):
        layer, point = site
    elif hasattr(site, "layer") and hasattr(site, "point"):
        layer, point = site.layer, site.point
    else:
        parts = str(site).split(".")
        if len(parts) != 3 or parts[0] != "blocks" or not parts[2].startswith("hook_"):
            raise ValueError(_MSG_SITE.format(site=site))
        layer, point = int(parts[1]), parts[2][len("hook_"):]
    if point not in POINTS:
        raise ValueError(_MSG_SITE.format(site=site))
    return int(layer), point


class _Stop(Exception):
    """Raised inside a pre-hook to end a forward pass early (``run_to``)."""


def _layers(model: Any) -> Any:
    return model.model.layers


@contextlib.contextmanager
def site_hooks(model: Any, hooks: dict[SiteKey, Hook]) -> Iterator[None]:
    """Register ``{(layer, point): fn}`` on ``model.model.layers``: a forward hook on a block's output
    (``resid_post``) or a pre-hook on its input (``resid_pre``); all removed on exit."""
    handles = []

    def post_hook(fn: Hook) -> Callable:
        def post(module: Any, args: tuple, output: Any) -> Any:
            if isinstance(output, tuple):  # transformers < 4.54 returns (hidden_states, ...)
                return (fn(output[0]), *output[1:])
            return fn(output)

        return post

    def pre_hook(fn: Hook) -> Callable:
        def pre(module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        return pre

    try:
        for (layer, point), fn in sorted(hooks.items()):
            block = _layers(model)[layer]
            if point == "resid_post":
                handles.append(block.register_forward_hook(post_hook(fn)))
            else:
                handles.append(block.register_forward_pre_hook(pre_hook(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_to(model: Any, tokens: Tensor, layer: int, hooks: dict[SiteKey, Hook] | None = None) -> Tensor:
    """Residual entering block ``layer`` (before any hook there); runs blocks ``< layer`` only, with
    the ``hooks`` of those blocks (clamps below the delta site act in the prefix too)."""
    captured: list[Tensor] = []

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    below = {k: f for k, f in (hooks or {}).items() if k[0] < layer}
    with site_hooks(model, below):
        handle = _layers(model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model.model(input_ids=tokens)
        except _Stop:
            pass
        finally:
            handle.remove()
    return captured[0].detach()


def _masks(model: Any, x: Tensor, position_ids: Tensor) -> dict[str, Any]:
    """Attention masks per layer type, built by transformers' own mask helpers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = model.config
    kw = dict(config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kw)}
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return masks


class _KV:
    """A duck-typed Hugging Face cache for ONE pass through the decoder layers (HF attention calls
    ``cache.update(k, v, layer_idx, ...)`` after RoPE and attends to what it returns).

    - ``_KV()`` records: ``update`` stores each layer's (post-RoPE) keys and values and returns them
      unchanged (the pass is an ordinary full pass).
    - ``_KV(prefix)`` serves: ``update`` returns ``cat(prefix[layer], new)`` along the sequence, so the
      suffix queries attend to the cached prefix keys/values and to the suffix itself. Nothing is
      appended to ``prefix``: every step starts from the same cache.
    """

    def __init__(self, prefix: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        self.prefix = prefix
        self.store: dict[int, tuple[Tensor, Tensor]] = {}

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.prefix is None:
            self.store[layer_idx] = (key, value)
            return key, value
        pk, pv = self.prefix[layer_idx]
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def _cache_kwarg(layer_module: Any) -> str:
    """The decoder layer's keyword for the cache (``cache`` in transformers >= 5.x, else ``past_key_values``
    or ``past_key_value``)."""
    import inspect

    params = inspect.signature(layer_module.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "past_key_values"


def _suffix_masks(model: Any, start: int, seq: int, dtype: torch.dtype, device: Any) -> dict[str, Tensor]:
    """Additive masks ``[1, 1, seq - start, seq]`` for queries at slots ``start..seq`` against keys at
    every slot: causal (key <= query) and, for Gemma-2 sliding layers, ``query - key < window``."""
    q = torch.arange(start, seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    neg = torch.finfo(dtype).min
    add = lambda ok: torch.where(ok, 0.0, neg).to(dtype)[None, None]  # noqa: E731
    masks = {"full_attention": add(k <= q)}
    window = getattr(model.config, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(model.config, "layer_types", None) or ()):
        masks["sliding_attention"] = add((k <= q) & (q - k < window))
    return masks


def run_from(
    model: Any,
    resid: Tensor,
    layer: int,
    hooks: dict[SiteKey, Hook] | None = None,
    *,
    start: int = 0,
    read: int | None = None,
    kv: _KV | None = None,
    logits: bool = True,
) -> Tensor:
    """Logits from the residual entering block ``layer``; ``hooks`` at layers ``>= layer`` apply.

    Mirrors the decoder loop of ``LlamaModel`` / ``Gemma2Model`` (masks, rotary embeddings, final
    norm, ``lm_head``, Gemma-2 final soft-cap) for blocks ``layer..`` only.

    Sequence-axis caching (``start > 0``): ``resid`` holds only slots ``start..seq`` and ``kv`` serves
    the keys/values of slots ``< start`` at every block from ``layer`` on (``prefix_kv``); the hooks
    see suffix slots only (``add_delta`` slots must be shifted by ``start``). ``read``: unembed slots
    ``read..seq`` only (``read >= start``; default ``start``), so the logits are
    ``[batch, seq - read, vocab]``. ``logits=False`` returns the final residual instead (no norm, no
    ``lm_head``). ``kv=_KV()`` with ``start=0`` records every block's keys/values.
    """
    cfg = model.config
    hooks = hooks or {}
    n_new = resid.shape[1]
    seq = start + n_new
    position_ids = torch.arange(start, seq, device=resid.device)[None]
    if start == 0:
        masks = _masks(model, resid, position_ids)
    else:
        if kv is None or kv.prefix is None:
            raise ValueError("run_from(start > 0) needs kv=_KV(prefix) with the keys/values of slots < start.")
        masks = _suffix_masks(model, start, seq, resid.dtype, resid.device)
    position_embeddings = model.model.rotary_emb(resid, position_ids)
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    extra = {} if kv is None else {_cache_kwarg(_layers(model)[layer]): kv}
    x = resid
    for i in range(layer, cfg.num_hidden_layers):
        if (i, "resid_pre") in hooks:
            x = hooks[(i, "resid_pre")](x)
        x = _layers(model)[i](x, attention_mask=masks[types[i]], position_embeddings=position_embeddings,
                              position_ids=position_ids, **extra)
        if (i, "resid_post") in hooks:
            x = hooks[(i, "resid_post")](x)
    if not logits:
        return x
    read = start if read is None else read
    if read < start:
        raise ValueError(f"run_from: read={read} < start={start}.")
    if read > start:
        x = x[:, read - start :]
    out = model.lm_head(model.model.norm(x))
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if softcap is not None:
        out = torch.tanh(out / softcap) * softcap
    return out


@torch.no_grad()
def prefix_kv(model: Any, resid: Tensor, layer: int, hooks: dict[SiteKey, Hook], cut: int) -> dict[int, tuple[Tensor, Tensor]]:
    """Keys/values of slots ``< cut`` at every block from ``layer`` on, from ONE pass over the whole
    sequence with ``hooks`` (the clamps; ``delta = 0``). Causal attention: slots before the first
    delta slot never see ``delta``, so these are the same at every step. Computed once per solve."""
    rec = _KV()
    run_from(model, resid, layer, hooks, kv=rec, logits=False)
    return {i: (k[:, :, :cut].contiguous(), v[:, :, :cut].contiguous()) for i, (k, v) in rec.store.items()}


def add_delta(delta: Tensor, slots: Tensor) -> Hook:
    """``h -> h + delta`` at ``slots``: ``delta [batch, rows, d]``, ``slots [batch, rows]`` (-1 = unused)."""

    def hook(h: Tensor) -> Tensor:
        onehot = (torch.arange(h.shape[1], device=h.device)[None, :, None] == slots[:, None, :]).to(delta.dtype)
        return h + torch.bmm(onehot, delta).to(h.dtype)  # [b, seq, rows] @ [b, rows, d]

    return hook


def _hooks_with(clamps: dict[SiteKey, TorchClamp], site: SiteKey, delta: Tensor, slots: Tensor) -> dict[SiteKey, Hook]:
    """Every clamp at its site; at the delta site ``clamp`` then ``+ delta`` (``h_rec = h_def + delta``)."""
    hooks: dict[SiteKey, Hook] = dict(clamps)
    add = add_delta(delta, slots)
    if site in clamps:
        clamp = clamps[site]
        hooks[site] = lambda h: add(clamp(h))
    else:
        hooks[site] = add
    return hooks


# ----------------------------------------------------------------------------- the solvers


@dataclasses.dataclass(frozen=True)
class TorchRecovery:
    """Result for a batch of examples.

    Attributes:
        delta: ``[batch, rows, d_model]`` final perturbation.
        losses: ``[batch, steps]``: ``-objective`` at the start of each step (before its update); the
            JAX engine's ``trace["objective"]`` is minus this.
        final_objective: ``[batch]`` objective at the final ``delta``.
        clamped_objective: ``[batch]`` objective with the clamps and ``delta = 0``.
        recovered: ``[batch]`` bool, the objective's success predicate at the final ``delta``.
        clamped_success: ``[batch]`` bool, the same predicate with ``delta = 0``.
    """

    delta: Tensor
    losses: Tensor
    final_objective: Tensor
    clamped_objective: Tensor
    recovered: Tensor
    clamped_success: Tensor


def _prepare(clamps: Any, cfg: TorchRecoveryConfig) -> tuple[dict[SiteKey, TorchClamp], SiteKey, Tensor]:
    """Normalised clamps, the delta site and the projector ``P``."""
    clamps = {parse_site(k): v for k, v in clamps.items()}
    site = (cfg.layer, cfg.point)
    if cfg.projection != "none" and site not in clamps:
        raise ValueError(f"projection={cfg.projection!r} needs a clamp at the delta site {site}; clamps at {sorted(clamps)}.")
    any_clamp = next(iter(clamps.values()))
    A = clamps[site].encoder_columns if site in clamps else any_clamp.sae.W_enc[:, :1]
    return clamps, site, null_projector(A, cfg.projection, cfg.ridge)


def _step_update(cfg: TorchRecoveryConfig, delta: Tensor, opt: torch.optim.Optimizer, P: Tensor) -> None:
    """Project the gradient, Adam step, optional re-projection, budget clip (in place)."""
    with torch.no_grad():
        delta.grad = delta.grad @ P
    opt.step()
    with torch.no_grad():
        if cfg.reproject:
            delta.copy_(delta @ P)
        clip_budget_(delta, cfg.budget, cfg.clip_eps)


def _adam(cfg: TorchRecoveryConfig, delta: Tensor) -> torch.optim.Optimizer:
    # foreach=False keeps the plain per-tensor loop: identical math, no multi-tensor kernels to compile.
    return torch.optim.Adam([delta], lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps, foreach=False)


def _evaluate(cfg: TorchRecoveryConfig, logits: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return objective_values(cfg.objective, logits, target), success_values(cfg.objective, logits, target)


def recover_per_example(model: Any, clamps: Any, examples: TorchExamples, cfg: TorchRecoveryConfig) -> TorchRecovery:
    """The paper's loop: for each example a fresh ``delta`` and Adam; HF forward hooks; the full
    forward every step.

    Args:
        model: an HF causal LM (``load_hf_model``).
        clamps: ``{site: TorchClamp}``, site as ``"blocks.L.hook_resid_post"``; all act in every pass.
        examples: the batch (solved one by one).
        cfg: the delta site and hyper-parameters.
    """
    clamps, site, P = _prepare(clamps, cfg)
    d = model.config.hidden_size
    out: list[tuple[Tensor, ...]] = []
    for i in range(len(examples)):
        ex = examples.select(i)
        delta = torch.zeros(1, ex.delta_slots.shape[1], d, device=ex.tokens.device, requires_grad=True)
        opt = _adam(cfg, delta)
        losses = []
        with site_hooks(model, _hooks_with(clamps, site, delta, ex.delta_slots)):
            for _ in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                loss = -objective_values(cfg.objective, model(input_ids=ex.tokens).logits, ex.target).sum()
                loss.backward()
                losses.append(loss.detach())
                _step_update(cfg, delta, opt, P)
            with torch.no_grad():
                final, ok = _evaluate(cfg, model(input_ids=ex.tokens).logits, ex.target)
        zero = torch.zeros_like(delta)
        with torch.no_grad(), site_hooks(model, _hooks_with(clamps, site, zero, ex.delta_slots)):
            clamped, clamped_ok = _evaluate(cfg, model(input_ids=ex.tokens).logits, ex.target)
        history = torch.stack(losses) if losses else torch.zeros(0, device=delta.device)
        out.append((delta.detach()[0], history, final[0], clamped[0], ok[0], clamped_ok[0]))
    deltas, losses, finals, clampeds, oks, clamped_oks = (torch.stack(t) for t in zip(*out, strict=True))
    return TorchRecovery(deltas, losses, finals, clampeds, oks, clamped_oks)


@dataclasses.dataclass(frozen=True)
class TorchWindow:
    """Slot window of a cached step (same meaning as ``jaxrecover.recover.solver.Window``): run slots
    ``cut..seq`` against cached keys/values of the slots before ``cut``; unembed slots ``read..seq``.
    ``TorchWindow()`` is the full path."""

    cut: int = 0
    read: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cut <= self.read:
            raise ValueError(f"TorchWindow needs 0 <= cut <= read, got cut={self.cut}, read={self.read}.")


def plan_window(examples: TorchExamples, objective: str) -> TorchWindow:
    """The largest exact window for a batch: ``cut`` = first delta slot; ``read`` = first slot whose
    logits the objective reads (continuation: first slot with a positive weight; logit_diff / choice:
    the smallest target slot); ``cut = min(cut, read)``."""
    slots = examples.delta_slots
    used = slots[slots >= 0]
    cut = int(used.min()) if used.numel() else 0
    t, seq = examples.target, examples.tokens.shape[1]
    if objective == "continuation_logprob":
        hit = (t["weights"] > 0).any(0)
        read = int(hit.to(torch.int64).argmax()) if bool(hit.any()) else seq
    else:
        read = int(t["slot"].min())
    return TorchWindow(cut=min(cut, read), read=read)


def window_target(objective: str, target: dict[str, Tensor], read: int) -> dict[str, Tensor]:
    """``target`` re-indexed for logits of slots ``read..seq``."""
    if read == 0:
        return target
    if objective == "continuation_logprob":
        return {**target, "ids": target["ids"][:, read:], "weights": target["weights"][:, read:]}
    return {**target, "slot": target["slot"] - read}


def make_batched_logits(model: Any, clamps: dict[SiteKey, TorchClamp], cfg: TorchRecoveryConfig,
                        window: TorchWindow | None = None,
                        kv: dict[int, tuple[Tensor, Tensor]] | None = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(resid, delta, slots) -> logits`` through blocks ``layer..`` only.

    Full path (``window`` None or ``TorchWindow()``): ``resid [batch, seq, d]``, logits
    ``[batch, seq, vocab]``. Cached path: ``resid`` is the suffix ``[batch, seq - cut, d]``, ``slots``
    are shifted by ``-cut``, ``kv`` holds the prefix keys/values (``prefix_kv``), and the logits are
    those of slots ``read..seq``. This is the function ``recover_batched`` differentiates (and may
    hand to ``torch.compile``).
    """
    site = (cfg.layer, cfg.point)
    win = window or TorchWindow()
    if win.cut > 0 and kv is None:
        raise ValueError("make_batched_logits: a window with cut > 0 needs the prefix keys/values (kv).")

    def logits_fn(resid: Tensor, delta: Tensor, slots: Tensor) -> Tensor:
        cache = _KV(kv) if win.cut > 0 else None
        return run_from(model, resid, cfg.layer, _hooks_with(clamps, site, delta, slots), start=win.cut,
                        read=win.read, kv=cache)

    return logits_fn


def recover_batched(
    model: Any,
    clamps: Any,
    examples: TorchExamples,
    cfg: TorchRecoveryConfig,
    *,
    compile: bool = False,
    resid: Tensor | None = None,
    cache: bool = False,
    window: TorchWindow | None = None,
) -> TorchRecovery:
    """All examples at once; the prefix below the delta site is computed once.

    Args:
        model, clamps, examples, cfg: as ``recover_per_example``.
        compile: wrap the suffix forward in ``torch.compile`` (inductor; needs a C++ compiler on CPU).
        resid: the residual entering block ``cfg.layer`` (``run_to``), if already computed.
        cache: sequence-axis caching and read-slot unembedding, the JAX engine's algorithm: the keys and
            values of the slots before the first delta slot are computed ONCE (``prefix_kv``, every
            block from the delta layer on), each step runs only slots ``cut..seq`` against them, and
            ``lm_head`` runs only on the slots the objective reads. Same objective as the full path
            (causal attention). ``window`` overrides the planned window (``plan_window``).
    """
    clamps, site, P = _prepare(clamps, cfg)
    if resid is None:
        resid = run_to(model, examples.tokens, cfg.layer, dict(clamps))
    b, rows = examples.delta_slots.shape
    d = resid.shape[-1]
    win = window if window is not None else (plan_window(examples, cfg.objective) if cache else TorchWindow())
    slots, x, kv = examples.delta_slots, resid, None
    if win.cut > 0:
        zero = torch.zeros(b, rows, d, device=resid.device)
        kv = prefix_kv(model, resid, cfg.layer, _hooks_with(clamps, site, zero, slots), win.cut)
        x = resid[:, win.cut :]
        slots = torch.where(slots >= 0, slots - win.cut, slots)
    target = window_target(cfg.objective, examples.target, win.read)
    logits_fn = make_batched_logits(model, clamps, cfg, win, kv)
    if compile:
        logits_fn = torch.compile(logits_fn, dynamic=False)
    delta = torch.zeros(b, rows, d, device=resid.device, requires_grad=True)
    opt = _adam(cfg, delta)
    history = []
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        per_example = -objective_values(cfg.objective, logits_fn(x, delta, slots), target)
        per_example.sum().backward()  # examples are independent: each gets its own gradient
        history.append(per_example.detach())
        _step_update(cfg, delta, opt, P)
    with torch.no_grad():
        final, ok = _evaluate(cfg, logits_fn(x, delta, slots), target)
        clamped, clamped_ok = _evaluate(cfg, logits_fn(x, torch.zeros_like(delta), slots), target)
    losses = torch.stack(history, dim=1) if history else torch.zeros(b, 0, device=delta.device)
    return TorchRecovery(delta.detach(), losses, final, clamped, ok, clamped_ok)
