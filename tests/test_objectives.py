"""Objectives on hand-built readouts: values against direct formulas, success predicates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import objectives as O

V, S = 7, 4


def readout(seed=0, n=2):
    return O.Readout(logits=jax.random.normal(jax.random.key(seed), (n, S, V)))


def lsm(x):
    return np.asarray(jax.nn.log_softmax(x, axis=-1))


def close(want, scale):
    """``pytest.approx`` for an fp32 objective built by summing / differencing terms of size ``scale``:
    a relative tolerance alone fails when the result is much smaller than its terms (a margin near 0),
    so the absolute part scales with the terms."""
    return pytest.approx(want, rel=1e-5, abs=1e-6 * max(1.0, float(scale)))


def test_continuation_and_refusal_objectives():
    out = readout()
    ids = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)
    w = jnp.zeros((2, S)).at[0, 1:].set(1.0)
    t = O.Continuation(ids=ids, weights=w, answer_start=jnp.array(1, jnp.int32),
                       discouraged=jnp.array([2, 5, -1], jnp.int32))
    lp = lsm(out.logits)
    scale = np.abs(lp).max()  # every objective here sums and differences log-probs of this size
    want = np.mean([lp[0, i, int(ids[0, i])] for i in (1, 2, 3)])
    assert float(O.continuation_logprob(out, t)) == close(want, scale)
    assert bool(O.continuation_success(out, t))
    margin = want - max(lp[0, 1, 2], lp[0, 1, 5])
    assert float(O.anti_refusal_margin(out, t)) == close(margin, scale)
    assert float(O.refusal_stage2(out, t)) == close(5.0 * want + 0.1 * margin, scale)
    lg = np.asarray(out.logits)
    first = int(ids[0, 1])
    s1 = 4.0 * lp[0, 1, first] + 2.0 * want + 0.2 * margin + 0.1 * (lg[0, 1, first] - max(lg[0, 1, 2], lg[0, 1, 5]))
    assert float(O.refusal_stage1(out, t)) == close(s1, scale)
    assert bool(O.first_token_success(out, t))
    bad = O.Continuation(ids=(ids + 1) % V, weights=w, answer_start=t.answer_start, discouraged=t.discouraged)
    assert not bool(O.continuation_success(out, bad))
    g = jax.grad(lambda lg: O.refusal_stage1(O.Readout(logits=lg), t))(out.logits)  # differentiable, finite
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


def test_kl_logit_diff_choices_answers_probe():
    out = readout()
    base = jax.nn.log_softmax(out.logits, axis=-1)
    kl_t = O.KLTarget(base_logprobs=base, mask=jnp.ones((2, S)), tol=jnp.array(1e-6))
    scale = float(jnp.abs(base).max())  # log-probs: the size of the terms every objective below sums
    assert abs(float(O.kl_to_base(out, kl_t))) < 1e-6 * max(1.0, scale) and bool(O.kl_success(out, kl_t))
    lg = np.asarray(out.logits)
    ld = O.LogitDiffTarget(slot=jnp.array([3, 2]), io=jnp.array([1, 4]), s=jnp.array([0, 6]))
    want = np.mean([lg[0, 3, 1] - lg[0, 3, 0], lg[1, 2, 4] - lg[1, 2, 6]])
    assert float(O.logit_diff(out, ld)) == close(want, scale)
    ch = O.ChoiceTarget(slot=jnp.array(3), choice_ids=jnp.array([1, 2, 3, 4]), correct=jnp.array(2))
    c = lg[0, 3, [1, 2, 3, 4]]
    assert float(O.choice_margin(out, ch)) == close(c[2] - np.mean(np.delete(c, 2)), scale)
    assert float(O.choice_ce(out, ch)) == close(lsm(jnp.asarray(c))[2], scale)
    assert bool(O.choice_success(out, ch)) == (int(np.argmax(c)) == 2)
    ans = O.AnswerTarget(ids=jnp.zeros((2, S), jnp.int32), mask=jnp.ones((2, S)), correct=jnp.array(1))
    sc = lsm(out.logits)[:, :, 0].sum(-1)
    assert float(O.answer_logprob(out, ans)) == close(lsm(jnp.asarray(sc))[1], S * scale)  # sums of S log-probs
    assert bool(O.answer_success(out, ans)) == (int(np.argmax(sc)) == 1)
    resid = jax.random.normal(jax.random.key(1), (1, S, 3))
    pr = O.ProbeTarget(w=jnp.array([1.0, -1.0, 0.5]), b=jnp.array(0.2), mask=jnp.array([0.0, 1.0, 1.0, 0.0]))
    r = np.asarray(resid[0])
    want = (r[1] + r[2]) / 2 @ np.array([1.0, -1.0, 0.5]) + 0.2
    assert float(O.probe_logit(O.Readout(resid=resid), pr)) == close(want, np.abs(r).max())
    assert O.PROBE.readout == "resid"
