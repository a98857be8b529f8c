"""``teacher_forced`` builds continuation examples from text (slots, weights and targets by construction),
and the public records check their field types and shapes (jaxtyping annotations, beartype hook)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.recover.examples import teacher_forced
from jaxrecover.testing import word_level_tokenizer

TEXTS = ["tell me a joke", "why did the chicken cross the road", "to get to the other side", "ok"]


@pytest.fixture(scope="module")
def tok():
    return word_level_tokenizer(TEXTS)


def test_teacher_forced_scores_exactly_the_answer_tokens(tok):
    prompts, answers = ["tell me a joke", "ok"], [" why did the chicken", " to get to the other side"]
    ex = teacher_forced(tok, prompts, answers, chat=False, pad_to=4)
    n, _, seq = ex.tokens.shape
    assert n == 2 and seq % 4 == 0
    n_answer = [4, 6]
    for i in range(n):
        rows = ex.delta_slots[i][ex.delta_slots[i] >= 0]
        first = seq - n_answer[i] - 1
        assert rows.tolist() == list(range(first, seq - 1))  # last prompt token + all answer tokens but the last
        w = ex.target.weights[i, 0]
        assert np.flatnonzero(w).tolist() == rows.tolist()
        # the target at each scored slot is the next real token: the answer, in order
        assert ex.target.ids[i, 0, rows].tolist() == ex.tokens[i, 0, first + 1:].tolist()
        assert int(ex.target.answer_start[i]) == first
    assert ex.delta_slots.shape == (2, max(n_answer))  # the shorter answer's rows padded with -1
    assert (ex.delta_slots[0, n_answer[0]:] == -1).all()


def test_teacher_forced_refuses_mismatched_or_empty_answers(tok):
    with pytest.raises(ValueError, match="2 prompts and 1 answers"):
        teacher_forced(tok, ["ok", "ok"], ["joke"], chat=False)
    with pytest.raises(ValueError, match="adds no token"):
        teacher_forced(tok, ["ok"], [""], chat=False)


def test_example_fields_are_type_checked():
    ok = dict(tokens=jnp.zeros((1, 5), jnp.int32), valid=jnp.ones((1, 5), bool), delta_slots=jnp.arange(2),
              measure_mask=jnp.ones((5,), bool), target=O.Continuation(ids=jnp.zeros((1, 5), jnp.int32), weights=jnp.ones((1, 5))))
    R.Example(**ok)
    with pytest.raises(Exception, match="tokens"):  # float token ids
        R.Example(**{**ok, "tokens": jnp.zeros((1, 5), jnp.float32)})
    with pytest.raises(Exception, match="measure_mask"):  # seq differs from the tokens'
        R.Example(**{**ok, "measure_mask": jnp.ones((6,), bool)})
