"""Recovery objectives (higher is better; the recovery loss is ``-objective``) and success predicates.

ONE signature for every objective::

    objective(out: Readout, target) -> Float[Array, ""]
    success(out: Readout, target)   -> Bool[Array, ""]

- ``Readout`` holds what the defended-plus-delta pass produced at the readout site, for the
  ``n_var`` token variants of one example that share one ``delta``: ``logits [n_var, seq, vocab]``
  (readout ``"logits"``) and/or ``resid [n_var, seq, d_model]`` (readout ``"resid"``; post-hook value).
- ``target`` is a task pytree (below). Index conventions: ``ids[v, t]`` is the token that the logits
  at slot ``t`` should predict (i.e. the *next* token; callers shift once), slots are raw indices into
  the padded sequence. Variants scored jointly (MCQ answers, shared-delta batches) must keep the
  prompt at the same slots (right-pad the continuations).
- Everything is written for one example; ``recovery`` vmaps over examples.

Objectives (paper / authors' code, see paper-notes 1.11):

==============================  =====================================================================
``continuation_logprob``        weighted mean teacher-forced log p of the base model's continuation
``kl_to_base``                  ``-mean KL(p_base || p)`` over masked positions
``logit_diff``                  ``logit[io] - logit[s]`` at a readout slot (IOI), mean over variants
``choice_margin`` / ``choice_ce`` letter-token margin ``logit[c] - mean(others)`` / log-softmax (WMDP)
``answer_logprob``              log-softmax over variants of each answer's summed log p (MCQ)
``probe_logit``                 ``w . mean_pool(resid) + b`` over masked positions (TPP)
``anti_refusal_margin``         mean log p of first m base tokens - max log p of discouraged firsts
``refusal_stage1`` / ``_stage2`` the code's weighted combinations (4/2/0.2/0.1 and 5/0.1)
==============================  =====================================================================

``Task(objective, success, readout)`` bundles a pair; module constants name the standard ones.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from jaxrecover.core.pytree import pytree_dataclass

_NEG = -1e30  # finite "minus infinity" for masked maxima (keeps gradients NaN-free)


@pytree_dataclass
class Readout:
    """The defended-plus-delta pass at the readout site, for ``n_var`` variants of one example."""

    logits: Any = None  # [n_var, seq, vocab] float32
    resid: Any = None  # [n_var, seq, d_model]


# ----------------------------------------------------------------------------- targets


@pytree_dataclass
class Continuation:
    """Teacher-forced continuation (the base model's own greedy answer).

    ``ids [n_var, seq]``: next-token targets per slot (anything where ``weights == 0``);
    ``weights [n_var, seq]``: per-slot weights (0 = not scored);
    ``answer_start []``: the slot of variant 0 whose logits predict the first continuation token;
    ``discouraged [n_disc]``: first tokens of refusal / safety-cue prefixes (-1 = padding).
    """

    ids: Any
    weights: Any
    answer_start: Any = None
    discouraged: Any = None


@pytree_dataclass
class KLTarget:
    """``base_logprobs [n_var, seq, vocab]`` of the unclamped model, ``mask [n_var, seq]`` float,
    ``tol []``: success when the masked mean KL is at most ``tol``."""

    base_logprobs: Any
    mask: Any
    tol: Any = None


@pytree_dataclass
class LogitDiffTarget:
    """IOI: ``slot [n_var]`` readout slot, ``io [n_var]`` and ``s [n_var]`` token ids."""

    slot: Any
    io: Any
    s: Any


@pytree_dataclass
class ChoiceTarget:
    """Letter-choice MCQ read at ``slot []`` of variant 0: ``choice_ids [n_choice]``, ``correct []``."""

    slot: Any
    choice_ids: Any
    correct: Any


@pytree_dataclass
class AnswerTarget:
    """MCQ over variants: variant ``v`` is prompt + answer ``v``; ``ids [n_var, seq]`` next tokens,
    ``mask [n_var, seq]`` float marks the answer tokens; ``correct []`` the right variant."""

    ids: Any
    mask: Any
    correct: Any


@pytree_dataclass
class ProbeTarget:
    """Linear probe on the readout residual of variant 0: ``w [d]``, ``b []``, ``mask [seq]`` float
    (positions pooled, e.g. non-BOS/PAD/EOS)."""

    w: Any
    b: Any
    mask: Any


# ----------------------------------------------------------------------------- helpers


def token_logprobs(logits: Float[Array, "n seq vocab"], ids: Array) -> Float[Array, "n seq"]:
    """``log p(ids[v, t] | logits[v, t])`` (ids < 0 read token 0; mask them out)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.clip(ids, 0, logits.shape[-1] - 1)
    return jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]


def _wmean(x: Array, w: Array) -> Array:
    w = w.astype(x.dtype)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)


def _masked_max(x: Array, mask: Array) -> Array:
    m = jnp.max(jnp.where(mask, x, _NEG))
    return jnp.where(jnp.any(mask), m, jnp.zeros_like(m))


