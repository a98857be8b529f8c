"""Recovery speed: jaxrecover against a faithful PyTorch reference, side by side in one run.

Modes (same problem, same weights, same hyper-parameters; see ``benchmarks/README.md``):

- ``jax``            : the jaxrecover engine, ``jit(vmap(solve))`` over the batch; prefix below the
                       delta site computed once per example, all steps in one ``lax.scan``.
- ``torch_loop``     : the paper's loop. One example at a time, HF forward hooks, the FULL forward
                       every step (``benchmarks.torch_reference.recover_per_example``).
- ``torch_batched``  : all examples at once, prefix cached, blocks from the delta layer on only
                       (``recover_batched``); ``--torch-compile`` adds ``torch_compiled`` (inductor).
- ``jax_min_cache`` / ``jax_min_full`` : a minimal JAX loop (gradient, encoder-null projection,
                       Adam, clip; no drift bookkeeping) with the prefix cached vs the full forward
                       recomputed every step: the prefix-caching speed-up.

Reported per (mode, seq, batch): compile (first call minus steady), steady solve time, examples/s,
time per optimisation step of the whole batch ((solve(steps) - solve(0)) / steps), model FLOPs
utilisation, peak memory. Results go to ``benchmarks/results/<device>/`` as JSON, a markdown table
and a PNG plot.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/bench_recovery.py` as well as `python -m benchmarks.bench_recovery`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _timing  # noqa: E402

# ----------------------------------------------------------------------------- models

# Hugging Face configs of the random-weight presets (published sizes; random init, never downloaded).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("LlamaConfig", dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5,
                                 tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "gemma2-2b": ("Gemma2Config", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                       head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                       hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                                       rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=128, max_position_embeddings=8192, rope_theta=500000.0,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)),
}

_MSG_MODEL = "--model {spec!r}: expected 'smollm2', 'random:<preset>' (presets: {presets}) or an HF folder path."


def _cache_root() -> Path:
    return Path(os.environ.get("JAXRECOVER_CACHE", Path.home() / ".cache" / "jaxrecover")).expanduser()


def random_checkpoint(preset: str, dtype: str, seed: int = 0) -> Path:
    """An HF folder with random weights for ``preset``: built with ``transformers`` once, then cached
    under ``<cache>/bench_random/<preset>-<dtype>-s<seed>``. Both frameworks load this same folder."""
    import torch
    import transformers

    if preset not in PRESETS:
        raise ValueError(_MSG_MODEL.format(spec=f"random:{preset}", presets=sorted(PRESETS)))
    folder = _cache_root() / "bench_random" / f"{preset}-{dtype}-s{seed}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    conf_name, kw = PRESETS[preset]
    config = getattr(transformers, conf_name)(**kw)
    torch.manual_seed(seed)
    cls = transformers.Gemma2ForCausalLM if conf_name == "Gemma2Config" else transformers.LlamaForCausalLM
    model = cls(config).to(getattr(torch, dtype))
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
    if folder.exists():  # a half-written folder from an interrupted run
        shutil.rmtree(folder)
    tmp.replace(folder)
    return folder


def resolve_model(spec: str, dtype: str, seed: int) -> Path:
    if spec == "smollm2":
        from jaxrecover.embedded import default_model_dir

        return default_model_dir()
    if spec.startswith("random:"):
        return random_checkpoint(spec.split(":", 1)[1], dtype, seed)
    if Path(spec).is_dir():
        return Path(spec)
    raise ValueError(_MSG_MODEL.format(spec=spec, presets=sorted(PRESETS)))


# ----------------------------------------------------------------------------- FLOPs and peak


def flops_per_example_step(cfg: Any, seq: int, layer: int) -> dict[str, float]:
    """Analytic model FLOPs of one optimisation step for one example.

    A step runs blocks ``layer..n_layers-1`` and the unembedding forward, then back-propagates to the
    delta site WITHOUT weight gradients (weights are frozen): the activation-gradient pass costs about
    one forward. So ``step = 2 * forward_suffix`` with
    ``forward_suffix = sum_l (2 * matmul_params_l * seq + 4 * seq^2 * n_heads * d_head) + 2 * d_model * d_vocab * seq``
    (dense attention scores and values counted in full, as implemented; norms, softmax and the SAE
    clamp, ``O(seq * d_model * k)``, are ignored).
    """
    d, h, kv, dh, m, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab
    attn_params = d * h * dh + 2 * d * kv * dh + h * dh * d
    mlp_params = (3 if cfg.arch != "gpt2" else 2) * d * m
    per_layer = 2 * (attn_params + mlp_params) * seq + 4 * seq * seq * h * dh
    n_suffix = cfg.n_layers - layer
    forward = n_suffix * per_layer + 2 * d * v * seq
    return {"forward_suffix_flops": float(forward), "step_flops": float(2 * forward)}


def measure_peak_tflops(dtype: str, n: int | None = None, repeats: int = 5) -> float:
    """Achieved TFLOP/s of a large square matmul on the default JAX device (the MFU denominator)."""
    dev = jax.devices()[0]
    n = n or (1024 if dev.platform == "cpu" else 8192)
    jdt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jdt)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timing.time_steady(f, a, repeats=repeats).times)
    return 2 * n**3 / best / 1e12


def device_name() -> str:
    """A folder-safe device label: the accelerator kind, or the CPU model plus core count."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        label = dev.device_kind
    else:
        label = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    label = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        label = f"cpu-{label}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


