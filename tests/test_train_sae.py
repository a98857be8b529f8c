"""SAE trainer: learning on a known sparse dictionary, invariants, exact resume, metrics by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.sae import train as ts
from jaxrecover.sae.autoencoder import SAE, decode, encode, encode_pre
from jaxrecover.core.sites import Site
from jaxrecover.model.transformer import run_to

D_IN, M_TRUE = 32, 64


def sparse_data(n: int, seed: int, offset: float = 0.5, scale: float = 1.0) -> np.ndarray:
    """Rows ``z @ D + offset`` from a fixed unit-norm dictionary ``D``; ~4 of 64 atoms active."""
    D = np.random.default_rng(0).normal(size=(M_TRUE, D_IN))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    z = (r.random((n, M_TRUE)) < 4 / M_TRUE) * r.exponential(1.0, (n, M_TRUE))
    return (scale * (z @ D + offset)).astype(np.float32)


def small_cfg(**kw) -> ts.TrainConfig:
    base = dict(d_in=D_IN, d_sae=128, steps=300, k=4, batch_size=256, lr=3e-3, warmup_steps=20, aux_k=16,
                dead_tokens=5000, checkpoint_every=20)
    return ts.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return sparse_data(20_000, seed=1)


@pytest.fixture(scope="module")
def topk_run(data):
    cfg = small_cfg()
    logs: list[tuple[int, dict[str, float]]] = []
    state = ts.train(cfg, ts.ArrayBatches(data, cfg.batch_size), data[:2000], progress=False, log_every=25,
                     log=lambda i, m: logs.append((i, m)))
    return cfg, state, logs


# ----------------------------------------------------------------------------- learning


def test_topk_loss_decreases_and_ev_rises(topk_run):
    cfg, state, logs = topk_run
    first, last = logs[0][1], logs[-1][1]
    assert last["mse"] < 0.5 * first["mse"]
    assert last["ev"] > first["ev"] + 0.2
    held_out = jnp.asarray(sparse_data(2000, seed=2))
    sae = ts.to_sae(state, cfg)
    assert float(ts.explained_variance(held_out, decode(sae, encode(sae, held_out)))) > 0.8


def test_topk_keeps_exactly_k(topk_run, data):
    cfg, state, _ = topk_run
    sae = ts.to_sae(state, cfg)
    x = jnp.asarray(data[:500])
    z = encode(sae, x)
    nonzero = np.asarray(jnp.sum(z != 0, axis=-1))
    assert nonzero.max() <= cfg.k
    # with every pre-activation positive, relu removes nothing: exactly k survive
    shifted = dataclasses.replace(sae, b_enc=sae.b_enc + 1e3)
    assert np.all(np.asarray(jnp.sum(encode(shifted, x) != 0, axis=-1)) == cfg.k)
    mask = jax.vmap(lambda p: ts._topk_mask(p, cfg.k))(encode_pre(sae, x))
    assert np.all(np.asarray(jnp.sum(mask, axis=-1)) == cfg.k)


def test_decoder_rows_stay_unit_norm(topk_run):
    _, state, _ = topk_run
    norms = np.linalg.norm(np.asarray(state.params.W_dec), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def test_normalisation_is_folded_into_raw_sae():
    """A run on data x100 gives an SAE on RAW inputs whose output is the normalised SAE's / s."""
    raw = sparse_data(4000, seed=3, scale=100.0)
    cfg = small_cfg(steps=30)
    state = ts.train(cfg, ts.ArrayBatches(raw, cfg.batch_size), raw[:2000], progress=False)
    s = float(state.scale)
    assert s == pytest.approx(ts.input_scale(raw[:2000]), rel=1e-5) and s < 0.1  # s ~ 0.01: relative, not 1e-6
    p = state.params
    normalised = SAE(W_enc=p.W_enc, b_enc=p.b_enc, W_dec=p.W_dec, b_dec=p.b_dec, activation="topk", k=cfg.k,
                     apply_b_dec_to_input=True)
    x = jnp.asarray(raw[:64])
    expected = decode(normalised, encode(normalised, x * s)) / s
    latents = encode(normalised, x * s) / s
    # raw inputs are x100: reconstructions and latents reach ~300, so the fp32 atols scale with them
    # (measured errors ~1.5e-7 of that scale)
    atol_x = 1e-5 * max(1.0, float(jnp.abs(expected).max()))
    atol_z = 1e-6 * max(1.0, float(jnp.abs(latents).max()))
    for fold in (True, False):
        sae = ts.to_sae(state, cfg, fold_b_dec=fold)
        assert sae.apply_b_dec_to_input is not fold
        np.testing.assert_allclose(np.asarray(decode(sae, encode(sae, x))), np.asarray(expected), rtol=1e-4,
                                   atol=atol_x)
        np.testing.assert_allclose(np.asarray(encode(sae, x)), np.asarray(latents), rtol=1e-4, atol=atol_z)