# ----------------------------------------------------------------------------- continuation / refusal


def continuation_logprob(out: Readout, target: Continuation) -> Float[Array, ""]:
    """Weighted mean teacher-forced log-probability of the target continuation."""
    return _wmean(token_logprobs(out.logits, target.ids), target.weights)


def continuation_success(out: Readout, target: Continuation) -> Bool[Array, ""]:
    """Greedy decoding reproduces every scored target token (argmax == ids where weight > 0)."""
    hit = jnp.argmax(out.logits, axis=-1) == target.ids
    return jnp.all(hit | (target.weights <= 0))


def _first_m(target: Continuation, m: int) -> tuple[Array, Array]:
    """Slots ``answer_start + [0, m)`` of variant 0 and whether each one is scored."""
    seq = target.ids.shape[-1]
    slots = target.answer_start + jnp.arange(m, dtype=jnp.int32)
    inside = slots < seq
    safe = jnp.clip(slots, 0, seq - 1)
    return safe, inside & (target.weights[0, safe] > 0)


def anti_refusal_margin(out: Readout, target: Continuation, m: int = 8) -> Float[Array, ""]:
    """Mean log p of the first ``m`` base tokens minus the max log p of the discouraged first tokens
    (refusal / safety-cue prefixes) at the first answer slot."""
    lp = token_logprobs(out.logits, target.ids)[0]
    slots, ok = _first_m(target, m)
    base = _wmean(lp[slots], ok)
    logp0 = jax.nn.log_softmax(out.logits[0, target.answer_start].astype(jnp.float32))
    disc = target.discouraged
    worst = _masked_max(logp0[jnp.clip(disc, 0, logp0.shape[0] - 1)], disc >= 0)
    return base - worst


def refusal_stage1(out: Readout, target: Continuation) -> Float[Array, ""]:
    """Code's stage-1 ("boundary") objective: ``4.0 log p(first) + 2.0 mean log p(first 8)
    + 0.2 anti_refusal_margin + 0.1 (logit(first) - max discouraged first logit)``."""
    lp = token_logprobs(out.logits, target.ids)[0]
    slots, ok = _first_m(target, 8)
    first = lp[target.answer_start]
    logits0 = out.logits[0, target.answer_start].astype(jnp.float32)
    disc = target.discouraged
    first_logit = logits0[jnp.clip(target.ids[0, target.answer_start], 0, logits0.shape[0] - 1)]
    logit_margin = first_logit - _masked_max(logits0[jnp.clip(disc, 0, logits0.shape[0] - 1)], disc >= 0)
    return 4.0 * first + 2.0 * _wmean(lp[slots], ok) + 0.2 * anti_refusal_margin(out, target) + 0.1 * logit_margin


def refusal_stage2(out: Readout, target: Continuation) -> Float[Array, ""]:
    """Code's stage-2 objective: ``5.0 * weighted mean log p + 0.1 * anti_refusal_margin``."""
    return 5.0 * continuation_logprob(out, target) + 0.1 * anti_refusal_margin(out, target)


def first_token_success(out: Readout, target: Continuation) -> Bool[Array, ""]:
    """The greedy first answer token is the base model's first token."""
    return jnp.argmax(out.logits[0, target.answer_start]) == target.ids[0, target.answer_start]


# ----------------------------------------------------------------------------- KL


def kl_to_base(out: Readout, target: KLTarget) -> Float[Array, ""]:
    """``-mean_t KL(p_base,t || p_t)`` over masked positions (0 is perfect recovery)."""
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(target.base_logprobs) * (target.base_logprobs - logp), axis=-1)
    return -_wmean(kl, target.mask)


def kl_success(out: Readout, target: KLTarget) -> Bool[Array, ""]:
    return -kl_to_base(out, target) <= target.tol


# ----------------------------------------------------------------------------- IOI


def _logit_diffs(out: Readout, target: LogitDiffTarget) -> Array:
    n = out.logits.shape[0]
    at = out.logits[jnp.arange(n), target.slot]  # [n_var, vocab]
    return at[jnp.arange(n), target.io] - at[jnp.arange(n), target.s]


def logit_diff(out: Readout, target: LogitDiffTarget) -> Float[Array, ""]:
    """IOI: mean over variants of ``logit[io] - logit[s]`` at the readout slot."""
    return jnp.mean(_logit_diffs(out, target))


def logit_diff_success(out: Readout, target: LogitDiffTarget) -> Bool[Array, ""]:
    """Every variant has ``logit[io] > logit[s]``."""
    return jnp.all(_logit_diffs(out, target) > 0)


# ----------------------------------------------------------------------------- letter choices (WMDP)


def _choice_logits(out: Readout, target: ChoiceTarget) -> Array:
    return out.logits[0, target.slot][target.choice_ids].astype(jnp.float32)


def choice_margin(out: Readout, target: ChoiceTarget) -> Float[Array, ""]:
    """``logit[correct] - mean(logits of the other choices)`` (code's ``choice_margin``)."""
    c = _choice_logits(out, target)
    n = c.shape[0]
    correct = c[target.correct]
    return correct - (jnp.sum(c) - correct) / (n - 1)


