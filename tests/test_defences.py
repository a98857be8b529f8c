"""Defences (jaxrecover.recover.defences) on a tiny random Llama and random SAEs.

Formulas against direct computations: the error-free splice is D(clamp(E(h))); a span ablation leaves
nothing in the span, and the game's attacker perturbation after it is orthogonal to the span; a
multi-layer clamp is the composition of the single-layer clamps in layer order. The game's round
loop runs on the tiny model; the guard refuses defences that cannot apply.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.core.sites import Site
from jaxrecover.model.generate import generate, generate_uncached
from jaxrecover.model.transformer import embed, forward, run_blocks, run_to, unembed
from jaxrecover.recover import batch as runner
from jaxrecover.recover import defences as DF
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.sae.autoencoder import SAE, reconstruct
from jaxrecover.sae.clamp import AddDelta, Clamp, compose
from jaxrecover.testing import random_transformer, tiny_config

SEQ, D, D_SAE, N = 6, 16, 32, 4
SITE = Site(1, "resid_pre")
FEATS = jnp.array([0, 1, 2], jnp.int32)


def _sae(seed: int, activation: str = "relu", apply_b_dec: bool = True) -> SAE:
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
    return SAE(W_enc=f(D, D_SAE) * D**-0.5, b_enc=f(D_SAE) * 0.1, W_dec=f(D_SAE, D) * D_SAE**-0.5, b_dec=f(D) * 0.1,
               threshold=jnp.abs(f(D_SAE)) * 0.1 if activation == "jumprelu" else None, activation=activation,
               k=6 if activation == "topk" else 0, apply_b_dec_to_input=apply_b_dec)


@pytest.fixture(scope="module")
def setup():
    """(model, clamp at SITE that flips every example's last-slot argmax, examples [N], tokens)."""
    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    k = jax.random.split(jax.random.key(1), 6)
    toks = jax.random.randint(k[0], (N, SEQ), 0, cfg.d_vocab).at[:, -2:].set(7)

    @jax.jit
    def probe(model, toks):  # one compile: the site residuals, the targets, the target's gradient
        h = jax.vmap(lambda t: run_to(model, t, SITE.layer))(toks)
        targets = jnp.argmax(jax.vmap(lambda x: forward_from(model, x))(h)[:, -1], -1).astype(jnp.int32)
        g = jax.grad(lambda x: jax.nn.log_softmax(forward_from(model, x)[-1])[targets[0]])(h[0])[-1]
        return h, targets, g

    h, targets, g = probe(model, toks)
    e = jax.random.normal(k[1], (D,))
    e = e / jnp.linalg.norm(e)
    W_enc = (jax.random.normal(k[2], (D, D_SAE)) / D**0.5).at[:, 0].set(e)
    b_enc = (0.1 * jax.random.normal(k[3], (D_SAE,))).at[0].set(5.0 - h[0, -1] @ e).at[1:3].set(-3.0)
    W_dec = (jax.random.normal(k[4], (D_SAE, D)) / D**0.5).at[0].set(g / jnp.linalg.norm(g))
    sae = SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=jnp.zeros(D), hook_name=str(SITE))
    clamp = Clamp(sae, FEATS, jnp.zeros(3))
    ids = jnp.zeros((N, 1, SEQ), jnp.int32).at[:, 0, -1].set(targets)
    w = jnp.zeros((N, 1, SEQ), jnp.float32).at[:, 0, -1].set(1.0)
    ex = R.Example(tokens=toks[:, None, :], valid=jnp.ones((N, 1, SEQ), bool),
                   delta_slots=jnp.full((N, 2), SEQ - 1, jnp.int32).at[:, 1].set(-1),
                   measure_mask=jnp.ones((N, SEQ), bool), target=O.Continuation(ids=ids, weights=w))
    return model, clamp, ex, toks


def forward_from(model, x):
    x, _ = run_blocks(model, x, SITE.layer, model.cfg.n_layers)
    return unembed(model, x)