def test_jumprelu_trains_and_moves_thresholds(data):
    cfg = small_cfg(activation="jumprelu", steps=200, l0_coeff=3e-3, bandwidth=0.05, threshold_init=0.1, aux_k=0)
    logs: list[tuple[int, dict[str, float]]] = []
    state = ts.train(cfg, ts.ArrayBatches(data, cfg.batch_size), data[:2000], progress=False, log_every=25,
                     log=lambda i, m: logs.append((i, m)))
    assert logs[-1][1]["loss"] < 0.5 * logs[0][1]["loss"]
    assert logs[-1][1]["ev"] > 0.8
    assert not np.allclose(np.asarray(state.params.log_threshold), np.log(0.1))
    sae = ts.to_sae(state, cfg)
    assert sae.activation == "jumprelu" and sae.threshold is not None


def test_jumprelu_threshold_init_from_data_sets_initial_l0(data):
    """threshold_init_l0: each latent fires on l0/d_sae of the init rows, so the mean L0 starts at l0
    (a constant 1e-3 threshold starts near d_sae / 2); the floor applies where the quantile is lower."""
    cfg = small_cfg(activation="jumprelu", aux_k=0, threshold_init_l0=8.0)
    sample = data[:4000]
    state = ts.init_state(cfg, sample)
    p = state.params
    x = jnp.asarray(sample) * state.scale
    pre = (x - p.b_dec[None, :]) @ p.W_enc + p.b_enc[None, :]
    fires = pre > jnp.exp(p.log_threshold)[None, :]
    assert abs(float(jnp.mean(jnp.sum(fires, axis=-1))) - 8.0) < 0.5
    np.testing.assert_allclose(np.asarray(jnp.mean(fires, axis=0)), 8.0 / cfg.d_sae, atol=2e-3)
    flat = ts.init_state(small_cfg(activation="jumprelu", aux_k=0), sample).params
    pre_flat = (x - flat.b_dec[None, :]) @ flat.W_enc + flat.b_enc[None, :]
    assert float(jnp.mean(jnp.sum(pre_flat > jnp.exp(flat.log_threshold)[None, :], axis=-1))) > 0.3 * cfg.d_sae
    high_floor = ts.init_state(small_cfg(activation="jumprelu", aux_k=0, threshold_init_l0=8.0, threshold_init=50.0),
                               sample)
    np.testing.assert_allclose(np.exp(np.asarray(high_floor.params.log_threshold)), 50.0, rtol=1e-5)
    with pytest.raises(ValueError, match="threshold_init_l0"):
        small_cfg(activation="jumprelu", threshold_init_l0=float(cfg.d_sae))


def test_jumprelu_with_data_thresholds_trains_sparse(data):
    cfg = small_cfg(activation="jumprelu", steps=200, l0_coeff=3e-3, bandwidth=0.05, aux_k=0, threshold_init_l0=6.0,
                    threshold_lr_mult=10.0)
    logs: list[tuple[int, dict[str, float]]] = []
    state = ts.train(cfg, ts.ArrayBatches(data, cfg.batch_size), data[:2000], progress=False, log_every=25,
                     log=lambda i, m: logs.append((i, m)))
    assert logs[-1][1]["ev"] > 0.8
    assert logs[-1][1]["l0"] < 16  # ~4 true atoms per row; a 1e-3 constant init would start at ~64
    sae = ts.to_sae(state, cfg)
    held_out = jnp.asarray(sparse_data(2000, seed=2))
    assert float(ts.explained_variance(held_out, decode(sae, encode(sae, held_out)))) > 0.8


def test_jumprelu_preact_loss_term_and_gradient():
    """preact_coeff adds coeff * sum_i relu(t_i - pre_i); its gradient lowers the thresholds and raises the
    pre-activations of latents below threshold (the only gradient a never-firing latent gets)."""
    cfg = small_cfg(activation="jumprelu", aux_k=0, l0_coeff=0.0, threshold_init=0.3, preact_coeff=0.5)
    base = dataclasses.replace(cfg, preact_coeff=0.0)
    params = ts.init_params(jax.random.PRNGKey(0), cfg, jnp.zeros(D_IN))
    x = jnp.asarray(sparse_data(1, seed=3)[0])
    dead = jnp.zeros(cfg.d_sae, bool)

    def extra(p):
        return ts.example_loss(cfg, p, x, dead)[0] - ts.example_loss(base, p, x, dead)[0]

    pre = (x - params.b_dec) @ params.W_enc + params.b_enc
    t = jnp.exp(params.log_threshold)
    np.testing.assert_allclose(float(extra(params)), 0.5 * float(jnp.sum(jax.nn.relu(t - pre))), rtol=1e-5)
    g = jax.grad(extra)(params)
    below = np.asarray(pre < t)
    assert below.any() and (~below).any()
    assert np.all(np.asarray(g.log_threshold)[below] > 0) and np.all(np.asarray(g.b_enc)[below] < 0)
    np.testing.assert_array_equal(np.asarray(g.b_enc)[~below], 0.0)


