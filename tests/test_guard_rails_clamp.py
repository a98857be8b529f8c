"""Guard rails (issue 11): a Clamp, a clamp mapping or a judge never turns a wrong input into a quiet number.

Each test names the "Measured now" case it pins down; every one failed before the fix.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import judges as judges
from jaxrecover.sae.clamp import AddDelta, Clamp, check_clamps, compose, validate_clamp
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_sae, tiny_config

D, D_SAE = 32, 48  # tiny_config("llama") has d_model 32, 2 layers
SLOTS = jnp.arange(4)


def _sae(hook_name: str = "", d_in: int = D) -> object:
    return random_sae(d_in, D_SAE, seed=3, hook_name=hook_name)


def _resid(width: int = D) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).normal(size=(4, width)).astype(np.float32))


# ---- Clamp construction: ids, lengths, values


@pytest.mark.parametrize("bad", [D_SAE, 99999, -1])
def test_clamp_refuses_feature_ids_outside_the_sae(bad):
    # before: 99999 and -1 silently acted on the last feature (JAX clamps out-of-range gathers)
    with pytest.raises(ValueError, match=rf"(?s)'blocks.0.hook_resid_post'.*{bad}.*d_sae={D_SAE}"):
        Clamp(_sae("blocks.0.hook_resid_post"), jnp.array([1, bad]), jnp.zeros(2))


def test_clamp_refuses_conflicting_duplicate_ids():
    with pytest.raises(ValueError, match="feature id 5 is listed more than once"):
        Clamp(_sae(), jnp.array([5, 2, 5]), jnp.array([0.0, 1.0, 3.0]))


def test_clamp_applies_an_equal_duplicate_once():
    # before: [5, 5] with a "set" clamp added the edit twice
    sae, h = _sae(), _resid()
    once = Clamp(sae, jnp.array([5]), jnp.array([2.0]))(h, SLOTS)
    for mode in ("set", "scale"):
        once = Clamp(sae, jnp.array([5]), jnp.array([2.0]), mode=mode)(h, SLOTS)
        twice = Clamp(sae, jnp.array([5, 5]), jnp.array([2.0, 2.0]), mode=mode)(h, SLOTS)
        np.testing.assert_allclose(twice, once, rtol=1e-6, atol=1e-6)
    # traced duplicates (built inside jit, no construction check) are honoured the same way
    traced = jax.jit(lambda f, v: Clamp(sae, f, v)(h, SLOTS))(jnp.array([5, 5]), jnp.array([2.0, 2.0]))
    np.testing.assert_allclose(traced, Clamp(sae, jnp.array([5]), jnp.array([2.0]))(h, SLOTS), rtol=1e-6, atol=1e-6)


def test_clamp_refuses_features_values_length_mismatch():
    # under the test suite's jaxtyping hook the annotation catches it first; without it (a user's
    # run) validate_clamp does, with the SAE named
    with pytest.raises((ValueError, TypeError)):
        Clamp(_sae(), jnp.array([1, 2, 3]), jnp.zeros(2))
    good = Clamp(_sae("blocks.0.hook_resid_pre"), jnp.array([1, 2, 3]), jnp.zeros(3))
    leaves, tree = jax.tree.flatten(good)
    bad = jax.tree.unflatten(tree, [jnp.zeros(2) if leaf.shape == (3,) and leaf.dtype == jnp.float32 else leaf
                                    for leaf in leaves])  # unflattening skips __init__
    with pytest.raises(ValueError, match=r"'blocks.0.hook_resid_pre'.*features has shape \(3,\) but values has shape \(2,\)"):
        validate_clamp(bad)


@pytest.mark.parametrize(("mode", "value"), [("set", jnp.nan), ("set", jnp.inf), ("scale", -jnp.inf),
                                             ("floor", jnp.inf), ("ceiling", -jnp.inf), ("floor", jnp.nan)])
def test_clamp_refuses_non_finite_values(mode, value):
    with pytest.raises(ValueError, match="non-finite value"):
        Clamp(_sae(), jnp.array([1, 2]), jnp.array([0.0, value]), mode=mode)


def test_clamp_keeps_unbounded_floor_and_ceiling_and_ignores_zero_mode_values():
    Clamp(_sae(), jnp.array([1]), jnp.array([-jnp.inf]), mode="floor")
    Clamp(_sae(), jnp.array([1]), jnp.array([jnp.inf]), mode="ceiling")
    Clamp(_sae(), jnp.array([1]), jnp.array([jnp.nan]), mode="zero")


def test_clamp_checks_every_row_of_a_stack_and_skips_tracers():
    sae = _sae()
    with pytest.raises(ValueError, match="outside"):
        Clamp(sae, jnp.array([[0, 1], [2, D_SAE]]), jnp.zeros((2, 2)))
    # in_axes prefixes and clamps built under vmap stay legal
    Clamp(None, 0, 0)
    out = jax.vmap(lambda f, v: Clamp(sae, f, v)(_resid(), SLOTS))(jnp.array([[0, 1], [2, 3]]), jnp.zeros((2, 2)))
    assert out.shape == (2, 4, D)


def test_clamp_call_refuses_a_residual_of_another_width():
    # before: failed deep inside dot_general with no SAE named
    clamp = Clamp(_sae("blocks.1.hook_resid_pre", d_in=24), jnp.array([1]), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"(?s)'blocks.1.hook_resid_pre'.*d_in=24.*32 wide"):
        clamp(_resid(D), SLOTS)


# ---- check_clamps: sites, widths, hook names


def test_check_clamps_accepts_an_sae_at_its_own_site():
    cfg = tiny_config("llama")
    site = Site(1, "resid_post")
    clamp = Clamp(_sae(str(site)), jnp.array([1, 2]), jnp.zeros(2))
    check_clamps(cfg, {site: clamp})
    check_clamps(cfg, {str(site): compose(clamp, AddDelta(jnp.zeros((1, D)), jnp.array([0])))})
    check_clamps(cfg, {Site(0): Clamp(_sae(""), jnp.array([1]), jnp.zeros(1))})  # no hook name: nothing to compare


def test_check_clamps_refuses_a_site_outside_the_model():
    # before: a hook at Site(99) on a 2-layer model was never run, silently
    clamp = Clamp(_sae(), jnp.array([1]), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"(?s)blocks.99.hook_resid_pre.*2 layers"):
        check_clamps(tiny_config("llama"), {Site(99): clamp})


def test_check_clamps_refuses_an_sae_of_another_width():
    clamp = Clamp(_sae("blocks.0.hook_resid_pre", d_in=24), jnp.array([1]), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"(?s)blocks.0.hook_resid_pre.*d_in=24.*d_model=32"):
        check_clamps(tiny_config("llama"), {Site(0): clamp})


@pytest.mark.parametrize("hook", ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
def test_check_clamps_refuses_an_sae_placed_at_another_site_unless_allowed(hook):
    # before: an mlp_out SAE at a residual site ran without a word
    site = Site(1, "resid_post")
    clamp = Clamp(_sae(hook), jnp.array([1]), jnp.zeros(1))
    with pytest.raises(ValueError, match=rf"(?s)blocks.1.hook_resid_post.*{hook}.*allow_site_mismatch"):
        check_clamps(tiny_config("llama"), {site: clamp})
    check_clamps(tiny_config("llama"), {site: clamp}, allow_site_mismatch=True)


def test_check_clamps_names_the_site_for_a_bad_stacked_clamp():
    site = Site(1, "resid_post")
    good = Clamp(_sae(str(site)), jnp.array([[1, 2], [3, 4]]), jnp.zeros((2, 2)))
    leaves, tree = jax.tree.flatten(good)
    bad = jax.tree.unflatten(tree, [jnp.array([[1, 2], [3, 99]]) if leaf.dtype == jnp.int32 else leaf
                                    for leaf in leaves])  # e.g. ids edited after construction
    with pytest.raises(ValueError, match=r"At site blocks.1.hook_resid_post: Clamp on SAE 'blocks.1.hook_resid_post'.*99"):
        check_clamps(tiny_config("llama"), {site: bad})


def test_check_clamps_takes_a_model():
    from jaxrecover.testing import random_transformer

    model = random_transformer(jax.random.key(0), tiny_config("llama"))
    with pytest.raises(ValueError, match="2 layers"):
        check_clamps(model, {Site(2): Clamp(_sae(), jnp.array([1]), jnp.zeros(1))})


# ---- judges: empty / non-text completions


NONTEXT = ["", "   \n\t ", "...!!??", "\ufffd\ufffd\ufffd", "\x00\x01\x7f\x1b", "-- ** --", "\u200b\u200b"]


@pytest.mark.parametrize("text", NONTEXT)
def test_empty_or_nontext_is_never_non_refusal(text):
    # before: empty or garbage text counted as "non-refusal"
    assert judges.is_empty_or_nontext(text)
    q = judges.assess_recovery_quality(text, "Sure, here is a detailed answer about baking bread at home.")
    assert q.nontext and not q.non_refusal and not q.base_like and not q.strict_base_like
    assert judges.is_effective_refusal(text)  # the clamp side: a suppressed answer
    assert not judges.strict_valid(text, "I'm sorry, I cannot help with that.")  # no usable base answer


@pytest.mark.parametrize("text", ["Sure! Step 1: mix flour.", "42", "Ja, natürlich.", "好的"])
def test_real_text_is_judged_as_before(text):
    assert not judges.is_empty_or_nontext(text)
    q = judges.assess_recovery_quality(text, text)
    assert q.non_refusal == (not q.refusal) and not q.nontext
    assert judges.assess_recovery_quality("I'm sorry, I can't.", text).non_refusal is False