def _near_identity_sae(seed: int, hook_name: str = "") -> SAE:
    """W_enc = [I, -I] (+ noise), W_dec its transpose: D(E(h)) ~ h, so an error-free splice below a
    clamp changes the model a little (a small SAE error), not beyond recognition."""
    rng = np.random.default_rng(seed)
    W = np.concatenate([np.eye(D), -np.eye(D)], 1) + 0.05 * rng.normal(size=(D, 2 * D))
    W = jnp.asarray(W.astype(np.float32))
    return SAE(W_enc=W, b_enc=jnp.zeros(2 * D), W_dec=W.T, b_dec=jnp.zeros(D), hook_name=hook_name)


BELOW = Site(0, "resid_post")


def _solver(constraint, basis=None, clamp_sites=(SITE,), steps=12, budget=6.0):
    cfg = R.RecoveryConfig(steps=steps, lr=0.15, budget=budget, constraint=constraint,
                           optimizer=DF.attacker_optimizer("adam", 0.15, basis))
    return R.make_solver(R.RecoveryProblem(SITE, clamp_sites), cfg, O.continuation_logprob, O.continuation_success)


# ----------------------------------------------------------------------------- error-free splice


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_error_free_splice_is_decode_of_clamped_encode(activation):
    sae = _sae(3, activation)
    h = jnp.asarray(np.random.default_rng(4).normal(size=(SEQ, D)).astype(np.float32))
    feats, vals = jnp.array([3, 9, 20]), jnp.array([2.0, 0.0, 1.5], jnp.float32)
    out = DF.ErrorFreeSplice(sae, feats, vals, mode="floor")(h, jnp.arange(SEQ))
    # direct: numpy encoder, the floor on S, numpy decoder
    W_enc, b_enc, W_dec, b_dec = (np.asarray(a, np.float64) for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (np.asarray(h, np.float64) - b_dec) @ W_enc + b_enc
    z = np.maximum(pre, 0.0)
    if activation == "jumprelu":
        z = z * (pre > np.asarray(sae.threshold, np.float64))
    if activation == "topk":
        z = z * (pre >= np.sort(pre, axis=-1)[:, -sae.k][:, None])
    z[:, [3, 9, 20]] = np.maximum(z[:, [3, 9, 20]], [2.0, 0.0, 1.5])
    np.testing.assert_allclose(np.asarray(out), z @ W_dec + b_dec, atol=1e-5)
    # = the clamp (error kept) minus the SAE error: the error term is what the splice drops
    clamp = Clamp(sae, feats, vals, mode="floor")
    np.testing.assert_allclose(out, clamp(h, jnp.arange(SEQ)) - (h - reconstruct(sae, h)), atol=1e-5)


def test_error_free_splice_slot_mask_and_refusals():
    sae, h = _sae(5), jnp.asarray(np.random.default_rng(6).normal(size=(SEQ, D)).astype(np.float32))
    mask = jnp.ones(SEQ, bool).at[0].set(False)
    out = DF.error_free(Clamp(sae, jnp.array([1]), jnp.array([0.0]), slot_mask=mask))(h, jnp.arange(SEQ))
    np.testing.assert_array_equal(out[0], h[0])  # the masked slot is left alone
    assert float(jnp.abs(out[1:] - h[1:]).max()) > 1e-3
    with pytest.raises(ValueError, match="outside"):
        DF.ErrorFreeSplice(sae, jnp.array([D_SAE]), jnp.array([0.0]))
    # the mode check is the clamp module's one validate_clamp: the same message as for a Clamp
    for make in (Clamp, DF.ErrorFreeSplice):
        with pytest.raises(ValueError, match="Unknown clamp mode 'bogus'"):
            make(sae, jnp.array([1]), jnp.array([0.0]), mode="bogus")


# ----------------------------------------------------------------------------- span ablation


def test_span_basis_orthonormal_spanning_and_extension():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(3, D))
    rows = rng.normal(size=(5, 2, 3)) @ mix  # [5, 2, d] rows of rank 3
    rows[1, 1] = 0.0  # an unused delta row
    Q = DF.span_basis(rows)
    assert Q.shape == (D, 3)
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-10)
    flat = rows.reshape(-1, D)
    np.testing.assert_allclose(flat - flat @ Q @ Q.T, 0.0, atol=1e-9)
    more = rng.normal(size=(2, D))
    Q2 = DF.span_basis(np.concatenate([flat[:3], more]), prev=Q)
    np.testing.assert_allclose(Q2[:, :3], Q)  # earlier directions kept first
    assert Q2.shape == (D, 5)
    np.testing.assert_allclose(Q2.T @ Q2, np.eye(5), atol=1e-10)
    assert DF.span_basis(flat[:4], prev=Q).shape == (D, 3)  # nothing new
    assert DF.span_basis(more, prev=Q, max_new=1).shape == (D, 4)
    with pytest.raises(ValueError, match="span is empty"):
        DF.span_basis(np.zeros((3, 2, D)))
    with pytest.raises(ValueError, match="span is empty"):
        DF.SpanAblation(jnp.zeros((D, 0)))


