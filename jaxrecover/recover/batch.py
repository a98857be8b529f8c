"""Running a solver over many examples: pad, shard over devices, compile once per shape, checkpoint,
and turn results into records. The solver itself (``recovery``) is written for one example.

- ``solve_batch``: ``vmap(solve)`` over stacked examples, example axis sharded over ``jax.devices()``
  (padded to a multiple of the device count; padding dropped), window planned from the data
  (``recovery.plan_window``), so a step only recomputes what ``delta`` can change.
- ``run_recovery``: the same in batches of ``batch_size`` and chunks of ``steps_per_chunk``
  steps, with an orbax checkpoint per chunk and one records file per finished batch; a rerun after a
  kill resumes and gives identical results. A progress bar moves every chunk.
- ``result_records``: per-example JSON-able dicts with a ``status`` of ``"recovered"``,
  ``"not_recovered"`` or ``"non_finite"`` (a non-finite loss, gradient or delta: never a recovery).

Several processes (``distributed.initialize``): the example axis is split over every process's
devices (``jax.devices()`` is global), each process passes the same full host batch, and results are
gathered back to every process (``sharding.to_host``), so records, deltas and anything computed from
them are the same in every process and in every layout. Only process 0 writes files (records, run
key, summaries); the orbax checkpoints are written by all processes together, into a folder every
process sees (checked). Which batches are finished is process 0's decision, shared with the others,
so all processes always run the same compiled steps.
"""

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxrecover.runtime import checkpoint as ckpt
from jaxrecover.runtime import distributed as D
from jaxrecover.recover import metrics as M
from jaxrecover.recover import solver as R
from jaxrecover.runtime.sharding import map_batched, pad_batch, replicate, shard_batch, to_host
from jaxrecover.core.sites import Site


def _n(tree: Any) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _place(tree: Any, size: int) -> Any:
    """Pad the leading axis to ``size`` (repeating the last example) and shard it over all (global)
    devices; ``size`` must be a multiple of the device count (``batch_size_for`` gives one)."""
    n_dev = len(jax.devices())
    padded, _ = pad_batch(tree, size) if _n(tree) != size else (tree, size)
    return shard_batch(padded) if n_dev > 1 else padded


def _shared(tree: Any) -> Any:
    """A tree every example uses (model, shared clamps) as a full copy on every global device: a
    no-op in one process (placed once per solve call in several: small next to the solve)."""
    return tree if jax.process_count() == 1 else replicate(tree)


def _place_clamps(clamps: Any, clamp_axes: Any, size: int) -> Any:
    """Per-example clamp arrays padded and sharded like the examples; shared ones replicated."""
    return map_batched(clamps, clamp_axes, lambda c: _place(c, size), replicate)


# Examples per device per compiled call; None: all examples at once. XLA's fp32 matrix products sum
# in an order that depends on their shapes, so on real models the per-device batch size (more than
# the layout) decides the last bits of every result, which the steps then grow: with a fixed value
# the layouts agree (SmolLM2: bitwise; README "Scale-out"). Default: $JAXRECOVER_PER_DEVICE_BATCH, which
# ``jaxrecover --per-device-batch K`` sets after checking it (read at call time: no module state).
PER_DEVICE_BATCH_ENV = "JAXRECOVER_PER_DEVICE_BATCH"
STEPS_PER_CHUNK = 5  # progress bars and checkpoints move every chunk (same result: chunks only split the scan)


