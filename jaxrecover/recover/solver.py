"""The recovery solver: optimise an additive residual perturbation ``delta`` with the SAE clamps
ACTIVE in every forward pass, so that the suppressed behaviour comes back without (to first order)
moving the defended features. Shaped like an optimistix solver over an optax transform:
``init -> step* -> finish``, written for ONE example (batch with ``jax.vmap``; ``runner`` does
batching, sharding, checkpoints and records).

- ``Solver(problem, cfg, objective, success)`` is a frozen, hashable spec. ``init(solver, model,
  example, clamps, window)`` runs the prefix and the reference pass once; ``step`` is one projected
  update; ``advance`` runs ``n`` steps in ``lax.scan``; ``finish`` evaluates and measures the selected
  ``delta``; ``solve`` chains them (one compile per shape).
- ``example`` (``Example``): ``tokens [n_var, seq]``, ``valid [n_var, seq]``, ``delta_slots [rows]``
  (raw slots of the padded sequence; -1 = unused row), ``measure_mask [seq]`` (where drift is
  measured), ``target`` (objective pytree), optionally ``budget []`` (this example's L2 budget
  instead of ``cfg.budget``). All ``n_var`` variants share one ``delta``.
- ``clamps``: ``{Site: Clamp}``; every clamp acts in EVERY pass (prefix, optimisation, evaluation).
  At the delta site ``h_rec = h_def + delta`` (paper). Clamp sites at or after the delta site are
  *measured*: ``Phi`` = their clamped latents ``z_S``, read from ``h_def + delta`` at the delta site
  and from the pre-clamp residual at a downstream clamp site.

What a step recomputes (``Window``, static): nothing below the delta layer (the prefix residual is
computed once), and with ``window.cut > 0`` no slot before ``cut`` either: causal attention means
``delta`` (whose rows sit at slots ``>= cut``) cannot change them, so ``init`` caches their keys and
values at every block from the delta layer on and each step runs only slots ``cut..seq`` against that
cache. Logits are unembedded only from ``window.read`` on (the slots the objective reads; targets are
windowed with ``objectives.window_target``). ``plan_window`` picks the largest exact window for a
batch; ``FULL`` (``cut = read = 0``) is the full recompute path, kept for comparison.

Constraints are strategy objects (``Unconstrained``, ``EncoderNull``, ``JacobianNull``); the
optimiser is any ``optax.GradientTransformation`` (``"adam"`` / ``"sgd"`` are shorthands with
``cfg.lr``). Order inside one step (authors' code): loss gradient -> constraint projection ->
``+ drift_penalty * grad(drift)`` (unprojected) -> optimiser -> post map (encoder re-projection of
``delta`` when on, then the L2 budget clip) -> correction steps. A non-finite objective, gradient or
update freezes that example's ``delta`` and marks it ``non_finite``: it is never a success.

Paper vs authors' code (paper-notes 1.6-1.7, 6); the DEFAULT is the paper:

=====================  ====================================  =========================================
field                  paper (default)                       authors' code
=====================  ====================================  =========================================
``EncoderNull``:
``projector``          ``"pinv"`` exact projector            ``"ridge"`` (1e-4)
``reproject``          True: delta stays in the null space   False: only the gradient is projected
``JacobianNull``:
``method``             ``"exact"`` row space of J            ``"sketch"``: 8 probes + drift probe
``RecoveryConfig``:
``drift_penalty``      0                                     200 (refusal), unprojected gradient
``correction_steps``   0                                     5 steps of GD on the drift (lr 0.05)
``select``             ``"final"``                           ``"drift_constrained"`` (0.03 / 80)
``optimizer``          ``"adam"`` (code; Fig. 1 draws GD)    ``"adam"``
=====================  ====================================  =========================================
"""

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Shaped

from jaxrecover.recover import metrics as M
from jaxrecover.recover import objectives as O
from jaxrecover.recover import projections as proj
from jaxrecover.core.pytree import pytree_dataclass
from jaxrecover.sae.clamp import AddDelta, compose
from jaxrecover.recover.objectives import Readout
from jaxrecover.sae.autoencoder import encode_features
from jaxrecover.core.sites import Site
from jaxrecover.model.transformer import (KV, SPLIT_MAX_BYTES, SeqInfo, embed, run_layers, run_to, seq_info,
                                          split_blocks, split_pays, unembed)

CONSTRAINTS = ("encoder", "jacobian", "none")
OPTIMIZERS = ("adam", "sgd")
SELECTS = ("final", "drift_constrained")
DRIFT_LOSSES = ("relative_mse", "relative_l2")
COMPUTE_DTYPES = ("float32", "bfloat16")

_MSG_ENCODER_SITE = (
    "constraint='encoder' projects onto the null space of the encoder of the clamp AT the delta site "
    "{site}, but the problem has no clamp there (clamp sites: {sites}). Use constraint='jacobian' for a "
    "delta below the clamp site."
)
_MSG_CLAMP_KEYS = "clamps keys {got} do not match problem.clamp_sites {want}."


# ----------------------------------------------------------------------------- constraints


def _check_fields(owner: str, checks: tuple[tuple[str, Any, bool | np.bool_, str], ...]) -> None:
    for name, value, ok, why in checks:
        if not ok:
            raise ValueError(f"{owner}.{name}={value!r}: {why}.")