# ----------------------------------------------------------------------------- one problem, both frameworks


@dataclasses.dataclass
class Problem:
    """The same recovery problem for both frameworks."""

    jax_examples: Any  # stacked jaxrecover.recovery.Example
    jax_clamps: dict
    jax_problem: Any
    jax_cfg: Any
    objective: str
    torch_examples: Any
    torch_clamps: dict
    torch_cfg: Any


def random_sae(key: jax.Array, d_in: int, d_sae: int) -> Any:
    """A relu SAE with unit-norm decoder rows and a positive encoder bias (features fire)."""
    from jaxrecover.sae import SAE

    k1, k2 = jax.random.split(key)
    W_enc = jax.random.normal(k1, (d_in, d_sae), jnp.float32) * d_in**-0.5
    W_dec = jax.random.normal(k2, (d_sae, d_in), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    return SAE(W_enc=W_enc, b_enc=jnp.full((d_sae,), 0.1, jnp.float32), W_dec=W_dec, b_dec=jnp.zeros((d_in,), jnp.float32))


def build_problem(
    model: Any,
    *,
    batch: int,
    seq: int,
    objective: str = "logit_diff",
    layer: int,
    point: str = "resid_post",
    steps: int = 10,
    lr: float = 0.05,
    budget: float = 20.0,
    projector: str = "ridge",
    reproject: bool = False,
    n_features: int = 4,
    d_sae: int | None = None,
    rows: int = 2,
    downstream_clamp: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> Problem:
    """Random tokens, a random SAE clamp at ``blocks.{layer}.hook_{point}`` (features set to 0) and,
    with ``downstream_clamp``, a x3 clamp at the last block's ``resid_post``. ``delta`` has ``rows``
    rows at the last ``rows`` slots. Targets per ``objective`` (one variant per example):
    ``logit_diff`` (io vs s at the last slot), ``choice_margin`` (4 choice tokens at the last slot),
    ``continuation_logprob`` (the last 4 next-token targets of the sequence itself)."""
    import torch

    from benchmarks.torch_reference import TorchClamp, TorchExamples, TorchRecoveryConfig, TorchSAE
    from jaxrecover import objectives as O
    from jaxrecover.interventions import Clamp
    from jaxrecover.recovery import Example, RecoveryConfig, RecoveryProblem
    from jaxrecover.sites import Site

    cfg = model.cfg
    rng = np.random.default_rng(seed)
    V, T, B = cfg.d_vocab, seq, batch
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    slots = np.broadcast_to(np.arange(T - rows, T, dtype=np.int32), (B, rows)).copy()
    site = Site(layer, point)
    sae = random_sae(jax.random.PRNGKey(seed), cfg.d_model, d_sae or 4 * cfg.d_model)
    feats = np.sort(rng.choice(sae.d_sae, n_features, replace=False)).astype(np.int32)
    jclamps = {site: Clamp(sae, jnp.asarray(feats), jnp.zeros((n_features,), jnp.float32), mode="set")}
    tsae = TorchSAE.from_jax(sae, device)
    tclamps = {str(site): TorchClamp(sae=tsae, features=torch.from_numpy(feats.astype(np.int64)).to(device),
                                     values=torch.zeros(n_features, device=device), mode="set")}
    if downstream_clamp:
        down = Site(cfg.n_layers - 1, "resid_post")
        if down != site:
            sae2 = random_sae(jax.random.PRNGKey(seed + 1), cfg.d_model, d_sae or 4 * cfg.d_model)
            f2 = np.sort(rng.choice(sae2.d_sae, n_features, replace=False)).astype(np.int32)
            jclamps[down] = Clamp(sae2, jnp.asarray(f2), jnp.full((n_features,), 3.0, jnp.float32), mode="scale")
            tclamps[str(down)] = TorchClamp(sae=TorchSAE.from_jax(sae2, device),
                                            features=torch.from_numpy(f2.astype(np.int64)).to(device),
                                            values=torch.full((n_features,), 3.0, device=device), mode="scale")

    t = lambda a, dt=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dt).to(device)  # noqa: E731
    if objective == "logit_diff":
        io, s = rng.integers(0, V, B), rng.integers(0, V, B)
        jt = O.LogitDiffTarget(slot=jnp.full((B, 1), T - 1, jnp.int32), io=jnp.asarray(io[:, None], jnp.int32),
                               s=jnp.asarray(s[:, None], jnp.int32))
        tt = dict(slot=t(np.full(B, T - 1)), io=t(io), s=t(s))
    elif objective == "choice_margin":
        choices = np.stack([rng.choice(V, 4, replace=False) for _ in range(B)])
        correct = rng.integers(0, 4, B)
        jt = O.ChoiceTarget(slot=jnp.full((B,), T - 1, jnp.int32), choice_ids=jnp.asarray(choices, jnp.int32),
                            correct=jnp.asarray(correct, jnp.int32))
        tt = dict(slot=t(np.full(B, T - 1)), choice_ids=t(choices), correct=t(correct))
    elif objective == "continuation_logprob":
        ids = np.roll(tokens, -1, axis=1)
        weights = np.zeros((B, T), np.float32)
        weights[:, T - 5 : T - 1] = 1.0
        jt = O.Continuation(ids=jnp.asarray(ids[:, None], jnp.int32), weights=jnp.asarray(weights[:, None]))
        tt = dict(ids=t(ids), weights=t(weights, torch.float32))
    else:
        raise ValueError(f"unknown objective {objective!r}")
    jex = Example(tokens=jnp.asarray(tokens[:, None]), valid=jnp.ones((B, 1, T), bool),
                  delta_slots=jnp.asarray(slots), measure_mask=jnp.ones((B, T), bool), target=jt)
    tex = TorchExamples(tokens=t(tokens), delta_slots=t(slots), target=tt)
    jcfg = RecoveryConfig(steps=steps, lr=lr, budget=budget, constraint="encoder", projector=projector,
                          reproject_delta=reproject)
    tcfg = TorchRecoveryConfig(layer=layer, point=point, steps=steps, lr=lr, budget=budget,
                               projection=projector, reproject=reproject, objective=objective)
    return Problem(jex, jclamps, RecoveryProblem(site, tuple(jclamps)), jcfg, objective, tex, tclamps, tcfg)


def jax_task(objective: str) -> Any:
    from jaxrecover import objectives as O

    return {"logit_diff": O.LOGIT_DIFF, "choice_margin": O.CHOICE_MARGIN, "continuation_logprob": O.LOGPROB}[objective]


# ----------------------------------------------------------------------------- solvers under test


def jax_solve_fn(p: Problem, steps: int | None = None) -> Callable:
    """``jit(vmap(solve))`` of the jaxrecover engine for ``p`` (optionally with another step count)."""
    from jaxrecover.recovery import make_recover

    task = jax_task(p.objective)
    cfg = p.jax_cfg if steps is None else p.jax_cfg.replace(steps=steps)
    solve = make_recover(p.jax_problem, cfg, task.objective, task.success)
    return jax.jit(jax.vmap(solve, in_axes=(None, 0, None)))


def jax_minimal_fn(p: Problem, cache_prefix: bool, steps: int | None = None) -> Callable:
    """A minimal recovery loop (value_and_grad, encoder-null projection, Adam, clip, ``lax.scan``).

    ``cache_prefix=True``: ``run_to`` once, ``run_from`` every step (what the engine does).
    ``cache_prefix=False``: the full ``forward`` every step; an ``optimization_barrier`` tying the
    tokens to ``delta`` stops XLA from hoisting the (delta-independent) prefix out of the loop, so
    this is the paper's "full forward every step".
    """
    import optax

    from jaxrecover import projections as proj
    from jaxrecover.interventions import AddDelta, compose
    from jaxrecover.objectives import Readout
    from jaxrecover.transformer import forward, run_from, run_to

    task = jax_task(p.objective)
    site = p.jax_problem.delta_site
    cfg = p.jax_cfg
    n_steps = cfg.steps if steps is None else steps
    clamp = p.jax_clamps[site]
    basis = proj.encoder_null_projector(clamp.sae, clamp.features, method=cfg.projector, ridge=cfg.ridge)
    tx = optax.adam(cfg.lr)

    def one(model: Any, ex: Any, clamps: dict) -> Any:
        tokens, valid = ex.tokens[0], ex.valid[0]
        below = {s: c for s, c in clamps.items() if s.layer < site.layer}
        prefix = run_to(model, tokens, site.layer, below, valid=valid) if cache_prefix else None

        def hooks(delta: Any) -> dict:
            return {**clamps, site: compose(clamps[site], AddDelta(delta, ex.delta_slots))}

        def loss(delta: Any) -> Any:
            if cache_prefix:
                logits = run_from(model, prefix, site.layer, hooks(delta), valid=valid)
            else:
                toks, delta = jax.lax.optimization_barrier((tokens, delta))
                logits = forward(model, toks, hooks(delta), valid=valid)
            return -task.objective(Readout(logits=logits[None]), ex.target)

        def step(carry: Any, _: Any) -> Any:
            delta, state = carry
            value, g = jax.value_and_grad(loss)(delta)
            with jax.numpy_dtype_promotion("standard"):  # optax computes `b1 ** count` (float ** int32)
                updates, state = tx.update(proj.apply(basis, g), state, delta)
            delta = proj.clip_l2(optax.apply_updates(delta, updates), cfg.budget)
            return (delta, state), value

        delta0 = jnp.zeros((ex.delta_slots.shape[0], model.cfg.d_model), jnp.float32)
        (delta, _), losses = jax.lax.scan(step, (delta0, tx.init(delta0)), None, length=n_steps)
        return delta, losses

    return jax.jit(jax.vmap(one, in_axes=(None, 0, None)))


# ----------------------------------------------------------------------------- measuring one cell


def _measure(fn: Callable, args: tuple, repeats: int, compiled: bool) -> dict[str, Any]:
    """First call (compile) and steady time of ``fn(*args)`` with peak memory of the steady calls."""
    out: dict[str, Any] = {}
    if compiled:
        first, _ = _timing.time_compile(fn, *args)
        out["first_call_s"] = first
    _timing.reset_device_peaks()
    with _timing.PeakRSS() as mem:
        steady = _timing.time_steady(fn, *args, repeats=repeats, warmup=0)
    out["steady"] = steady.as_dict()
    out["solve_s"] = steady.median
    out["peak_rss_delta_bytes"] = mem.peak_bytes
    out.update(_timing.device_peak_bytes())
    if compiled:
        out["compile_s"] = max(out["first_call_s"] - steady.median, 0.0)
    return out


def bench_cell(mode: str, jmodel: Any, tmodel: Any, p: Problem, repeats: int, flops: dict[str, float],
               peak_tflops: float) -> dict[str, Any]:
    """Time one mode on one problem: full solve, and the same with 0 steps (overheads)."""
    from benchmarks.torch_reference import recover_batched, recover_per_example

    steps = p.jax_cfg.steps
    B = int(p.jax_examples.tokens.shape[0])
    if mode == "jax":
        full = _measure(jax_solve_fn(p), (jmodel, p.jax_examples, p.jax_clamps), repeats, True)
        zero = _measure(jax_solve_fn(p, steps=0), (jmodel, p.jax_examples, p.jax_clamps), repeats, True)
    elif mode in ("jax_min_cache", "jax_min_full"):
        cache = mode == "jax_min_cache"
        full = _measure(jax_minimal_fn(p, cache), (jmodel, p.jax_examples, p.jax_clamps), repeats, True)
        zero = _measure(jax_minimal_fn(p, cache, steps=0), (jmodel, p.jax_examples, p.jax_clamps), repeats, True)
    elif mode == "torch_loop":
        run = lambda c: recover_per_example(tmodel, p.torch_clamps, p.torch_examples, c)  # noqa: E731
        full = _measure(run, (p.torch_cfg,), repeats, False)
        zero = _measure(run, (dataclasses.replace(p.torch_cfg, steps=0),), repeats, False)
    elif mode in ("torch_batched", "torch_compiled"):
        compile_ = mode == "torch_compiled"
        run = lambda c: recover_batched(tmodel, p.torch_clamps, p.torch_examples, c, compile=compile_)  # noqa: E731
        full = _measure(run, (p.torch_cfg,), repeats, compile_)
        zero = _measure(run, (dataclasses.replace(p.torch_cfg, steps=0),), repeats, compile_)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    step_s = max(full["solve_s"] - zero["solve_s"], 1e-12) / max(steps, 1)
    achieved = flops["step_flops"] * B / step_s
    return {
        **{k: v for k, v in full.items() if k != "steady"},
        "steady_times_s": full["steady"]["times_s"],
        "overhead_s": zero["solve_s"],
        "step_s": step_s,
        "examples_per_s": B / full["solve_s"],
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak_tflops * 1e12),
    }


