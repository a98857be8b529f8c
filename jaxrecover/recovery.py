"""Post-intervention recovery: optimise an additive residual perturbation ``delta`` with the SAE clamps
ACTIVE in every forward pass, so that the suppressed behaviour comes back without (to first order)
moving the defended features.

Contract:
- ``make_recover(problem, cfg, objective, success) -> solve(model, example, clamps) -> RecoveryResult``
  is pure and written for ONE example; batch with ``jax.vmap(solve, in_axes=(None, 0, None))`` or
  ``solve_batch`` (shards the example axis over ``jax.devices()``). ``make_solver`` exposes the same
  solver as ``init / advance / finish`` pieces for chunked, checkpointed runs (``run_recovery``).
- ``example`` (``Example``): ``tokens [n_var, seq]``, ``valid [n_var, seq]``, ``delta_slots [rows]``
  (raw slots of the padded sequence; -1 = unused row), ``measure_mask [seq]`` (where drift is
  measured), ``target`` (objective pytree). All ``n_var`` variants share one ``delta``.
- ``clamps``: ``{Site: Clamp}``; every clamp acts in EVERY pass (prefix, optimisation, evaluation).
- Forward with ``delta``: the prefix ``run_to(delta_site.layer)`` (clamps below it included) is
  computed ONCE per example; each step runs ``run_blocks`` from there with hooks
  ``{clamp sites: clamp, delta_site: compose(clamp_at_delta_site?, AddDelta(delta, slots))}``, so at
  the delta site ``h_rec = h_def + delta`` (paper). Clamp sites at or after the delta site are
  *measured*: ``Phi`` = their clamped latents ``z_S`` at the measured positions, read from
  ``h_def + delta`` at the delta site and from the pre-clamp residual at a downstream clamp site.
- Loop: ``lax.scan`` over steps (``advance(..., n)``); the step evaluates ``delta_t`` (objective,
  success, drift) with one forward, then updates. Early stop is a mask (``delta`` frozen once
  successful; no recompilation). One compile per shape bucket.

Paper vs authors' code (paper-notes 1.6-1.7, 6); the DEFAULT is the paper:

=====================  ====================================  =========================================
field                  paper (default)                       authors' code
=====================  ====================================  =========================================
``projector``          ``"pinv"`` exact projector            ``"ridge"`` (1e-4)
``reproject_delta``    True: delta stays in the null space   False: only the gradient is projected
``jacobian``           ``"exact"`` row space of J            ``"sketch"``: 8 probes + drift probe
``drift_penalty``      0                                     200 (refusal), unprojected gradient
``correction_steps``   0                                     5 steps of GD on the drift (lr 0.05)
``select``             ``"final"``                           ``"drift_constrained"`` (0.03 / 80)
``optimizer``          ``"adam"`` (code; Fig. 1 draws GD)    ``"adam"``
=====================  ====================================  =========================================

Order inside one step (code): loss gradient -> projection (encoder: ``P g``; jacobian: off the
row space at ``delta_t``) -> ``+ drift_penalty * grad(drift)`` (unprojected) -> optimiser ->
re-projection of ``delta`` (encoder + ``reproject_delta``) -> budget clip -> correction steps (each
re-projected/clipped). Jacobian mode never re-projects ``delta`` (its constraint is linearised at
``delta_t``).
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrecover import checkpoint as ckpt
from jaxrecover import metrics as M
from jaxrecover import projections as proj
from jaxrecover._pytree import pytree_dataclass
from jaxrecover.interventions import AddDelta, compose
from jaxrecover.objectives import Readout
from jaxrecover.sae import encode_features
from jaxrecover.sites import Site
from jaxrecover.transformer import embed, run_blocks, run_to, unembed

CONSTRAINTS = ("encoder", "jacobian", "none")
OPTIMIZERS = ("adam", "sgd")
SELECTS = ("final", "drift_constrained")
DRIFT_LOSSES = ("relative_mse", "relative_l2")

_MSG_ENCODER_SITE = (
    "constraint='encoder' projects onto the null space of the encoder of the clamp AT the delta site "
    "{site}, but the problem has no clamp there (clamp sites: {sites}). Use constraint='jacobian' for a "
    "delta below the clamp site."
)
_MSG_CLAMP_KEYS = "clamps keys {got} do not match problem.clamp_sites {want}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """Static solver settings (hashable). Defaults follow the paper; see the module table."""

    steps: int = 100
    lr: float = 0.1
    optimizer: str = "adam"
    budget: float = 20.0
    budget_per: str = "example"
    constraint: str = "encoder"
    projector: str = "pinv"
    ridge: float = 1e-4
    reproject_delta: bool = True
    jacobian: str = "exact"
    probes: int = 8
    drift_probe: bool = True
    drift_penalty: float = 0.0
    drift_loss: str = "relative_mse"
    correction_steps: int = 0
    correction_lr: float = 0.05
    select: str = "final"
    select_threshold: float = 0.03
    select_penalty: float = 80.0
    select_every: int = 10
    early_stop: bool = False
    eta: float = 0.0
    seed: int = 0
    steps_per_chunk: int = 50
    checkpoint_every: int = 1  # in chunks

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("budget_per", self.budget_per, proj.BUDGET_PER),
            ("constraint", self.constraint, CONSTRAINTS),
            ("projector", self.projector, proj.PROJECTOR_METHODS),
            ("jacobian", self.jacobian, proj.JACOBIAN_METHODS),
            ("select", self.select, SELECTS),
            ("drift_loss", self.drift_loss, DRIFT_LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"RecoveryConfig.{name}={value!r}; expected one of {allowed}.")
        if self.steps < 0 or self.steps_per_chunk <= 0 or self.select_every <= 0:
            raise ValueError("RecoveryConfig: steps >= 0, steps_per_chunk > 0 and select_every > 0 required.")

    def replace(self, **changes: Any) -> "RecoveryConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class RecoveryProblem:
    """Static shape of a recovery problem.

    ``delta_site``: where ``delta`` is added; ``clamp_sites``: the keys of the ``clamps`` mapping passed
    to ``solve``; ``readout``: ``"logits"`` or ``"resid"`` (then ``readout_site``, post-hook value;
    later blocks are not run).
    """

    delta_site: Site
    clamp_sites: tuple[Site, ...]
    readout: str = "logits"
    readout_site: Site | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delta_site", Site.parse(self.delta_site))
        object.__setattr__(self, "clamp_sites", tuple(sorted(Site.parse(s) for s in self.clamp_sites)))
        if self.readout not in ("logits", "resid"):
            raise ValueError(f"readout must be 'logits' or 'resid', got {self.readout!r}.")
        if self.readout == "resid":
            if self.readout_site is None:
                raise ValueError("readout='resid' needs readout_site.")
            object.__setattr__(self, "readout_site", Site.parse(self.readout_site))

    @property
    def measure_sites(self) -> tuple[Site, ...]:
        """Clamp sites that ``delta`` can influence (at or after the delta site)."""
        return tuple(s for s in self.clamp_sites if s.order >= self.delta_site.order)


@pytree_dataclass
class Example:
    """One example (see module docstring); batch by stacking every leaf on a leading axis."""

    tokens: Any  # [n_var, seq] int32
    valid: Any  # [n_var, seq] bool
    delta_slots: Any  # [rows] int32, -1 = unused
    measure_mask: Any  # [seq] bool
    target: Any


@pytree_dataclass
class Context:
    """Per-example constants computed once by ``init``."""

    prefix: Any  # [n_var, seq, d] residual entering block delta_site.layer
    z_ref: Any  # tuple over measure sites of [n_var, seq, k] (delta = 0)
    mask: Any  # [n_var, seq] measured positions
    h_def_rows: Any  # [rows, d] defended residual at the delta rows (variant 0)
    basis: Any  # [d, k] encoder-null basis (zeros [d, 1] when unused)
    base_objective: Any
    base_success: Any
    clamped_objective: Any
    clamped_success: Any


@pytree_dataclass
class SolverState:
    """Everything the step loop carries (and checkpoints)."""

    step: Any  # int32 []
    delta: Any  # [rows, d] float32
    opt_state: Any
    done: Any  # bool [] (early stop)
    steps_to_success: Any  # int32 [], -1 = never
    best_delta: Any
    best_feasible: Any
    best_score: Any
    best_step: Any
    key: Any  # uint32[2] raw PRNG key


@pytree_dataclass
class RecoveryResult:
    """The selected ``delta`` and everything measured about it (scalars unless noted)."""

    delta: Any  # [rows, d]
    objective: Any
    success: Any
    steps_to_success: Any
    selected_step: Any
    base_objective: Any
    base_success: Any
    clamped_objective: Any
    clamped_success: Any
    metrics: Any  # dict[str, scalar] (metrics.feature_metrics + delta_metrics)
    trace: Any = None  # dict[str, [steps]] (objective, success, drift_rel, delta_norm)


class Solver(NamedTuple):
    """Pure pieces of one solver. ``solve = finish . advance(steps) . init``."""

    init: Callable[..., tuple[Context, SolverState]]
    advance: Callable[..., tuple[SolverState, dict]]
    finish: Callable[..., RecoveryResult]
    solve: Callable[..., RecoveryResult]
    problem: RecoveryProblem
    cfg: RecoveryConfig


def _identity(x: jax.Array, slots: jax.Array) -> jax.Array:
    return x


def _drift_loss(kind: str, phi: tuple, z_ref: tuple, mask: jax.Array) -> jax.Array:
    """Code's drift losses: relative_mse = mean over sites of mean(dz^2) / (mean(z_ref^2) + 1e-6);
    relative_l2 = sum(dz^2) / (sum(z_ref^2) + 1e-6). Means over measured entries."""
    terms, num, den = [], 0.0, 0.0
    for z, r in zip(phi, z_ref, strict=True):
        m = jnp.broadcast_to(mask[:, :, None], z.shape).astype(z.dtype)
        n = jnp.maximum(jnp.sum(m), 1.0)
        d2, r2 = jnp.sum(m * jnp.square(z - r)), jnp.sum(m * jnp.square(r))
        terms.append((d2 / n) / (r2 / n + 1e-6))
        num, den = num + d2, den + r2
    if kind == "relative_mse":
        return sum(terms) / len(terms)
    return num / (den + 1e-6)


def _rel_drift(phi: tuple, z_ref: tuple, mask: jax.Array) -> jax.Array:
    m = mask[:, :, None]
    d2 = sum(jnp.sum(jnp.where(m, jnp.square(z - r), 0.0)) for z, r in zip(phi, z_ref, strict=True))
    r2 = sum(jnp.sum(jnp.where(m, jnp.square(r), 0.0)) for r in z_ref)
    return jnp.sqrt(d2) / (jnp.sqrt(r2) + M.EPS)


def make_solver(
    problem: RecoveryProblem,
    cfg: RecoveryConfig,
    objective: Callable[[Readout, Any], jax.Array],
    success: Callable[[Readout, Any], jax.Array],
) -> Solver:
    """Build the pure solver pieces for ``problem`` (see module docstring).

    Args:
        problem: static sites and readout.
        cfg: solver settings.
        objective: ``objective(out: Readout, target) -> scalar`` (higher is better).
        success: ``success(out: Readout, target) -> bool`` (task-specific "recovered").
    """
    site = problem.delta_site
    measure = problem.measure_sites
    if cfg.constraint == "encoder" and site not in problem.clamp_sites:
        raise ValueError(_MSG_ENCODER_SITE.format(site=site, sites=[str(s) for s in problem.clamp_sites]))
    if cfg.constraint == "jacobian" and not measure:
        raise ValueError("constraint='jacobian' needs at least one clamp site at or after the delta site.")
    reproject = cfg.constraint == "encoder" and cfg.reproject_delta
    base_opt = optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.sgd(cfg.lr)

    def check(clamps: Mapping[Site, Any]) -> dict[Site, Any]:
        clamps = {Site.parse(k): v for k, v in clamps.items()}
        if tuple(sorted(clamps)) != problem.clamp_sites:
            raise ValueError(_MSG_CLAMP_KEYS.format(got=sorted(map(str, clamps)), want=list(map(str, problem.clamp_sites))))
        return clamps

    def post(basis: jax.Array) -> Callable[[jax.Array], jax.Array]:
        """Post-step map on delta: re-projection (encoder, reproject on) then the budget clip."""
        P = proj.EncoderNullProjector(basis)

        def fn(delta: jax.Array) -> jax.Array:
            if reproject:
                delta = proj.apply(P, delta)
            return proj.clip_l2(delta, cfg.budget, per=cfg.budget_per)

        return fn

    def tx(basis: jax.Array) -> optax.GradientTransformation:
        return optax.chain(base_opt, proj.projected_params(post(basis)))

    # ------------------------------------------------------------------ forward passes

    def hooks_with(clamps: dict, delta: jax.Array | None, slots: jax.Array) -> dict:
        hooks: dict = dict(clamps)
        if delta is not None:
            add = AddDelta(delta, slots)
            hooks[site] = compose(clamps[site], add) if site in clamps else add
        return hooks

    def stop_layer(n_layers: int, with_readout: bool) -> int:
        """Blocks past the last measured site (and the readout site) are not run."""
        if with_readout and problem.readout == "logits":
            return n_layers
        layers = [s.layer + 1 for s in measure]
        if with_readout:
            layers.append(problem.readout_site.layer + 1)
        return max(layers, default=site.layer + 1)

    def forward(model, ex: Example, clamps: dict, prefix: jax.Array, delta: jax.Array, with_readout: bool = True):
        """``(Readout, Phi)`` for all variants with ``delta`` added (clamps on)."""
        hooks = hooks_with(clamps, delta, ex.delta_slots)
        stop = stop_layer(model.cfg.n_layers, with_readout)
        capture = tuple(measure)
        if with_readout and problem.readout == "resid":
            capture = capture + (problem.readout_site,)

        def one(x, valid):
            slots = jnp.arange(x.shape[0], dtype=jnp.int32)
            h, cap = run_blocks(model, x, site.layer, stop, hooks, valid=valid, capture=capture)
            phi = tuple(
                encode_features(clamps[s].sae, (hooks[s](cap[s], slots) if s == site else cap[s]), clamps[s].features)
                for s in measure
            )
            logits = resid = None
            if with_readout and problem.readout == "logits":
                logits = unembed(model, h)
            elif with_readout:
                rs = problem.readout_site
                resid = hooks.get(rs, _identity)(cap[rs], slots)
            return Readout(logits=logits, resid=resid), phi

        return jax.vmap(one)(prefix, ex.valid)

    def base_readout(model, ex: Example) -> Readout:
        """The unclamped model (no hooks at all)."""

        def one(tokens, valid):
            x = embed(model, tokens, valid)
            if problem.readout == "logits":
                h, _ = run_blocks(model, x, 0, model.cfg.n_layers, valid=valid)
                return Readout(logits=unembed(model, h))
            rs = problem.readout_site
            _, cap = run_blocks(model, x, 0, rs.layer + 1, valid=valid, capture=(rs,))
            return Readout(resid=cap[rs])

        return jax.vmap(one)(ex.tokens, ex.valid)

    # ------------------------------------------------------------------ init / step / finish

    def init(model, ex: Example, clamps: Mapping[Site, Any]) -> tuple[Context, SolverState]:
        clamps = check(clamps)
        below = {s: c for s, c in clamps.items() if s.layer < site.layer}
        prefix = jax.vmap(lambda t, v: run_to(model, t, site.layer, below, valid=v))(ex.tokens, ex.valid)
        rows, d = ex.delta_slots.shape[0], prefix.shape[-1]
        zero = jnp.zeros((rows, d), jnp.float32)
        out0, z_ref = forward(model, ex, clamps, prefix, zero)
        mask = ex.measure_mask[None, :] & ex.valid
        # defended residual at the delta site = its hook applied with delta = 0
        hooks = hooks_with(clamps, zero, ex.delta_slots)
        _, cap = run_blocks(model, prefix[0], site.layer, site.layer + 1, hooks, valid=ex.valid[0], capture=(site,))
        slots = jnp.arange(prefix.shape[1], dtype=jnp.int32)
        h_def = clamps[site](cap[site], slots) if site in clamps else cap[site]
        h_def_rows = h_def[jnp.clip(ex.delta_slots, 0, h_def.shape[0] - 1)]
        if cfg.constraint == "encoder":
            c = clamps[site]
            basis = proj.encoder_null_projector(c.sae, c.features, method=cfg.projector, ridge=cfg.ridge).basis
        else:
            basis = jnp.zeros((d, 1), jnp.float32)
        base = base_readout(model, ex)
        ctx = Context(
            prefix=prefix, z_ref=z_ref, mask=mask, h_def_rows=h_def_rows, basis=basis,
            base_objective=objective(base, ex.target), base_success=success(base, ex.target),
            clamped_objective=objective(out0, ex.target), clamped_success=success(out0, ex.target),
        )
        state = SolverState(
            step=jnp.zeros((), jnp.int32), delta=zero, opt_state=tx(basis).init(zero), done=jnp.zeros((), bool),
            steps_to_success=jnp.full((), -1, jnp.int32), best_delta=zero, best_feasible=jnp.zeros((), bool),
            best_score=jnp.full((), -jnp.inf, jnp.float32), best_step=jnp.full((), -1, jnp.int32),
            key=jax.random.PRNGKey(cfg.seed),
        )
        return ctx, state

    def consider(state: SolverState, delta, obj, drift, t, now) -> SolverState:
        """Drift-constrained selection: feasible (drift <= threshold) beats infeasible; then score."""
        feasible = drift <= cfg.select_threshold
        score = jnp.where(feasible, obj, obj - cfg.select_penalty * drift).astype(jnp.float32)
        better = (feasible & ~state.best_feasible) | ((feasible == state.best_feasible) & (score > state.best_score))
        take = now & better
        return dataclasses.replace(
            state,
            best_delta=jnp.where(take, delta, state.best_delta),
            best_feasible=jnp.where(take, feasible, state.best_feasible),
            best_score=jnp.where(take, score, state.best_score),
            best_step=jnp.where(take, t, state.best_step),
        )

    def step(model, ex: Example, clamps: dict, ctx: Context, state: SolverState):
        t, delta = state.step, state.delta

        def f(dl):
            out, phi = forward(model, ex, clamps, ctx.prefix, dl)
            return (objective(out, ex.target), phi), success(out, ex.target)

        (obj, phi), vjp, ok = jax.vjp(f, delta, has_aux=True)
        zphi = jax.tree.map(jnp.zeros_like, phi)
        g = vjp((-jnp.ones_like(obj), zphi))[0]  # gradient of the loss = -objective
        if cfg.constraint == "encoder":
            g = proj.apply(proj.EncoderNullProjector(ctx.basis), g)
        elif cfg.constraint == "jacobian":
            mphi = tuple(jnp.where(ctx.mask[:, :, None], z, 0.0) for z in phi)
            mref = tuple(jnp.where(ctx.mask[:, :, None], z, 0.0) for z in ctx.z_ref)
            basis = proj.jacobian_basis(
                # masked entries get zero cotangents: they never constrain delta
                lambda c: vjp((jnp.zeros_like(obj), tuple(jnp.where(ctx.mask[:, :, None], x, 0.0) for x in c)))[0],
                mphi, method=cfg.jacobian, key=jax.random.fold_in(state.key, t), probes=cfg.probes,
                phi_ref=mref, drift_probe=cfg.drift_probe,
            )
            g = proj.project_off(basis, g)
        if cfg.drift_penalty:
            dphi = jax.grad(lambda p: _drift_loss(cfg.drift_loss, p, ctx.z_ref, ctx.mask))(phi)
            g = g + cfg.drift_penalty * vjp((jnp.zeros_like(obj), dphi))[0]
        drift = _rel_drift(phi, ctx.z_ref, ctx.mask)

        # optax computes `b ** count` (float ** int32): not allowed under strict dtype promotion
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx(ctx.basis).update(g, state.opt_state, delta)
        new = optax.apply_updates(delta, updates)
        if cfg.correction_steps:
            fix = post(ctx.basis)

            def drift_of(dl):
                _, p = forward(model, ex, clamps, ctx.prefix, dl, with_readout=False)
                return _drift_loss(cfg.drift_loss, p, ctx.z_ref, ctx.mask)

            def correct(dl, _):
                return fix(dl - cfg.correction_lr * jax.grad(drift_of)(dl)), None

            new, _ = jax.lax.scan(correct, new, None, length=cfg.correction_steps)

        done = state.done | (ok & cfg.early_stop)
        keep = lambda a, b: jnp.where(done, a, b)  # noqa: E731 - frozen once successful
        state = consider(state, delta, obj, drift, t, (t % cfg.select_every) == 0)
        trace = {"objective": obj, "success": ok, "drift_rel": drift, "delta_norm": jnp.sqrt(jnp.sum(jnp.square(delta)))}
        state = dataclasses.replace(
            state,
            step=t + 1,
            delta=keep(delta, new),
            opt_state=jax.tree.map(keep, state.opt_state, opt_state),
            done=done,
            steps_to_success=jnp.where((state.steps_to_success < 0) & ok, t, state.steps_to_success),
        )
        return state, trace

    def advance(model, ex: Example, clamps: Mapping[Site, Any], ctx: Context, state: SolverState, n: int):
        """Run ``n`` steps (``lax.scan``); returns the new state and per-step traces ``[n]``."""
        clamps = check(clamps)
        return jax.lax.scan(lambda s, _: step(model, ex, clamps, ctx, s), state, None, length=n)

    def finish(model, ex: Example, clamps: Mapping[Site, Any], ctx: Context, state: SolverState) -> RecoveryResult:
        """Evaluate the final delta, apply the selection rule, and measure the selected delta."""
        clamps = check(clamps)

        def evaluate(dl):
            out, phi = forward(model, ex, clamps, ctx.prefix, dl)
            return objective(out, ex.target), success(out, ex.target), phi

        t = state.step
        obj, ok, phi = evaluate(state.delta)
        steps_to_success = jnp.where((state.steps_to_success < 0) & ok, t, state.steps_to_success)
        chosen, chosen_step = state.delta, t
        if cfg.select == "drift_constrained":
            st = consider(state, state.delta, obj, _rel_drift(phi, ctx.z_ref, ctx.mask), t, jnp.ones((), bool))
            chosen, chosen_step = st.best_delta, st.best_step
            obj, ok, phi = evaluate(chosen)
        row_mask = ex.delta_slots >= 0
        W = tuple(clamps[s].sae.W_dec[clamps[s].features] for s in measure)
        if measure:
            fm = M.feature_metrics(ctx.z_ref, phi, ctx.mask, W, eta=cfg.eta)
        else:
            fm = {}
        mets = {**fm, **M.delta_metrics(chosen, ctx.h_def_rows, row_mask)}
        return RecoveryResult(
            delta=chosen, objective=obj, success=ok, steps_to_success=steps_to_success, selected_step=chosen_step,
            base_objective=ctx.base_objective, base_success=ctx.base_success,
            clamped_objective=ctx.clamped_objective, clamped_success=ctx.clamped_success, metrics=mets,
        )

    def solve(model, ex: Example, clamps: Mapping[Site, Any]) -> RecoveryResult:
        ctx, state = init(model, ex, clamps)
        state, trace = advance(model, ex, clamps, ctx, state, cfg.steps)
        return dataclasses.replace(finish(model, ex, clamps, ctx, state), trace=trace)

    return Solver(init=init, advance=advance, finish=finish, solve=solve, problem=problem, cfg=cfg)


def make_recover(
    problem: RecoveryProblem,
    cfg: RecoveryConfig,
    objective: Callable[[Readout, Any], jax.Array],
    success: Callable[[Readout, Any], jax.Array],
) -> Callable[..., RecoveryResult]:
    """``solve(model, example, clamps) -> RecoveryResult``: pure, one example, all steps in one scan.

    >>> solve = make_recover(RecoveryProblem(Site(1), (Site(1),)), RecoveryConfig(budget=8.0), choice_margin, choice_success)
    >>> res = jax.jit(solve)(model, example, {Site(1): clamp})
    >>> batch = jax.jit(jax.vmap(solve, in_axes=(None, 0, None)))(model, examples, {Site(1): clamp})
    """
    return make_solver(problem, cfg, objective, success).solve


# ----------------------------------------------------------------------------- batching and sharding


def _n(tree: Any) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _pad(tree: Any, size: int) -> Any:
    """Pad the leading axis to ``size`` by repeating the last entry (dropped after the run)."""
    n = _n(tree)
    if n == size:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], size - n, axis=0)], axis=0), tree)


def _shard(tree: Any) -> Any:
    """Put the leading (example) axis across ``jax.devices()`` (jaxrecover.sharding when present)."""
    try:
        from jaxrecover.sharding import shard_batch  # noqa: PLC0415 - optional sibling module
    except ImportError:
        shard_batch = None
    if shard_batch is not None:
        return shard_batch(tree)
    devices = jax.devices()
    if len(devices) == 1 or _n(tree) % len(devices):
        return tree
    mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    return jax.device_put(tree, sharding)


@functools.lru_cache(maxsize=64)
def _batched(solver: Solver, what: str, n: int = 0) -> Callable:
    """Jitted ``vmap`` of one solver piece over examples (cached: one compile per shape bucket)."""
    if what == "init":
        return jax.jit(jax.vmap(solver.init, in_axes=(None, 0, None)))
    if what == "advance":
        return jax.jit(jax.vmap(lambda m, e, c, x, s: solver.advance(m, e, c, x, s, n), in_axes=(None, 0, None, 0, 0)))
    if what == "finish":
        return jax.jit(jax.vmap(solver.finish, in_axes=(None, 0, None, 0, 0)))
    return jax.jit(jax.vmap(solver.solve, in_axes=(None, 0, None)))


def solve_batch(solver: Solver, model: Any, examples: Example, clamps: Mapping[Site, Any]) -> RecoveryResult:
    """``vmap(solve)`` over stacked ``examples`` with the example axis sharded over ``jax.devices()``
    (padded to a multiple of the device count, padding dropped from the result)."""
    n = _n(examples)
    n_dev = len(jax.devices())
    padded = _shard(_pad(examples, -(-n // n_dev) * n_dev))
    res = _batched(solver, "solve")(model, padded, clamps)
    return jax.tree.map(lambda a: a[:n], res)


# ----------------------------------------------------------------------------- resumable runs


def _to_py(x: Any) -> Any:
    x = np.asarray(x)
    v = x.item() if x.ndim == 0 else x.tolist()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def result_records(res: RecoveryResult, start: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """Per-example JSON-able records from a batched ``RecoveryResult`` (no delta, no trace)."""
    n = _n(res.objective) if n is None else n
    out = []
    for i in range(n):
        m = {k: _to_py(v[i]) for k, v in res.metrics.items()}
        rec = {
            "index": start + i,
            "recovered": bool(res.success[i]),
            "clamp_flipped": bool(res.base_success[i]) and not bool(res.clamped_success[i]),
            "base_success": bool(res.base_success[i]),
            "clamped_success": bool(res.clamped_success[i]),
            "steps_to_success": int(res.steps_to_success[i]),
            "selected_step": int(res.selected_step[i]),
            "base_objective": _to_py(res.base_objective[i]),
            "clamped_objective": _to_py(res.clamped_objective[i]),
            "final_objective": _to_py(res.objective[i]),
            **m,
        }
        if "no_reactivation" in m:
            rec["zero_reactivation"] = rec["recovered"] and bool(m["no_reactivation"])
        out.append(rec)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_recovery(
    solver: Solver,
    model: Any,
    examples: Example,
    clamps: Mapping[Site, Any],
    out_dir: str | os.PathLike,
    *,
    run_id: str = "recovery",
    batch_size: int = 8,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    stop_after_chunks: int | None = None,
) -> dict[str, Any] | None:
    """Run ``solver`` over stacked ``examples`` in batches, checkpointing, and write results.

    Writes ``{out_dir}/{run_id}.jsonl`` (one record per example, ``result_records``) and
    ``{out_dir}/{run_id}_summary.json`` (``metrics.summarize`` + config + ``meta``). Each batch is
    checkpointed with orbax every ``cfg.checkpoint_every`` chunks of ``cfg.steps_per_chunk`` steps and
    its records are written atomically when done; a rerun after a kill at any point skips finished
    batches, restores the latest checkpoint of the current one and continues, giving identical
    results (the solver is deterministic and chunk boundaries do not move).
    ``stop_after_chunks`` simulates a kill (returns None after that many chunks).

    Returns:
        The summary dict (or None when stopped early).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - only needed for long runs

    cfg = solver.cfg
    out = Path(out_dir)
    rec_dir = out / "records" / run_id
    rec_dir.mkdir(parents=True, exist_ok=True)
    n_total = _n(examples)
    n_dev = len(jax.devices())
    bs = -(-min(batch_size, n_total) // n_dev) * n_dev
    chunks_run = 0
    bar = tqdm(total=n_total * cfg.steps, disable=not progress, desc=run_id)
    for b, start in enumerate(range(0, n_total, bs)):
        rec_file = rec_dir / f"batch{b:05d}.jsonl"
        n_real = min(bs, n_total - start)
        if rec_file.exists():
            bar.update(n_real * cfg.steps)
            continue
        batch = _shard(_pad(jax.tree.map(lambda a: a[start : start + n_real], examples), bs))
        ctx, state = _batched(solver, "init")(model, batch, clamps)
        mngr = ckpt.open_manager(out / "checkpoints", f"{run_id}/batch{b:05d}")
        restored = ckpt.restore_state(mngr, state)
        done_steps = 0
        if restored is not None:
            done_steps, state = restored
        bar.update(n_real * done_steps)
        n_chunks = 0
        while done_steps < cfg.steps:
            n = min(cfg.steps_per_chunk, cfg.steps - done_steps)
            state, _ = _batched(solver, "advance", n)(model, batch, clamps, ctx, state)
            done_steps += n
            n_chunks += 1
            chunks_run += 1
            bar.update(n_real * n)
            if n_chunks % cfg.checkpoint_every == 0 or done_steps == cfg.steps:
                ckpt.save_state(mngr, done_steps, state)
            if stop_after_chunks is not None and chunks_run >= stop_after_chunks:
                mngr.close()
                bar.close()
                return None
        res = _batched(solver, "finish")(model, batch, clamps, ctx, state)
        recs = result_records(res, start, n_real)
        _write_atomic(rec_file, "".join(json.dumps(r) + "\n" for r in recs))
        mngr.close()
    bar.close()
    records = []
    for f in sorted(rec_dir.glob("batch*.jsonl")):
        records.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line)
    records.sort(key=lambda r: r["index"])
    _write_atomic(out / f"{run_id}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "run_id": run_id,
        "config": dataclasses.asdict(cfg),
        "problem": {"delta_site": str(solver.problem.delta_site),
                    "clamp_sites": [str(s) for s in solver.problem.clamp_sites],
                    "readout": solver.problem.readout},
        "meta": dict(meta or {}),
        "all": M.summarize(records),
        "valid_flips": M.summarize([r for r in records if r["clamp_flipped"]]),
    }
    _write_atomic(out / f"{run_id}_summary.json", json.dumps(summary, indent=2))
    return summary