@dataclasses.dataclass(frozen=True)
class Unconstrained:
    """No projection (the paper's "no projection" ablation and baseline)."""

    name: ClassVar[str] = "none"
    needs_phi: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class EncoderNull:
    """Single layer: project onto the null space of ``W_enc[:, S]^T`` of the clamp AT the delta site,
    so the clamped features' pre-activations cannot move. ``projector``: ``"pinv"`` (paper) or
    ``"ridge"`` (code); ``reproject``: also re-project ``delta`` after each step (paper)."""

    projector: str = "pinv"
    ridge: float = 1e-4
    reproject: bool = True
    name: ClassVar[str] = "encoder"
    needs_phi: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_fields("EncoderNull", (
            ("projector", self.projector, self.projector in proj.PROJECTOR_METHODS, f"expected one of {proj.PROJECTOR_METHODS}"),
            ("ridge", self.ridge, bool(np.isfinite(self.ridge)) and self.ridge > 0, "must be a finite number > 0"),
        ))


@dataclasses.dataclass(frozen=True)
class JacobianNull:
    """Cross layer: project the gradient off the row space of ``J = dPhi/d delta`` at ``delta_t``
    (``method="exact"``: every row, paper; ``"sketch"``: ``probes`` random rows + the drift direction,
    authors' code).

    Both differentiate a pass that stops at the last measured site (``Phi`` alone, not the objective).
    ``"exact"`` takes one VJP per measured entry whose latent is nonzero (at most ``n_var x (seq -
    cut) x sum_k``; masked entries and latents at 0 have zero rows and are skipped), ``chunk`` at a
    time, orthonormalised as they come (``projections.exact_jacobian_basis``): its memory is
    ``chunk`` backward passes of those blocks plus the basis (about the size of ``J``), per example
    under ``vmap``, and its time is ``ceil(n_active / chunk)`` chunks (the largest ``n_active`` of a
    vmapped batch). The projection does not depend on ``chunk``."""

    method: str = "exact"
    probes: int = 8
    drift_probe: bool = True
    chunk: int = proj.JACOBIAN_CHUNK  # exact: VJPs per lax.map iteration (a memory knob only)
    name: ClassVar[str] = "jacobian"
    needs_phi: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_fields("JacobianNull", (
            ("method", self.method, self.method in proj.JACOBIAN_METHODS, f"expected one of {proj.JACOBIAN_METHODS}"),
            ("probes", self.probes, isinstance(self.probes, int) and self.probes > 0, "must be an int > 0"),
            ("chunk", self.chunk, isinstance(self.chunk, int) and self.chunk > 0, "must be an int > 0"),
        ))


Constraint = Unconstrained | EncoderNull | JacobianNull
STRATEGIES: Mapping[str, type] = MappingProxyType({c.name: c for c in (EncoderNull, JacobianNull, Unconstrained)})


def constraint_named(name: str) -> Constraint:
    """The strategy a name stands for, with its defaults (the paper's): ``"encoder"``, ``"jacobian"``, ``"none"``."""
    if name not in STRATEGIES:
        raise ValueError(f"constraint {name!r}; expected one of {CONSTRAINTS} (or an EncoderNull / JacobianNull / "
                         "Unconstrained object, which carries its own settings).")
    return STRATEGIES[name]()


# ----------------------------------------------------------------------------- static spec


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """Static solver settings (hashable). Defaults follow the paper; see the module table.

    ``constraint`` is a strategy object, which carries its own settings (``EncoderNull(projector,
    ridge, reproject)``, ``JacobianNull(method, probes, drift_probe, chunk)``, ``Unconstrained()``); a
    name (``"encoder"``, ``"jacobian"``, ``"none"``) is shorthand for that strategy with the paper's
    defaults and is replaced by the object. ``optimizer`` is an ``optax.GradientTransformation`` or
    ``"adam"`` / ``"sgd"`` with ``lr``. ``prefix_cache=False`` forces the full recompute path.
    ``compute_dtype="bfloat16"`` runs the transformer in bf16 (losses, projections and norms stay
    float32). How a run is chunked, checkpointed and batched is the runner's (``batch``), not this.
    """

    steps: int = 100
    lr: float = 0.1
    optimizer: Any = "adam"
    budget: float = 20.0
    budget_per: str = "example"
    constraint: Constraint | str = EncoderNull()  # a name becomes its strategy object in __post_init__
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
    prefix_cache: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if isinstance(self.constraint, str):
            object.__setattr__(self, "constraint", constraint_named(self.constraint))
        elif not isinstance(self.constraint, (EncoderNull, JacobianNull, Unconstrained)):
            raise ValueError(f"RecoveryConfig.constraint={self.constraint!r}; expected one of {CONSTRAINTS} or a "
                             "strategy object (EncoderNull, JacobianNull, Unconstrained).")
        choices = [
            ("budget_per", self.budget_per, proj.BUDGET_PER),
            ("select", self.select, SELECTS),
            ("drift_loss", self.drift_loss, DRIFT_LOSSES),
            ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
        ]
        if isinstance(self.optimizer, str):
            choices.append(("optimizer", self.optimizer, OPTIMIZERS))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"RecoveryConfig.{name}={value!r}; expected one of {allowed}.")
        _check_fields("RecoveryConfig", (
            ("steps", self.steps, self.steps >= 0, "must be >= 0"),
            ("select_every", self.select_every, self.select_every > 0, "must be > 0"),
            ("lr", self.lr, np.isfinite(self.lr) and self.lr > 0, "must be a finite number > 0"),
            ("budget", self.budget, not np.isnan(self.budget) and self.budget >= 0, "must be a number >= 0"),
            ("drift_penalty", self.drift_penalty, np.isfinite(self.drift_penalty) and self.drift_penalty >= 0,
             "must be finite and >= 0"),
            ("correction_steps", self.correction_steps, self.correction_steps >= 0, "must be >= 0"),
        ))

    def replace(self, **changes: Any) -> "RecoveryConfig":
        return dataclasses.replace(self, **changes)

    @property
    def optimizer_tx(self) -> optax.GradientTransformation:
        if not isinstance(self.optimizer, str):
            return self.optimizer
        return optax.adam(self.lr) if self.optimizer == "adam" else optax.sgd(self.lr)