# ----------------------------------------------------------------------------- outputs


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"# Recovery benchmark: {meta['model']} on {meta['device']}",
        "",
        f"`{meta['command']}`",
        "",
        f"steps={meta['steps']}, delta site {meta['site']}, objective {meta['objective']}, dtype {meta['dtype']}, "
        f"peak {meta['peak_tflops']:.3f} TFLOP/s ({meta['peak_source']}), jax {meta['jax_version']}, "
        f"torch {meta['torch_version']}, {meta['date']}.",
        "",
        "MFU: model FLOPs per step / step time / the matmul rate measured just before the cell "
        "(MFU max: / the best matmul rate of the whole run).",
        "",
        "| mode | seq | batch | compile s | solve s | examples/s | step ms | GFLOP/s | MFU % | MFU max % | peak RSS Δ MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['mode']} | {r['seq']} | {r['batch']} | {_fmt(r.get('compile_s'), '.1f')} | {_fmt(r['solve_s'], '.3f')} "
            f"| {_fmt(r['examples_per_s'], '.3f')} | {_fmt(1e3 * r['step_s'], '.1f')} | {_fmt(1e3 * r['achieved_tflops'], '.1f')} "
            f"| {_fmt(100 * r['mfu'], '.1f')} | {_fmt(100 * r['mfu_vs_max_peak'], '.1f')} "
            f"| {_fmt(r['peak_rss_delta_bytes'] / 2**20, '.0f')} |"
        )
    lines += ["", "Speed-ups (examples/s ratio, same seq and batch):", ""]
    lines += [f"- {k}: {v}" for k, v in report["ratios"].items()]
    lines.append("")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """examples/s ratios per (seq, batch) and their geometric means."""
    by = {(r["mode"], r["seq"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    pairs = [("jax", "torch_loop"), ("jax", "torch_batched"), ("jax", "torch_compiled"),
             ("torch_batched", "torch_loop"), ("jax_min_cache", "jax_min_full")]
    for a, b in pairs:
        vals = {f"seq{s}_b{n}": by[(a, s, n)]["examples_per_s"] / by[(b, s, n)]["examples_per_s"]
                for (m, s, n) in by if m == a and (b, s, n) in by}
        if vals:
            gm = math.exp(sum(math.log(v) for v in vals.values()) / len(vals))
            out[f"{a}/{b}"] = {"geomean": round(gm, 3), **{k: round(v, 3) for k, v in vals.items()}}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for seq in sorted({r["seq"] for r in rows if r["mode"] == mode}):
            rs = sorted((r for r in rows if r["mode"] == mode and r["seq"] == seq), key=lambda r: r["batch"])
            if len(rs) < 1:
                continue
            b = [r["batch"] for r in rs]
            axes[0].plot(b, [r["examples_per_s"] for r in rs], marker="o", label=f"{mode} seq{seq}")
            axes[1].plot(b, [100 * r["mfu"] for r in rs], marker="o", label=f"{mode} seq{seq}")
    for ax, title in zip(axes, ("examples / s (full solve)", "model FLOPs utilisation, %"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (examples)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    meta = report["meta"]
    fig.suptitle(f"recovery: {meta['model']}, {meta['steps']} steps, {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

_EPILOG = """\
what is compared
  jax            jaxrecover engine: jit(vmap(make_recover(...))) over the batch, prefix cached, lax.scan
  torch_loop     the paper's way: Python loop over examples, HF forward hooks, full forward every step
  torch_batched  PyTorch, all examples at once, prefix below the delta layer cached
  torch_compiled torch_batched under torch.compile (only with --torch-compile; slow to compile on CPU)
  jax_min_cache  minimal JAX loop, prefix cached          } their ratio is the prefix-caching
  jax_min_full   minimal JAX loop, full forward each step } speed-up (--no-prefix-ablation skips)

what is reported (per mode, seq, batch)
  compile_s      first call minus steady call (JAX: trace + XLA compile; torch eager: none)
  solve_s        steady wall time of a whole solve of the batch (init + steps + final evaluation)
  examples_per_s batch / solve_s
  step_s         (solve(steps) - solve(0 steps)) / steps: one optimisation step of the whole batch
  mfu            step FLOPs / step_s / peak. Step FLOPs = 2 x forward FLOPs of the blocks from the
                 delta layer on plus the unembedding (activation-only backward, no weight grads),
                 the same useful-work numerator for every mode. Peak = --peak-tflops, else a
                 measured large matmul on the device (an achievable peak, not the datasheet).
  peak memory    CPU: peak RSS above the RSS before the steady calls (sampled in a thread);
                 GPU: jax peak_bytes_in_use and torch.cuda.max_memory_allocated as well.

examples
  CPU, a couple of minutes on 2 cores (the committed CPU result):
    python benchmarks/bench_recovery.py --model random:smollm2-135m --seqs 32,64 --batches 1,2,4,8 --steps 10
  smoke test (seconds):
    python benchmarks/bench_recovery.py --model random:tiny --seqs 16 --batches 1,2 --steps 2 --out /tmp/b
  GPU (H100/H200), real-size random model in bf16:
    python benchmarks/bench_recovery.py --model random:gemma2-2b --dtype bfloat16 \\
        --seqs 32,64,128 --batches 1,2,4,8,16,32,64,128,256 --steps 20 --loop-max-batch 16
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench_recovery.py",
        description="Speed of post-intervention recovery: jaxrecover vs a faithful PyTorch reference "
                    "(per-example hook loop and batched), with compile time, steady step time, "
                    "examples/s, model FLOPs utilisation and peak memory.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="random:smollm2-135m",
                    help="'smollm2' (the embedded SmolLM2-135M-Instruct), 'random:<preset>' with preset in "
                         f"{sorted(PRESETS)} (random weights built by transformers, cached), or an HF folder.")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="model weights/compute dtype in both frameworks (delta and SAE stay float32).")
    ap.add_argument("--seqs", default="32,64", help="comma-separated sequence lengths.")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes (default 1,2,4,8 on CPU; 1,...,256 on GPU).")
    ap.add_argument("--steps", type=int, default=10, help="optimisation steps per solve.")
    ap.add_argument("--layer", type=int, default=None, help="delta/clamp layer (default n_layers // 2).")
    ap.add_argument("--point", default="resid_post", choices=("resid_pre", "resid_post"))
    ap.add_argument("--objective", default="logit_diff", choices=("logit_diff", "choice_margin", "continuation_logprob"))
    ap.add_argument("--modes", default="jax,torch_loop,torch_batched",
                    help="comma-separated modes to time (see below); --torch-compile adds torch_compiled.")
    ap.add_argument("--torch-compile", action="store_true", help="also time torch_batched under torch.compile.")
    ap.add_argument("--no-prefix-ablation", action="store_true", help="skip the jax_min_cache / jax_min_full pair.")
    ap.add_argument("--ablation-batch", type=int, default=None,
                    help="batch size of the prefix-caching ablation (default: the largest batch).")
    ap.add_argument("--loop-max-batch", type=int, default=None,
                    help="skip torch_loop above this batch size (it is linear in the batch).")
    ap.add_argument("--repeats", type=int, default=None, help="steady-state repeats (default 1 on CPU, 3 on GPU).")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU, TFLOP/s (default: measured large matmul in --dtype).")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads for the torch modes (default: torch's choice, one per core). On a "
                         "shared, oversubscribed CPU, OpenMP threads that spin at barriers can make torch several "
                         "times slower; 1 avoids that.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/).")
    ap.add_argument("--name", default=None, help="file stem (default recovery_<model>_<dtype>).")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from benchmarks.torch_reference import load_hf_model
    from jaxrecover.io_hf import load_transformer

    on_gpu = jax.devices()[0].platform != "cpu"
    seqs = [int(s) for s in args.seqs.split(",")]
    default_batches = "1,2,4,8,16,32,64,128,256" if on_gpu else "1,2,4,8"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    repeats = args.repeats or (3 if on_gpu else 1)
    tdev = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    modes = [m for m in args.modes.split(",") if m]
    if args.torch_compile and "torch_compiled" not in modes:
        modes.append("torch_compiled")

    folder = resolve_model(args.model, args.dtype, args.seed)
    jmodel = load_transformer(folder, dtype=args.dtype)
    tmodel = load_hf_model(folder, dtype=getattr(torch, args.dtype), device=tdev)
    cfg = jmodel.cfg
    layer = cfg.n_layers // 2 if args.layer is None else args.layer
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    else:
        peak, peak_source = measure_peak_tflops(args.dtype), "measured matmul, max over the run"
    peaks = [peak]
    print(f"model {args.model} ({folder}), layer {layer}, device {device_name()}, peak {peak:.3f} TFLOP/s",
          file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    ablation_batch = args.ablation_batch or max(batches)
    for seq in seqs:
        flops = flops_per_example_step(cfg, seq, layer)
        for batch in batches:
            cell_modes = list(modes)
            if not args.no_prefix_ablation and batch == ablation_batch:
                cell_modes += ["jax_min_cache", "jax_min_full"]
            p = build_problem(jmodel, batch=batch, seq=seq, objective=args.objective, layer=layer, point=args.point,
                              steps=args.steps, seed=args.seed, device=tdev)
            for mode in cell_modes:
                if mode == "torch_loop" and args.loop_max_batch is not None and batch > args.loop_max_batch:
                    continue
                t0 = time.perf_counter()
                # On a shared machine the achievable matmul rate moves with the load: re-measure it next
                # to each cell, so that the cell's MFU compares like with like.
                cell_peak = peak if args.peak_tflops is not None else measure_peak_tflops(args.dtype)
                peaks.append(cell_peak)
                try:
                    r = bench_cell(mode, jmodel, tmodel, p, repeats, flops, cell_peak)
                    r["cell_peak_tflops"] = cell_peak
                except Exception as err:  # noqa: BLE001 - e.g. torch.compile unavailable: record and go on
                    print(f"  {mode} seq={seq} batch={batch}: FAILED {type(err).__name__}: {err}", file=sys.stderr)
                    rows.append({"mode": mode, "seq": seq, "batch": batch, "error": f"{type(err).__name__}: {err}"})
                    continue
                rows.append({"mode": mode, "seq": seq, "batch": batch, **flops, **r})
                print(f"  {mode:15s} seq={seq:4d} batch={batch:4d}: {r['examples_per_s']:9.3f} ex/s, "
                      f"step {1e3 * r['step_s']:9.2f} ms, MFU {100 * r['mfu']:6.2f}%, "
                      f"compile {r.get('compile_s', 0.0):6.1f}s  ({time.perf_counter() - t0:.0f}s wall)",
                      file=sys.stderr, flush=True)

    ok_rows = [r for r in rows if "error" not in r]
    peak = max(peaks)
    for r in ok_rows:
        r["mfu_vs_max_peak"] = r["achieved_tflops"] / peak
    meta = {
        "command": "python benchmarks/bench_recovery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "model_dir": str(folder),
        "config": dataclasses.asdict(cfg),
        "dtype": args.dtype,
        "site": f"blocks.{layer}.hook_{args.point}",
        "objective": args.objective,
        "steps": args.steps,
        "repeats": repeats,
        "device": device_name(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_device": tdev,
        "torch_threads": torch.get_num_threads(),
        "peak_tflops_measurements": peaks,
        "cpu_count": os.cpu_count(),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "jax_version": jax.__version__,
        "torch_version": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "max_rss_bytes": _timing.max_rss_bytes(),
    }
    report = {"meta": meta, "rows": rows, "ratios": ratios(ok_rows),
              "errors": [r for r in rows if "error" in r]}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_name()
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"recovery_{re.sub(r'[^a-z0-9.]+', '-', args.model.lower())}_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown({**report, "rows": ok_rows}))
    if ok_rows:
        plot({**report, "rows": ok_rows}, out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.md/.png", file=sys.stderr)
    print(json.dumps(report["ratios"], indent=2))
    return report


if __name__ == "__main__":
    main()