def test_ablation_leaves_no_component_in_span_and_equals_ablating_after_delta(setup):
    _, clamp, _, _ = setup
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(SEQ, D)).astype(np.float32))
    Q = jnp.asarray(DF.span_basis(rng.normal(size=(2, D))), jnp.float32)
    hook, slots = DF.with_ablation(clamp, Q), jnp.arange(SEQ)
    assert hook.sae is clamp.sae and hook.features is clamp.features  # what the solver measures
    out = hook(h, slots)
    assert float(jnp.abs(out @ Q).max()) < 1e-5
    np.testing.assert_allclose(out, clamp(h, slots) - (clamp(h, slots) @ Q) @ Q.T, atol=1e-5)
    np.testing.assert_allclose(DF.SpanAblation(Q)(out, slots), out, atol=1e-6)  # idempotent
    # an attacker confined to span(Q)^perp sees exactly an ablation applied AFTER its delta
    d = DF.ablate(Q, jnp.asarray(rng.normal(size=(1, D)).astype(np.float32)))
    add = AddDelta(d, jnp.array([SEQ - 1]))
    after = compose(clamp, add, DF.SpanAblation(Q))(h, slots)
    np.testing.assert_allclose(compose(hook, add)(h, slots), after, atol=1e-5)


def test_attacker_optimizer_is_named_stably_and_confine_keeps_the_norm():
    rng = np.random.default_rng(3)
    Q = DF.span_basis(rng.normal(size=(2, D)))
    a, b = DF.attacker_optimizer("adam", 0.1, Q), DF.attacker_optimizer("adam", 0.1, Q.copy())
    assert repr(a) == repr(b) and "0x" not in repr(a)  # a run key from repr(cfg) matches across reruns
    assert repr(a) != repr(DF.attacker_optimizer("adam", 0.1, DF.span_basis(rng.normal(size=(2, D)))))
    assert DF.attacker_optimizer("adam", 0.1, None) == "adam"
    g = jnp.asarray(rng.normal(size=(3, D)).astype(np.float32))
    c = DF.confine(g, Q)
    assert float(jnp.abs(c @ jnp.asarray(Q, jnp.float32)).max()) < 1e-5
    assert float(jnp.linalg.norm(c)) == pytest.approx(float(jnp.linalg.norm(g)), rel=1e-5)


# ----------------------------------------------------------------------------- multi-layer


def test_multi_layer_is_composition_in_layer_order(setup):
    model, _, _, toks = setup
    a, b = Site(0, "resid_post"), Site(1, "resid_post")
    ca = Clamp(_sae(7, apply_b_dec=False), jnp.array([0, 4]), jnp.array([3.0, 0.0]))
    cb = DF.error_free(Clamp(_sae(8), jnp.array([2]), jnp.array([2.5])))
    hooks = DF.multi_layer({str(b): cb, a: ca})
    assert list(hooks) == [a, b]
    t, slots = toks[0], jnp.arange(SEQ)
    got = jax.jit(lambda m, hk: forward(m, t, hk))(model, hooks)
    # by hand: block 0, clamp a, block 1, splice b, unembed
    x, _ = run_blocks(model, embed(model, t), 0, 1)
    x, _ = run_blocks(model, ca(x, slots), 1, 2)
    np.testing.assert_allclose(got, unembed(model, cb(x, slots)), atol=1e-4)
    single = forward(model, t, {a: ca})
    assert float(jnp.abs(single - got).max()) > 1e-3  # the second layer's defence does act
    with pytest.raises(ValueError, match="twice"):
        DF.multi_layer({a: ca, str(a): ca})
    with pytest.raises(ValueError, match="not a defence"):
        DF.multi_layer({a: DF.SpanAblation(jnp.eye(D)[:, :1])})