@dataclasses.dataclass(frozen=True)
class RecoveryProblem:
    """Static shape of a recovery problem.

    ``delta_site``: where ``delta`` is added; ``clamp_sites``: the keys of the ``clamps`` mapping;
    ``readout``: ``"logits"`` or ``"resid"`` (then ``readout_site``, post-hook value; later blocks are
    not run).
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


@dataclasses.dataclass(frozen=True)
class Window:
    """Static slot window of a step: run slots ``cut..seq`` against cached keys/values of the slots
    before ``cut``; unembed slots ``read..seq`` (``read >= cut``). ``Window()`` is the full path."""

    cut: int = 0
    read: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.cut <= self.read:
            raise ValueError(f"Window needs 0 <= cut <= read, got cut={self.cut}, read={self.read}.")


FULL = Window()


@dataclasses.dataclass(frozen=True)
class Solver:
    """A recovery solver: hashable, so it can key compile caches and be a static argument."""

    problem: RecoveryProblem
    cfg: RecoveryConfig
    objective: Callable[[Readout, Any], jax.Array]
    success: Callable[[Readout, Any], jax.Array]

    def __post_init__(self) -> None:
        c = self.cfg.constraint
        site, measure = self.problem.delta_site, self.problem.measure_sites
        if isinstance(c, EncoderNull) and site not in self.problem.clamp_sites:
            raise ValueError(_MSG_ENCODER_SITE.format(site=site, sites=[str(s) for s in self.problem.clamp_sites]))
        if isinstance(c, JacobianNull) and not measure:
            raise ValueError("constraint='jacobian' needs at least one clamp site at or after the delta site.")

    def init(self, model, ex, clamps, window: Window = FULL):
        return init(self, model, ex, clamps, window)

    def advance(self, model, ex, clamps, ctx, state, n: int, window: Window = FULL):
        return advance(self, model, ex, clamps, ctx, state, n, window)

    def finish(self, model, ex, clamps, ctx, state, window: Window = FULL):
        return finish(self, model, ex, clamps, ctx, state, window)

    def solve(self, model, ex, clamps, window: Window = FULL):
        return solve(self, model, ex, clamps, window)

    @property
    def needs_phi(self) -> bool:
        """Whether a step needs the measured features (constraint, penalty, corrections, selection)."""
        cfg = self.cfg
        return (cfg.constraint.needs_phi or cfg.drift_penalty > 0 or cfg.correction_steps > 0
                or cfg.select == "drift_constrained")


def make_solver(problem: RecoveryProblem, cfg: RecoveryConfig, objective: Callable, success: Callable) -> Solver:
    """The solver for ``problem``: ``objective(out: Readout, target) -> scalar`` (higher is better),
    ``success(out, target) -> bool`` (the task's "recovered")."""
    return Solver(problem, cfg, objective, success)


# ----------------------------------------------------------------------------- pytrees


@pytree_dataclass
class Example:
    """One example (see module docstring); batch by stacking every leaf on a leading axis."""

    tokens: Int[ArrayLike, "*batch n_var seq"]
    valid: Bool[ArrayLike, "*batch n_var seq"]
    delta_slots: Int[ArrayLike, "*batch rows"]  # -1 = unused row
    measure_mask: Bool[ArrayLike, "*batch seq"]
    target: Any  # an objectives target pytree (Continuation, LogitDiffTarget, ...)
    # this example's L2 budget for delta, so one batch can hold a grid of budgets
    # (``suite.run_solver_budgets``); None: ``cfg.budget`` for every example
    budget: Float[ArrayLike, "*batch"] | float | None = None


@pytree_dataclass
class Context:
    """Per-example constants computed once by ``init``."""

    prefix: Float[ArrayLike, "*batch n_var seq d"]  # residual entering block delta_site.layer
    kv_k: Float[ArrayLike, "*batch n_var layers seq n_kv d_head"] | None  # from the delta layer on (None: full path)
    kv_v: Float[ArrayLike, "*batch n_var layers seq n_kv d_head"] | None
    readout_resid: Float[ArrayLike, "*batch n_var seq d"] | None  # at delta = 0 (resid readout only)
    z_ref: tuple[Float[ArrayLike, "*batch n_var seq _k"], ...]  # per measure site (delta = 0)
    mask: Bool[ArrayLike, "*batch n_var seq"]  # measured positions
    h_def_rows: Float[ArrayLike, "*batch rows d"]  # defended residual at the delta rows (variant 0)
    basis: Float[ArrayLike, "*batch d _b"]  # encoder-null basis (zeros [d, 1] when unused)
    base_objective: Float[ArrayLike, "*batch"]
    base_success: Bool[ArrayLike, "*batch"]
    clamped_objective: Float[ArrayLike, "*batch"]
    clamped_success: Bool[ArrayLike, "*batch"]


@pytree_dataclass
class SolverState:
    """Everything the step loop carries (and checkpoints)."""

    step: Int[ArrayLike, "*batch"]
    delta: Float[ArrayLike, "*batch rows d"]
    opt_state: Any  # the optax state
    done: Bool[ArrayLike, "*batch"]  # early stop or non-finite
    non_finite: Bool[ArrayLike, "*batch"]  # a non-finite objective, gradient or update was met (delta frozen)
    steps_to_success: Int[ArrayLike, "*batch"]  # -1 = never
    best_delta: Float[ArrayLike, "*batch rows d"]
    best_feasible: Bool[ArrayLike, "*batch"]
    best_score: Float[ArrayLike, "*batch"]
    best_step: Int[ArrayLike, "*batch"]
    key: Shaped[ArrayLike, "*batch 2"]  # raw uint32 PRNG key


@pytree_dataclass
class RecoveryResult:
    """The selected ``delta`` and everything measured about it (scalars unless noted)."""

    delta: Float[ArrayLike, "*batch rows d"]
    objective: Float[ArrayLike, "*batch"]
    success: Bool[ArrayLike, "*batch"]  # False whenever non_finite
    non_finite: Bool[ArrayLike, "*batch"]
    steps_to_success: Int[ArrayLike, "*batch"]  # -1 = never
    selected_step: Int[ArrayLike, "*batch"]
    base_objective: Float[ArrayLike, "*batch"]
    base_success: Bool[ArrayLike, "*batch"]
    clamped_objective: Float[ArrayLike, "*batch"]
    clamped_success: Bool[ArrayLike, "*batch"]
    metrics: dict[str, Any]  # name -> [*batch] (metrics.feature_metrics + delta_metrics)
    trace: dict[str, Any] | None = None  # name -> [*batch, steps] (objective, success, drift_rel, delta_norm)


# ----------------------------------------------------------------------------- windows


def plan_window(solver: Solver, examples: Example) -> Window:
    """The largest exact window for a (host, concrete) batch of examples: ``cut`` = first delta slot,
    ``read`` = first slot the objective reads (``objectives.first_read_slot``); ``FULL`` when
    ``cfg.prefix_cache`` is off."""
    if not solver.cfg.prefix_cache:
        return FULL
    slots = np.asarray(examples.delta_slots)
    used = slots[slots >= 0]
    cut = int(used.min()) if used.size else 0
    if solver.problem.readout == "resid":
        return Window(cut=cut, read=cut)
    read = O.first_read_slot(examples.target)
    cut = min(cut, read)
    return Window(cut=cut, read=read)


# ----------------------------------------------------------------------------- forward passes


def _identity(x: jax.Array, slots: jax.Array) -> jax.Array:
    return x


def _check(problem: RecoveryProblem, clamps: Mapping[Site, Any]) -> dict[Site, Any]:
    clamps = {Site.parse(k): v for k, v in clamps.items()}
    if tuple(sorted(clamps)) != problem.clamp_sites:
        raise ValueError(_MSG_CLAMP_KEYS.format(got=sorted(map(str, clamps)), want=list(map(str, problem.clamp_sites))))
    return clamps


def _hooks(problem: RecoveryProblem, clamps: dict, delta: jax.Array, slots: jax.Array) -> dict:
    site = problem.delta_site
    hooks: dict = dict(clamps)
    add = AddDelta(delta, slots)
    hooks[site] = compose(clamps[site], add) if site in clamps else add
    return hooks


def _stop_layer(problem: RecoveryProblem, n_layers: int, with_readout: bool) -> int:
    """Blocks past the last measured site (and the readout site) are not run."""
    if with_readout and problem.readout == "logits":
        return n_layers
    layers = [s.layer + 1 for s in problem.measure_sites]
    if with_readout:
        layers.append(problem.readout_site.layer + 1)
    return max(layers, default=problem.delta_site.layer + 1)


def _in_dtype(model: Any, dtype: str) -> Any:
    """The model with its float weights cast to the compute dtype (a no-op for float32 models)."""
    want = jnp.dtype(dtype)
    cast = lambda a: a.astype(want) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != want else a
    cfg = dataclasses.replace(model.cfg, dtype=dtype) if model.cfg.dtype != dtype else model.cfg
    return dataclasses.replace(jax.tree.map(cast, model), cfg=cfg)


def _forward(solver: Solver, model, ex: Example, clamps: dict, ctx: Context, delta, window: Window, *,
             readout: bool = True, phi: bool = True, layers: tuple | None = None):
    """``(Readout, Phi)`` for all variants with ``delta`` added (clamps on), over slots
    ``window.cut..seq`` (logits from ``window.read``); ``Phi`` per measured site over those slots."""
    problem = solver.problem
    site, measure, cut = problem.delta_site, problem.measure_sites, window.cut
    hooks = _hooks(problem, clamps, delta, ex.delta_slots)
    stop = _stop_layer(problem, model.cfg.n_layers, readout)
    capture = measure if phi else ()
    if readout and problem.readout == "resid":
        capture = capture + (problem.readout_site,)

    def one(x, valid, k, v, resid0):
        full = seq_info(valid)
        info = SeqInfo(slots=full.slots[cut:], positions=full.positions[cut:], valid=valid[cut:])
        kv = None if cut == 0 else KV(k=k, v=v, positions=full.positions, valid=valid)
        out = run_layers(model, x[cut:], site.layer, stop, hooks, info=info, kv=kv, capture=capture, layers=layers)
        cap = out.captured
        phis = tuple(
            encode_features(clamps[s].sae, hooks[s](cap[s], info.slots) if s == site else cap[s], clamps[s].features)
            for s in (measure if phi else ())
        )
        if readout and problem.readout == "logits":
            return Readout(logits=unembed(model, out.x[window.read - cut :])), phis
        if readout:
            r = hooks.get(problem.readout_site, _identity)(cap[problem.readout_site], info.slots)
            return Readout(resid=r if cut == 0 else jnp.concatenate([resid0[:cut], r])), phis
        return Readout(), phis

    return jax.vmap(one)(ctx.prefix, ex.valid, ctx.kv_k, ctx.kv_v, ctx.readout_resid)


def _base_readout(problem: RecoveryProblem, model, ex: Example, read: int = 0) -> Readout:
    """The unclamped model (no hooks at all); logits from slot ``read`` on."""

    def one(tokens, valid):
        x = embed(model, tokens, valid)
        if problem.readout == "logits":
            h = run_layers(model, x, 0, model.cfg.n_layers, info=seq_info(valid)).x
            return Readout(logits=unembed(model, h[read:]))
        rs = problem.readout_site
        out = run_layers(model, x, 0, rs.layer + 1, info=seq_info(valid), capture=(rs,))
        return Readout(resid=out.captured[rs])

    return jax.vmap(one)(ex.tokens, ex.valid)


def _target(solver: Solver, ex: Example, window: Window) -> Any:
    return O.window_target(ex.target, window.read) if solver.problem.readout == "logits" else ex.target


# ----------------------------------------------------------------------------- drift


def _sq_sums(phi: tuple, z_ref: tuple, mask: jax.Array, cut: int) -> tuple[list, list, list]:
    """Per site: sum of squared drift over slots ``cut..`` (slots before ``cut`` cannot drift), and
    the sum of squared reference latents and count of measured entries over ALL slots."""
    d2, r2, n = [], [], []
    for z, r in zip(phi, z_ref, strict=True):
        m = jnp.broadcast_to(mask[:, :, None], r.shape)
        d2.append(jnp.sum(jnp.where(m[:, cut:], jnp.square(z - r[:, cut:]), 0.0)))
        r2.append(jnp.sum(jnp.where(m, jnp.square(r), 0.0)))
        n.append(jnp.maximum(jnp.sum(m.astype(jnp.float32)), 1.0))
    return d2, r2, n


def _drift_loss(kind: str, phi: tuple, z_ref: tuple, mask: jax.Array, cut: int) -> jax.Array:
    """Code's drift losses: relative_mse = mean over sites of mean(dz^2) / (mean(z_ref^2) + 1e-6);
    relative_l2 = sum(dz^2) / (sum(z_ref^2) + 1e-6). Means over measured entries."""
    d2, r2, n = _sq_sums(phi, z_ref, mask, cut)
    if kind == "relative_mse":
        return sum((a / c) / (b / c + 1e-6) for a, b, c in zip(d2, r2, n)) / len(d2)
    return sum(d2) / (sum(r2) + 1e-6)


def _rel_drift(phi: tuple, z_ref: tuple, mask: jax.Array, cut: int) -> jax.Array:
    d2, r2, _ = _sq_sums(phi, z_ref, mask, cut)
    return jnp.sqrt(sum(d2)) / (jnp.sqrt(sum(r2)) + M.EPS)


# ----------------------------------------------------------------------------- init / step / finish


def _post(solver: Solver, basis: jax.Array, budget: Any = None) -> Callable[[jax.Array], jax.Array]:
    """Post-step map on delta: re-projection (encoder, reproject on) then the budget clip, at the
    example's own ``budget`` (``Example.budget``) when it carries one, else ``cfg.budget``."""
    c, cfg = solver.cfg.constraint, solver.cfg
    P = proj.EncoderNullProjector(basis)
    radius = cfg.budget if budget is None else budget

    def fn(delta: jax.Array) -> jax.Array:
        if isinstance(c, EncoderNull) and c.reproject:
            delta = proj.apply(P, delta)
        return proj.clip_l2(delta, radius, per=cfg.budget_per)

    return fn


def _tx(solver: Solver, basis: jax.Array, budget: Any = None) -> optax.GradientTransformation:
    return optax.chain(solver.cfg.optimizer_tx, proj.projected_params(_post(solver, basis, budget)))


def init(solver: Solver, model, ex: Example, clamps: Mapping[Site, Any], window: Window = FULL) -> tuple[Context, SolverState]:
    """The prefix below the delta layer, and ONE pass from there with ``delta = 0`` that gives the
    reference features, the defended residual at the delta rows, the clamped readout and (for
    ``window.cut > 0``) the keys/values of every slot at every block from the delta layer on."""
    problem, cfg = solver.problem, solver.cfg
    model = _in_dtype(model, cfg.compute_dtype)
    clamps = _check(problem, clamps)
    site, measure = problem.delta_site, problem.measure_sites
    if isinstance(cfg.constraint, EncoderNull):  # shapes are static: raised while tracing, before any pass
        proj.check_encoder_null_space(clamps[site].sae.W_enc.shape[0], clamps[site].features.shape[-1])
    below = {s: c for s, c in clamps.items() if s.layer < site.layer}
    prefix = jax.vmap(lambda t, v: run_to(model, t, site.layer, below, valid=v))(ex.tokens, ex.valid)
    rows, d = ex.delta_slots.shape[0], prefix.shape[-1]
    zero = jnp.zeros((rows, d), jnp.float32)
    hooks = _hooks(problem, clamps, zero, ex.delta_slots)
    stop = _stop_layer(problem, model.cfg.n_layers, True)
    capture = tuple(dict.fromkeys((*measure, site) + ((problem.readout_site,) if problem.readout == "resid" else ())))

    def one(x, valid):
        info = seq_info(valid)
        out = run_layers(model, x, site.layer, stop, hooks, info=info, capture=capture)
        cap = out.captured
        at_site = {s: (hooks[s](cap[s], info.slots) if s == site else cap[s]) for s in measure}
        z = tuple(encode_features(clamps[s].sae, at_site[s], clamps[s].features) for s in measure)
        h_def = hooks[site](cap[site], info.slots) if site in clamps else cap[site]
        if problem.readout == "logits":
            read, resid0 = Readout(logits=unembed(model, out.x[window.read :])), None
        else:
            resid0 = hooks.get(problem.readout_site, _identity)(cap[problem.readout_site], info.slots)
            read = Readout(resid=resid0)
        return out.k, out.v, z, h_def, read, resid0

    k, v, z_ref, h_def, out0, resid0 = jax.vmap(one)(prefix, ex.valid)
    h_def = h_def[0]
    h_def_rows = h_def[jnp.clip(ex.delta_slots, 0, h_def.shape[0] - 1)]
    c = cfg.constraint
    if isinstance(c, EncoderNull):
        cl = clamps[site]
        basis = proj.encoder_null_projector(cl.sae, cl.features, method=c.projector, ridge=c.ridge).basis
    else:
        basis = jnp.zeros((d, 1), jnp.float32)
    base = _base_readout(problem, model, ex, window.read if problem.readout == "logits" else 0)
    target = _target(solver, ex, window)
    ctx = Context(
        prefix=prefix, kv_k=k if window.cut else None, kv_v=v if window.cut else None, readout_resid=resid0,
        z_ref=z_ref, mask=ex.measure_mask[None, :] & ex.valid, h_def_rows=h_def_rows.astype(jnp.float32), basis=basis,
        base_objective=solver.objective(base, target), base_success=solver.success(base, target),
        clamped_objective=solver.objective(out0, target), clamped_success=solver.success(out0, target),
    )
    state = SolverState(
        step=jnp.zeros((), jnp.int32), delta=zero, opt_state=_tx(solver, basis).init(zero), done=jnp.zeros((), bool),
        non_finite=jnp.zeros((), bool), steps_to_success=jnp.full((), -1, jnp.int32), best_delta=zero,
        best_feasible=jnp.zeros((), bool), best_score=jnp.full((), -jnp.inf, jnp.float32),
        best_step=jnp.full((), -1, jnp.int32), key=jax.random.PRNGKey(cfg.seed),
    )
    return ctx, state


def _consider(cfg: RecoveryConfig, state: SolverState, delta, obj, drift, t, now) -> SolverState:
    """Drift-constrained selection: feasible (drift <= threshold) beats infeasible; then score."""
    feasible = drift <= cfg.select_threshold
    score = jnp.where(feasible, obj, obj - cfg.select_penalty * drift).astype(jnp.float32)
    better = (feasible & ~state.best_feasible) | ((feasible == state.best_feasible) & (score > state.best_score))
    take = now & better & jnp.isfinite(score)
    return dataclasses.replace(
        state,
        best_delta=jnp.where(take, delta, state.best_delta),
        best_feasible=jnp.where(take, feasible, state.best_feasible),
        best_score=jnp.where(take, score, state.best_score),
        best_step=jnp.where(take, t, state.best_step),
    )


def _project_grad(solver: Solver, g, phi_vjp: Callable | None, phi, ctx: Context, key, window: Window):
    """The constraint's projection of the loss gradient at ``delta_t``; ``phi_vjp`` is the VJP of
    ``delta -> Phi`` alone (a pass that stops at the last measured site)."""
    c, cut = solver.cfg.constraint, window.cut
    if isinstance(c, EncoderNull):
        return proj.apply(proj.EncoderNullProjector(ctx.basis), g)
    if not isinstance(c, JacobianNull):
        return g
    m = ctx.mask[:, :, None]
    if c.method == "sketch":
        # probes are drawn over ALL slots (as the full path does) and the rows before ``cut`` are
        # dropped: they have zero Jacobian, so cached and full paths give the same basis
        mphi = tuple(jnp.where(m, jnp.concatenate([r[:, :cut], z], axis=1), 0.0) for z, r in zip(phi, ctx.z_ref))
        mref = tuple(jnp.where(m, r, 0.0) for r in ctx.z_ref)

        def vjp_fn(cot):
            return phi_vjp(tuple(jnp.where(m, x, 0.0)[:, cut:] for x in cot))[0]
        active = None
    else:
        ms = m[:, cut:]
        mphi, mref = tuple(jnp.where(ms, z, 0.0) for z in phi), None
        # rows that are exactly zero are skipped: masked entries, and latents at 0 (ReLU, JumpReLU and
        # TopK latents have derivative 0 wherever they are 0); ``phi`` comes from the same pass as
        # ``phi_vjp``, so a latent and its row agree on being zero
        active = tuple(ms & (z != 0) for z in phi)

        def vjp_fn(cot):  # masked entries get zero cotangents: they never constrain delta
            return phi_vjp(tuple(jnp.where(ms, x, 0.0) for x in cot))[0]

    basis = proj.jacobian_basis(vjp_fn, mphi, method=c.method, key=key, probes=c.probes, phi_ref=mref,
                                drift_probe=c.drift_probe, chunk=c.chunk, active=active)
    return proj.project_off(basis, g)


def _all_finite(*trees: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(trees)]))