def default_per_device_batch() -> int | None:
    value = os.environ.get(PER_DEVICE_BATCH_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def batch_size_for(n: int, batch_size: int, per_device_batch: int | None = None) -> int:
    """``min(batch_size, n)`` rounded up to a multiple of the device count; with
    ``per_device_batch`` (default ``$JAXRECOVER_PER_DEVICE_BATCH``) exactly that many per device."""
    n_dev = len(jax.devices())
    k = default_per_device_batch() if per_device_batch is None else per_device_batch
    if k:
        return k * n_dev
    return -(-min(batch_size, n) // n_dev) * n_dev


def _rows(tree: Any, start: int, stop: int) -> Any:
    return jax.tree.map(lambda a: a[start:stop], tree)


def _axes_key(clamp_axes: Any) -> tuple:
    """A hashable form of a vmap ``in_axes`` prefix for the clamps (``None``: shared by all)."""
    leaves, treedef = jax.tree.flatten(clamp_axes, is_leaf=lambda x: x is None)
    return tuple(leaves), treedef


@functools.lru_cache(maxsize=64)
def _compiled(solver: R.Solver, what: str, window: R.Window, n: int, axes_key: tuple) -> Any:
    ca = jax.tree.unflatten(axes_key[1], axes_key[0])
    if what == "init":
        return jax.jit(jax.vmap(lambda m, e, c: R.init(solver, m, e, c, window), in_axes=(None, 0, ca)))
    if what == "advance":
        fn = lambda m, e, c, x, s: R.advance(solver, m, e, c, x, s, n, window)  # noqa: E731
        return jax.jit(jax.vmap(fn, in_axes=(None, 0, ca, 0, 0)))
    return jax.jit(jax.vmap(lambda m, e, c, x, s: R.finish(solver, m, e, c, x, s, window), in_axes=(None, 0, ca, 0, 0)))


def compiled(solver: R.Solver, what: str, window: R.Window, n: int = 0, clamp_axes: Any = None) -> Any:
    """Jitted ``vmap`` of one solver piece over examples: one compile per (solver, window, shape).
    ``clamp_axes`` is the clamps' ``in_axes`` (``None``: one set of clamps for every example)."""
    return _compiled(solver, what, window, n, _axes_key(clamp_axes))


def solve_batch(solver: R.Solver, model: Any, examples: R.Example, clamps: Mapping[Site, Any],
                window: R.Window | None = None, *, clamp_axes: Any = None, progress: bool = False,
                desc: str = "recover", per_device_batch: int | None = None,
                steps_per_chunk: int = STEPS_PER_CHUNK, store: str | os.PathLike | None = None) -> R.RecoveryResult:
    """All examples at once (``vmap``; sharded and padded when several devices), window planned from
    the data unless given. With ``progress`` the steps run in chunks of ``steps_per_chunk`` under
    a progress bar (same result: the chunks only split the scan); the trace is returned either way.
    With ``per_device_batch`` (default ``$JAXRECOVER_PER_DEVICE_BATCH``) the examples run in calls of exactly that
    many per device (the last one padded): the same shapes on every device in every layout.

    With ``store`` (a folder) the finished result is saved there (``checkpoint.save_result``) under a
    content hash of the solver, model, examples, clamps and their axes, and a call with the same
    inputs reads it back instead of solving (host arrays either way). ``run_recovery`` is the same
    solve for long runs: in batches, checkpointed mid-solve, with records files."""
    if store is not None:
        key = result_key(solver, model, examples, clamps, clamp_axes)
        saved = load_solved(store, key, desc)
        if saved is not None:
            return saved
        res = jax.device_get(_solve(solver, model, examples, clamps, window, clamp_axes=clamp_axes, progress=progress,
                                    desc=desc, per_device_batch=per_device_batch, steps_per_chunk=steps_per_chunk))
        save_solved(store, key, res, desc)
        return res
    return _solve(solver, model, examples, clamps, window, clamp_axes=clamp_axes, progress=progress, desc=desc,
                  per_device_batch=per_device_batch, steps_per_chunk=steps_per_chunk)


def _solve(solver: R.Solver, model: Any, examples: R.Example, clamps: Mapping[Site, Any],
           window: R.Window | None = None, *, clamp_axes: Any = None, progress: bool = False,
           desc: str = "recover", per_device_batch: int | None = None,
           steps_per_chunk: int = STEPS_PER_CHUNK) -> R.RecoveryResult:
    """``solve_batch`` without a store."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    n = _n(examples)
    window = R.plan_window(solver, examples) if window is None else window
    size = batch_size_for(n, n, per_device_batch)
    if n > size:  # fixed per-device batch: one call per group, same window, concatenated
        parts = [_solve(solver, model, _rows(examples, i, i + size),
                             map_batched(clamps, clamp_axes, lambda c: _rows(c, i, i + size), lambda c: c),  # noqa: B023
                             window, clamp_axes=clamp_axes, progress=progress, desc=f"{desc} {i // size + 1}/{-(-n // size)}",
                             per_device_batch=per_device_batch, steps_per_chunk=steps_per_chunk)
                 for i in range(0, n, size)]
        return jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *parts)
    ex = _place(examples, size)
    model = _shared(model)
    clamps = _place_clamps(clamps, clamp_axes, size)
    ctx, state = compiled(solver, "init", window, 0, clamp_axes)(model, ex, clamps)
    steps, traces, done = solver.cfg.steps, [], 0
    bar = tqdm(total=steps * n, desc=desc, disable=not (progress and D.is_writer()), leave=False, unit="ex-step")
    while done < steps:
        k = min(steps_per_chunk if progress else steps, steps - done)
        state, trace = compiled(solver, "advance", window, k, clamp_axes)(model, ex, clamps, ctx, state)
        jax.block_until_ready(state.delta)
        traces.append(trace)
        done += k
        bar.update(k * n)
    bar.close()
    res = compiled(solver, "finish", window, 0, clamp_axes)(model, ex, clamps, ctx, state)
    if jax.process_count() > 1:  # split over processes: gather a full copy into every process
        res, traces = jax.tree.map(jax.numpy.asarray, to_host((res, traces)))
    trace = jax.tree.map(lambda *t: np.concatenate(t, axis=1), *traces) if traces else None
    return jax.tree.map(lambda a: a[:n], dataclasses.replace(res, trace=trace))


# ----------------------------------------------------------------------------- records


def _to_py(x: Any) -> Any:
    x = np.asarray(x)
    v = x.item() if x.ndim == 0 else x.tolist()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def status(recovered: bool, non_finite: bool) -> str:
    return "non_finite" if non_finite else ("recovered" if recovered else "not_recovered")


def result_records(res: R.RecoveryResult, start: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """Per-example JSON-able records from a batched ``RecoveryResult`` (no delta, no trace)."""
    n = _n(res.objective) if n is None else n
    out = []
    for i in range(n):
        m = {k: _to_py(v[i]) for k, v in res.metrics.items()}
        rec = {
            "index": start + i,
            "status": status(bool(res.success[i]), bool(res.non_finite[i])),
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
    """``report.atomic_write_text``: the package's one atomic writer (process 0 only; unique temp
    name, removed on error and, after a SIGKILL, by the next run's ``report.remove_stale_temps``)."""
    from jaxrecover.runtime.report import atomic_write_text

    atomic_write_text(path, text)


def _save_npy(path: Path, array: Any) -> None:
    from jaxrecover.runtime.report import atomic_save_npy

    atomic_save_npy(path, array)


# ----------------------------------------------------------------------------- resumable driver


def load_solved(store: str | os.PathLike, key: str, desc: str = "recover") -> R.RecoveryResult | None:
    """The finished result ``solve_batch(store=...)`` saved under ``key`` (``result_key``), or None."""
    saved = ckpt.load_result(Path(store), key)
    if saved is None:
        return None
    print(f"solve: {desc} (resumed from {Path(store) / key})", file=sys.stderr, flush=True)
    return R.RecoveryResult(**{f.name: saved[0].get(f.name) for f in dataclasses.fields(R.RecoveryResult)})


def save_solved(store: str | os.PathLike, key: str, res: R.RecoveryResult, desc: str = "recover") -> None:
    """Keep a finished (host) result in ``store`` under ``key`` for ``load_solved``."""
    ckpt.save_result(Path(store), key, {f.name: getattr(res, f.name) for f in dataclasses.fields(res)
                                        if getattr(res, f.name) is not None}, {"desc": desc})


def result_key(solver: R.Solver, model: Any, examples: R.Example, clamps: Mapping[Site, Any], clamp_axes: Any = None) -> str:
    """The store key of a finished ``solve_batch``: the run key plus the clamps' vmap axes."""
    import hashlib  # noqa: PLC0415

    axes = hashlib.sha1(str(_axes_key(clamp_axes)).encode()).hexdigest()[:8]
    return f"solve_{_run_key(solver, model, examples, clamps)}_{axes}"


def _run_key(solver: R.Solver, model: Any, examples: R.Example, clamps: Mapping[Site, Any]) -> str:
    """sha256 over everything a run's results depend on: the model's and clamps' arrays (SAE weights,
    features, values), the examples, the solver's settings and the package version."""
    import hashlib

    from jaxrecover._version import __version__

    def name(fn: Any) -> str:  # stable across processes (a function's repr holds its address)
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    h = hashlib.sha256(f"{__version__}|{solver.problem}|{solver.cfg}|{name(solver.objective)}|{name(solver.success)}".encode())
    for tree in (model, examples, {str(k): v for k, v in clamps.items()}):
        for leaf in jax.tree.leaves(tree):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _fresh_unless_same(out: Path, run_id: str, rec_dir: Path, key: str) -> None:
    """Resume only a run made from the same inputs; otherwise drop its records and checkpoints (and
    say so) so that old and new results never mix."""
    import shutil
    import sys

    key_file = out / f"{run_id}_key.txt"
    if D.is_writer():  # process 0 decides and cleans; the others wait for it (same folder, checked)
        old = key_file.read_text().strip() if key_file.exists() else None
        if old is not None and old != key:
            print(f"jaxrecover: {out}/{run_id} was made from other inputs (model, SAE, examples or settings); "
                  "starting fresh", file=sys.stderr)
            shutil.rmtree(rec_dir, ignore_errors=True)
            shutil.rmtree(out / "checkpoints" / run_id, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(key_file, key)
    D.barrier("run-key")


@dataclasses.dataclass
class BatchRun:
    """One finished batch of ``run_recovery``: its records and (host) selected deltas."""

    records: list[dict[str, Any]]
    delta: np.ndarray


def run_recovery(
    solver: R.Solver,
    model: Any,
    examples: R.Example,
    clamps: Mapping[Site, Any],
    out_dir: str | os.PathLike,
    *,
    run_id: str = "recovery",
    batch_size: int = 8,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    stop_after_chunks: int | None = None,
    window: R.Window | None = None,
    per_device_batch: int | None = None,
    steps_per_chunk: int = STEPS_PER_CHUNK,
    checkpoint_every: int = 1,
) -> dict[str, Any] | None:
    """Run ``solver`` over stacked ``examples`` in batches, checkpointing, and write results.

    Writes ``{out_dir}/{run_id}.jsonl`` (one record per example), ``{out_dir}/{run_id}_deltas.npy``
    (the selected deltas, example order) and ``{out_dir}/{run_id}_summary.json``. Each batch is
    checkpointed with orbax every ``checkpoint_every`` chunks of ``steps_per_chunk`` steps and
    its records are written atomically when done; a rerun after a kill at any point skips finished
    batches, restores the latest checkpoint of the current one and continues, giving identical
    results (the solver is deterministic and chunk boundaries do not move). ``stop_after_chunks``
    simulates a kill (returns None after that many chunks). ``per_device_batch`` (default
    ``$JAXRECOVER_PER_DEVICE_BATCH``) replaces ``batch_size`` by that many examples per device.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415 - only needed for long runs

    cfg = solver.cfg
    out = Path(out_dir)
    rec_dir = out / "records" / run_id
    D.check_shared_dir(out)
    n_total = _n(examples)
    bs = batch_size_for(n_total, batch_size, per_device_batch)
    # the batch size is part of the key: a resume in another layout (device count) or with another
    # batch size would read records files that cover other examples
    if steps_per_chunk < 1 or checkpoint_every < 1:
        raise ValueError(f"run_recovery: steps_per_chunk={steps_per_chunk}, checkpoint_every={checkpoint_every}: both must be >= 1.")
    # the chunk length is in the key too: a checkpoint is only resumable on the same chunk boundaries
    _fresh_unless_same(out, run_id, rec_dir, f"{_run_key(solver, model, examples, clamps)}-bs{bs}-chunk{steps_per_chunk}")
    if D.is_writer():
        rec_dir.mkdir(parents=True, exist_ok=True)
    D.barrier("records-dir")
    model, clamps = _shared(model), _place_clamps(clamps, None, 0)
    window = R.plan_window(solver, examples) if window is None else window
    chunks_run = 0
    bar = tqdm(total=n_total * cfg.steps, disable=not (progress and D.is_writer()), desc=run_id, unit="ex-step")
    for b, start in enumerate(range(0, n_total, bs)):
        rec_file = rec_dir / f"batch{b:05d}.jsonl"
        n_real = min(bs, n_total - start)
        if D.broadcast_flag(rec_file.exists(), f"{run_id}/done{b}"):  # every process skips the same batches
            bar.update(n_real * cfg.steps)
            continue
        batch = _place(jax.tree.map(lambda a: a[start : start + n_real], examples), bs)
        ctx, state = compiled(solver, "init", window)(model, batch, clamps)
        mngr = ckpt.open_manager(out / "checkpoints", f"{run_id}/batch{b:05d}")
        restored = ckpt.restore_state(mngr, state)
        done_steps = 0
        if restored is not None:
            done_steps, state = restored
        bar.update(n_real * done_steps)
        n_chunks = 0
        while done_steps < cfg.steps:
            n = min(steps_per_chunk, cfg.steps - done_steps)
            state, _ = compiled(solver, "advance", window, n)(model, batch, clamps, ctx, state)
            done_steps += n
            n_chunks += 1
            chunks_run += 1
            bar.update(n_real * n)
            if n_chunks % checkpoint_every == 0 or done_steps == cfg.steps:
                ckpt.save_state(mngr, done_steps, state)
            if stop_after_chunks is not None and chunks_run >= stop_after_chunks:
                mngr.close()
                bar.close()
                return None
        res = to_host(compiled(solver, "finish", window)(model, batch, clamps, ctx, state))
        _save_npy(rec_dir / f"batch{b:05d}_delta.npy", np.asarray(res.delta)[:n_real])  # before the records: they mark it done
        _write_atomic(rec_file, "".join(json.dumps(r) + "\n" for r in result_records(res, start, n_real)))
        mngr.close()
    bar.close()
    D.barrier("records-written")  # the others read what process 0 wrote
    records, deltas = [], []
    for f in sorted(rec_dir.glob("batch*.jsonl")):
        records.extend(json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line)
        deltas.append(np.load(f.with_name(f.stem + "_delta.npy")))
    records.sort(key=lambda r: r["index"])
    _save_npy(out / f"{run_id}_deltas.npy", np.concatenate(deltas) if deltas else np.zeros((0,)))
    _write_atomic(out / f"{run_id}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "run_id": run_id,
        "config": {k: (v if isinstance(v, (int, float, str, bool)) else repr(v)) for k, v in dataclasses.asdict(cfg).items()},
        "window": dataclasses.asdict(window),
        "problem": {"delta_site": str(solver.problem.delta_site),
                    "clamp_sites": [str(s) for s in solver.problem.clamp_sites],
                    "readout": solver.problem.readout},
        "meta": dict(meta or {}),
        "all": M.summarize(records),
        "valid_flips": M.summarize([r for r in records if r["clamp_flipped"]]),
    }
    _write_atomic(out / f"{run_id}_summary.json", json.dumps(summary, indent=2))
    return summary
