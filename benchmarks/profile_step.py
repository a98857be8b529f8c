"""Where the engine's windowed step goes on the refusal-shaped problem (issue 21, item 2).

One process, on the real SmolLM2 weights and the problem of ``bench_recovery.py --problems refusal``:
for each batch, rounds of (engine step, torch_cached step) interleaved, the minimum over rounds
kept, so both sides see the same machine load. Optionally (``--pieces``) the step's pieces alone
(the 20-block window forward, forward+VJP, the unembedding with its VJP) and the optimised HLO of
one step (``--hlo DIR``), to name the ops where XLA:CPU trails.

    python benchmarks/profile_step.py --batches 1,8 --rounds 3 --pieces --hlo /tmp/hlo

The refusal setup (base answers, features, floor values) is built once and kept in
``/tmp/jaxrecover_refusal_setup.npz`` (``--setup``), so reruns skip the generation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_recovery as BR  # noqa: E402


def load_setup(jmodel, folder: Path, n: int, path: Path) -> BR.RefusalSetup:
    """``bench_recovery.refusal_setup`` for ``n`` examples, cached in ``path`` (the SAE is reloaded)."""
    from jaxrecover.sae.files import load_sae

    sae_dir = ROOT / "sae_weights" / "smollm2-135m-instruct-res" / f"blocks.{BR.REFUSAL_LAYER}.hook_resid_post"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if z["tokens"].shape[0] >= n:
            return BR.RefusalSetup(z["tokens"], load_sae(sae_dir, dtype=jnp.float32), z["features"], z["floor"],
                                   float(z["budget"]), int(z["prompt_len"]), str(z["source"]))
    s = BR.refusal_setup(jmodel, folder, n)
    np.savez(path, tokens=s.tokens, features=s.features, floor=s.floor, budget=s.budget, prompt_len=s.prompt_len,
             source=s.feature_source)
    return s


# engine variants timed side by side: "split" is the engine as it is (the window's blocks sliced once
# per advance call, run unrolled: recovery._window_layers); "stacked" forces the old layer scan that
# slices the stacked weights inside the loop; "before" is the engine before issue 21 (that scan, and
# the attention projections as 3-D einsums)
VARIANTS = ("split", "stacked", "before")


def _einsum_projections():
    """The pre-issue-21 attention projections (3-D einsums), to patch into ``transformer``."""
    from jaxrecover.model import transformer as T

    def proj_in(x, W):
        return jnp.einsum("sd,dhk->shk", x, W)

    def attn_out(p, o):
        y = jnp.einsum("shk,hkd->sd", o, p.W_O)
        return y if p.b_O is None else y + T._like(p.b_O, y)

    return {"_proj_in": proj_in, "attn_out": attn_out}


def engine_step_fn(p: BR.Problem, jmodel, variant: str = "split"):
    """``(advance, args, window)``: the engine's jitted ``advance`` (``steps`` steps) and its arguments."""
    from jaxrecover.recover import solver as R
    from jaxrecover.recover import batch as runner

    from jaxrecover.model import transformer as T

    runner._compiled.cache_clear()
    patches = []
    if variant in ("stacked", "before"):
        patches.append((R, "_window_layers", lambda solver, model: None))
    if variant == "before":
        patches += [(T, name, fn) for name, fn in _einsum_projections().items()]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        return _engine_step_fn(p, jmodel)
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _engine_step_fn(p: BR.Problem, jmodel):
    from jaxrecover.recover import solver as R
    from jaxrecover.recover import batch as runner

    solver = BR.jax_solver(p)
    window = R.plan_window(solver, p.jax_examples)
    args = (jmodel, p.jax_examples, p.jax_clamps)
    ctx, state = jax.block_until_ready(runner.compiled(solver, "init", window)(*args))
    advance = runner.compiled(solver, "advance", window, solver.cfg.steps)
    a = (*args, ctx, state)
    advance.lower(*a)  # trace now (the variant's patch is in place), compile on first call
    return advance, a, window