def test_jumprelu_straight_through_gradients():
    """d/dt H(pre - t) = -K((pre-t)/eps)/eps and d/dt JumpReLU = -t K((pre-t)/eps)/eps (rectangle K)."""
    pre = jnp.array([0.50, 0.52, 0.60, 1.00])
    t = jnp.array([0.51, 0.51, 0.51, 0.51])
    eps = 0.04  # |pre - t| < 0.02 for the first two entries only
    g_step = jax.grad(lambda t: jnp.sum(ts._step_fn(pre, t, eps)))(t)
    np.testing.assert_allclose(np.asarray(g_step), [-25.0, -25.0, 0.0, 0.0], rtol=1e-6)
    g_jump_t = jax.grad(lambda t: jnp.sum(ts._jump_relu(pre, t, eps)))(t)
    np.testing.assert_allclose(np.asarray(g_jump_t), [-0.51 * 25, -0.51 * 25, 0.0, 0.0], rtol=1e-6)
    g_jump_pre = jax.grad(lambda p: jnp.sum(ts._jump_relu(p, t, eps)))(pre)
    np.testing.assert_allclose(np.asarray(g_jump_pre), [0.0, 1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- resume


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_exact(data, tmp_path):
    cfg = small_cfg(steps=70, checkpoint_every=20)
    batches = ts.ArrayBatches(data, cfg.batch_size, seed=5)
    sample = data[:2000]
    reference = ts.train(cfg, batches, sample, progress=False)

    def dying(start: int):  # a run killed while computing step 47: last checkpoint is step 40
        for i, b in zip(range(start, 47), batches(start)):
            yield b
        raise _Interrupt

    with pytest.raises(_Interrupt):
        ts.train(cfg, dying, sample, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert ts.restore_or_init(cfg, sample, tmp_path / "ckpt").step == 40
    resumed = ts.train(cfg, ts.ArrayBatches(data, cfg.batch_size, seed=5), sample, checkpoint_dir=tmp_path / "ckpt",
                       progress=False)
    assert int(resumed.step) == cfg.steps
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- data


def test_chunk_token_stream():
    chunks = ts.chunk_token_stream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, sep_id=0)
    np.testing.assert_array_equal(chunks, [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]])
    assert ts.chunk_token_stream([[1, 2]], seq_len=4, sep_id=None).shape == (0, 4)


def test_activation_rows_drop_sink_and_padding():
    resid = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(ts.activation_rows(resid), resid[1:])
    valid = np.array([False, False, True, True, True, True])  # left padding: slot 2 is the sink
    np.testing.assert_array_equal(ts.activation_rows(resid, valid), resid[3:])


def test_array_batches_deterministic_epochs():
    rows = np.arange(20, dtype=np.float32)[:, None]
    a, b = ts.ArrayBatches(rows, 6, seed=1), ts.ArrayBatches(rows, 6, seed=1)
    epoch0 = np.concatenate([a.indices(i) for i in range(3)])
    assert len(set(epoch0.tolist())) == 18  # no repeats inside an epoch
    np.testing.assert_array_equal(next(a(4)), next(b(4)))  # random access == replay
    assert not np.array_equal(a.indices(0), a.indices(3))  # a new permutation per epoch


def test_shuffle_buffer_is_a_seeded_permutation():
    blocks = [np.arange(i * 10, (i + 1) * 10, dtype=np.float32)[:, None] for i in range(10)]
    out = np.concatenate(list(ts.shuffle_buffer(blocks, batch_size=8, buffer_rows=32, seed=0)))[:, 0]
    assert len(out) == 96 and len(set(out.tolist())) == 96  # each row at most once, only the tail is dropped
    assert not np.array_equal(out, np.sort(out))
    again = np.concatenate(list(ts.shuffle_buffer(blocks, batch_size=8, buffer_rows=32, seed=0)))[:, 0]
    np.testing.assert_array_equal(out, again)


def test_harvest_matches_run_to(llama_model, tmp_path):
    cfg = llama_model.cfg
    chunks = np.random.default_rng(0).integers(0, cfg.d_vocab, (5, 9)).astype(np.int32)
    sites = [Site(0, "resid_post"), Site(1, "resid_post")]
    paths = [tmp_path / "l0.f16", tmp_path / "l1.f16"]
    maps = ts.harvest(llama_model, chunks, sites, paths, batch_chunks=2, progress=False)
    for site, m in zip(sites, maps, strict=True):
        expected = np.stack([np.asarray(run_to(llama_model, jnp.asarray(c), site.layer + 1))[1:] for c in chunks])
        np.testing.assert_allclose(np.asarray(m, np.float32), expected.reshape(-1, cfg.d_model), rtol=2e-3, atol=2e-3)
    # a rerun finds the work done and leaves the files as they are
    again = ts.harvest(llama_model, chunks, sites, paths, batch_chunks=2, progress=False)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(maps[0]))


