"""The step loop's pre-sliced blocks (``run_layers(layers=)``, ``recovery._window_layers``) give the
results of the stacked-weights scan, and are taken only where they should be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.recover import batch as runner
from jaxrecover.sae.clamp import Clamp
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_sae, random_transformer, tiny_config
from jaxrecover.model.transformer import embed, run_layers, seq_info, split_blocks

SEQ = 10


def _model(arch: str):
    cfg = tiny_config(arch, n_layers=5) if arch == "llama" else tiny_config(arch)
    return random_transformer(jax.random.key(7), cfg)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_run_layers_on_split_blocks_equals_the_scan(arch):
    model = _model(arch)
    n = model.cfg.n_layers
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, model.cfg.d_vocab, SEQ), jnp.int32)
    valid = jnp.arange(SEQ) >= 2  # left padding
    x = embed(model, tokens, valid)
    hooks = {Site(1, "resid_mid"): lambda h, s: h * 1.5}  # a hooked block between two unhooked runs
    a = run_layers(model, x, 0, n, hooks, info=seq_info(valid), capture=(Site(n - 1, "resid_pre"),))
    b = run_layers(model, x, 0, n, hooks, info=seq_info(valid), capture=(Site(n - 1, "resid_pre"),),
                   layers=split_blocks(model, 0, n))
    for got, want in ((b.x, a.x), (b.k, a.k), (b.v, a.v), *zip(b.captured.values(), a.captured.values(), strict=True)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pre-sliced"):
        run_layers(model, x, 0, n, info=seq_info(valid), layers=split_blocks(model, 0, n - 1))


def _problem():
    model = _model("llama")
    site, down = Site(1, "resid_post"), Site(3, "resid_mid")
    d = model.cfg.d_model
    clamps = {s: Clamp(random_sae(d, 48, seed=i, hook_name=str(s)), jnp.array([1, 5, 9]), jnp.full(3, 0.5))
              for i, s in enumerate((site, down))}
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, model.cfg.d_vocab, (2, 1, SEQ)).astype(np.int32)
    weights = np.zeros(tokens.shape, np.float32)
    weights[..., 6:SEQ - 1] = 1.0
    ex = R.Example(
        tokens=jnp.asarray(tokens), valid=jnp.ones(tokens.shape, bool),
        delta_slots=jnp.asarray(np.tile(np.array([5, 6, 7], np.int32), (2, 1))), measure_mask=jnp.ones((2, SEQ), bool),
        target=O.Continuation(ids=jnp.asarray(np.roll(tokens, -1, axis=-1)), weights=jnp.asarray(weights),
                              answer_start=jnp.full((2,), 6), discouraged=jnp.full((2, 1), -1)),
    )
    solver = R.make_solver(R.RecoveryProblem(delta_site=site, clamp_sites=(site, down)),
                           R.RecoveryConfig(steps=4, lr=0.05, budget=3.0, constraint="encoder", optimizer="sgd"),
                           O.continuation_logprob, O.continuation_success)
    return model, clamps, ex, solver


def test_solver_with_split_blocks_equals_the_stacked_scan(monkeypatch):
    model, clamps, ex, solver = _problem()
    assert len(R._window_layers(solver, model)) == model.cfg.n_layers - 1  # the split path is taken on CPU
    runner._compiled.cache_clear()
    split = runner.solve_batch(solver, model, ex, clamps)
    monkeypatch.setattr(R, "_window_layers", lambda solver, model: None)
    runner._compiled.cache_clear()
    stacked = runner.solve_batch(solver, model, ex, clamps)
    runner._compiled.cache_clear()
    assert float(jnp.max(jnp.abs(stacked.delta))) > 1e-3  # the steps moved delta
    np.testing.assert_allclose(np.asarray(split.delta), np.asarray(stacked.delta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(split.objective), np.asarray(stacked.objective), rtol=1e-5, atol=1e-6)


def test_large_windows_keep_the_stacked_weights(monkeypatch):
    model, _, _, solver = _problem()
    monkeypatch.setattr(R, "_SPLIT_MAX_BYTES", 0)
    assert R._window_layers(solver, model) is None