# ----------------------------------------------------------------------------- the game


def test_game_rounds_confine_the_attacker_and_grow_the_span(setup):
    """Also the solver on a multi-layer defence: an error-free splice below the attack site (in the
    cached prefix) and the clamp at it (measured, encoder-null)."""
    model, clamp, ex, toks = setup
    base = DF.multi_layer({BELOW: DF.ErrorFreeSplice(_near_identity_sae(11), jnp.array([3]), jnp.array([0.0])),
                           SITE: clamp})
    seen, B = [], 20.0

    def solve(hooks, basis):
        res = runner.solve_batch(_solver("encoder", basis, tuple(hooks), steps=30, budget=B), model, ex, hooks)
        seen.append((hooks, basis, jax.device_get(res)))
        return seen[-1][2]

    game = DF.play_game(solve, DF.ablation_defence(base, SITE), rounds=3, threshold=0.0, min_drop=-1.0, budget=B,
                        max_new=1)  # rank 1 per round, as refusal-direction ablation
    rounds = game.rounds
    assert [r.round for r in rounds] == list(range(len(rounds))) and len(rounds) == 3, game.stop
    # round 0 ran both defences (the clamped objective is the direct forward pass under them) ...
    logp = jax.nn.log_softmax(jax.jit(jax.vmap(lambda t: forward(model, t, base)))(toks)[:, -1], -1)
    direct = logp[jnp.arange(N), ex.target.ids[:, 0, -1]]
    res0 = seen[0][2]
    np.testing.assert_allclose(res0.clamped_objective, direct, atol=1e-4)
    assert res0.success.all() and not res0.clamped_success.any()  # every flip bypassed
    assert rounds[0].n_defended == N and all(0 <= r.n_defended <= N for r in rounds)
    np.testing.assert_array_less(res0.metrics["drift_abs"], 1e-4)  # ... and measured the clamp's features
    ranks = [r.basis_rank for r in rounds]
    assert ranks[0] == 0 and all(x < y for x, y in itertools.pairwise(ranks))
    assert game.stop == rounds[-1].stop == "rounds" and all(r.stop is None for r in rounds[:-1])
    for r, (hooks, basis, res) in zip(rounds, seen):
        assert r.n == N and r.n_recovered == int(res.success.sum()) and r.recovery_rate == r.n_recovered / N
        assert r.budget == B and (r.delta_norm_max is None or r.delta_norm_max <= B * (1 + 1e-5))
        if basis is None:
            continue
        Q = np.asarray(basis)
        assert Q.shape[1] == r.basis_rank
        # every later delta is orthogonal to the ablated span ...
        assert np.abs(res.delta @ Q).max() < 1e-4 * max(np.abs(res.delta).max(), 1e-6)
        # ... and the defended, attacked residual at the site has no component in it
        below, at = hooks[BELOW], hooks[SITE]
        h = jax.vmap(lambda t, f=below: run_to(model, t, SITE.layer, {BELOW: f}))(ex.tokens[:, 0])
        attacked = jax.vmap(lambda x, dl, sl, f=at: compose(f, AddDelta(dl, sl))(x, jnp.arange(SEQ)))(
            h, jnp.asarray(res.delta), ex.delta_slots)
        assert float(jnp.abs(attacked @ jnp.asarray(Q, jnp.float32)).max()) < 1e-4
    # round r+1 ablates round r's span plus the strongest direction of round r's recovered deltas
    for (_, prev, res), nxt in zip(seen, game.bases[1:]):
        if prev is not None:
            np.testing.assert_allclose(nxt[:, :-1], prev)
        full = DF.span_basis(res.delta[res.success])
        q = nxt[:, -1]
        np.testing.assert_allclose(q - full @ (full.T @ q), 0.0, atol=1e-6)


