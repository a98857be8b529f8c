"""A budget sweep solved as ONE batch over budgets x examples equals the sweep solved point by point.

``suite.run_solver_budgets`` tiles the examples once per budget and carries each row's L2 budget in
``Example.budget`` (the post-step clip reads it instead of ``cfg.budget``). Per grid point it must give
what a separate solve with ``cfg.budget = b`` gives: the same decisions, and deltas and objectives
within 1e-6 relative in fp32. Both run with one example per device per call
(``JAXRECOVER_PER_DEVICE_BATCH=1``): the joint batch is 3x larger, and XLA's fp32 sums follow the
per-device batch shape (README "Scale-out"), so with that shape fixed the two agree (measured:
bitwise); without it, 6 unclipped Adam steps grew a last-bit difference to 1.1e-6 in one of 96 delta
entries.

Cost: compiles, not steps (6 steps run in milliseconds). ``cfg.budget`` is static, so every separate
solve compiles its own three programs: three solvers in all (the joint one and references at the two
nonzero budgets; budget 0 needs none). Measured with ``time .venv/bin/python -m pytest -q
tests/test_sweep_joint.py`` on AMD EPYC (/proc/cpuinfo), 2 cores shared with two other heavy jobs
(load average 7): 51 s wall (pytest's count 43 s), 33 s CPU; a reference fewer saves about a third.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrecover.recover import objectives as O
from jaxrecover.recover import solver as R
from jaxrecover.recover import batch as runner
from jaxrecover.sae.clamp import Clamp
from jaxrecover.experiment import suite as S
from jaxrecover.sae.autoencoder import SAE
from jaxrecover.core.sites import Site
from jaxrecover.testing import random_transformer, tiny_config

N_EX, SEQ, D, D_SAE = 3, 5, 16, 24
SITE = Site(1, "resid_pre")
# 0: delta stays 0; 0.3: the clip binds; 50: it never binds (and the solver's own cfg.budget, 1.0,
# would: the rows must use their own budget)
BUDGETS = (0.0, 0.3, 50.0)


@pytest.fixture(scope="module")
def problem():
    """Tiny llama, 3 examples with their own clamped features (a per-example clamp, as in TPP)."""
    cfg = tiny_config("llama", d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32)
    model = random_transformer(jax.random.key(0), cfg)
    rng = np.random.default_rng(3)
    sae = SAE(W_enc=jnp.asarray(rng.standard_normal((D, D_SAE), np.float32) / D**0.5), b_enc=0.3 * jnp.ones(D_SAE),
              W_dec=jnp.asarray(rng.standard_normal((D_SAE, D), np.float32)), b_dec=jnp.zeros(D))
    clamp = Clamp(sae, jnp.asarray(rng.integers(0, D_SAE, (N_EX, 2)), jnp.int32), jnp.zeros((N_EX, 2)))
    ex = R.Example(tokens=jnp.asarray(rng.integers(0, cfg.d_vocab, (N_EX, 1, SEQ)), jnp.int32),
                   valid=jnp.ones((N_EX, 1, SEQ), bool),
                   delta_slots=jnp.tile(jnp.array([[SEQ - 2, SEQ - 1]], jnp.int32), (N_EX, 1)),
                   measure_mask=jnp.ones((N_EX, SEQ), bool),
                   target=O.Continuation(ids=jnp.asarray(rng.integers(0, cfg.d_vocab, (N_EX, 1, SEQ)), jnp.int32),
                                         weights=jnp.ones((N_EX, 1, SEQ), jnp.float32)))
    rc = R.RecoveryConfig(steps=6, lr=0.1, budget=1.0)  # cfg.budget is not used by the joint solve
    solver = R.make_solver(R.RecoveryProblem(SITE, (SITE,)), rc, O.continuation_logprob, O.continuation_success)
    return solver, model, ex, {SITE: clamp}, {SITE: Clamp(None, 0, 0)}


def test_joint_budget_grid_equals_point_by_point(problem, monkeypatch):
    solver, model, ex, clamps, axes = problem
    monkeypatch.setenv("JAXRECOVER_PER_DEVICE_BATCH", "1")
    joint = S.run_solver_budgets(solver, model, ex, clamps, BUDGETS, clamp_axes=axes, progress=False)
    assert len(joint) == len(BUDGETS)
    for b, got in zip(BUDGETS[1:], joint[1:], strict=True):  # budget 0 is checked below: delta == 0
        one = R.make_solver(solver.problem, solver.cfg.replace(budget=b), solver.objective, solver.success)
        g, r = got.result, S.run_solver(one, model, ex, clamps, clamp_axes=axes, progress=False).result
        print(f"budget {b}: max |joint - separate| delta", float(np.abs(g.delta - r.delta).max()))
        np.testing.assert_array_equal(g.success, r.success, err_msg=f"budget {b}")
        np.testing.assert_array_equal(g.non_finite, r.non_finite, err_msg=f"budget {b}")
        for key in ("delta", "objective", "clamped_objective"):
            want = np.asarray(getattr(r, key))
            scale = max(1.0, float(np.abs(want).max()))  # fp32: 1e-6 relative to the array's scale
            np.testing.assert_allclose(np.asarray(getattr(g, key)), want, rtol=1e-6, atol=1e-6 * scale,
                                       err_msg=f"budget {b}: {key}")
        np.testing.assert_allclose(g.trace["objective"], r.trace["objective"], rtol=1e-6, atol=1e-6)
        assert [x["index"] for x in got.records] == list(range(N_EX))  # records indexed per grid point
    # each grid point really had its own budget: 0 keeps delta 0, 0.3 binds, 50 does not
    norms = [np.sqrt((np.asarray(run.result.delta) ** 2).sum(axis=(1, 2))) for run in joint]
    print("delta norms per budget:", norms)
    assert np.all(norms[0] == 0.0)
    np.testing.assert_allclose(norms[1], 0.3, rtol=1e-5)
    assert np.all(norms[2] > solver.cfg.budget) and np.all(norms[2] < 50.0)


def test_examples_that_carry_budgets_are_refused(problem):
    solver, model, ex, clamps, axes = problem
    with_budget = dataclasses.replace(ex, budget=jnp.ones(N_EX))
    with pytest.raises(ValueError, match="already carry per-example budgets"):
        S.run_solver_budgets(solver, model, with_budget, clamps, BUDGETS, clamp_axes=axes, progress=False)
    with pytest.raises(ValueError, match=">= 0"):
        S.run_solver_budgets(solver, model, ex, clamps, (1.0, -2.0), clamp_axes=axes, progress=False)