def step(solver: Solver, model, ex: Example, clamps: dict, ctx: Context, state: SolverState, window: Window = FULL):
    """One projected update of ``delta`` (see the module docstring for the order)."""
    return _step(solver, model, ex, clamps, ctx, state, window, None)


_SPLIT_MAX_BYTES = SPLIT_MAX_BYTES  # a module attribute, so a test can force the stacked path


def _window_layers(solver: Solver, model) -> tuple | None:
    """The blocks a step runs (delta layer to the last one), sliced ONCE for the whole step loop
    (``run_layers(layers=)``) where ``transformer.split_pays``; otherwise ``None`` (the stacked weights)."""
    start, stop = solver.problem.delta_site.layer, model.cfg.n_layers
    return split_blocks(model, start, stop) if split_pays(model, start, stop, _SPLIT_MAX_BYTES) else None


def _step(solver: Solver, model, ex: Example, clamps: dict, ctx: Context, state: SolverState, window: Window,
          layers: tuple | None):
    cfg = solver.cfg
    t, delta = state.step, state.delta
    need_phi = solver.needs_phi
    target = _target(solver, ex, window)

    def f(dl):
        out, phi = _forward(solver, model, ex, clamps, ctx, dl, window, phi=need_phi, layers=layers)
        return (solver.objective(out, target), phi), solver.success(out, target)

    (obj, phi), vjp, ok = jax.vjp(f, delta, has_aux=True)
    g = vjp((-jnp.ones_like(obj), jax.tree.map(jnp.zeros_like, phi)))[0]  # gradient of the loss = -objective
    if isinstance(cfg.constraint, JacobianNull):
        # J's rows are VJPs of Phi ALONE: differentiating the whole objective pass (all blocks and
        # the unembedding, with a zero cotangent on the objective) would cost a full backward per row
        phi_j, phi_vjp = jax.vjp(
            lambda dl: _forward(solver, model, ex, clamps, ctx, dl, window, readout=False, layers=layers)[1], delta)
        g = _project_grad(solver, g, phi_vjp, phi_j, ctx, jax.random.fold_in(state.key, t), window)
    else:
        g = _project_grad(solver, g, None, phi, ctx, state.key, window)
    if cfg.drift_penalty:
        dphi = jax.grad(lambda p: _drift_loss(cfg.drift_loss, p, ctx.z_ref, ctx.mask, window.cut))(phi)
        g = g + cfg.drift_penalty * vjp((jnp.zeros_like(obj), dphi))[0]
    drift = _rel_drift(phi, ctx.z_ref, ctx.mask, window.cut) if need_phi else jnp.full((), jnp.nan, jnp.float32)

    # optax computes `b ** count` (float ** int32): not allowed under strict dtype promotion
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = _tx(solver, ctx.basis, ex.budget).update(g, state.opt_state, delta)
    new = optax.apply_updates(delta, updates)
    if cfg.correction_steps:
        fix = _post(solver, ctx.basis, ex.budget)

        def drift_of(dl):
            _, p = _forward(solver, model, ex, clamps, ctx, dl, window, readout=False, layers=layers)
            return _drift_loss(cfg.drift_loss, p, ctx.z_ref, ctx.mask, window.cut)

        def correct(dl, _):
            return fix(dl - cfg.correction_lr * jax.grad(drift_of)(dl)), None

        new, _ = jax.lax.scan(correct, new, None, length=cfg.correction_steps)

    bad = state.non_finite | ~_all_finite(obj, g, new)
    ok = ok & ~bad
    done = state.done | (ok & cfg.early_stop) | bad
    keep = lambda a, b: jnp.where(done, a, b)
    if cfg.select == "drift_constrained":
        state = _consider(cfg, state, delta, obj, drift, t, ((t % cfg.select_every) == 0) & ~bad)
    trace = {"objective": obj, "success": ok, "drift_rel": drift, "delta_norm": jnp.sqrt(jnp.sum(jnp.square(delta)))}
    state = dataclasses.replace(
        state,
        step=t + 1,
        delta=keep(delta, new),
        opt_state=jax.tree.map(keep, state.opt_state, opt_state),
        done=done,
        non_finite=bad,
        steps_to_success=jnp.where((state.steps_to_success < 0) & ok, t, state.steps_to_success),
    )
    return state, trace