def test_game_stops_below_threshold_at_once():
    class Res:
        success = np.zeros(3, bool)
        delta = np.zeros((3, 1, D))

    game = DF.play_game(lambda h, b: Res(), lambda b: {}, rounds=5, threshold=0.5)
    assert len(game.rounds) == 1 and game.stop == "below_threshold" and game.rounds[0].recovery_rate == 0.0


# ----------------------------------------------------------------------------- side effects, generation


def test_next_token_fidelity_against_direct(setup):
    model, clamp, _, toks = setup
    valid = jnp.ones(toks.shape, bool).at[1, :2].set(False)
    same = DF.next_token_fidelity(model, toks, valid, {})
    assert same["kl_mean"] == pytest.approx(0.0, abs=1e-6) and same["top1_agree"] == 1.0
    hooks = {SITE: DF.error_free(clamp)}
    got = DF.next_token_fidelity(model, toks, valid, hooks)
    p = jax.nn.log_softmax(jax.vmap(lambda t, v: forward(model, t, valid=v))(toks, valid), -1)
    q = jax.nn.log_softmax(jax.vmap(lambda t, v: forward(model, t, hooks, valid=v))(toks, valid), -1)
    kl = np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))[np.asarray(valid)]
    agree = np.asarray(jnp.argmax(p, -1) == jnp.argmax(q, -1))[np.asarray(valid)]
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-4) and got["kl_mean"] > 1e-3
    assert got["top1_agree"] == pytest.approx(agree.mean()) and got["n_slots"] == int(valid.sum())


def test_defences_in_generation_match_the_uncached_reference(setup):
    model, clamp, _, toks = setup
    Q = jnp.asarray(DF.span_basis(np.random.default_rng(2).normal(size=(2, D))), jnp.float32)
    hooks = {Site(0, "resid_post"): DF.error_free(clamp), SITE: DF.with_ablation(clamp, Q)}
    a = generate(model, toks, max_new_tokens=3, hooks=hooks, return_logits=True)
    b = generate_uncached(model, toks, max_new_tokens=3, hooks=hooks, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)


# ----------------------------------------------------------------------------- guard


def test_check_defence_refuses_in_one_line(setup):
    model, clamp, _, _ = setup
    cfg, sae = model.cfg, clamp.sae
    DF.check_defence(cfg, SITE, sae, FEATS, n_features=5, basis=np.eye(D)[:, :2])  # fine
    wide = SAE(W_enc=jnp.zeros((D + 1, 4)), b_enc=jnp.zeros(4), W_dec=jnp.zeros((4, D + 1)), b_dec=jnp.zeros(D + 1))
    cases = [
        ({"site": Site(5, "resid_post")}, "has 2 layers"),
        ({"sae": wide}, "d_in=17"),
        ({"n_features": D_SAE + 1}, "K=33"),
        ({"features": jnp.arange(D_SAE + 2) % D_SAE}, "K=34"),
        ({"site": Site(0, "resid_post")}, "trained at"),
        ({"basis": np.zeros((D, 0))}, "span is empty"),
        ({"require_basis": True}, "span is empty"),
        ({"basis": np.eye(D + 1)[:, :2]}, "d_model=16"),
        ({"basis": 2 * np.eye(D)[:, :2]}, "orthonormal"),
    ]
    for change, match in cases:
        kw = {"site": SITE, "sae": sae, "features": None, "n_features": None, "basis": None, "require_basis": False} | change
        with pytest.raises(ValueError, match=match) as err:
            DF.check_defence(cfg, kw.pop("site"), kw.pop("sae"), kw.pop("features"), **kw)
        assert "\n" not in str(err.value)