# ----------------------------------------------------------------------------- metrics


def test_metrics_on_hand_computed_examples():
    x = jnp.array([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    x_hat = jnp.array([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert float(ts.explained_variance(x, x_hat)) == pytest.approx(0.5)
    assert float(ts.l0(jnp.array([[0.0, 2.0, 0.0], [1.0, -1.0, 3.0]]))) == pytest.approx(2.0)
    assert float(ts.dead_fraction(jnp.array([0, 10, 99, 100]), 100)) == pytest.approx(0.25)
    assert ts.fraction_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    tokens = jnp.array([0, 1, 2])
    expected = -(np.log(0.25) + np.log(0.1)) / 2
    assert float(ts.next_token_loss(logits, tokens)) == pytest.approx(expected, rel=1e-5)
    valid = jnp.array([False, True, True])  # only the pair (1 -> 2) is real
    assert float(ts.next_token_loss(logits, tokens, valid)) == pytest.approx(-np.log(0.1), rel=1e-5)


def _identity_sae(d: int) -> SAE:
    """relu([x, -x]) @ [[I], [-I]] == x: a perfect reconstruction."""
    eye = jnp.eye(d)
    return SAE(W_enc=jnp.concatenate([eye, -eye], axis=1), b_enc=jnp.zeros(2 * d), W_dec=jnp.concatenate([eye, -eye]),
               b_dec=jnp.zeros(d), activation="relu", hook_name="blocks.0.hook_resid_post")


def test_evaluate_perfect_and_zero_saes(llama_model):
    cfg = llama_model.cfg
    chunks = np.random.default_rng(1).integers(0, cfg.d_vocab, (4, 12)).astype(np.int32)
    site = Site(0, "resid_post")
    mean = np.zeros(cfg.d_model, np.float32)
    perfect = ts.evaluate(llama_model, _identity_sae(cfg.d_model), site, chunks, mean, batch_chunks=2, progress=False)
    assert perfect["ev"] == pytest.approx(1.0, abs=1e-5)
    # cross-entropies here are ~15-20 nats: relative tolerances (an abs 1e-6 is below one fp32 ulp of 15)
    assert perfect["ce_spliced"] == pytest.approx(perfect["ce_clean"], rel=1e-6)
    assert perfect["flr_zero"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["ce_mean"] == pytest.approx(perfect["ce_zero"], rel=1e-6)  # the mean here is zero
    assert perfect["n_tokens"] == 4 * 11
    nothing = dataclasses.replace(_identity_sae(cfg.d_model), b_enc=jnp.full(2 * cfg.d_model, -1e3))
    null = ts.evaluate(llama_model, nothing, site, chunks, mean, batch_chunks=2, progress=False)
    assert null["l0"] == 0.0 and null["dead_frac"] == 1.0
    assert null["flr_zero"] == pytest.approx(0.0, abs=1e-5)  # reconstructs zeros == zero ablation
    # rows at or above max_norm are neither replaced nor measured
    norms = np.linalg.norm(np.stack([np.asarray(run_to(llama_model, jnp.asarray(c), 1))[1:] for c in chunks]), axis=-1)
    ceiling = float(np.median(norms))
    part = ts.evaluate(llama_model, nothing, site, chunks, mean, max_norm=ceiling, batch_chunks=2, progress=False)
    assert part["n_tokens"] == int(np.sum(norms < ceiling)) and part["n_excluded"] == int(np.sum(norms >= ceiling))
    assert part["ce_zero"] != pytest.approx(null["ce_zero"])  # the kept rows changed the ablated run


def test_norm_ceiling():
    rows = np.ones((101, 4), np.float32)  # norm 2
    rows[0] *= 1000
    assert ts.norm_ceiling(rows, factor=10.0) == pytest.approx(20.0)
