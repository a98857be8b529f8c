"""Orbax checkpoint round trip and kill/resume of ``run_recovery`` (identical results)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxrecover.runtime import checkpoint as ckpt
from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.recover import batch as runner
from jaxrecover.sae.clamp import Clamp
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_transformer, tiny_config

SEQ, D = 5, 16
SITE = Site(1, "resid_pre")


def _problem():
    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    k = jax.random.split(jax.random.key(1), 4)
    sae = SAE(W_enc=jax.random.normal(k[0], (D, 24)) / D**0.5, b_enc=0.3 * jnp.ones(24),
              W_dec=jax.random.normal(k[1], (24, D)), b_dec=jnp.zeros(D))
    clamp = Clamp(sae, jnp.array([0, 3], jnp.int32), jnp.zeros(2))
    n = 3
    toks = jax.random.randint(k[2], (n, 1, SEQ), 0, cfg.d_vocab)
    ids = jax.random.randint(k[3], (n, 1, SEQ), 0, cfg.d_vocab)
    ex = R.Example(tokens=toks, valid=jnp.ones((n, 1, SEQ), bool), delta_slots=jnp.full((n, 1), SEQ - 1, jnp.int32),
                   measure_mask=jnp.ones((n, SEQ), bool),
                   target=O.Continuation(ids=ids, weights=jnp.ones((n, 1, SEQ), jnp.float32)))
    cfg_r = R.RecoveryConfig(steps=6, lr=0.1, budget=4.0)
    solver = R.make_solver(R.RecoveryProblem(SITE, (SITE,)), cfg_r, O.continuation_logprob, O.continuation_success)
    return solver, model, ex, {SITE: clamp}


def test_state_round_trip(tmp_path):
    solver, model, ex, clamps = _problem()
    ctx, state = jax.jit(solver.init)(model, jax.tree.map(lambda a: a[0], ex), clamps)
    state = jax.tree.map(lambda a: a, state)
    mngr = ckpt.open_manager(tmp_path, "run-a")
    assert ckpt.restore_state(mngr, state) is None
    bumped = state.__class__(**{**state.__dict__, "delta": state.delta + 1.0, "step": state.step + 3})
    ckpt.save_state(mngr, 3, bumped)
    step, back = ckpt.restore_state(mngr, state)
    assert step == 3
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(bumped), strict=True):
        np.testing.assert_array_equal(a, b)
    mngr.close()


def test_killed_run_resumes_to_identical_results(tmp_path):
    solver, model, ex, clamps = _problem()
    full = runner.run_recovery(solver, model, ex, clamps, tmp_path / "a", run_id="r", batch_size=4, progress=False, steps_per_chunk=2)
    assert full is not None and full["all"]["n"] == 3
    # kill after one chunk, then after two more (mid-run, checkpoint restored each time), then finish
    assert runner.run_recovery(solver, model, ex, clamps, tmp_path / "b", run_id="r", batch_size=4, progress=False, steps_per_chunk=2,
                          stop_after_chunks=1) is None
    assert runner.run_recovery(solver, model, ex, clamps, tmp_path / "b", run_id="r", batch_size=4, progress=False, steps_per_chunk=2,
                          stop_after_chunks=1) is None
    runner.run_recovery(solver, model, ex, clamps, tmp_path / "b", run_id="r", batch_size=4, progress=False, steps_per_chunk=2)
    a = (tmp_path / "a" / "r.jsonl").read_text()
    b = (tmp_path / "b" / "r.jsonl").read_text()
    assert a == b
    recs = [json.loads(line) for line in a.splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert json.loads((tmp_path / "b" / "r_summary.json").read_text())["all"]["n"] == 3


def test_resume_with_other_inputs_starts_fresh(tmp_path, capsys):
    solver, model, ex, clamps = _problem()
    assert runner.run_recovery(solver, model, ex, clamps, tmp_path, run_id="r", batch_size=4, progress=False, steps_per_chunk=2,
                               stop_after_chunks=1) is None
    (site, clamp), = clamps.items()
    other = {site: dataclasses.replace(clamp, values=clamp.values + 0.5)}  # same shapes, other defence
    runner.run_recovery(solver, model, ex, other, tmp_path, run_id="r", batch_size=4, progress=False, steps_per_chunk=2)
    assert "starting fresh" in capsys.readouterr().err
    fresh = runner.run_recovery(solver, model, ex, other, tmp_path / "ref", run_id="r", batch_size=4, progress=False, steps_per_chunk=2)
    assert (tmp_path / "r.jsonl").read_text() == (tmp_path / "ref" / "r.jsonl").read_text()
    assert fresh["all"]["n"] == 3