def advance(solver: Solver, model, ex: Example, clamps: Mapping[Site, Any], ctx: Context, state: SolverState, n: int,
            window: Window = FULL):
    """Run ``n`` steps (``lax.scan``); returns the new state and per-step traces ``[n]``."""
    model = _in_dtype(model, solver.cfg.compute_dtype)
    clamps = _check(solver.problem, clamps)
    layers = _window_layers(solver, model)  # outside the scan: sliced once per call, not once per step
    return jax.lax.scan(lambda s, _: _step(solver, model, ex, clamps, ctx, s, window, layers), state, None, length=n)


def finish(solver: Solver, model, ex: Example, clamps: Mapping[Site, Any], ctx: Context, state: SolverState,
           window: Window = FULL) -> RecoveryResult:
    """Evaluate the final delta (on the step's window: the slots before ``cut`` read back their
    reference features exactly), apply the selection rule, and measure the selected delta (every
    metric is computed here once, never inside the step loop)."""
    problem, cfg = solver.problem, solver.cfg
    model = _in_dtype(model, cfg.compute_dtype)
    clamps = _check(problem, clamps)
    measure = problem.measure_sites
    target = _target(solver, ex, window)

    def evaluate(dl):
        out, phi = _forward(solver, model, ex, clamps, ctx, dl, window)
        phi = tuple(jnp.concatenate([r[:, : window.cut], z], axis=1) for r, z in zip(ctx.z_ref, phi, strict=True))
        return solver.objective(out, target), solver.success(out, target), phi

    t = state.step
    obj, ok, phi = evaluate(state.delta)
    chosen, chosen_step = state.delta, t
    if cfg.select == "drift_constrained":
        st = _consider(cfg, state, state.delta, obj, _rel_drift(phi, ctx.z_ref, ctx.mask, 0), t, ~state.non_finite)
        chosen, chosen_step = st.best_delta, st.best_step
        obj, ok, phi = evaluate(chosen)
    bad = state.non_finite | ~_all_finite(obj, chosen)
    ok = ok & ~bad
    steps_to_success = jnp.where((state.steps_to_success < 0) & ok, t, state.steps_to_success)
    row_mask = ex.delta_slots >= 0
    W = tuple(clamps[s].sae.W_dec[clamps[s].features] for s in measure)
    fm = M.feature_metrics(ctx.z_ref, phi, ctx.mask, W, eta=cfg.eta) if measure else {}
    mets = {**fm, **M.delta_metrics(chosen, ctx.h_def_rows, row_mask)}
    return RecoveryResult(
        delta=chosen, objective=obj, success=ok, non_finite=bad, steps_to_success=steps_to_success,
        selected_step=chosen_step, base_objective=ctx.base_objective, base_success=ctx.base_success,
        clamped_objective=ctx.clamped_objective, clamped_success=ctx.clamped_success, metrics=mets,
    )


