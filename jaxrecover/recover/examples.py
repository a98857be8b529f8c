"""Building solver ``Example`` s from text, so a user never does slot arithmetic by hand."""

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrecover.model.tokenizer import apply_chat_template, encode_batch
from jaxrecover.recover.objectives import Continuation
from jaxrecover.recover.solver import Example


def teacher_forced(tok: Any, prompts: str | Sequence[str], answers: str | Sequence[str], *, chat: bool = True,
                   pad_to: int = 8) -> Example:
    """Stacked examples (leading axis = prompts) that score ``answers`` teacher-forced after ``prompts``.

    Each prompt is wrapped in the tokenizer's chat template when ``chat`` (the instruct models' view),
    then ``prompt + answer`` is tokenized left-padded to a multiple of ``pad_to``. ``delta`` acts on
    the last prompt token and every answer token but the last (the slots whose logits predict the
    answer; rows of shorter answers are padded with -1, "unused"); the target is a ``Continuation``
    weighting exactly those slots, so ``objectives.continuation_logprob`` is the answer's log-prob.
    Drift is measured on every real token.

    >>> ex = teacher_forced(tok, "Give me three tips.", "1. Research the company.")  # doctest: +SKIP
    >>> ex.tokens.shape, ex.delta_slots.shape  # doctest: +SKIP
    ((1, 1, 24), (1, 8))
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"teacher_forced: {len(prompts)} prompts and {len(answers)} answers; give one answer per prompt (at least one).")
    if chat:
        prompts = [apply_chat_template(tok, p) for p in prompts]
    tokens, valid = encode_batch(tok, [p + a for p, a in zip(prompts, answers, strict=True)], pad_to=pad_to)
    n_prompt = encode_batch(tok, prompts)[1].sum(axis=1)
    n_answer = valid.sum(axis=1) - n_prompt
    if (n_answer < 1).any():
        bad = int(np.argmin(n_answer))
        raise ValueError(f"teacher_forced: answer {bad} ({answers[bad]!r}) adds no token after its prompt.")
    seq = tokens.shape[1]
    first = seq - n_answer - 1  # the slot whose logits predict the first answer token (left padding)
    rows = int(n_answer.max())
    slots = np.full((len(prompts), rows), -1, np.int32)
    weights = np.zeros(tokens.shape, np.float32)
    for i, (f, n) in enumerate(zip(first, n_answer, strict=True)):  # host-side bookkeeping, once per prompt
        slots[i, :n] = np.arange(f, f + n)
        weights[i, f:seq - 1] = 1.0
    target = Continuation(ids=np.roll(tokens, -1, axis=1)[:, None], weights=weights[:, None],
                          answer_start=first.astype(np.int32), discouraged=np.full((len(prompts), 1), -1, np.int32))
    return Example(tokens=tokens[:, None], valid=valid[:, None], delta_slots=slots, measure_mask=valid.copy(), target=target)