def choice_ce(out: Readout, target: ChoiceTarget) -> Float[Array, ""]:
    """Log-softmax of the correct letter over the choice letters (= minus the code's ``choice_ce``)."""
    return jax.nn.log_softmax(_choice_logits(out, target))[target.correct]


def choice_success(out: Readout, target: ChoiceTarget) -> Bool[Array, ""]:
    return jnp.argmax(_choice_logits(out, target)) == target.correct


# ----------------------------------------------------------------------------- MCQ over continuations


def answer_scores(out: Readout, target: AnswerTarget) -> Float[Array, " n_var"]:
    """Summed log-probability of each variant's answer tokens."""
    lp = token_logprobs(out.logits, target.ids)
    return jnp.sum(lp * target.mask.astype(lp.dtype), axis=-1)


def answer_logprob(out: Readout, target: AnswerTarget) -> Float[Array, ""]:
    return jax.nn.log_softmax(answer_scores(out, target))[target.correct]


def answer_success(out: Readout, target: AnswerTarget) -> Bool[Array, ""]:
    return jnp.argmax(answer_scores(out, target)) == target.correct


# ----------------------------------------------------------------------------- probe (TPP)


def probe_logit(out: Readout, target: ProbeTarget) -> Float[Array, ""]:
    """``w . mean_pool(resid) + b`` over masked positions of variant 0 (readout ``"resid"``)."""
    h = out.resid[0].astype(jnp.float32)
    m = target.mask.astype(h.dtype)
    pooled = jnp.sum(h * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1e-8)
    return pooled @ target.w.astype(h.dtype) + target.b


def probe_success(out: Readout, target: ProbeTarget) -> Bool[Array, ""]:
    return probe_logit(out, target) > 0


# ----------------------------------------------------------------------------- bundles


class Task(NamedTuple):
    """An objective, its success predicate and the readout it needs (``"logits"`` | ``"resid"``)."""

    objective: Callable[[Readout, Any], Array]
    success: Callable[[Readout, Any], Array]
    readout: str = "logits"


LOGPROB = Task(continuation_logprob, continuation_success)
KL = Task(kl_to_base, kl_success)
LOGIT_DIFF = Task(logit_diff, logit_diff_success)
CHOICE_MARGIN = Task(choice_margin, choice_success)
CHOICE_CE = Task(choice_ce, choice_success)
ANSWER = Task(answer_logprob, answer_success)
PROBE = Task(probe_logit, probe_success, "resid")
REFUSAL_STAGE1 = Task(refusal_stage1, first_token_success)
REFUSAL_STAGE2 = Task(refusal_stage2, continuation_success)


# ----------------------------------------------------------------------------- read windows
#
# The solver unembeds only the slots an objective reads. ``first_read_slot`` (host, concrete arrays,
# any leading batch axes) says where reading starts; ``window_target`` (traceable) re-indexes a
# target for logits that start at that slot. Unknown target types read from slot 0 (full logits).


def _first_positive(x: Any) -> int:
    """First slot (last axis) where any entry over the leading axes is > 0 (the length if none)."""
    hit = np.any(np.asarray(x) > 0, axis=tuple(range(np.ndim(x) - 1)))
    return int(np.argmax(hit)) if hit.any() else int(np.shape(x)[-1])


def first_read_slot(target: Any) -> int:
    """The first slot whose logits ``target``'s objectives read (0 when unknown)."""
    if isinstance(target, Continuation):
        first = _first_positive(target.weights)
        if target.answer_start is not None:
            first = min(first, int(np.min(np.asarray(target.answer_start))))
        return first
    if isinstance(target, (KLTarget, AnswerTarget)):
        return _first_positive(target.mask)
    if isinstance(target, (LogitDiffTarget, ChoiceTarget)):
        return int(np.min(np.asarray(target.slot)))
    return 0


def window_target(target: Any, start: int) -> Any:
    """``target`` re-indexed for logits of slots ``start..seq`` (``start`` static; 0 is a no-op)."""
    if start == 0:
        return target
    if isinstance(target, Continuation):
        a = None if target.answer_start is None else target.answer_start - start
        return Continuation(target.ids[..., start:], target.weights[..., start:], a, target.discouraged)
    if isinstance(target, KLTarget):
        return KLTarget(target.base_logprobs[..., start:, :], target.mask[..., start:], target.tol)
    if isinstance(target, AnswerTarget):
        return AnswerTarget(target.ids[..., start:], target.mask[..., start:], target.correct)
    if isinstance(target, LogitDiffTarget):
        return LogitDiffTarget(target.slot - start, target.io, target.s)
    if isinstance(target, ChoiceTarget):
        return ChoiceTarget(target.slot - start, target.choice_ids, target.correct)
    raise ValueError(f"window_target: no read window for {type(target).__name__} (first_read_slot gives 0 for it).")