def time_call(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def torch_step_s(tmodel, p: BR.Problem) -> tuple[float, float]:
    """``(solve(steps) - solve(0)) / steps`` of ``recover_batched(cache=True)`` (bench_recovery's rule),
    in wall and in process CPU seconds."""
    from benchmarks.torch_reference import recover_batched

    run = lambda c: recover_batched(tmodel, p.torch_clamps, p.torch_examples, c, cache=True)  # noqa: E731
    t0, c0 = time.perf_counter(), time.process_time()
    run(dataclasses.replace(p.torch_cfg, steps=0))
    t1, c1 = time.perf_counter(), time.process_time()
    run(p.torch_cfg)
    t2, c2 = time.perf_counter(), time.process_time()
    n = p.torch_cfg.steps
    return ((t2 - t1) - (t1 - t0)) / n, ((c2 - c1) - (c1 - c0)) / n


def pieces(p: BR.Problem, jmodel, rounds: int) -> dict[str, float]:
    """Seconds of the window's pieces for the whole batch: forward (readout + Phi), forward+VJP
    (the step's gradient), and the unembedding of the read slots with its VJP."""
    from jaxrecover.recover import solver as R
    from jaxrecover.recover import batch as runner
    from jaxrecover.model.transformer import unembed

    solver = BR.jax_solver(p)
    window = R.plan_window(solver, p.jax_examples)
    args = (jmodel, p.jax_examples, p.jax_clamps)
    ctx, state = jax.block_until_ready(runner.compiled(solver, "init", window)(*args))
    clamps = R._check(solver.problem, p.jax_clamps)
    ex = p.jax_examples

    def objective(delta):  # the step's pass for the whole batch (vmap over examples, as the runner)
        def one(dl, e, c):
            out, phi = R._forward(solver, jmodel, e, clamps, c, dl, window)
            return solver.objective(out, R._target(solver, e, window)), phi

        obj, phi = jax.vmap(one)(delta, ex, ctx)
        return jnp.sum(obj), phi

    fwd = jax.jit(objective)
    grad = jax.jit(jax.grad(lambda d: objective(d)[0]))
    B, rows = ex.delta_slots.shape
    h = jnp.ones((B, 17, jmodel.cfg.d_model), jnp.float32)
    unemb = jax.jit(lambda h: jnp.sum(jax.vmap(lambda x: unembed(jmodel, x))(h) ** 2))
    unemb_g = jax.jit(jax.grad(lambda h: jnp.sum(jax.vmap(lambda x: unembed(jmodel, x))(h) ** 2)))
    delta = state.delta
    out: dict[str, float] = {}
    for name, fn, a in (("forward", fwd, (delta,)), ("forward+vjp", grad, (delta,)),
                        ("unembed17", unemb, (h,)), ("unembed17+vjp", unemb_g, (h,))):
        jax.block_until_ready(fn(*a))
        out[name] = min(time_call(fn, a) for _ in range(rounds))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--pieces", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"engine variants to time (of {VARIANTS})")
    ap.add_argument("--hlo", default=None, help="folder for the optimised HLO of advance (one file per batch)")
    ap.add_argument("--setup", default="/tmp/jaxrecover_refusal_setup.npz")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    import torch

    from benchmarks.torch_reference import load_hf_model
    from jaxrecover.io.hf import load_transformer

    torch.set_num_threads(args.torch_threads)
    batches = [int(b) for b in args.batches.split(",")]
    folder = BR.resolve_model("smollm2", "float32", 0)
    jmodel = load_transformer(folder, dtype="float32")
    tmodel = None if args.no_torch else load_hf_model(folder, dtype=torch.float32, device="cpu")
    setup = load_setup(jmodel, folder, max(batches), Path(args.setup))
    report: dict = {"cpu": BR.cpu_model(), "load_start": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "batches": {}}
    variants = [v for v in args.variants.split(",") if v]
    for B in batches:
        p = BR.build_refusal_problem(setup, batch=B, steps=args.steps)
        engines, row = {}, {}
        for v in variants:
            advance, a, window = engine_step_fn(p, jmodel, v)
            t0 = time.perf_counter()
            jax.block_until_ready(advance(*a))
            row[f"{v}_first_call_s"] = time.perf_counter() - t0
            engines[v] = (advance, a)
            if args.hlo:
                Path(args.hlo).mkdir(parents=True, exist_ok=True)
                (Path(args.hlo) / f"advance_{v}_b{B}.txt").write_text(advance.lower(*a).compile().as_text())
        row["window"] = {"cut": window.cut, "read": window.read}
        times: dict[str, list] = {k: [] for k in [*variants, "torch"]}
        cpu: dict[str, list] = {k: [] for k in [*variants, "torch"]}
        for _ in range(args.rounds):  # interleaved: every side sees the same load
            for v, (advance, a) in engines.items():
                c0 = time.process_time()
                times[v].append(time_call(advance, a) / args.steps)
                cpu[v].append((time.process_time() - c0) / args.steps)
            if tmodel is not None:
                wall, cpu_s = torch_step_s(tmodel, p)
                times["torch"].append(wall)
                cpu["torch"].append(cpu_s)
        for k, ts in times.items():
            if ts:
                row[f"{k}_step_s"], row[f"{k}_step_all"], row[f"{k}_cpu_s"] = min(ts), ts, min(cpu[k])
        for v in variants:
            if times["torch"]:
                row[f"ratio_step_{v}"] = min(times["torch"]) / min(times[v])
        print(json.dumps({B: row}), flush=True)
        if args.pieces:
            row["pieces_s"] = pieces(p, jmodel, args.rounds)
            print(json.dumps({B: row["pieces_s"]}), flush=True)
        report["batches"][B] = row
    report["load_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