def solve(solver: Solver, model, ex: Example, clamps: Mapping[Site, Any], window: Window = FULL) -> RecoveryResult:
    """``finish . advance(cfg.steps) . init``, with the per-step trace."""
    ctx, state = init(solver, model, ex, clamps, window)
    state, trace = advance(solver, model, ex, clamps, ctx, state, solver.cfg.steps, window)
    return dataclasses.replace(finish(solver, model, ex, clamps, ctx, state, window), trace=trace)


def random_direction(solver: Solver, model, ex: Example, clamps: Mapping[Site, Any], delta: jax.Array,
                     key: jax.Array, ctx: Context | None = None, window: Window = FULL) -> jax.Array:
    """A control for a recovered ``delta``: a Gaussian direction mapped through the SAME constraint
    (encoder-null projector; Jacobian-null projection at ``delta = 0``; none), on the same rows, scaled
    to ``||delta||``. Replayed under the clamp it tells whether recovery needs the optimised direction
    or any perturbation of that size in that subspace. ``ctx``: the ``init`` context of ``window``
    (``plan_window``: the Jacobian's VJPs then run on the window's slots only, as in a step; the
    direction is the same), when the caller has it already."""
    ctx = init(solver, model, ex, clamps, window)[0] if ctx is None else ctx
    rows = (ex.delta_slots >= 0)[:, None]
    g = jnp.where(rows, jax.random.normal(key, delta.shape, jnp.float32), 0.0)
    if isinstance(solver.cfg.constraint, JacobianNull):
        m = _in_dtype(model, solver.cfg.compute_dtype)
        cl = _check(solver.problem, clamps)
        zero = jnp.zeros_like(g)
        phi, phi_vjp = jax.vjp(lambda dl: _forward(solver, m, ex, cl, ctx, dl, window, readout=False)[1], zero)
        g = _project_grad(solver, g, phi_vjp, phi, ctx, key, window)
    else:
        g = _project_grad(solver, g, None, None, ctx, key, window)
    g = jnp.where(rows, g, 0.0)
    norm = jnp.sqrt(jnp.sum(jnp.square(delta.astype(jnp.float32))))
    return g * (norm / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(g))), 1e-30))
